"""Supernet: extraction parity on every shipped space, subnet plans, unsupported spaces."""

import dataclasses
import random

import pytest
import torch

from nas.arch import Arch
from nas.errors import NasError
from nas.supernet import Supernet, check_supported, extract
from nas.supernet.elastic import Pass

# resolution per space: small enough to be fast, large enough for every stride
RESOLUTION = {"tiny": 16, "mnasnet": 32, "mobilenetv2": 32, "resnet": 64}


def _perturbed(space) -> Supernet:
    """A supernet whose BatchNorm statistics and kernel transforms are not the identity."""
    torch.manual_seed(0)
    net = Supernet(space, 10)
    with torch.no_grad():
        for name, t in net.named_parameters():
            if "transforms" in name:
                t.add_(0.05 * torch.randn_like(t))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("name", sorted(RESOLUTION))
def test_extracted_subnet_matches_the_supernet(spaces, name):
    space = spaces[name]
    net = _perturbed(space)
    rng = random.Random(1)
    archs = [space.decode(space.sample(rng), resolution=RESOLUTION[name]) for _ in range(3)]
    for arch in archs:
        x = torch.randn(6, 3, arch.resolution, arch.resolution)
        with torch.no_grad():
            expected = net(x, net.plan(arch))
            model = extract(net, arch).eval()
            assert (model(x) - expected).abs().max().item() <= 1e-5, arch
            # a calibration pass: statistics of the first 6 images, applied to the rest
            ctx = Pass(calibrate=6, stats={})
            calibrated = net(torch.cat([x, x.flip(0)]), net.plan(arch), ctx)[6:]
            recalibrated = extract(net, arch, stats=ctx.stats).eval()
            assert (recalibrated(x.flip(0)) - calibrated).abs().max().item() <= 1e-5, arch
            assert (calibrated - net(x.flip(0), net.plan(arch))).abs().max().item() > 1e-3  # statistics matter


def test_smaller_kernel_is_the_transformed_centre(spaces):
    net = Supernet(spaces["mobilenetv2"], 10)
    conv = net.slots["s1_l0"]["ir"].depthwise.conv
    assert conv.kernels == (7, 5, 3)
    torch.testing.assert_close(conv.kernel(8, 8, 5), conv.weight[:8, :, 1:6, 1:6])  # identity at the start
    with torch.no_grad():
        conv.transforms["5"].mul_(2.0)
    torch.testing.assert_close(conv.kernel(8, 8, 3), 2 * conv.weight[:8, :, 2:5, 2:5])


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("size,stride", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_kernel_taps_beyond_a_small_map_are_dropped_without_changing_the_output(depthwise, size, stride):
    from nas.supernet.elastic import ElasticConv

    torch.manual_seed(0)
    conv = ElasticConv(6, 6, (7, 5, 3), stride, depthwise=depthwise)
    x = torch.randn(3, 6, size, size)
    for k in (7, 5, 3):
        full = torch.nn.functional.conv2d(x, conv.kernel(6, 6, k), None, stride, k // 2, 1, 6 if depthwise else 1)
        torch.testing.assert_close(conv(x, 6, k), full, rtol=0, atol=1e-6)


def test_plan_uses_the_first_slots_of_each_stage(spaces):
    space = spaces["tiny"]
    net = Supernet(space, 10)
    params = space.sample(random.Random(0)) | {"s0.layers": 1, "s1.layers": 2, "s2.layers": 1}
    plan = net.plan(space.decode(params))
    assert [slot for slot, _ in plan.steps] == ["stem0", "s0_l0", "s1_l0", "s1_l1", "s2_l0", "head"]


def test_arch_outside_the_space_is_a_one_line_error(spaces):
    space = spaces["tiny"]
    net = Supernet(space, 10)
    arch = space.decode(space.sample(random.Random(0)))
    wide = dataclasses.replace(arch, layers=(arch.layers[0].replace(out=999), *arch.layers[1:]))
    with pytest.raises(NasError, match="not a subnet of .*tiny.yaml") as info:
        net.plan(wide)
    assert "\n" not in str(info.value)
    with pytest.raises(NasError, match="not a subnet"):
        net.plan(Arch.parse("i16-conv_k3_s2_c16_re-avg"))


def test_unsupported_space_names_the_decision(spaces):
    stage = spaces["tiny"].stages[1]
    even = dataclasses.replace(stage, choices={**stage.choices, "kernel": (3, 4)})
    space = dataclasses.replace(spaces["tiny"], stages=(spaces["tiny"].stages[0], even, spaces["tiny"].stages[2]))
    with pytest.raises(NasError, match=r"stages\[1\]\.kernel"):
        check_supported(space)
    for name in RESOLUTION:
        check_supported(spaces[name])
