"""Proxy training: train one candidate at a fidelity and report its validation accuracy.

How a network is trained is a ``Recipe`` (optimizer, schedule, regularisation, augmentation): one
fixed recipe per dataset (``default_recipe``) serves candidates, final trainings and baselines
alike, so their accuracies compare; hyperparameters proposed by a search (``hparams``) override its
optimizer, learning rate and batch size.

A candidate's own failure (a non-finite loss, an exception in its model) is returned as a failed
``TrainResult`` with a reason, never raised, so a search goes on; only the user's mistakes (unknown
optimizer, unreadable data) raise ``NasError``. Training is seeded and leaves no trace in global
state: torch's RNG and thread count are restored afterwards, so the same seed and thread count give
the same accuracy whatever ran before.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from nas.arch import Arch
from nas.builder import build_model
from nas.data import Dataset
from nas.errors import NasError
from nas.fidelity import Fidelity

OPTIMIZERS = ("sgd", "adam", "adamw")
# The default proxy budget, tuned so mobilenet_v2 at 32x32 on digits clears 95% validation accuracy
# well inside 60 s on a 2-core CPU (docs/training.md has the measurement).
DEFAULT_FIDELITY = Fidelity(epochs=8, fraction=1.0, resolution=32)
DEFAULT_HPARAMS: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "batch_size": 64}
WEIGHT_DECAY = {"sgd": 4e-5, "adam": 0.0, "adamw": 0.01}
EVAL_BATCH = 256
BN_CALIBRATION_IMAGES = 512
BN_MOMENTUM = 0.1  # torch's default, which the builder keeps
BN_STALE_SHARE = 0.01  # recalibrate while the running statistics hold more of their start than this


@dataclass(frozen=True)
class Recipe:
    """How a network is trained. The fidelity passed with it sets how long (epochs, data share,
    resolution); ``epochs`` is the recipe's own full budget, the one final trainings use."""

    optimizer: str = "sgd"  # sgd (momentum 0.9, Nesterov) | adam | adamw
    lr: float = 0.05  # peak learning rate, reached after the warm-up
    weight_decay: float = 4e-5
    batch_size: int = 64
    warmup_share: float = 0.05  # linear warm-up over this share of all steps, then cosine to zero
    epochs: int = 6
    label_smoothing: float = 0.1
    dropout: float = 0.2  # before the classifier
    grad_clip: float | None = None  # clip the gradients' global L2 norm to this; None: no clipping
    augment: bool = True  # the dataset's own augmentation (crop + flip for natural images, none for digits)

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (_number(self.lr) and self.lr > 0, "lr", "a positive number"),
            (_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0"),
            (isinstance(self.batch_size, int) and self.batch_size >= 2, "batch_size", "an integer of at least 2"),
            (_number(self.warmup_share) and 0 <= self.warmup_share < 1, "warmup_share", "a number in [0, 1)"),
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "a positive integer"),
            (_number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label_smoothing", "a number in [0, 1)"),
            (_number(self.dropout) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)"),
            (self.grad_clip is None or (_number(self.grad_clip) and self.grad_clip > 0), "grad_clip", "a positive number or null"),
            (isinstance(self.augment, bool), "augment", "true or false"),
        ]
        for ok, key, allowed in checks:
            if not ok:
                raise NasError(f"recipe {key} must be {allowed}, got {getattr(self, key)!r}")

    def with_hparams(self, hparams: dict[str, Any]) -> "Recipe":
        """This recipe with a search's optimizer, lr and batch size (and that optimizer's weight decay)."""
        hp = resolve_hparams(hparams)
        return dataclasses.replace(self, optimizer=hp["optimizer"], lr=float(hp["lr"]), batch_size=hp["batch_size"],
                                   weight_decay=WEIGHT_DECAY[hp["optimizer"]])

    def fidelity(self, resolution: int) -> Fidelity:
        """The recipe's full budget at ``resolution``: all of the training split for ``epochs``."""
        return Fidelity(self.epochs, 1.0, resolution)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise NasError(f"unknown recipe key(s) {sorted(unknown)}; known: {sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**data)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What search-proposed hyperparameters trained with before the fixed recipe: the "before" of
# docs/training.md's seed-stability figures, kept so that measurement can be repeated.
LEGACY_RECIPE = Recipe()


# The fixed recipe (docs/training.md has the seed-stability measurements behind it): against the
# legacy one, twice the optimizer steps per epoch at about the same cost (batch 32), a longer warm-up
# and gradient clipping, which keep deep plain-convolution candidates from diverging early.
FIXED_RECIPE = Recipe(batch_size=32, warmup_share=0.1, grad_clip=2.0)


def default_recipe(data: str) -> Recipe:
    """The fixed recipe for a data spec (``digits``, ``cifar10:PATH``, ``imagefolder:PATH``): the same
    optimizer and schedule for every dataset; augmentation is each dataset's own (``Dataset.flip``,
    ``crop_padding``)."""
    return FIXED_RECIPE


@dataclass(frozen=True)
class EpochStats:
    """What the per-epoch callback sees after each epoch (1-based ``epoch``)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float  # since training started


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one proxy training. ``accuracy`` is the last epoch's top-1 validation accuracy."""

    accuracy: float | None
    val_accuracies: tuple[float, ...] = ()
    val_losses: tuple[float, ...] = ()
    train_losses: tuple[float, ...] = ()
    epochs: int = 0  # epochs completed (fewer than asked when stopped early or failed)
    seconds: float = 0.0  # wall time, model construction and validation included
    images_per_second: float = 0.0  # training images per second of training steps
    stopped_early: bool = False
    error: str | None = None
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the model)."""
        return {
            "accuracy": self.accuracy,
            "val_accuracies": list(self.val_accuracies),
            "val_losses": list(self.val_losses),
            "train_losses": list(self.train_losses),
            "epochs": self.epochs,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "stopped_early": self.stopped_early,
            "failed": self.failed,
            "error": self.error,
        }


class CandidateFailure(Exception):
    """Raised inside training when a candidate cannot go on (non-finite loss); becomes ``error``."""


def resolve_hparams(hparams: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and checked: a bad value is the user's (or the space file's) mistake."""
    out = {**DEFAULT_HPARAMS, **(hparams or {})}
    unknown = set(out) - set(DEFAULT_HPARAMS)
    if unknown:
        raise NasError(f"unknown training hyperparameter(s) {sorted(unknown)}; known: {sorted(DEFAULT_HPARAMS)}")
    if out["optimizer"] not in OPTIMIZERS:
        raise NasError(f"optimizer should be one of {', '.join(OPTIMIZERS)} instead of {out['optimizer']!r}")
    if not (isinstance(out["lr"], (int, float)) and out["lr"] > 0):
        raise NasError(f"lr must be a positive number, got {out['lr']!r}")
    if not (isinstance(out["batch_size"], int) and out["batch_size"] >= 2):
        raise NasError(f"batch_size must be an integer of at least 2, got {out['batch_size']!r}")
    return out


def default_threads() -> int:
    """All cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    lr, decay = recipe.lr, recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)


def _initial_weights(model: nn.Module, init: dict[str, torch.Tensor] | nn.Module) -> None:
    """Start from ``init`` (a state_dict or a module of the same architecture), e.g. a supernet's subnet."""
    state = init.state_dict() if isinstance(init, nn.Module) else init
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NasError(f"init weights do not fit this architecture ({first}); pass the weights of the same Arch") from None


def warmup_cosine(total_steps: int, warmup_share: float = LEGACY_RECIPE.warmup_share) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine decay to zero at ``total_steps``."""
    warmup = max(1, round(warmup_share * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def recalibrate_batchnorm(model: nn.Module, data: Dataset, fraction: float, resolution: int) -> None:
    """Re-estimate BatchNorm's running statistics from the current weights on training images.

    After a few steps the running averages (momentum 0.1, starting at mean 0, variance 1) are still
    mostly their starting values, and a model that fits its training data scores chance on
    validation: low-fidelity accuracies would rank nothing. A forward pass over the first
    ``BN_CALIBRATION_IMAGES`` of the training prefix (no augmentation) with a cumulative average fixes
    that, as single-path NAS and Once-for-All do before evaluating a subnet. Only for short runs:
    after a full cosine schedule the running averages, taken over many more images, score higher.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    n = min(BN_CALIBRATION_IMAGES, data.train_size(fraction))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # dropout's draws must not shift training's
        for indices in torch.arange(n).tensor_split(math.ceil(n / EVAL_BATCH)):  # equal sizes, never 1 of n > 1
            x, _ = data.train.get(indices, resolution)
            model(x.contiguous(memory_format=torch.channels_last))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def validate(model: nn.Module, data: Dataset, resolution: int, split: str = "val") -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of ``model`` on the held-out ``split`` ("val" or "test")."""
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.inference_mode():
        for x, y in data.eval_batches(split, EVAL_BATCH, resolution):
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    n = len(data.split(split))
    return correct / n, loss_sum / n


def evaluate(predict: Callable[[np.ndarray], np.ndarray], data: Dataset, resolution: int, split: str = "val") -> float:
    """Top-1 accuracy on ``split`` of any predictor (e.g. an ONNX Runtime session), same inputs as training.

    ``predict`` gets a float32 N x 3 x R x R normalised batch and returns logits (N x classes) or labels (N).
    """
    correct = 0
    for x, y in data.eval_batches(split, EVAL_BATCH, resolution):
        out = np.asarray(predict(x.numpy()))
        labels = out.argmax(1) if out.ndim == 2 else out
        correct += int((labels == y.numpy()).sum())
    return correct / len(data.split(split))


def train_candidate(
    arch: Arch,
    hparams: dict[str, Any] | None,
    fidelity: Fidelity,
    data: Dataset,
    *,
    seed: int = 0,
    recipe: Recipe | None = None,
    init: dict[str, torch.Tensor] | nn.Module | None = None,
    threads: int | None = None,
    on_epoch: Callable[[EpochStats], bool | None] | None = None,
    return_model: bool = False,
) -> TrainResult:
    """Train ``arch`` at ``fidelity.resolution`` on ``fidelity.fraction`` of ``data`` for ``fidelity.epochs``.

    ``recipe`` (default: ``default_recipe(data.name)``) says how; ``hparams`` (optimizer, lr,
    batch_size; missing keys take ``DEFAULT_HPARAMS``), when given, are what the search space
    proposes and replace the recipe's. ``init`` starts from those weights instead of a random
    initialisation (fine-tuning a subnet extracted from a supernet). ``on_epoch`` returning False
    stops training after that epoch (a scheduler pruning the candidate). ``return_model`` puts the
    trained model, in eval mode, in ``result.model``.
    """
    recipe = recipe or default_recipe(data.name)
    if hparams is not None:
        recipe = recipe.with_hparams(hparams)
    if threads is not None and threads < 1:
        raise NasError(f"threads must be at least 1, got {threads}")
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    history: dict[str, list[float]] = {"val_accuracies": [], "val_losses": [], "train_losses": []}
    train_seconds, train_images, stopped = 0.0, 0, False
    model = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(arch.with_resolution(fidelity.resolution), data.num_classes, recipe.dropout)
            if init is not None:
                _initial_weights(model, init)
            model = model.to(memory_format=torch.channels_last)  # about 2x faster depthwise convs on CPU
            generator = torch.Generator().manual_seed(seed)
            optimizer = make_optimizer(model, recipe)
            steps_per_epoch = data.train_steps(fidelity.fraction, recipe.batch_size)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(fidelity.epochs * steps_per_epoch, recipe.warmup_share))
            criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
            for epoch in range(1, fidelity.epochs + 1):
                model.train()
                epoch_start, loss_sum, seen = time.perf_counter(), 0.0, 0
                for x, y in data.train_batches(fidelity.fraction, recipe.batch_size, fidelity.resolution, generator,
                                               augment=recipe.augment):
                    loss = criterion(model(x.contiguous(memory_format=torch.channels_last)), y)
                    if not torch.isfinite(loss):
                        raise CandidateFailure(f"non-finite training loss ({loss.item()}) in epoch {epoch} at lr {recipe.lr:g}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                    optimizer.step()
                    schedule.step()
                    loss_sum += loss.item() * len(y)
                    seen += len(y)
                train_seconds += time.perf_counter() - epoch_start
                train_images += seen
                steps_done = epoch * steps_per_epoch
                if (1 - BN_MOMENTUM) ** steps_done > BN_STALE_SHARE:  # fewer than 44 steps so far
                    recalibrate_batchnorm(model, data, fidelity.fraction, fidelity.resolution)
                accuracy, val_loss = validate(model, data, fidelity.resolution)
                if not math.isfinite(val_loss):
                    raise CandidateFailure(f"non-finite validation loss after epoch {epoch}")
                history["train_losses"].append(loss_sum / seen)
                history["val_losses"].append(val_loss)
                history["val_accuracies"].append(accuracy)
                stats = EpochStats(epoch, loss_sum / seen, val_loss, accuracy, time.perf_counter() - start)
                if on_epoch is not None and on_epoch(stats) is False and epoch < fidelity.epochs:
                    stopped = True
                    break
        error = None
    except NasError:
        raise
    except Exception as exc:  # the candidate's failure, not the caller's: report it and go on
        error = str(exc) if isinstance(exc, CandidateFailure) else f"{type(exc).__name__}: {exc}"
    finally:
        torch.set_num_threads(previous_threads)
    accuracies = history["val_accuracies"]
    return TrainResult(
        accuracy=accuracies[-1] if accuracies and error is None else None,
        val_accuracies=tuple(accuracies),
        val_losses=tuple(history["val_losses"]),
        train_losses=tuple(history["train_losses"]),
        epochs=len(accuracies),
        seconds=time.perf_counter() - start,
        images_per_second=train_images / train_seconds if train_seconds else 0.0,
        stopped_early=stopped,
        error=error,
        model=model.to(memory_format=torch.contiguous_format) if return_model and error is None else None,
    )


# --- many trainings (nas.finals.train_seeds journals them): how far their seeds agree -----------------


def seed_agreement(accuracies: np.ndarray, drop: float = 0.15) -> dict[str, Any]:
    """How far single seeds agree: ``accuracies`` is archs x seeds (NaN: a failed run).

    ``kendall_between_seeds``: Kendall tau between two seeds' accuracies over the archs, averaged
    over all pairs of seeds; ``outlier_runs``: runs at least ``drop`` below their arch's best seed
    (a failure counts), the diverging runs a fixed recipe must avoid.
    """
    from itertools import combinations

    from scipy.stats import kendalltau

    acc = np.nan_to_num(np.asarray(accuracies, dtype=float), nan=0.0)  # a failure ranks last
    taus = [float(kendalltau(acc[:, i], acc[:, j]).statistic) for i, j in combinations(range(acc.shape[1]), 2)]
    outliers = acc <= acc.max(axis=1, keepdims=True) - drop
    return {
        "archs": int(acc.shape[0]),
        "seeds": int(acc.shape[1]),
        "kendall_between_seeds": round(float(np.mean(taus)), 3),
        "kendall_pairs": [round(t, 3) for t in taus],
        "mean_accuracy": round(float(acc.mean()), 4),
        "mean_accuracy_range": [round(float(acc.mean(1).min()), 4), round(float(acc.mean(1).max()), 4)],
        "mean_std_between_seeds": round(float(acc.std(axis=1, ddof=1).mean()), 4),
        "max_spread": round(float((acc.max(1) - acc.min(1)).max()), 4),
        "outlier_runs": int(outliers.sum()),
        "failed_runs": int(np.isnan(np.asarray(accuracies, dtype=float)).sum()),
    }
