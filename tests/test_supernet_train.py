"""Supernet training, checkpoints and evaluation: resume equality, determinism, bad inputs."""

import random

import pytest
import torch

from conftest import SPACES, run_script
from nas.errors import NasError
from nas.supernet import (Supernet, SupernetEvaluator, SupernetMeta, SupernetRecipe, load_supernet,
                          train_supernet)
from nas.supernet.checkpoint import WEIGHTS, save_tensors, write_meta
from nas.supernet.model import space_fingerprint

QUICK = SupernetRecipe(epochs=2, batch_size=256, random_subnets=2, sort_every=1)  # 5 steps per epoch on digits


def _fake_folder(folder, space, resolution=16):
    """A finished supernet folder without training: untrained weights, complete metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_tensors(folder / WEIGHTS, Supernet(space, 10).state_dict())
    write_meta(folder, SupernetMeta(space.name, space.source, space_fingerprint(space), "digits", 10, resolution, 0,
                                    QUICK.to_dict(), epochs_done=2, complete=True))
    return folder


@pytest.fixture(scope="module")
def digits():
    from nas.data import load_dataset

    return load_dataset("digits")


@pytest.mark.slow
def test_resumed_training_ends_with_the_same_weights(spaces, tmp_path):
    space = spaces["tiny"]
    train_supernet(space, "digits", 16, tmp_path / "straight", recipe=QUICK, threads=1, log=lambda _: None)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_supernet(space, "digits", 16, tmp_path / "resumed", recipe=QUICK, threads=1, log=stop_after_first_epoch)
    with pytest.raises(NasError, match="stopped after epoch 1 of 2"):
        load_supernet(tmp_path / "resumed", space, "digits", 16)
    lines = []
    train_supernet(space, "digits", 16, tmp_path / "resumed", recipe=QUICK, threads=1, log=lines.append)
    assert lines[0].startswith("resuming") and len(lines) == 2
    straight = load_supernet(tmp_path / "straight", space, "digits", 16).state_dict()
    resumed = load_supernet(tmp_path / "resumed", space, "digits", 16).state_dict()
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    with pytest.raises(NasError, match="seed"):  # a finished folder refuses other settings
        train_supernet(space, "digits", 16, tmp_path / "resumed", recipe=QUICK, seed=1, log=lambda _: None)


def test_evaluation_is_deterministic_and_recalibrated(spaces, tmp_path, digits):
    space = spaces["tiny"]
    net = load_supernet(_fake_folder(tmp_path, space), space, "digits", 16)
    archs = [space.decode(space.sample(random.Random(i)), 16) for i in range(6)]
    first = SupernetEvaluator(net, digits, 16).accuracy_many(archs)
    again = SupernetEvaluator(net, digits, 16)
    assert again.accuracy_many(archs[::-1]) == first[::-1]
    assert all(0 <= a <= 1 for a in first)
    import nas.supernet.evaluate as evaluate_module

    chunked = evaluate_module.EVAL_CHUNK
    try:  # a split evaluated in chunks, each behind the same calibration images, scores the same
        evaluate_module.EVAL_CHUNK = 50
        assert SupernetEvaluator(net, digits, 16).accuracy_many(archs) == first
    finally:
        evaluate_module.EVAL_CHUNK = chunked
    # the extracted, recalibrated network scores what the evaluator reported
    from nas.train import validate

    model = again.extract(archs[0]).eval()
    assert validate(model, digits, 16)[0] == pytest.approx(first[0], abs=1e-9)


def test_bad_checkpoints_are_one_line_errors(spaces, tmp_path):
    tiny, mnasnet = spaces["tiny"], spaces["mnasnet"]
    folder = _fake_folder(tmp_path / "ok", tiny)
    errors = []
    for args in ((folder, mnasnet, "digits", 16), (folder, tiny, "digits", 32), (folder, tiny, "cifar10:/x", 16),
                 (tmp_path / "empty", tiny, "digits", 16)):
        with pytest.raises(NasError) as info:
            load_supernet(*args)
        errors.append(str(info.value))
    assert "space" in errors[0] and "mnasnet" in errors[0]
    assert "resolution" in errors[1] and "data" in errors[2] and "no supernet here" in errors[3]
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(NasError, match="not a readable checkpoint") as info:
        load_supernet(folder, tiny, "digits", 16)
    errors.append(str(info.value))
    assert all("\n" not in e for e in errors)


def test_missing_dataset_folder_fails_before_training(spaces, tmp_path):
    with pytest.raises(NasError, match="no such folder"):
        train_supernet(spaces["tiny"], f"cifar10:{tmp_path / 'nope'}", 32, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    result = run_script("train_supernet.py", "--space", str(SPACES / "tiny.yaml"), "--data",
                        f"cifar10:{tmp_path / 'nope'}", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_recipe_round_trips_and_rejects_unknown_keys():
    recipe = SupernetRecipe(epochs=3, distill=0.5)
    assert SupernetRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(NasError, match="unknown key"):
        SupernetRecipe.from_dict({"epochs": 3, "learning_rate": 0.1})


def test_channel_sorting_keeps_the_largest_subnet_and_moves_momentum(spaces):
    from nas.supernet.train import _optimizer, extreme_params

    space = spaces["tiny"]
    torch.manual_seed(0)
    net = Supernet(space, 10)
    arch = space.decode(extreme_params(space, True), 16)
    x = torch.randn(8, 3, 16, 16)
    optimizer = _optimizer(net, QUICK)
    net(x, net.plan(arch)).logsumexp(1).sum().backward()
    optimizer.step()
    block = net.slots["s1_l0"]["ir"]
    momentum = optimizer.state[block.project.conv.weight]["momentum_buffer"].clone()
    importance = block.project.conv.weight.detach().abs().sum(dim=(0, 2, 3))
    net.eval()
    with torch.no_grad():
        before = net(x, net.plan(arch))
        net.sort_channels(optimizer)
        after = net(x, net.plan(arch))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    order = torch.argsort(importance, descending=True, stable=True)
    torch.testing.assert_close(optimizer.state[block.project.conv.weight]["momentum_buffer"], momentum[:, order])
    sorted_importance = block.project.conv.weight.detach().abs().sum(dim=(0, 2, 3))
    assert torch.all(sorted_importance[:-1] >= sorted_importance[1:])


def test_export_with_inherited_weights(spaces, tmp_path):
    import json

    space = spaces["tiny"]
    folder = _fake_folder(tmp_path / "sn", space)
    arch = space.decode(space.sample(random.Random(2)), 16)
    result = run_script("export.py", arch.to_string(), "--init-from", str(folder), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["parity_rel_max_abs"] < 1e-4 and report["arch"] == arch.to_string()
    outside = run_script("export.py", "mobilenet_v2", "--init-from", str(folder), "--out", str(tmp_path / "x.onnx"))
    assert outside.returncode == 2 and "not a subnet" in outside.stderr


def test_shared_prefixes_are_reused_bit_for_bit(spaces, tmp_path, digits):
    from nas.supernet.elastic import Pass

    space = spaces["tiny"]
    net = load_supernet(_fake_folder(tmp_path, space), space, "digits", 16)
    evaluator = SupernetEvaluator(net, digits, 16)
    base = space.sample(random.Random(0))
    points = [base, base | {"s2.kernel": 5 if base["s2.kernel"] == 3 else 3}, base | {"s1.se": 0.25 - base["s1.se"]}]
    with torch.inference_mode():
        for params in points:
            arch = space.decode(params, 16)
            direct = net(evaluator._batches[0], net.plan(arch), Pass(calibrate=evaluator._n))[evaluator._n:]
            assert torch.equal(evaluator._logits(arch), direct)
    assert len(evaluator._prefixes) >= 3  # stem and stage ends of the first, reused by the others


def test_killed_after_the_last_checkpoint_finishes_without_training(spaces, tmp_path):
    from nas.supernet.checkpoint import CHECKPOINT
    from nas.supernet.train import _optimizer

    space = spaces["tiny"]
    torch.manual_seed(0)
    net = Supernet(space, 10)
    save_tensors(tmp_path / CHECKPOINT, {"model": net.state_dict(), "optimizer": _optimizer(net, QUICK).state_dict(),
                                         "epoch": QUICK.epochs})
    write_meta(tmp_path, SupernetMeta(space.name, space.source, space_fingerprint(space), "digits", 10, 16, 0,
                                      QUICK.to_dict(), epochs_done=QUICK.epochs - 1))
    lines = []
    train_supernet(space, "digits", 16, tmp_path, recipe=QUICK, log=lines.append)
    assert len(lines) == 1 and not (tmp_path / CHECKPOINT).exists()
    loaded = load_supernet(tmp_path, space, "digits", 16).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())


def test_health_averages_random_subnets_and_flags_scores_near_chance(spaces, tmp_path, digits):
    from types import SimpleNamespace

    from nas.supernet import supernet_health

    space = spaces["tiny"]

    class Scored:  # an evaluator whose subnets score what the test says
        supernet, resolution = SimpleNamespace(space=space, num_classes=10), 16

        def __init__(self, scores):
            self.scores, self.archs = scores, []

        def accuracy_many(self, archs):
            self.archs += archs
            return self.scores[:len(archs)]

    working = Scored([0.5, 0.9, 0.7, 0.3])
    health = supernet_health(working, seed=3, subnets=4)
    assert (health.mean, health.low, health.high, health.chance) == (pytest.approx(0.6), 0.3, 0.9, 0.1)
    assert not health.near_chance and len({a.to_string() for a in working.archs}) == 4
    assert all(a.resolution == 16 for a in working.archs)
    # a quarter of the way from chance (10%) to 100% is the line: 32.5%
    assert supernet_health(Scored([0.32] * 4), subnets=4).near_chance
    assert not supernet_health(Scored([0.33] * 4), subnets=4).near_chance
    # the same seed draws the same subnets
    again = Scored([0.5] * 4)
    supernet_health(again, seed=3, subnets=4)
    assert [a.to_string() for a in again.archs] == [a.to_string() for a in working.archs]
    # an untrained supernet scores its subnets near chance
    untrained = load_supernet(_fake_folder(tmp_path, space), space, "digits", 16)
    assert supernet_health(SupernetEvaluator(untrained, digits, 16), subnets=5).near_chance
