"""Training a supernet: one fixed recipe, the sandwich rule with in-place distillation, resumable per epoch.

Each step trains, on the same batch, the largest subnet (cross-entropy with the labels), the smallest
and ``random_subnets`` random subnets of the space (BigNAS's sandwich rule); the smaller ones learn
from the largest one's predictions on that batch (in-place distillation: a KL term weighted
``distill``, the rest cross-entropy with the labels). Gradients of all of them are summed into one
SGD step. Between phases (every ``sort_every`` epochs) the expanded channels of every block are
re-sorted by importance, so that narrower subnets keep the most useful ones (Once-for-All).

Every random draw of an epoch comes from generators seeded by (seed, epoch), and a checkpoint is
written after every epoch: with the same thread count, a resumed training ends with exactly the
weights of an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from nas.arch import Arch
from nas.errors import NasError
from nas.space import SearchSpace
from nas.supernet.checkpoint import (CHECKPOINT, META, WEIGHTS, SupernetMeta, load_tensors, read_meta,
                                     save_tensors, write_meta)
from nas.supernet.elastic import TRAIN_PASS
from nas.supernet.model import Supernet, space_fingerprint

# op order from the most to the least capable, for the sandwich rule's largest and smallest subnets
OP_CAPACITY = ("ir", "bot", "conv", "ds")


@dataclass(frozen=True)
class SupernetRecipe:
    """The one training recipe (docs/supernet.md has the measurements behind each value)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 0.05  # SGD with Nesterov momentum 0.9; linear warm-up then cosine to zero
    momentum: float = 0.9
    weight_decay: float = 4e-5
    warmup_share: float = 0.05
    random_subnets: int = 6  # besides the largest and the smallest, per step
    distill: float = 0.5  # weight of the largest subnet's soft labels in the other subnets' loss
    label_smoothing: float = 0.1  # of every cross-entropy term
    grad_clip: float = 5.0  # global gradient norm
    sort_every: int = 4  # epochs between re-sorts of expanded channels; 0 = never

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise NasError(f"supernet recipe: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or not 0 <= self.distill <= 1 or self.random_subnets < 0:
            raise NasError(f"supernet recipe: need lr > 0, 0 <= distill <= 1, random_subnets >= 0; got {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SupernetRecipe":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise NasError(f"supernet recipe: unknown key(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)


def extreme_params(space: SearchSpace, largest: bool) -> dict[str, Any]:
    """The largest (or smallest) point: every numeric choice at its end, the most (least) capable op."""
    params: dict[str, Any] = {}
    for d in space.decisions:
        if d.is_hyperparameter:
            continue
        key = d.name.rsplit(".", 1)[-1]
        if key == "op":
            ranked = sorted(d.choices, key=OP_CAPACITY.index)
            params[d.name] = ranked[0] if largest else ranked[-1]
        elif key == "skip":
            params[d.name] = True
        elif key == "act":
            params[d.name] = d.choices[0]
        else:
            params[d.name] = max(d.choices) if largest else min(d.choices)
    return params


def sandwich(space: SearchSpace, resolution: int, rng: random.Random, n_random: int) -> list[Arch]:
    """[largest, smallest, n_random random subnets] of one step."""
    archs = [space.decode(extreme_params(space, largest), resolution) for largest in (True, False)]
    return archs + [space.decode(space.sample(rng), resolution) for _ in range(n_random)]


def _schedule(recipe: SupernetRecipe, steps_per_epoch: int) -> Callable[[int], float]:
    total = recipe.epochs * steps_per_epoch
    warmup = max(1, round(recipe.warmup_share * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _optimizer(net: Supernet, recipe: SupernetRecipe) -> torch.optim.Optimizer:
    # no weight decay on BatchNorm, biases and kernel transforms (decay would pull those to zero)
    decay = [p for n, p in net.named_parameters() if p.ndim == 4 or n.startswith("classifier.weight")]
    keep = [p for n, p in net.named_parameters() if not (p.ndim == 4 or n.startswith("classifier.weight"))]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)


def _step_loss(net: Supernet, archs: list[Arch], x: torch.Tensor, y: torch.Tensor, recipe: SupernetRecipe) -> float:
    """Forward and backward every subnet of the sandwich; returns the largest subnet's loss."""
    teacher = net(x, net.plan(archs[0]), TRAIN_PASS)
    loss = F.cross_entropy(teacher, y, label_smoothing=recipe.label_smoothing)
    if not torch.isfinite(loss):
        raise NasError(f"supernet training diverged (loss {loss.item()}); lower the recipe's lr")
    loss.backward()
    soft = teacher.detach().softmax(1)
    for arch in archs[1:]:
        logits = net(x, net.plan(arch), TRAIN_PASS)
        student = recipe.distill * F.kl_div(logits.log_softmax(1), soft, reduction="batchmean")
        if recipe.distill < 1:
            labels = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            student = student + (1 - recipe.distill) * labels
        student.backward()
    return loss.item()


def train_supernet(space: SearchSpace, data: str, resolution: int, out_dir: Path, *,
                   recipe: SupernetRecipe | None = None, seed: int = 0, threads: int | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Train (or resume, or find finished) the supernet of ``space`` on ``data`` at ``resolution``.

    Returns ``out_dir``; ``load_supernet(out_dir, space, data, resolution)`` reads the result. The data
    is loaded (and a bad spec or missing folder reported) before anything is written.
    """
    from nas.data import load_dataset
    from nas.train import default_threads

    recipe = recipe or SupernetRecipe()
    out_dir = Path(out_dir)
    dataset = load_dataset(data, seed=0)
    fingerprint = space_fingerprint(space)
    meta = read_meta(out_dir)
    if meta is not None:
        meta.check(out_dir / META, space_hash=fingerprint, space_file=space.source, data=data,
                   resolution=resolution)
        for key, mine, wanted in (("seed", meta.seed, seed), ("recipe", meta.recipe, recipe.to_dict())):
            if mine != wanted:
                raise NasError(f"{out_dir / META}: {key}: training there used {mine!r}, not {wanted!r}; "
                               "use another --out or the same settings")
        if meta.complete:
            log(f"{out_dir}: supernet already trained ({meta.epochs_done} epochs, {meta.train_seconds:.0f}s)")
            return out_dir
    threads = threads or default_threads()
    meta = meta or SupernetMeta(space.name, space.source, fingerprint, data, dataset.num_classes, resolution, seed,
                                recipe.to_dict(), threads=threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = Supernet(space, dataset.num_classes).to(memory_format=torch.channels_last)
            optimizer = _optimizer(net, recipe)
            start_epoch = 0
            if meta.epochs_done:
                state = load_tensors(out_dir / CHECKPOINT)
                net.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                start_epoch = int(state["epoch"])
                log(f"resuming {out_dir} after epoch {start_epoch}/{recipe.epochs}")
                if start_epoch == recipe.epochs:  # killed after the last checkpoint, before the metadata
                    _save_epoch(net, optimizer, start_epoch, meta.train_seconds, meta, out_dir)
                    return out_dir
            _train_epochs(net, optimizer, space, dataset, resolution, recipe, seed, start_epoch, meta, out_dir, log)
    finally:
        torch.set_num_threads(previous_threads)
    return out_dir


def _save_epoch(net: Supernet, optimizer, done: int, seconds: float, meta: SupernetMeta, out_dir: Path) -> SupernetMeta:
    """Checkpoint after epoch ``done``; after the last one the supernet's weights alone, and no checkpoint
    (the optimizer state is only needed to resume). The metadata is written last."""
    complete = done == meta.recipe["epochs"]
    save_tensors(out_dir / CHECKPOINT, {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": done})
    if complete:
        save_tensors(out_dir / WEIGHTS, net.state_dict())
    meta = SupernetMeta.from_dict({**meta.to_dict(), "epochs_done": done, "complete": complete,
                                   "train_seconds": round(seconds, 2)})
    write_meta(out_dir, meta)
    if complete:
        (out_dir / CHECKPOINT).unlink()
    return meta


def _train_epochs(net, optimizer, space, dataset, resolution, recipe, seed, start_epoch, meta, out_dir, log) -> None:
    from nas.supernet.evaluate import SupernetEvaluator

    steps = dataset.train_steps(1.0, recipe.batch_size)
    schedule = _schedule(recipe, steps)
    seconds, session = meta.train_seconds, 0.0
    for epoch in range(start_epoch, recipe.epochs):
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        rng = random.Random(f"supernet:{seed}:{epoch}")
        net.train()
        loss_sum = 0.0
        for step, (x, y) in enumerate(dataset.train_batches(1.0, recipe.batch_size, resolution, generator)):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * schedule(epoch * steps + step)
            optimizer.zero_grad(set_to_none=True)
            loss_sum += _step_loss(net, sandwich(space, resolution, rng, recipe.random_subnets),
                                   x.contiguous(memory_format=torch.channels_last), y, recipe)
            torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
            optimizer.step()
        if recipe.sort_every and (epoch + 1) % recipe.sort_every == 0 and epoch + 1 < recipe.epochs:
            net.sort_channels(optimizer)
        seconds += time.perf_counter() - began
        session += time.perf_counter() - began
        done = epoch + 1
        meta = _save_epoch(net, optimizer, done, seconds, meta, out_dir)
        evaluator = SupernetEvaluator(net, dataset, resolution)
        largest, smallest = sandwich(space, resolution, rng, 0)
        eta = session / (done - start_epoch) * (recipe.epochs - done)
        log(f"epoch {done}/{recipe.epochs}  loss {loss_sum / steps:.4f}  val accuracy largest "
            f"{evaluator.accuracy(largest):.4f} smallest {evaluator.accuracy(smallest):.4f}  "
            f"{seconds:.0f}s  ETA {eta / 60:.1f} min")
