import dataclasses
import random

import pytest

from nas.arch import Arch, Layer, make_divisible
from nas.errors import ArchStringError
from nas.references import REFERENCES, reference


@pytest.mark.parametrize("value,expected", [(5.6, 8), (18, 24), (30, 32), (80 * 2.3, 184), (32 * 0.35, 16), (16 * 1.25, 24)])
def test_make_divisible_worked_examples(value, expected):
    assert make_divisible(value) == expected


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_strings_are_canonical(name):
    arch = reference(name)
    assert arch.to_string() == REFERENCES[name]
    assert Arch.from_json(arch.to_json()) == arch


@pytest.mark.parametrize("space_name", ["mnasnet", "mobilenetv2", "resnet", "tiny"])
def test_string_and_json_round_trip_on_random_points(spaces, space_name):
    space = spaces[space_name]
    rng = random.Random(7)
    for _ in range(300):
        arch = space.decode(space.sample(rng))
        text = arch.to_string()
        assert Arch.parse(text) == arch
        assert Arch.parse(text).to_string() == text
        assert Arch.from_json(arch.to_json()) == arch
        assert Arch.from_json(arch.to_json()).key == arch.key


def test_irrelevant_choices_do_not_change_the_key(spaces):
    space = spaces["mnasnet"]
    params = space.sample(random.Random(3))
    params.update({"s1.op": "conv", "s1.expansion": 3.0})
    other = dict(params, **{"s1.expansion": 6.0})  # expansion means nothing for a regular conv
    assert space.decode(params).key == space.decode(other).key
    # the first layer of a strided stage has no residual to disable
    params["s1.layers"] = 1
    assert space.decode(dict(params, **{"s1.skip": False})).key == space.decode(dict(params, **{"s1.skip": True})).key
    # but a relevant choice does change it
    assert space.decode(dict(params, **{"s1.kernel": 3})).key != space.decode(dict(params, **{"s1.kernel": 5})).key


def test_equal_networks_written_differently_share_a_key():
    merged = Arch.parse("i32-conv_k3_s2_c16_re-ir_n2_k3_e6_c16_re-avg")
    spelled_out = Arch.parse("i32-conv_k3_s2_c16_re-ir_k3_e6_c16_re-ir_k3_e6_c16_re-avg")
    assert merged == spelled_out and merged.key == spelled_out.key
    # an MBConv with expansion 1 is a depthwise-separable conv
    assert Arch.parse("i32-conv_k3_c16_re-ir_k3_e1_c16_re-avg") == Arch.parse("i32-conv_k3_c16_re-ds_k3_c16_re-avg")
    # noskip where no residual is possible is dropped
    assert Arch.parse("i32-conv_k3_c8_re-ds_k3_s2_c16_noskip_re-avg").to_string() == "i32-conv_k3_c8_re-ds_k3_s2_c16_re-avg"


def test_arch_is_immutable():
    arch = reference("mobilenet_v2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.resolution = 64
    assert arch.with_resolution(64).resolution == 64 and arch.resolution == 224
    assert isinstance(arch.layers, tuple) and isinstance(arch.layers[0], Layer)


@pytest.mark.parametrize(
    "text,token,fragment",
    [
        ("", "", "resolution"),
        ("conv_k3_c8_re-avg", "conv_k3_c8_re", "resolution"),
        ("i32-conv_k4_c8_re-avg", "conv_k4_c8_re", "kernel should be one of"),
        ("i32-conv_k3_s3_c8_re-avg", "conv_k3_s3_c8_re", "stride should be 1 or 2 instead of 3"),
        ("i32-foo_k3_c8-avg", "foo_k3_c8", "unknown block type 'foo'"),
        ("i32-ir_k3_c8_re-avg", "ir_k3_c8_re", "missing field 'e'"),
        ("i32-conv_k3_re-avg", "conv_k3_re", "missing field 'c'"),
        ("i32-conv_k3_c8_q1-avg", "conv_k3_c8_q1", "unknown field 'q1'"),
        ("i32-conv_k3_c8_re", "conv_k3_c8_re", "missing the pooling token"),
        ("i32-avg", "i32", "at least one layer"),
        ("i32-conv_k3_c8_k5-avg", "conv_k3_c8_k5", "given twice"),
        ("i32-conv_k3_c8-avg-conv_k3_c8", "conv_k3_c8", "only 'fc_c<width>_<act>'"),
    ],
)
def test_invalid_strings_name_the_token(text, token, fragment):
    with pytest.raises(ArchStringError) as info:
        Arch.parse(text)
    message = str(info.value)
    assert fragment in message and repr(token) in message and "\n" not in message
