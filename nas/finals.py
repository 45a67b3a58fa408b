"""The final trainings: the front points and the baselines, each trained from scratch with the same
recipe under several seeds and scored once on the test split.

Every finished training is appended to ``finals.jsonl`` in the run folder, so a crash or Ctrl-C
loses at most the trainings in flight, and a rerun trains only what is missing. The data split is
the run's (its seed); only the training seed varies.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nas.arch import Arch
from nas.executor import TrainJob, make_executor, threads_per_worker
from nas.fidelity import Fidelity
from nas.journal import append_jsonl, read_jsonl
from nas.space import SearchSpace


@dataclass(frozen=True)
class SeedRun:
    """One training of one architecture under one seed."""

    arch: str
    seed: int
    val_accuracy: float | None
    test_accuracy: float | None
    seconds: float
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "seed": self.seed, "val_accuracy": self.val_accuracy,
                "test_accuracy": self.test_accuracy, "seconds": self.seconds, "error": self.error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SeedRun":
        return cls(**{k: data[k] for k in ("arch", "seed", "val_accuracy", "test_accuracy", "seconds", "error")})


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


def train_finals(archs: Sequence[Arch], *, run_dir: Path, data: str, split_seed: int, fidelity: Fidelity,
                 seeds: int, workers: int, hparams: dict[str, dict[str, Any]] | None = None, executor: str = "local",
                 ray_address: str | None = None, log: Callable[[str], None] = print) -> dict[str, FinalScore]:
    """Train every architecture under seeds 0..seeds-1 (those not already in ``finals.jsonl``), keep
    each seed-0 model's weights for export, and return the scores keyed by architecture string.
    ``hparams`` (by architecture string) replace the fixed recipe's optimizer, lr and batch size."""
    journal = run_dir / "finals.jsonl"
    done = {(r.arch, r.seed): r for r in map(SeedRun.from_dict, read_jsonl(journal))}
    (run_dir / "weights").mkdir(exist_ok=True)
    jobs = []
    for number, arch in enumerate(archs):
        text = arch.to_string()
        for seed in range(seeds):
            if (text, seed) in done and (seed or weights_path(run_dir, arch, seed).exists()):
                continue
            jobs.append(TrainJob(number, 0, text, (hparams or {}).get(text, {}), fidelity, data, seed,
                                 threads_per_worker(workers),
                                 split_seed=split_seed, test=True,
                                 weights_path=str(weights_path(run_dir, arch, seed)) if seed == 0 else None))
    if jobs:
        skipped = len(archs) * seeds - len(jobs)
        log(f"final trainings: {len(jobs)} to run ({len(archs)} networks x {seeds} seeds, {fidelity.epochs} epochs"
            + (f"; {skipped} kept from before" if skipped else "") + f", {workers} worker(s))")
    started, finished = time.monotonic(), 0

    def on_result(job: TrainJob, result: dict[str, Any]) -> None:
        nonlocal finished
        run = SeedRun(job.arch, job.seed, result["accuracy"], result.get("test_accuracy"), result["seconds"],
                      result["error"])
        append_jsonl(journal, run.to_dict())
        done[(run.arch, run.seed)] = run
        finished += 1
        elapsed = time.monotonic() - started
        eta = elapsed / finished * (len(jobs) - finished)
        outcome = (f"test {run.test_accuracy:.4f} (val {run.val_accuracy:.4f})" if run.error is None
                   else f"failed: {run.error}")
        log(f"[final {finished}/{len(jobs)}] network {job.number} seed {job.seed}: {outcome} in {run.seconds:.1f}s"
            f" | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")

    _run(jobs, on_result, workers, executor, ray_address)
    return {a.to_string(): FinalScore(tuple(done[(a.to_string(), s)] for s in range(seeds))) for a in archs}

