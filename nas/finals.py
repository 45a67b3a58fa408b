"""Trainings from scratch under several seeds, each scored once on the test split: the main job's
final trainings (the front points and the baselines, one recipe) and the benchmarks' ground truths.

Every finished training is appended to a JSONL journal (``finals.jsonl`` in a run folder), so a
crash or Ctrl-C loses at most the trainings in flight, and a rerun trains only what is missing. The
data split is fixed (a run's seed); only the training seed varies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.arch import Arch
from nas.errors import NasError
from nas.executor import TrainJob, make_executor, threads_per_worker
from nas.fidelity import Fidelity
from nas.journal import append_jsonl, read_jsonl
from nas.space import SearchSpace
from nas.train import Recipe, default_recipe


@dataclass(frozen=True)
class SeedRun:
    """One training of one architecture under one seed: one line of a journal."""

    arch: str
    seed: int
    val_accuracy: float | None
    test_accuracy: float | None
    seconds: float  # wall time
    error: str | None
    cpu_seconds: float | None = None  # training and test scoring, all threads (absent from older journals)
    setup: dict[str, Any] | None = None  # data, split seed, fidelity and recipe, in a journal shared by several

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.setup is None:  # a run folder's finals.jsonl: the run fixes the setup
            del out["setup"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeedRun:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class FinalScore:
    """Accuracy over seeds: the mean and the sample standard deviation (0 for one seed)."""

    runs: tuple[SeedRun, ...]

    def _values(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.runs if getattr(r, name) is not None]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs if r.error is None]

    def mean(self, name: str = "test_accuracy") -> float | None:
        values = self._values(name)
        return statistics.fmean(values) if values else None

    def std(self, name: str = "test_accuracy") -> float | None:
        values = self._values(name)
        return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def weights_path(run_dir: Path, arch: Arch, seed: int) -> Path:
    digest = hashlib.sha1(arch.to_string().encode()).hexdigest()[:16]
    return run_dir / "weights" / f"{digest}-seed{seed}.pt"


def _run(jobs: list[TrainJob], on_result, workers: int, executor: str, ray_address: str | None) -> None:
    if jobs:
        pool = make_executor(executor, workers, threads_per_worker(workers), ray_address)
        try:
            pool.run(jobs, on_result)
        finally:
            pool.close()


def tune_hyperparameters(arch: Arch, space: SearchSpace, budget: int, *, run_dir: Path, data: str, split_seed: int,
                         fidelity: Fidelity, workers: int, executor: str = "local", ray_address: str | None = None,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """A baseline's share of a joint hyperparameter search (``--search-hparams``): ``budget`` settings
    drawn from the space's hyperparameters, each trained at the search's top rung; the best on the
    validation split is returned. Journaled in ``hparams.jsonl`` like the final trainings."""
    text = arch.to_string()
    rng = random.Random(f"{split_seed}:{text}")
    settings = [{d.name[3:]: d.sample(rng) for d in space.hyperparameters} for _ in range(budget)]
    journal = run_dir / "hparams.jsonl"
    scores = {r["index"]: r["val_accuracy"] for r in read_jsonl(journal) if r["arch"] == text}
    jobs = [TrainJob(i, 0, text, hp, fidelity, data, split_seed, threads_per_worker(workers))
            for i, hp in enumerate(settings) if i not in scores]
    if jobs:
        log(f"hyperparameter search for {text[:60]}...: {len(jobs)} of {budget} settings to train")

    def on_result(job: TrainJob, result: dict[str, Any]) -> None:
        append_jsonl(journal, {"arch": text, "index": job.number, "hparams": job.hparams,
                               "val_accuracy": result["accuracy"]})
        scores[job.number] = result["accuracy"]

    _run(jobs, on_result, workers, executor, ray_address)
    best = max(range(budget), key=lambda i: -1.0 if scores[i] is None else scores[i])
    return settings[best]


def train_seeds(archs: Sequence[Arch], seeds: Sequence[int], fidelity: Fidelity, data: str, recipes: Sequence[Recipe],
                *, split_seed: int = 0, journal: Path | None = None, shared_journal: bool = True,
                seed0_weights: Callable[[Arch], Path] | None = None, workers: int = 1, executor: str = "local",
                ray_address: str | None = None, label: str = "seed",
                log: Callable[[str], None] = print) -> list[list[SeedRun]]:
    """Train every architecture under every seed with its own recipe (``recipes[i]`` for ``archs[i]``)
    on ``split_seed``'s data split, score each on validation and test; the runs per architecture, in
    seed order.

    With ``journal`` (JSONL) each finished training is appended at once and trainings already there
    are not repeated. ``shared_journal``: each line records its setup (data, split seed, fidelity,
    recipe) and only a line of the same setup counts, so one journal can hold several studies; False:
    the journal belongs to one setup (a run folder's ``finals.jsonl``). ``seed0_weights(arch)``: where
    seed 0's trained weights go; a journalled seed-0 training without that file is trained again.
    """
    if len(recipes) != len(archs):
        raise ValueError(f"{len(recipes)} recipes for {len(archs)} architectures")
    setups = [{"data": data, "split_seed": split_seed, "fidelity": fidelity.to_dict(), "recipe": r.to_dict()}
              if shared_journal else None for r in recipes]
    done = {} if journal is None else {_key(r.arch, r.seed, r.setup): r for r in _read_runs(journal)}
    jobs = []
    for number, (arch, recipe) in enumerate(zip(archs, recipes)):
        text = arch.to_string()
        for seed in seeds:
            weights = seed0_weights(arch) if seed0_weights is not None and seed == 0 else None
            if _key(text, seed, setups[number]) in done and (weights is None or weights.exists()):
                continue
            jobs.append(TrainJob(number, 0, text, {}, fidelity, data, seed, threads_per_worker(workers),
                                 split_seed=split_seed, test=True, weights_path=None if weights is None else str(weights),
                                 recipe=recipe.to_dict()))
    if jobs:
        skipped = len(archs) * len(seeds) - len(jobs)
        log(f"{label} trainings: {len(jobs)} to run ({len(archs)} networks x {len(seeds)} seeds, {fidelity.epochs} epochs"
            + (f"; {skipped} kept from before" if skipped else "") + f", {workers} worker(s))")
    started, finished = time.monotonic(), 0

    def on_result(job: TrainJob, result: dict[str, Any]) -> None:
        nonlocal finished
        run = SeedRun(job.arch, job.seed, result["accuracy"], result.get("test_accuracy"), result["seconds"],
                      result["error"], result["cpu_seconds"], setups[job.number])
        if journal is not None:
            append_jsonl(journal, run.to_dict())
        done[_key(run.arch, run.seed, run.setup)] = run
        finished += 1
        elapsed = time.monotonic() - started
        eta = elapsed / finished * (len(jobs) - finished)
        outcome = (f"test {run.test_accuracy:.4f} (val {run.val_accuracy:.4f})" if run.error is None
                   else f"failed: {run.error}")
        log(f"[{label} {finished}/{len(jobs)}] network {job.number} seed {job.seed}: {outcome} in {run.seconds:.1f}s"
            f" | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")

    _run(jobs, on_result, workers, executor, ray_address)
    return [[done[_key(a.to_string(), s, setup)] for s in seeds] for a, setup in zip(archs, setups)]


def _key(arch: str, seed: int, setup: dict[str, Any] | None) -> tuple[str, int, str]:
    return arch, seed, json.dumps(setup, sort_keys=True)


def _read_runs(journal: Path) -> list[SeedRun]:
    try:
        return [SeedRun.from_dict(r) for r in read_jsonl(journal)]
    except (ValueError, TypeError) as exc:
        raise NasError(f"{journal}: not a journal of trainings ({exc}); move it away to train afresh") from None


def train_finals(archs: Sequence[Arch], *, run_dir: Path, data: str, split_seed: int, fidelity: Fidelity,
                 seeds: int, workers: int, hparams: dict[str, dict[str, Any]] | None = None, executor: str = "local",
                 ray_address: str | None = None, log: Callable[[str], None] = print) -> dict[str, FinalScore]:
    """The main job's final trainings: every architecture under seeds 0..seeds-1 with the fixed recipe,
    journalled in ``finals.jsonl``, each seed-0 model's weights kept for export; the scores keyed by
    architecture string. ``hparams`` (by architecture string) replace the recipe's optimizer, lr and
    batch size."""
    recipe = default_recipe(data)
    recipes = [recipe.with_hparams(hp) if (hp := (hparams or {}).get(a.to_string())) else recipe for a in archs]
    (run_dir / "weights").mkdir(exist_ok=True)
    runs = train_seeds(archs, range(seeds), fidelity, data, recipes, split_seed=split_seed,
                       journal=run_dir / "finals.jsonl", shared_journal=False,
                       seed0_weights=lambda arch: weights_path(run_dir, arch, 0), workers=workers, executor=executor,
                       ray_address=ray_address, label="final", log=log)
    return {a.to_string(): FinalScore(tuple(r)) for a, r in zip(archs, runs)}
