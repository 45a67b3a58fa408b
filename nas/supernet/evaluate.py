"""Scoring subnets: validation accuracy with BatchNorm statistics recalibrated for each subnet.

A subnet's BatchNorm statistics are those of ``calibration_images`` training images (the first of
the stratified training order, no augmentation), as single-path NAS and Once-for-All recalibrate
before evaluating. Calibration and evaluation run as one forward pass over the calibration images
followed by the evaluation split: every BatchNorm normalises the whole batch with the statistics of
its calibration part, which is exactly "recalibrate, then evaluate" in a single pass. Both image
tensors are built once per evaluator; results are memoised per architecture. A large evaluation split
runs in chunks of ``EVAL_CHUNK`` images, each behind the same calibration images (same statistics).

Subnets that share their first stages (what mutation-based searches propose) share those stages'
output: the feature maps at stage ends are kept in a least-recently-used cache of up to
``PREFIX_CACHE_BYTES``, keyed by the steps that produced them, and a subnet starts from the longest
cached prefix. The result is bit-identical to running it from the input (tested).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from nas.arch import Arch
from nas.builder import Network
from nas.errors import NasError
from nas.supernet.elastic import Pass
from nas.supernet.extract import extract
from nas.supernet.model import Supernet

CALIBRATION_IMAGES = 256
EVAL_CHUNK = 2048
PREFIX_CACHE_BYTES = 256 * 2**20


class SupernetEvaluator:
    """``accuracy(arch)``: top-1 accuracy on ``split`` of ``arch`` with weights inherited from ``supernet``.

    Deterministic: no random draws; ``seed`` picks which training images calibrate BatchNorm (seed 0:
    the first ``calibration_images`` of the training order). ``threads`` sets torch's thread count
    during each evaluation (restored afterwards); None keeps the caller's. On a busy machine one thread
    scored several times more subnets per second than two (docs/supernet.md).
    """

    def __init__(self, supernet: Supernet, dataset, resolution: int, *, seed: int = 0, split: str = "val",
                 calibration_images: int = CALIBRATION_IMAGES, threads: int | None = None):
        if split not in ("val", "test") or getattr(dataset, split, None) is None:
            raise NasError(f"split should be 'val' or 'test' (one the dataset has) instead of {split!r}")
        if supernet.num_classes != dataset.num_classes:
            raise NasError(f"the supernet has {supernet.num_classes} classes, dataset {dataset.name} "
                           f"{dataset.num_classes}; load the supernet trained on this data")
        self.supernet, self.resolution = supernet, resolution
        n = min(calibration_images, len(dataset.train))
        shuffled = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(seed)) if seed else None
        order = torch.arange(n) if shuffled is None else shuffled[:n]
        calibration, _ = dataset.train.get(order, resolution)
        evaluation = getattr(dataset, split)
        self._labels = evaluation.labels
        self._batches = [
            torch.cat([calibration, evaluation.get(chunk, resolution)[0]]).contiguous(memory_format=torch.channels_last)
            for chunk in torch.arange(len(evaluation)).split(EVAL_CHUNK)
        ]
        self._n = n
        self._threads = threads
        self._cache: dict[str, float] = {}
        self._prefixes: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._prefix_bytes = 0

    def _logits(self, arch: Arch, stats: dict | None = None) -> torch.Tensor:
        plan = self.supernet.plan(arch.with_resolution(self.resolution))
        before = torch.get_num_threads()
        torch.set_num_threads(self._threads or before)
        try:
            if stats is not None:  # statistics of every BatchNorm wanted: no shortcut
                ctx = Pass(calibrate=self._n, stats=stats)
                return torch.cat([self.supernet(batch, plan, ctx)[self._n:] for batch in self._batches])
            return self._cached_logits(plan)
        finally:
            torch.set_num_threads(before)

    def _cached_logits(self, plan) -> torch.Tensor:
        ctx = Pass(calibrate=self._n)
        ends = plan.stage_ends
        start, xs = 0, self._batches
        for end in reversed(ends):
            hit = self._prefixes.get(plan.steps[:end])
            if hit is not None:
                self._prefixes.move_to_end(plan.steps[:end])
                start, xs = end, hit
                break
        for end in (*[e for e in ends if e > start], len(plan.steps)):
            xs = [self.supernet.features(x, plan, ctx, start, end) for x in xs]
            if end < len(plan.steps):
                self._remember(plan.steps[:end], xs)
            start = end
        return torch.cat([self.supernet.classify(x, plan)[self._n:] for x in xs])

    def _remember(self, key: tuple, xs: list[torch.Tensor]) -> None:
        size = sum(x.numel() * x.element_size() for x in xs)
        if size > PREFIX_CACHE_BYTES:
            return
        self._prefixes[key] = xs
        self._prefix_bytes += size
        while self._prefix_bytes > PREFIX_CACHE_BYTES:
            _, dropped = self._prefixes.popitem(last=False)
            self._prefix_bytes -= sum(x.numel() * x.element_size() for x in dropped)

    def accuracy(self, arch: Arch) -> float:
        """Top-1 accuracy in [0, 1] (memoised by the architecture's string at this resolution)."""
        key = arch.with_resolution(self.resolution).to_string()
        if key not in self._cache:
            with torch.inference_mode():
                correct = (self._logits(arch).argmax(1) == self._labels).sum().item()
            self._cache[key] = correct / len(self._labels)
        return self._cache[key]

    def accuracy_many(self, archs: Sequence[Arch]) -> list[float]:
        return [self.accuracy(arch) for arch in archs]

    def extract(self, arch: Arch, dropout: float = 0.2) -> Network:
        """The subnet as the builder's network, BatchNorm recalibrated as ``accuracy`` does it."""
        stats: dict = {}
        with torch.no_grad():
            self._logits(arch, stats)
        return extract(self.supernet, arch.with_resolution(self.resolution), stats=stats, dropout=dropout)


HEALTH_SUBNETS = 20


@dataclass(frozen=True)
class SupernetHealth:
    """How a trained supernet scores uniform random subnets of its space. Where they score near chance
    (less than a quarter of the way from chance to 100%), its accuracies rank noise, not architectures."""

    subnets: int
    mean: float
    low: float
    high: float
    chance: float

    @property
    def near_chance(self) -> bool:
        return self.mean < self.chance + (1 - self.chance) / 4

    def summary(self) -> str:
        return (f"{self.subnets} random subnets score {self.mean:.1%} on average ({self.low:.1%}-{self.high:.1%}; "
                f"chance {self.chance:.1%})")


def supernet_health(evaluator: SupernetEvaluator, seed: int = 0, subnets: int = HEALTH_SUBNETS) -> SupernetHealth:
    """Score ``subnets`` uniform random subnets of the supernet's space (seeded, a few seconds)."""
    space, rng = evaluator.supernet.space, random.Random(f"health:{seed}")
    scores = evaluator.accuracy_many([space.decode(space.sample(rng), evaluator.resolution) for _ in range(subnets)])
    return SupernetHealth(subnets, sum(scores) / subnets, min(scores), max(scores), 1 / evaluator.supernet.num_classes)


def inherited_subnet(folder, arch: Arch):
    """(network, dataset, metadata): ``arch`` with the weights of the supernet trained in ``folder``, its
    BatchNorm recalibrated on that supernet's training data at its resolution, in eval mode.

    The space, data and resolution come from the folder's metadata; ``arch`` is taken at that resolution.
    """
    from pathlib import Path

    from nas.data import load_dataset
    from nas.space import load_space
    from nas.supernet.checkpoint import META, TRAIN_HINT, load_supernet, read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise NasError(f"{folder}: no supernet here (no {META}); {TRAIN_HINT}")
    space = load_space(meta.space_file)
    supernet = load_supernet(folder, space, meta.data, meta.resolution)
    data = load_dataset(meta.data)
    model = SupernetEvaluator(supernet, data, meta.resolution).extract(arch.with_resolution(meta.resolution))
    return model.eval(), data, meta
