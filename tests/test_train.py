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
from nas.train import evaluate, resolve_hparams, train_candidate, warmup_cosine

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
    train_candidate(tiny_arch, HP, Fidelity(2, 0.5, 16), digits, threads=1)
    assert digits.train_steps(0.5, 32) == 22 and len(calls) == 1
