"""Build a latency table: measure every block and head a space can produce, then calibrate.

Each ``BlockSpec`` from ``nas.space.block_contexts`` is built alone (``nas.builder.build_block``,
the same constructor the whole network uses), exported to an in-memory ONNX model with the block's
input shape, and measured with the protocol of ``nas.latency.measure``, in chunks whose sessions are
interleaved. Entries are measured in a fixed shuffled order so that a noisy spell of the machine
spreads over all stages rather than biasing one.

With ``passes`` > 1 every entry is measured that many times, minutes apart: the machine's state (its
neighbours' use of the shared cache and memory bus) drifts over minutes, and one pass times every
model in one state of it. An entry keeps its fastest figure over the passes, the protocol's own
statistic over sessions spread in time. The calibration networks get ``calibration_passes`` passes
of their own (one after each pass over the entries, the rest back to back at the end) and each keeps
the geometric mean of its passes, because the calibration maps entries to what one measurement of a
network reads (a search's end-to-end figure, a validation's), which the fastest of several would
undercut, and the level of the whole fit is set by the machine's state while they were timed. Entries
and calibration networks left unstable (sessions disagreeing, or the machine busy: see
``nas.latency.measure``) get up to ``UNSTABLE_PASSES`` more passes at the end, and the fastest
figure of a pass is kept.

Progress is appended to ``<out>.partial`` (JSON lines: a header with the settings, then one line per
measured entry or calibration network) after every chunk; rerunning the same command reads it and
measures only what is missing. The finished table is written atomically and the sidecar removed.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

import nas
from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec
from nas.builder import Head, build_block
from nas.errors import NasError
from nas.export import MIN_OPSET, export_onnx
from nas.latency.measure import (UNSTABLE_PASSES, BusyMonitor, Measurement, Protocol, faster, measure_models,
                                 measurement_lock)
from nas.latency.table import LatencyTable
from nas.latency.targets import Target, cpu_model
from nas.space import SearchSpace, block_contexts, with_resolution

log = logging.getLogger(__name__)

ENTRY_ORDER_SEED = 0
IMAGENET_RESOLUTION = 224
# whole networks measured to fit the calibration: with 20, the fit's leave-one-out error was 6-8%,
# and the noise of single networks moved its coefficients; the levels model's 18 coefficients want
# 120 or more. They cost ~0.3 s each at 32 px, ~2 s at 224
CALIBRATION_ARCHS = 150
# the share of them drawn from the space's fast end (the fastest of FAST_POOL times as many random
# networks, by their entries' sum): a search's front lives there, and random networks seldom go
# there (on mnasnet.yaml, 5 of 120 below 0.08 ms; the fit then under-predicted such networks by 7%)
FAST_SHARE = 0.2
FAST_POOL = 20
# passes over every entry and calibration network (--passes). Two cut the calibration's leave-one-out
# error (mnasnet.yaml t1 3.1% -> 2.1%, mobilenetv2.yaml t1 1.4% -> 1.1%) and a two-pass mnasnet table
# scored 85-86% within +-5% right after its build, but an hour later it read 59% where the one-pass
# table it replaced read 79% (85% and 82% re-anchored), and at two threads the two-pass table lost to
# the one-pass one outright: the drift between a build and its use outweighs the noise a pass removes,
# so the default keeps the build at half the time
PASSES = 1
# passes over the calibration networks (--calibration-passes), each network keeping their geometric
# mean: the fit's level is the machine's state while they were timed, which on the AMD VM wandered
# between x0.99 and x1.04 of a table's build within half an hour. Fitted on one pass of mnasnet.yaml's
# 150 networks timed at one of 10 other moments of that half hour, the table predicted 300 held-out
# networks within +-5% for 88% on average (worst of 10 draws 83%), on the mean of 3 passes 91% (worst
# 89%), of 4 the same; 100 other networks 86% (80%), 89% (84%) and 89% (86%). A pass takes ~1 min at
# 32 px, ~3 min at 224
CALIBRATION_PASSES = 3


def default_num_classes(resolution: int) -> int:
    """1000 (ImageNet) for tables at 224 px and above, else 10 (the embedded proxy data sets)."""
    return 1000 if resolution >= IMAGENET_RESOLUTION else 10


def sample_archs(space: SearchSpace, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Arch]:
    """``n`` distinct random architectures (``space.sample`` with ``random.Random(seed)``), none in ``exclude``.

    Bounded: gives up after ``50 * n`` draws and returns what it has (small spaces hold few networks).
    """
    rng = random.Random(seed)
    archs: dict[str, Arch] = {}
    for _ in range(50 * n):
        if len(archs) == n:
            break
        arch = space.decode(space.sample(rng))
        if arch.key not in exclude:
            archs.setdefault(arch.key, arch)
    return list(archs.values())


def calibration_networks(space: SearchSpace, n: int, seed: int, raw_ms: Callable[[Arch], float]) -> list[Arch]:
    """``n`` networks to calibrate on: random ones, and a ``FAST_SHARE`` of the fastest by ``raw_ms``
    among ``FAST_POOL`` times as many other random ones (seed + 1)."""
    fast = round(n * FAST_SHARE)
    archs = sample_archs(space, n - fast, seed)
    pool = sample_archs(space, fast * FAST_POOL, seed + 1, exclude=frozenset(a.key for a in archs))
    return archs + sorted(pool, key=raw_ms)[:fast]


def entry_model(item: BlockSpec | HeadSpec, target: Target, opset: int) -> bytes:
    """A one-block ONNX model with the block's own input shape."""
    if isinstance(item, HeadSpec):
        module, channels = Head(item, dropout=0.0), item.in_ch
    else:
        module, channels = build_block(item), item.in_ch
    return export_onnx(module, resolution=item.resolution, batch=target.batch, opset=opset, in_channels=channels)


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _settings(space: SearchSpace, target: Target, resolution: int, num_classes: int, opset: int,
              protocol: Protocol, calibration_archs: int, calibration_seed: int, passes: int,
              calibration_passes: int) -> dict[str, Any]:
    """What a table's numbers depend on; a resumed build must match it field for field."""
    return {
        **target.settings(),
        "opset": opset, "exporter": "torch.onnx.export(dynamo=False)", "torch": torch.__version__,
        "cpu": cpu_model(), "space": space.name, "space_file": space.source, "space_sha256": _file_sha256(space.source),
        "resolution": resolution, "num_classes": num_classes, "protocol": protocol.to_dict(),
        "calibration_archs": calibration_archs, "calibration_seed": calibration_seed, "passes": passes,
        "calibration_passes": calibration_passes,
    }


class _Partial:
    """The ``.partial`` sidecar: a settings header, then one JSON line per finished measurement.

    Measurements are kept per pass; a model measured more than once within a pass (the passes over
    unstable ones) keeps its fastest figure there, both in memory and when the file is read back.
    """

    def __init__(self, path: Path, settings: dict[str, Any], fresh: bool):
        self.path = path
        self.done: dict[str, dict[int, dict[str, Measurement]]] = {"entry": {}, "calibration": {}}
        if path.exists() and not fresh:
            self._read(settings)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": settings}) + "\n")

    def _read(self, settings: dict[str, Any]) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["header"]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):
            raise NasError(f"{self.path}: not a build_lut.py progress file; delete it or pass --fresh") from None
        for field in sorted((set(settings) | set(header)) - {"space_file"}):  # the same file may be named differently
            if header.get(field) != settings.get(field):
                raise NasError(
                    f"{self.path}: an unfinished build with other settings ({field}: {header.get(field)!r} there, "
                    f"{settings.get(field)!r} now); rerun with those settings or pass --fresh to start over"
                )
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the build was killed
                continue
            kind = "entry" if "entry" in record else "calibration"
            self._keep(kind, record[kind], record["pass"], Measurement.from_dict(record["m"]))

    def _keep(self, kind: str, name: str, number: int, m: Measurement) -> None:
        measured = self.done[kind].setdefault(number, {})
        measured[name] = faster(measured.get(name), m)

    def measured(self, kind: str, number: int) -> dict[str, Measurement]:
        """What pass ``number`` has measured of ``kind`` so far."""
        return self.done[kind].get(number, {})

    def passes_of(self, kind: str, name: str) -> dict[int, Measurement]:
        return {number: measured[name] for number, measured in self.done[kind].items() if name in measured}

    def append(self, kind: str, number: int, names: list[str], measurements: list[Measurement]) -> None:
        with self.path.open("a") as handle:
            for name, m in zip(names, measurements):
                handle.write(json.dumps({kind: name, "pass": number, "m": m.to_dict()}) + "\n")
                self._keep(kind, name, number, m)


def combined_entry(passes: Iterable[Measurement]) -> Measurement:
    """An entry over its passes: the fastest figure, stable when any pass was (``faster``)."""
    return functools.reduce(faster, passes, None)


def combined_network(passes: Iterable[Measurement]) -> Measurement:
    """A calibration network over its passes: the geometric mean, what one measurement reads on
    average; stable only when every pass was."""
    passes = list(passes)
    mean = math.exp(sum(math.log(m.ms) for m in passes) / len(passes))
    return dataclasses.replace(min(passes, key=lambda m: m.ms), ms=mean, stable=all(m.stable for m in passes))


COMBINE = {"entry": combined_entry, "calibration": combined_network}


class _Measurer:
    """Measures named models chunk by chunk into the sidecar, all rounds checked by one busy monitor."""

    def __init__(self, partial: _Partial, target: Target, protocol: Protocol, chunk: int, progress: bool):
        self.partial, self.target, self.protocol, self.chunk, self.progress = partial, target, protocol, chunk, progress
        self.monitor = BusyMonitor(target, protocol) if protocol.reference else None

    def run(self, kind: str, number: int, names: list[str], model: Callable[[str], bytes], total: int,
            desc: str) -> None:
        # the lock covers exporting too: it would disturb another process's measurement
        with measurement_lock(), tqdm(total=total, initial=total - len(names), desc=desc, unit=kind,
                                      disable=not self.progress, dynamic_ncols=True) as bar:
            for start in range(0, len(names), self.chunk):
                part = names[start:start + self.chunk]
                measured = measure_models([model(name) for name in part], self.target, self.protocol, self.monitor)
                self.partial.append(kind, number, part, measured)
                bar.update(len(part))

    def combined(self, kind: str, name: str) -> Measurement:
        return COMBINE[kind](self.partial.passes_of(kind, name).values())

    def again(self, kind: str, names: list[str], model: Callable[[str], bytes]) -> None:
        """Up to ``UNSTABLE_PASSES`` more passes over the models whose combined figure is unstable, each
        measuring again their unstable passes (a busy spell is usually over by then)."""
        plural = {"entry": "entries", "calibration": "calibration networks"}.get(kind, kind + "s")
        for number in range(1, UNSTABLE_PASSES + 1):
            redo: dict[int, list[str]] = {}
            for name in names:
                passes = self.partial.passes_of(kind, name)
                if not COMBINE[kind](passes.values()).stable:
                    for pass_number in (p for p, m in passes.items() if not m.stable):
                        redo.setdefault(pass_number, []).append(name)
            if not redo:
                return
            count = sum(map(len, redo.values()))
            log.info("measuring %d unstable %s again (pass %d of at most %d)", count, plural, number, UNSTABLE_PASSES)
            for pass_number, unstable in sorted(redo.items()):
                self.run(kind, pass_number, unstable, model, len(unstable), f"unstable {plural}, pass {number}")


def entry_dict(m: Measurement) -> dict[str, Any]:
    return {"ms": round(m.ms, 6), "median_ms": round(m.median_ms, 6), "p10_ms": round(m.p10_ms, 6),
            "p90_ms": round(m.p90_ms, 6), "count": m.count, "spread": round(m.spread, 4),
            "slowdown": round(m.slowdown, 4), "stable": m.stable}


def build_table(
    space: SearchSpace,
    target: Target,
    out: str | Path,
    *,
    resolution: int | None = None,
    num_classes: int | None = None,
    opset: int = MIN_OPSET,
    protocol: Protocol = Protocol(),
    calibration_archs: int = CALIBRATION_ARCHS,
    calibration_seed: int = 0,
    passes: int = PASSES,
    calibration_passes: int = CALIBRATION_PASSES,
    chunk: int = 32,
    fresh: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> LatencyTable | None:
    """Measure every block context of ``space`` in ``passes`` passes and ``calibration_archs`` whole
    networks in ``calibration_passes``; write ``out``.

    Resumes from ``<out>.partial`` unless ``fresh``. ``stop_after`` measures at most that many new
    entries and returns None, leaving the sidecar to resume from (as an interrupted build would).
    """
    if passes < 1 or calibration_passes < 1:
        raise NasError(f"--passes and --calibration-passes must be at least 1, got {passes} and {calibration_passes}")
    out = Path(out)
    sidecar = out.with_name(out.name + ".partial")
    if out.exists() and not sidecar.exists() and not fresh:
        raise NasError(f"{out} already exists; pass --fresh to measure it again, or --out for another file")
    resolution = resolution or space.resolution
    num_classes = num_classes or default_num_classes(resolution)
    space = with_resolution(space, resolution)
    settings = _settings(space, target, resolution, num_classes, opset, protocol, calibration_archs, calibration_seed,
                         passes, calibration_passes)
    started = time.perf_counter()
    partial = _Partial(sidecar, settings, fresh)
    measurer = _Measurer(partial, target, protocol, chunk, progress)

    blocks, heads = block_contexts(space, num_classes)
    items: dict[str, BlockSpec | HeadSpec] = {item.key: item for item in [*blocks, *heads]}
    order = list(items)
    random.Random(ENTRY_ORDER_SEED).shuffle(order)

    def model_of(key: str) -> bytes:
        return entry_model(items[key], target, opset)

    def network_model(name: str) -> bytes:
        return export_onnx(archs[name], batch=target.batch, num_classes=num_classes)

    left = stop_after  # new entries this run may still measure (None: all)
    archs: dict[str, Arch] = {}

    def calibrate(number: int) -> None:
        names = [name for name in archs if name not in partial.measured("calibration", number)]
        of = f", pass {number} of {calibration_passes}" if calibration_passes > 1 else ""
        measurer.run("calibration", number, names, network_model, len(archs), f"calibration networks{of}")

    for number in range(1, passes + 1):
        todo = [key for key in order if key not in partial.measured("entry", number)]
        now = todo if left is None else todo[:left]
        of = f", pass {number} of {passes}" if passes > 1 else ""
        measurer.run("entry", number, now, model_of, len(items), f"{space.name} entries{of}")
        if len(now) < len(todo):
            return None
        left = None if left is None else left - len(now)
        if number == 1:  # chosen by the first pass's entries, so that a resumed build picks the same ones
            first = LatencyTable(settings, {key: {"ms": m.ms} for key, m in partial.measured("entry", 1).items()},
                                 None, str(out))
            archs = {arch.to_string(): arch for arch in calibration_networks(
                space, calibration_archs, calibration_seed, first.predict_raw)}
        if number <= calibration_passes:
            calibrate(number)
    for number in range(passes + 1, calibration_passes + 1):
        calibrate(number)
    measurer.again("entry", order, model_of)
    measurer.again("calibration", list(archs), network_model)

    entries = {key: entry_dict(measurer.combined("entry", key)) for key in items}
    uncalibrated = LatencyTable(settings, entries, None, str(out))
    calibration = None
    if archs:
        calibration = uncalibrated.fit_calibration(list(archs.values()),
                                                   [measurer.combined("calibration", name).ms for name in archs])

    unstable = sum(not entry["stable"] for entry in entries.values())
    if unstable:
        log.warning("%d of %d entries stayed unstable (sessions disagreeing or the machine busy beyond %.0f%%) "
                    "after %d more passes; they are marked stable=false in %s", unstable, len(entries),
                    protocol.spread_tol * 100, UNSTABLE_PASSES, out)
    metadata = {
        **settings,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 1),  # this run only, when resumed
        "entries": len(entries), "unstable_entries": unstable,
        "reference_ms": round(measurer.monitor.reference_ms, 6) if measurer.monitor else None,
        "python": platform.python_version(), "platform": platform.platform(), "nas": nas.__version__,
        "command": " ".join(sys.argv),
    }
    table = LatencyTable(metadata, entries, calibration, str(out))
    table.save(out)
    partial.path.unlink()
    return table


def refit_calibration(table: LatencyTable) -> LatencyTable:
    """The table with its calibration fitted again to the networks it keeps (arch and measured ms), without
    measuring: for a table whose calibration came from an older model."""
    old = table.calibration
    if old is None or not old.rows:
        raise NasError(f"{table.source}: the table keeps no calibration networks to refit; rebuild it with "
                       "python scripts/build_lut.py --fresh")
    archs = [Arch.parse(row.arch) for row in old.rows]
    return table.with_calibration(table.fit_calibration(archs, [row.measured_ms for row in old.rows]))


def estimate_build_seconds(space: SearchSpace, target: Target, *, resolution: int | None = None,
                           num_classes: int | None = None, sample: int = 48, opset: int = MIN_OPSET,
                           protocol: Protocol = Protocol(), chunk: int = 32, seed: int = 0,
                           passes: int = PASSES) -> dict[str, Any]:
    """Time the full per-entry pipeline on a random sample of entries and project the entries of all
    ``passes`` (not the passes over unstable ones, nor the calibration networks)."""
    resolution = resolution or space.resolution
    num_classes = num_classes or default_num_classes(resolution)
    space = with_resolution(space, resolution)
    blocks, heads = block_contexts(space, num_classes)
    items: list[BlockSpec | HeadSpec] = [*blocks, *heads]
    picked = random.Random(seed).sample(items, min(sample, len(items)))
    started = time.perf_counter()
    monitor = BusyMonitor(target, protocol) if protocol.reference else None
    exporting = 0.0
    for start in range(0, len(picked), chunk):
        t0 = time.perf_counter()
        models = [entry_model(item, target, opset) for item in picked[start:start + chunk]]
        exporting += time.perf_counter() - t0
        measure_models(models, target, protocol, monitor)
    per_entry = (time.perf_counter() - started) / len(picked)
    return {"entries": len(items), "sampled": len(picked), "per_entry_ms": round(per_entry * 1e3, 2),
            "export_ms": round(exporting / len(picked) * 1e3, 2), "passes": passes,
            "projected_entries_s": round(per_entry * len(items) * passes, 1)}
