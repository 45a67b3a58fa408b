"""Where candidate trainings run: in-process, on N local worker processes, or on a Ray cluster.

Every executor has one method, ``run(jobs, on_result)``: it trains the jobs (in parallel where it
can) and calls ``on_result(job, result)`` in the caller's process as each one finishes, so the
journal records every finished evaluation at once. ``on_result`` may return more jobs, which run in
the same call: that is how ASHA keeps every worker busy without rounds. Workers only train; latency
is never measured here.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from nas.errors import NasError
from nas.fidelity import Fidelity


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs to train one candidate at one rung (plain, picklable data)."""

    number: int
    rung: int
    arch: str
    hparams: dict[str, Any]
    fidelity: Fidelity
    data: str
    seed: int  # training seed
    threads: int
    split_seed: int | None = None  # the data split's seed; None: ``seed`` (a search trains with the run's seed)
    test: bool = False  # also score the trained model on the test split (final trainings only)
    weights_path: str | None = None  # where to save the trained state_dict
    params: dict[str, Any] | None = None  # the point of the space (for evaluators that score decisions)
    recipe: dict[str, Any] | None = None  # a ``Recipe.to_dict()``; None: the data's default recipe


_DATASETS: dict[tuple[str, int], Any] = {}


def train_job(job: TrainJob) -> dict[str, Any]:
    """Worker entry point: the candidate's training result as a dict; failures are results too."""
    from nas.arch import Arch
    from nas.data import load_dataset
    from nas.train import Recipe, train_candidate, validate

    split_seed = job.seed if job.split_seed is None else job.split_seed
    key = (job.data, split_seed)
    if key not in _DATASETS:  # each worker process loads the data once
        _DATASETS[key] = load_dataset(job.data, seed=split_seed)
    data = _DATASETS[key]
    keep = job.test or job.weights_path is not None
    cpu_start = time.process_time()
    result = train_candidate(Arch.parse(job.arch), job.hparams or None, job.fidelity, data, seed=job.seed,
                             recipe=Recipe.from_dict(job.recipe) if job.recipe else None, threads=job.threads,
                             return_model=keep)
    out = result.to_dict()
    if job.test:  # a scored training also reports its CPU time (training and test scoring, all threads)
        if not result.failed:
            out["test_accuracy"] = validate(result.model, data, job.fidelity.resolution, split="test")[0]
        out["cpu_seconds"] = time.process_time() - cpu_start
    if job.weights_path is not None and not result.failed:
        import torch

        torch.save(result.model.state_dict(), job.weights_path)
    return out


OnResult = Callable[[TrainJob, dict[str, Any]], Iterable[TrainJob] | None]  # returns follow-up jobs, if any


class InlineExecutor:
    """One worker: train in this process, in order (deterministic and easiest to debug)."""

    def run(self, jobs: list[TrainJob], on_result: OnResult) -> None:
        queue = collections.deque(jobs)
        while queue:
            job = queue.popleft()
            queue.extend(on_result(job, train_job(job)) or ())

    def close(self) -> None:
        pass


class ProcessExecutor:
    """N local worker processes (spawned, so torch's threads start clean in each)."""

    def __init__(self, workers: int):
        self.pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, jobs: list[TrainJob], on_result: OnResult) -> None:
        pending = {self.pool.submit(train_job, job): job for job in jobs}
        while pending:
            finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                for job in on_result(pending.pop(future), future.result()) or ():
                    pending[self.pool.submit(train_job, job)] = job

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayExecutor:
    """Jobs as Ray tasks on a cluster (``address``) or on a local Ray instance (``address=None``)."""

    def __init__(self, address: str | None, threads: int):
        try:
            import ray
        except ImportError:
            raise NasError("--executor ray needs Ray: pip install 'ray[default]' (or nas[ray])") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            except ConnectionError as exc:
                raise NasError(f"--ray-address {address}: cannot connect to a Ray cluster ({exc})") from None
        self.remote = ray.remote(num_cpus=threads)(train_job)

    def run(self, jobs: list[TrainJob], on_result: OnResult) -> None:
        refs = {self.remote.remote(job): job for job in jobs}
        while refs:
            ready, _ = self.ray.wait(list(refs), num_returns=1)
            for ref in ready:
                for job in on_result(refs.pop(ref), self.ray.get(ref)) or ():
                    refs[self.remote.remote(job)] = job

    def close(self) -> None:
        pass


class EvaluatorExecutor:
    """Accuracy without training (a supernet's inherited weights, or a predictor): the jobs of a call
    are scored together by ``accuracy_many(archs, points)``, which batches what it can, in this process."""

    def __init__(self, accuracy_many: Callable[[list[Any], list[dict[str, Any] | None]], Sequence[float]], source: str):
        self.accuracy_many, self.source = accuracy_many, source

    def run(self, jobs: list[TrainJob], on_result: OnResult) -> None:
        from nas.arch import Arch

        queue = list(jobs)
        while queue:
            start = time.perf_counter()
            archs = [Arch.parse(j.arch).with_resolution(j.fidelity.resolution) for j in queue]
            accuracies = [float(a) for a in self.accuracy_many(archs, [j.params for j in queue])]
            seconds = (time.perf_counter() - start) / len(queue)
            follow: list[TrainJob] = []
            for job, accuracy in zip(queue, accuracies):
                error = None if math.isfinite(accuracy) else f"{self.source} accuracy is {accuracy}"
                follow += on_result(job, {"accuracy": accuracy if error is None else None,
                                          "val_accuracies": [accuracy], "seconds": seconds, "error": error,
                                          "source": self.source}) or ()
            queue = follow

    def close(self) -> None:
        pass


def make_executor(kind: str, workers: int, threads: int, ray_address: str | None = None):
    if kind == "ray":
        return RayExecutor(ray_address, threads)
    if kind != "local":
        raise NasError(f"--executor should be 'local' or 'ray' instead of {kind!r}")
    if workers < 1:
        raise NasError(f"--workers must be at least 1, got {workers}")
    return InlineExecutor() if workers == 1 else ProcessExecutor(workers)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)
