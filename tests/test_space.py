import random
from pathlib import Path

import pytest
import yaml

from conftest import SPACES, run_script
from nas.errors import SpaceError
from nas.references import reference
from nas.space import load_space


def test_shipped_spaces_load_and_declare_what_every_space_needs(spaces):
    for name, space in spaces.items():
        assert space.resolution > 0
        assert min(space.width_mult) >= 0.35 and max(space.width_mult) <= 1.4 and len(space.width_mult) > 1
        kinds = {d.name: d.kind for d in space.hyperparameters}
        assert kinds == {"hp.optimizer": "categorical", "hp.lr": "log_float", "hp.batch_size": "int"}, name
        assert space.size() > 1


def test_mnasnet_space_is_the_factorised_hierarchical_space(spaces):
    space = spaces["mnasnet"]
    assert len(space.stages) == 7 and space.choice_per == "block"
    mv2 = [(16, 1, 1), (24, 2, 2), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
    for stage, (channels, layers, stride) in zip(space.stages, mv2):
        assert (stage.channels, stage.stride) == (channels, stride)
        assert set(stage.choices["layers"]) == {n for n in (layers - 1, layers, layers + 1) if n >= 1}
        assert stage.choices["op"] == ("conv", "ds", "ir") and stage.choices["expansion"] == (3.0, 6.0)
        assert stage.choices["kernel"] == (3, 5) and stage.choices["se"] == (0.0, 0.25)
        assert stage.choices["skip"] == (False, True) and stage.choices["width"] == (0.75, 1.0, 1.25)


def test_mobilenet_v2_is_a_point_of_the_per_layer_space(spaces):
    space = spaces["mobilenetv2"]
    depths = [1, 2, 3, 4, 3, 3, 1]
    params = {}
    for d in space.decisions:
        leaf = d.name.split(".")[-1]
        if d.is_hyperparameter:
            params[d.name] = d.sample(random.Random(0))
        elif d.name == "width_mult" or leaf == "width":
            params[d.name] = 1.0
        elif leaf == "layers":
            params[d.name] = depths[int(d.name[1])]
        elif leaf == "kernel":
            params[d.name] = 3
        elif leaf == "expansion":
            params[d.name] = 1.0 if d.name.startswith("s0.") else 6.0
    assert space.contains(params)
    assert space.decode(params) == reference("mobilenet_v2")


@pytest.mark.parametrize("name", ["mnasnet", "mobilenetv2", "tiny"])
def test_sampling_mutation_crossover_are_seeded_and_stay_in_the_space(spaces, name):
    space = spaces[name]
    first = [space.sample(random.Random(5)) for _ in range(3)]
    again = [space.sample(random.Random(5)) for _ in range(3)]
    assert first == again
    rng, rng2 = random.Random(11), random.Random(11)
    a, b = space.sample(rng), space.sample(rng)
    a2, b2 = space.sample(rng2), space.sample(rng2)
    for _ in range(50):
        child = space.mutate(a, rng)
        assert child == space.mutate(a2, rng2)
        assert space.contains(child)
        assert space.candidate_key(child) != space.candidate_key(a)  # a mutation changes the candidate
        mix = space.crossover(a, b, rng)
        assert mix == space.crossover(a2, b2, rng2) and space.contains(mix)
        assert all(mix[k] in (a[k], b[k]) for k in mix)
        a, a2 = child, child


def test_size_counts_distinct_architectures_of_a_small_space(tmp_path):
    text = (SPACES / "tiny.yaml").read_text()
    data = yaml.safe_load(text)
    data["width_mult"] = [0.5, 1.0]
    data["defaults"].update(op=["conv", "ir"], expansion=[3, 6], kernel=[3], se=[0], skip=[True], width=[1.0])
    data["stages"] = [{"channels": 16, "stride": 2, "layers": [1, 2]}]
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    # per layer: conv, ir e3, ir e6 = 3 options; 2 depths -> 3 + 3 = 6 (shared per block); x 2 width_mult
    assert space.size() == 12
    seen = {space.decode(space.sample(random.Random(i))).key for i in range(400)}
    assert len(seen) == 12


BAD_SPACES = [
    # (edit applied to tiny.yaml's text or data, key named in the message, fragment of the message)
    (lambda t: t.replace("resolution: 16", "resolution: [16"), "line", "YAML syntax error"),
    (lambda d: d["defaults"].update(op=["conv", "transformer"]), "stages[0].op", "'transformer' is not allowed"),
    (lambda d: d["defaults"].update(kernel=[3, 4]), "stages[0].kernel", "4 is not allowed"),
    (lambda d: d["stages"][1].update(stride=3), "stages[1].stride", "3 is not allowed"),
    (lambda d: d["defaults"].update(se=[]), "stages[0].se", "empty"),
    (lambda d: d.pop("stages"), "stages", "missing required key"),
    (lambda d: d.update(colour="red"), "colour", "unknown key"),
    (lambda d: d["stages"][0].update(depth=3), "stages[0].depth", "unknown key"),
    (lambda d: d["stem"][0].update(op="ir"), "stem[0].op", "'ir' is not allowed"),
    (lambda d: d["hyperparameters"]["lr"].update(low=0.0), "hyperparameters.lr.low", "positive"),
    (lambda d: d["hyperparameters"].pop("batch_size"), "hyperparameters.batch_size", "missing required key"),
    (lambda d: d["head"].update(pool="max"), "head.pool", "'max' is not allowed"),
    (lambda d: d["defaults"].pop("kernel"), "stages[0].kernel", "missing"),
]


def _write_bad_space(tmp_path: Path, edit) -> Path:
    text = (SPACES / "tiny.yaml").read_text()
    path = tmp_path / "bad.yaml"
    if edit.__code__.co_varnames[0] == "t":
        path.write_text(edit(text))
    else:
        data = yaml.safe_load(text)
        edit(data)
        path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit,key,fragment", BAD_SPACES)
def test_invalid_space_files_raise_one_line_naming_file_and_key(tmp_path, edit, key, fragment):
    path = _write_bad_space(tmp_path, edit)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(str(path)) and key in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("edit,key,fragment", BAD_SPACES)
def test_scripts_exit_2_with_one_line_on_a_bad_space(tmp_path, edit, key, fragment):
    path = _write_bad_space(tmp_path, edit)
    result = run_script("describe.py", "--space", str(path), "--sample", "1")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and key in lines[0] and fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_space_file_is_a_clear_error(tmp_path):
    result = run_script("describe.py", "--space", str(tmp_path / "nope.yaml"), "--sample", "1")
    assert result.returncode == 2 and "nope.yaml" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("payload", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", b"name: x\x00\x00\x01"])
def test_binary_space_file_is_one_line_not_a_decode_traceback(tmp_path, payload):
    path = tmp_path / "space.yaml"
    path.write_bytes(payload)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "not a text file" in message and "\n" not in message
