"""Proxy training: seeded, isolated failures, early stopping, the evaluation helper, the train script."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SPACES, run_script
from nas import train as train_module
from nas.data import load_dataset
from nas.errors import NasError
from nas.fidelity import Fidelity
from nas.space import load_space
from nas.train import (Recipe, default_recipe, evaluate, resolve_hparams, seed_agreement, train_candidate, validate,
                       warmup_cosine)

TINY = Fidelity(epochs=2, fraction=0.2, resolution=16)
HP = {"optimizer": "sgd", "lr": 0.05, "batch_size": 32}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny_arch():
    space = load_space(SPACES / "tiny.yaml")
    return space.decode(space.sample(random.Random(1)))


def test_same_seed_same_accuracy_other_seed_other_run(digits, tiny_arch):
    a = train_candidate(tiny_arch, HP, TINY, digits, seed=0, threads=1)
    b = train_candidate(tiny_arch, HP, TINY, digits, seed=0, threads=1)
    c = train_candidate(tiny_arch, HP, TINY, digits, seed=1, threads=1)
    assert not a.failed and a.epochs == 2 and len(a.val_accuracies) == 2
    assert a.accuracy == b.accuracy and a.train_losses == b.train_losses and a.val_losses == b.val_losses
    assert c.train_losses != a.train_losses
    assert 0 <= a.accuracy <= 1 and a.images_per_second > 0 and a.seconds > 0
    assert a.model is None  # only on request


def test_training_learns_digits(digits, tiny_arch):
    result = train_candidate(tiny_arch, {"optimizer": "adam", "lr": 0.003, "batch_size": 32},
                             Fidelity(3, 0.5, 16), digits, threads=1)
    assert result.accuracy > 0.6, result  # chance is 0.1
    assert result.train_losses[-1] < result.train_losses[0]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_every_optimizer_trains(digits, tiny_arch, optimizer):
    result = train_candidate(tiny_arch, {"optimizer": optimizer, "lr": 0.003}, Fidelity(1, 0.1, 16), digits, threads=1)
    assert not result.failed and result.accuracy is not None


def test_training_leaves_global_state_alone(digits, tiny_arch):
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    train_candidate(tiny_arch, HP, Fidelity(1, 0.1, 16), digits, threads=1)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def test_a_diverging_candidate_fails_with_a_reason_and_does_not_raise(digits, tiny_arch):
    result = train_candidate(tiny_arch, {"optimizer": "sgd", "lr": 1e6, "batch_size": 32}, TINY, digits, threads=1)
    assert result.failed and result.accuracy is None
    assert "non-finite training loss" in result.error and "lr 1e+06" in result.error
    assert result.to_dict()["failed"] is True


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 10)

    def forward(self, x):
        return self.linear(x.mean((2, 3))) * float("nan")


class BrokenModel(NaNModel):
    def forward(self, x):
        raise RuntimeError("shape mismatch in block 3")


@pytest.mark.parametrize("model, reason", [(NaNModel, "non-finite training loss"), (BrokenModel, "RuntimeError: shape mismatch in block 3")])
def test_a_broken_model_fails_that_candidate_only(digits, tiny_arch, monkeypatch, model, reason):
    monkeypatch.setattr(train_module, "build_model", lambda *args, **kwargs: model())
    result = train_candidate(tiny_arch, HP, TINY, digits, threads=1)
    assert result.failed and reason in result.error and result.epochs == 0


def test_user_mistakes_in_hyperparameters_raise(digits, tiny_arch):
    for bad, message in [({"optimizer": "rmsprop"}, "optimizer should be one of"), ({"momentum": 0.8}, "unknown training"),
                         ({"lr": -1}, "lr must be"), ({"batch_size": 1}, "batch_size")]:
        with pytest.raises(NasError, match=message):
            train_candidate(tiny_arch, bad, TINY, digits)
    assert resolve_hparams(None) == train_module.DEFAULT_HPARAMS


def test_the_epoch_callback_can_stop_training(digits, tiny_arch):
    seen = []

    def stop_after_first(stats):
        seen.append(stats)
        return False

    result = train_candidate(tiny_arch, HP, Fidelity(3, 0.1, 16), digits, threads=1, on_epoch=stop_after_first)
    assert result.stopped_early and result.epochs == 1 and not result.failed
    assert [s.epoch for s in seen] == [1] and seen[0].val_accuracy == result.accuracy
    # returning None (or True) keeps going
    result = train_candidate(tiny_arch, HP, Fidelity(2, 0.1, 16), digits, threads=1, on_epoch=lambda s: None)
    assert not result.stopped_early and result.epochs == 2


def test_returned_model_and_evaluate_agree(digits, tiny_arch):
    result = train_candidate(tiny_arch, HP, TINY, digits, threads=1, return_model=True)
    model = result.model
    assert not model.training

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    assert evaluate(predict, digits, TINY.resolution) == pytest.approx(result.accuracy)
    # a predictor may also return labels
    assert evaluate(lambda x: predict(x).argmax(1), digits, 16) == pytest.approx(result.accuracy)
    assert evaluate(lambda x: np.zeros(len(x), dtype=np.int64), digits, 16) == pytest.approx(
        float((digits.val.labels == 0).float().mean()))
    # the test split is scored the same way, on its own images
    assert evaluate(predict, digits, 16, split="test") == pytest.approx(validate(model, digits, 16, split="test")[0])
    assert evaluate(lambda x: np.zeros(len(x), dtype=np.int64), digits, 16, split="test") == pytest.approx(
        float((digits.test.labels == 0).float().mean()))
    with pytest.raises(NasError, match="split should be one of val, test"):
        evaluate(predict, digits, 16, split="train")


def test_recipe_round_trips_and_names_a_bad_field():
    recipe = default_recipe("digits")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.fidelity(24) == Fidelity(recipe.epochs, 1.0, 24)
    for key, value, message in [("optimizer", "rmsprop", "recipe optimizer must be one of sgd, adam, adamw"),
                                ("lr", 0, "recipe lr must be a positive number"),
                                ("warmup_share", 1.0, "recipe warmup_share"), ("grad_clip", -1, "recipe grad_clip"),
                                ("epochs", 2.5, "recipe epochs"), ("augment", "yes", "recipe augment")]:
        with pytest.raises(NasError, match=message):
            Recipe(**{key: value})
    with pytest.raises(NasError, match=r"unknown recipe key\(s\) \['momentum'\]"):
        Recipe.from_dict({**recipe.to_dict(), "momentum": 0.8})
    for spec in ("digits", "cifar10:/x", "imagefolder:/y"):
        assert isinstance(default_recipe(spec), Recipe)


def test_hparams_replace_the_recipes_optimizer_lr_and_batch(digits, tiny_arch):
    hp = {"optimizer": "adam", "lr": 0.003, "batch_size": 32}
    recipe = Recipe(grad_clip=2.0, epochs=4)
    assert recipe.with_hparams(hp) == Recipe(optimizer="adam", lr=0.003, batch_size=32, weight_decay=0.0, grad_clip=2.0, epochs=4)
    a = train_candidate(tiny_arch, hp, TINY, digits, recipe=recipe, threads=1)
    b = train_candidate(tiny_arch, None, TINY, digits, recipe=recipe.with_hparams(hp), threads=1)
    assert a.train_losses == b.train_losses
    # without hparams the recipe decides: another recipe, another run
    c = train_candidate(tiny_arch, None, TINY, digits, recipe=recipe, threads=1)
    assert c.train_losses != a.train_losses


def test_gradient_clipping_changes_the_run_only_when_it_binds(digits, tiny_arch):
    free = train_candidate(tiny_arch, None, TINY, digits, recipe=Recipe(), threads=1)
    loose = train_candidate(tiny_arch, None, TINY, digits, recipe=Recipe(grad_clip=1e9), threads=1)
    tight = train_candidate(tiny_arch, None, TINY, digits, recipe=Recipe(grad_clip=1e-3), threads=1)
    assert loose.train_losses == free.train_losses and tight.train_losses != free.train_losses


def test_init_starts_from_given_weights(digits, tiny_arch):
    trained = train_candidate(tiny_arch, None, Fidelity(3, 0.5, 16), digits, recipe=Recipe(), threads=1,
                              return_model=True)
    # a learning rate too small to move the weights: fine-tuning keeps what the init already knew
    still = Recipe(lr=1e-9)
    from_init = train_candidate(tiny_arch, None, Fidelity(1, 0.1, 16), digits, recipe=still, init=trained.model, threads=1)
    from_state = train_candidate(tiny_arch, None, Fidelity(1, 0.1, 16), digits, recipe=still,
                                 init=trained.model.state_dict(), threads=1)
    scratch = train_candidate(tiny_arch, None, Fidelity(1, 0.1, 16), digits, recipe=still, threads=1)
    assert from_init.accuracy == from_state.accuracy
    assert from_init.accuracy > 0.5 > scratch.accuracy, (from_init.accuracy, scratch.accuracy)
    space = load_space(SPACES / "tiny.yaml")
    other = space.decode(space.sample(random.Random(7)))
    assert other.to_string() != tiny_arch.to_string()
    with pytest.raises(NasError, match="init weights do not fit this architecture"):
        train_candidate(other, None, TINY, digits, recipe=still, init=trained.model, threads=1)


def test_seed_agreement_counts_diverging_runs_and_rank_agreement():
    acc = np.array([[0.9, 0.91, 0.9], [0.5, 0.52, 0.51], [0.7, 0.2, 0.71], [0.3, 0.31, np.nan]])
    out = seed_agreement(acc)
    assert out["outlier_runs"] == 2 and out["failed_runs"] == 1  # 0.2 under 0.71, and the failure (0 under 0.31)
    assert out["archs"] == 4 and out["seeds"] == 3 and len(out["kendall_pairs"]) == 3
    same = seed_agreement(np.array([[0.9, 0.91], [0.5, 0.52], [0.7, 0.71]]))
    assert same["kendall_between_seeds"] == 1.0 and same["outlier_runs"] == 0
    flipped = seed_agreement(np.array([[0.9, 0.5], [0.5, 0.9], [0.7, 0.7]]))
    assert flipped["kendall_between_seeds"] < 0


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100)
    assert f(0) == pytest.approx(0.2)  # 5 warm-up steps
    assert f(4) == pytest.approx(1.0) and f(5) == pytest.approx(1.0)
    assert f(52) == pytest.approx(0.5, abs=0.02)
    assert f(99) < 0.01 and all(f(i) >= f(i + 1) for i in range(5, 99))


# --- scripts/train.py end to end ------------------------------------------------------------------


def test_train_script_writes_json(tmp_path, tiny_arch):
    arch_file = tmp_path / "best.json"
    arch_file.write_text(json.dumps({"arch": tiny_arch.to_string(), "accuracy": 0.5}))
    out = tmp_path / "result.json"
    proc = run_script("train.py", str(arch_file), "--data", "digits", "--epochs", "2", "--fraction", "0.1",
                      "--resolution", "16", "--threads", "1", "--optimizer", "adam", "--lr", "0.003", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/2" in proc.stdout and "epoch 2/2" in proc.stdout
    result = json.loads(out.read_text())
    assert {"accuracy", "epochs", "seconds", "images_per_second", "arch", "fidelity", "hparams", "data"} <= set(result)
    assert result["epochs"] == 2 and 0 <= result["accuracy"] <= 1
    assert result["fidelity"] == {"epochs": 2, "fraction": 0.1, "resolution": 16}
    assert result["hparams"] == {"optimizer": "adam", "lr": 0.003, "batch_size": 64}
    assert result["arch"] == tiny_arch.with_resolution(16).to_string()


@pytest.mark.parametrize(
    "args, message",
    [
        (["no_such_net", "--epochs", "1"], "unknown architecture 'no_such_net'"),
        (["mobilenet_v2", "--data", "cifar10:/no/such/dir", "--epochs", "1"], "/no/such/dir: no such folder"),
        (["mobilenet_v2", "--epochs", "0"], "epochs must be a positive integer"),
    ],
)
def test_train_script_exits_2_with_one_line_on_bad_input(args, message):
    proc = run_script("train.py", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_batchnorm_statistics_are_recalibrated_from_the_current_weights(digits, tiny_arch):
    from nas.builder import build_model

    model = build_model(tiny_arch, 10).to(memory_format=torch.channels_last)
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    first.running_mean.fill_(100.0)  # stale statistics, as after a few training steps
    inputs = []
    first.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    train_module.recalibrate_batchnorm(model, digits, 1.0, 16)
    seen = torch.cat(inputs)
    assert len(seen) == train_module.BN_CALIBRATION_IMAGES and len(inputs) > 1  # in equal batches
    assert torch.allclose(first.running_mean, seen.mean((0, 2, 3)), atol=1e-4)
    assert first.momentum == 0.1


def test_only_short_runs_recalibrate(digits, tiny_arch, monkeypatch):
    calls = []
    real = train_module.recalibrate_batchnorm
    monkeypatch.setattr(train_module, "recalibrate_batchnorm", lambda *a: calls.append(a) or real(*a))
    # 22 steps per epoch: after epoch 1, 0.9**22 = 10% of the running statistics are still their start
    # values; after epoch 2, 0.9**44 < 1% and the running averages are kept
    train_candidate(tiny_arch, HP, Fidelity(2, 0.56, 16), digits, threads=1)
    assert digits.train_steps(0.56, 32) == 22 and len(calls) == 1


def test_bench_supernet_refuses_a_truth_it_cannot_use_in_one_line(tmp_path):
    space = SPACES / "tiny.yaml"
    cases = [(None, "no such truth file; run without --truth"), ("{not json", "not a JSON truth file"),
             (json.dumps({"space_hash": "0" * 16}), "space_hash is '0000000000000000', this run needs")]
    for content, message in cases:
        truth = tmp_path / "truth.json"
        truth.unlink(missing_ok=True)
        if content is not None:
            truth.write_text(content)
        proc = run_script("bench_supernet.py", "--space", str(space), "--truth", str(truth), "--json", str(tmp_path / "o.json"))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.json").exists()
    proc = run_script("bench_supernet.py", "--archs", "2")
    assert proc.returncode == 2 and "--archs must be at least 4, got 2" in proc.stderr
