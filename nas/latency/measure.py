"""The latency measurement protocol: warm-up, many timed runs, repeated interleaved sessions.

Why each step (see docs/latency.md for the figures behind them):

- Warm-up runs: the first runs of a session allocate buffers and fill caches.
- Many timed runs (``time.perf_counter_ns`` around ``run_with_iobinding``, the cheapest call ONNX
  Runtime offers from Python, with the garbage collector paused): the median ignores the odd slow
  run; p10/p90 show the spread. The run count adapts to the model: enough runs to fill
  ``session_seconds``, within ``[min_runs, max_runs]``.
- The figure is the **fastest run** of all sessions (``aggregate="fastest"``). The machine's noise
  comes and goes in spells of 0.1-1 s that slow every run in them by 5-25%, longer than a session:
  the same 30 networks measured three times agreed within +-5% for 63-70% of pairs by best session
  median, and for 96% by fastest run. Noise only adds time, and the fastest run is the one least touched.
  The best session median and p10/p90 are kept beside it.
- Several sessions per model: a session's median varies by several percent from one session to the
  next (memory placement), and by tens of percent on a busy machine. Sessions are interleaved
  round-robin over all the models being compared, so a burst of machine noise hits them all alike
  instead of one model's every session.
- Agreement check: when the best ``sessions`` session figures (each session's fastest run, or its
  median for the median-based aggregates) spread by more than ``spread_tol``,
  the model gets another round of sessions (``retries``); a figure that still disagrees is kept but
  marked unstable and logged.
- Busy check (``reference``): a machine slowed down as a whole (another process on the shared core,
  cache or memory bus) slows every session alike, which the agreement check cannot see. A fixed
  reference block is timed before and after each round of sessions; a figure taken from a round in
  which it ran more than ``spread_tol`` slower than its best is marked unstable. Table builds,
  validation and ``measure_archs`` measure unstable models again later (``UNSTABLE_PASSES``) and
  keep the fastest figure: noise only adds time.
- One measurement at a time per machine, and never alongside training: ``measurement_lock`` is an
  exclusive ``flock`` on a file in the system temp dir, ``training_lock`` a shared one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from nas.arch import Arch
from nas.blocks import BlockSpec
from nas.builder import build_block
from nas.errors import NasError
from nas.export import export_onnx
from nas.latency.targets import Target

try:
    import fcntl
except ImportError:  # Windows: measurements are serialised within one program only
    fcntl = None

log = logging.getLogger(__name__)

LOCK_PATH = Path(tempfile.gettempdir()) / "nas-measurement.lock"
AGGREGATES = ("fastest", "min", "median")
# extra passes over models left unstable: on a shared machine a busy spell can outlast one pass, and
# an entry it inflates inflates every network containing the block (one pass left 44% of mnasnet.yaml's
# entries unstable on a busy day, three left 9% on a quieter one)
UNSTABLE_PASSES = 3


@dataclass(frozen=True)
class Protocol:
    """How one model is timed; recorded in every latency table so that numbers stay comparable."""

    warmup: int = 5  # untimed runs at the start of each session
    min_runs: int = 20  # timed runs per session, at least ...
    max_runs: int = 300  # ... and at most
    session_seconds: float = 0.01  # aim for this much timed running per session, within those bounds
    sessions: int = 3  # sessions per model, interleaved round-robin over the models measured together
    # "fastest": the fastest run of all sessions; "min": the best session median; "median": the median one
    aggregate: str = "fastest"
    spread_tol: float = 0.1  # session figures disagreeing by more than this (relative) ...
    retries: int = 1  # ... trigger this many extra rounds of sessions
    reference: bool = True  # time a reference block around each round to detect a busy machine

    def __post_init__(self) -> None:
        for name in ("warmup", "min_runs", "sessions"):
            if getattr(self, name) < 1:
                raise NasError(f"measurement protocol: {name} must be at least 1, got {getattr(self, name)}")
        if self.max_runs < self.min_runs:
            raise NasError(f"measurement protocol: max_runs ({self.max_runs}) is below min_runs ({self.min_runs})")
        if self.aggregate not in AGGREGATES:
            raise NasError(f"measurement protocol: aggregate {self.aggregate!r} is not one of {AGGREGATES}")
        if self.retries < 0 or self.session_seconds < 0 or self.spread_tol <= 0:
            raise NasError("measurement protocol: retries and session_seconds must be >= 0, spread_tol > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Protocol":
        return cls(**data)


@dataclass(frozen=True)
class Measurement:
    """One model's latency in milliseconds, with the spread that says how far to trust it."""

    ms: float  # the protocol's aggregate: what tables sum and validations compare
    median_ms: float  # the best session median
    p10_ms: float  # percentiles over every timed run of every session
    p90_ms: float
    count: int  # timed runs in all
    sessions_ms: tuple[float, ...]  # per-session figures (fastest run, or median), in the order measured
    spread: float  # (max - min) / min over the best `protocol.sessions` session figures
    slowdown: float  # the reference block's slowdown in the round the value comes from (0 = unchecked)
    stable: bool  # spread and slowdown both within protocol.spread_tol

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sessions_ms"] = list(self.sessions_ms)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Measurement":
        return cls(**{**data, "sessions_ms": tuple(data["sessions_ms"])})


def faster(a: Measurement | None, b: Measurement) -> Measurement:
    """Of two measurements of one model, the faster: machine noise only ever adds time. It counts as
    stable when either was: a stable repeat that is no faster bounds the other from above."""
    if a is None:
        return b
    fastest = b if b.ms < a.ms else a
    return dataclasses.replace(fastest, stable=a.stable or b.stable)


# --- the machine-wide guard -------------------------------------------------------------------

_held = threading.local()


@contextlib.contextmanager
def _flock(mode: int, what: str) -> Iterator[None]:
    with open(LOCK_PATH, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s waits for %s: another nas measurement or training holds it", what, LOCK_PATH)
                fcntl.flock(handle, mode)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


_in_process = threading.Lock()  # serialises measuring threads where flock is unavailable


@contextlib.contextmanager
def measurement_lock() -> Iterator[None]:
    """Hold the machine exclusively while measuring: no other nas measurement or training runs.

    Re-entrant within a thread. Waits (and logs once) while another process or thread holds the lock.
    """
    if getattr(_held, "measuring", 0):
        _held.measuring += 1
        try:
            yield
        finally:
            _held.measuring -= 1
        return
    if getattr(_held, "training", 0):
        raise RuntimeError("latency measurement inside training_lock() would deadlock; measure after training")
    with _in_process, _flock(fcntl.LOCK_EX if fcntl else 0, "latency measurement"):
        _held.measuring = 1
        try:
            yield
        finally:
            _held.measuring = 0


@contextlib.contextmanager
def training_lock() -> Iterator[None]:
    """Hold while training: trainings share the machine, measurements wait until none is running."""
    if getattr(_held, "measuring", 0):
        raise RuntimeError("training inside measurement_lock() would skew the measurement")
    _held.training = getattr(_held, "training", 0) + 1
    try:
        with _flock(fcntl.LOCK_SH if fcntl else 0, "training"):
            yield
    finally:
        _held.training -= 1


# --- timing -------------------------------------------------------------------------------------


def _time_session(target: Target, model: bytes, protocol: Protocol) -> np.ndarray:
    """A fresh session: warm-up, then timed runs; returns their durations in nanoseconds."""
    session = target.session(model)
    spec = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(spec.shape, dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input(spec.name, x)
    for output in session.get_outputs():
        binding.bind_output(output.name)
    run, clock = session.run_with_iobinding, time.perf_counter_ns
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to the model
    try:
        warm = np.empty(protocol.warmup, dtype=np.int64)
        for i in range(protocol.warmup):
            start = clock()
            run(binding)
            warm[i] = clock() - start
        per_run = max(float(np.median(warm[1:] if protocol.warmup > 1 else warm)), 1.0)
        n = min(protocol.max_runs, max(protocol.min_runs, math.ceil(protocol.session_seconds * 1e9 / per_run)))
        times = np.empty(n, dtype=np.int64)
        for i in range(n):
            start = clock()
            run(binding)
            times[i] = clock() - start
    finally:
        if gc_enabled:
            gc.enable()
    return times


def _session_figures(sessions: list[np.ndarray], protocol: Protocol) -> list[float]:
    """Each session's figure in ms: its fastest run for the "fastest" aggregate, else its median."""
    statistic = np.min if protocol.aggregate == "fastest" else np.median
    return [float(statistic(t)) / 1e6 for t in sessions]


def _best_spread(figures: list[float], k: int) -> float:
    best = sorted(figures)[:k]
    return (best[-1] - best[0]) / best[0]


def _summarise(sessions: list[np.ndarray], busy: list[float], protocol: Protocol) -> Measurement:
    figures = _session_figures(sessions, protocol)
    medians = [float(np.median(t)) / 1e6 for t in sessions]
    pooled = np.concatenate(sessions) / 1e6
    value = float(np.median(figures)) if protocol.aggregate == "median" else min(figures)
    # how busy the machine was in the round of the session the value comes from
    slowdown = busy[int(np.argmin([abs(f - value) for f in figures]))]
    spread = _best_spread(figures, protocol.sessions)
    return Measurement(
        ms=value,
        median_ms=min(medians),
        p10_ms=float(np.percentile(pooled, 10)),
        p90_ms=float(np.percentile(pooled, 90)),
        count=int(pooled.size),
        sessions_ms=tuple(figures),
        spread=spread,
        slowdown=slowdown,
        stable=spread <= protocol.spread_tol and slowdown <= protocol.spread_tol,
    )


# a small MBConv with memory-bound (depthwise) and compute-bound (1x1) parts: 40 us at 1 thread on the
# 2-core EPYC this was written on (75 us while the other core was busy); a round's check costs ~2 x 12 ms
REFERENCE_BLOCK = BlockSpec("ir", 16, 16, 96, 3, 1, 0, "relu", True, 16)


class BusyMonitor:
    """Times the reference block; ``slowdown()`` is its latency now relative to the best seen.

    One monitor per build or validation keeps its best across all their rounds. ``baseline_ms``
    (a table's ``reference_ms``) counts as seen: measurements meant to be compared with that table
    are then held to the machine state it was built in, not only to the best of their own minutes.
    """

    def __init__(self, target: Target, protocol: Protocol, baseline_ms: float | None = None):
        self.target, self.protocol = target, protocol
        self.model = export_onnx(build_block(REFERENCE_BLOCK), resolution=REFERENCE_BLOCK.resolution,
                                 batch=target.batch, in_channels=REFERENCE_BLOCK.in_ch)
        self.best_ns = math.inf
        self.baseline_ns = baseline_ms * 1e6 if baseline_ms else math.inf
        with measurement_lock():
            for _ in range(3):  # a baseline before the first round is judged
                self.slowdown()

    def slowdown(self) -> float:
        # judged by the protocol's own session figure: a spell that leaves a session's fastest run
        # fast has not touched a fastest-run figure
        now_ns = _session_figures([_time_session(self.target, self.model, self.protocol)], self.protocol)[0] * 1e6
        self.best_ns = min(self.best_ns, now_ns)
        return now_ns / min(self.best_ns, self.baseline_ns) - 1

    @property
    def reference_ms(self) -> float:
        """The reference block's best session figure here (never the baseline): a fingerprint of the machine's
        speed, kept in tables."""
        return self.best_ns / 1e6


def measure_models(models: Sequence[bytes], target: Target, protocol: Protocol = Protocol(),
                   monitor: BusyMonitor | None = None) -> list[Measurement]:
    """Measure ONNX models together, sessions interleaved round-robin so noise hits all alike.

    With ``protocol.reference``, a ``monitor`` (made here when not given) checks every round.
    """
    sessions: list[list[np.ndarray]] = [[] for _ in models]
    busy: list[list[float]] = [[] for _ in models]  # the round's reference slowdown, per session
    with measurement_lock():
        if protocol.reference and monitor is None:
            monitor = BusyMonitor(target, protocol)
        pending = list(range(len(models)))
        for _ in range(1 + protocol.retries):
            for _ in range(protocol.sessions):
                before = monitor.slowdown() if protocol.reference else 0.0
                for i in pending:
                    sessions[i].append(_time_session(target, models[i], protocol))
                slowdown = max(before, monitor.slowdown()) if protocol.reference else 0.0
                for i in pending:
                    busy[i].append(slowdown)
            pending = [i for i in pending
                       if _best_spread(_session_figures(sessions[i], protocol), protocol.sessions) > protocol.spread_tol]
            if not pending:
                break
    return [_summarise(s, b, protocol) for s, b in zip(sessions, busy)]


def measure_onnx(model: bytes, target: Target, protocol: Protocol = Protocol()) -> Measurement:
    return measure_models([model], target, protocol)[0]


def measure_archs(
    archs: Sequence[Arch], target: Target, protocol: Protocol = Protocol(), num_classes: int = 1000, *,
    chunk: int = 10, monitor: BusyMonitor | None = None, progress: Callable[[int], object] | None = None,
) -> list[Measurement]:
    """End-to-end latency of whole networks (each at its own resolution), measured interleaved.

    Networks are exported and measured ``chunk`` at a time (a 224-px model takes megabytes), all under
    the machine-wide lock so that exporting never disturbs another process's measurement. Models left
    unstable get up to ``UNSTABLE_PASSES`` more passes at the end, and the fastest figure is kept. ``progress(k)`` is called
    after each chunk of the first pass.
    """
    results: list[Measurement | None] = [None] * len(archs)

    def run(indices: list[int], report: Callable[[int], object] | None) -> None:
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            models = [export_onnx(archs[i], batch=target.batch, num_classes=num_classes) for i in part]
            for i, m in zip(part, measure_models(models, target, protocol, monitor)):
                results[i] = faster(results[i], m)
            if report:
                report(len(part))

    with measurement_lock():
        if protocol.reference and monitor is None:
            monitor = BusyMonitor(target, protocol)
        run(list(range(len(archs))), progress)
        for _ in range(UNSTABLE_PASSES):
            unstable = [i for i, m in enumerate(results) if not m.stable]
            if not unstable:
                break
            run(unstable, None)
    return results
