"""Build a latency table: measure every block and head a space can produce, then calibrate.

Each ``BlockSpec`` from ``nas.space.block_contexts`` is built alone (``nas.builder.build_block``,
the same constructor the whole network uses), exported to an in-memory ONNX model with the block's
input shape, and measured with the protocol of ``nas.latency.measure``, in chunks whose sessions are
interleaved. Entries are measured in a fixed shuffled order so that a noisy spell of the machine
spreads over all stages rather than biasing one.

Progress is appended to ``<out>.partial`` (JSON lines: a header with the settings, then one line per
measured entry or calibration network) after every chunk; rerunning the same command reads it and
measures only what is missing. The finished table is written atomically and the sidecar removed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import nas
from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec
from nas.builder import Head, build_block
from nas.errors import NasError
from nas.export import MIN_OPSET, export_onnx
from nas.latency.measure import Measurement, Protocol, measure_models
from nas.latency.table import Calibration, LatencyTable
from nas.latency.targets import Target, cpu_model
from nas.space import SearchSpace, block_contexts, with_resolution

log = logging.getLogger(__name__)

ENTRY_ORDER_SEED = 0
IMAGENET_RESOLUTION = 224


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


def _entry_model(item: BlockSpec | HeadSpec, target: Target, opset: int) -> bytes:
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
              protocol: Protocol, calibration_archs: int, calibration_seed: int) -> dict[str, Any]:
    """What a table's numbers depend on; a resumed build must match it field for field."""
    return {
        **target.settings(),
        "opset": opset, "exporter": "torch.onnx.export(dynamo=False)", "torch": torch.__version__,
        "cpu": cpu_model(), "space": space.name, "space_file": space.source, "space_sha256": _file_sha256(space.source),
        "resolution": resolution, "num_classes": num_classes, "protocol": protocol.to_dict(),
        "calibration_archs": calibration_archs, "calibration_seed": calibration_seed,
    }


class _Partial:
    """The ``.partial`` sidecar: a settings header, then one JSON line per finished measurement."""

    def __init__(self, path: Path, settings: dict[str, Any], fresh: bool):
        self.path = path
        self.entries: dict[str, Measurement] = {}
        self.calibration: dict[str, Measurement] = {}
        if path.exists() and not fresh:
            self._read(settings)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": settings}) + "\n")

    def _read(self, settings: dict[str, Any]) -> None:
        lines = self.path.read_text().splitlines()
        header = json.loads(lines[0]).get("header", {}) if lines else {}
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
            store = self.entries if "entry" in record else self.calibration
            store[record.get("entry") or record["calibration"]] = Measurement.from_dict(record["m"])

    def append(self, kind: str, names: list[str], measurements: list[Measurement]) -> None:
        with self.path.open("a") as handle:
            for name, m in zip(names, measurements):
                handle.write(json.dumps({kind: name, "m": m.to_dict()}) + "\n")


def _entry_dict(m: Measurement) -> dict[str, Any]:
    return {"median_ms": round(m.median_ms, 6), "p10_ms": round(m.p10_ms, 6), "p90_ms": round(m.p90_ms, 6),
            "count": m.count, "spread": round(m.spread, 4), "stable": m.stable}


def build_table(
    space: SearchSpace,
    target: Target,
    out: str | Path,
    *,
    resolution: int | None = None,
    num_classes: int | None = None,
    opset: int = MIN_OPSET,
    protocol: Protocol = Protocol(),
    calibration_archs: int = 20,
    calibration_seed: int = 0,
    chunk: int = 32,
    fresh: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> LatencyTable | None:
    """Measure every block context of ``space`` and ``calibration_archs`` whole networks; write ``out``.

    Resumes from ``<out>.partial`` unless ``fresh``. ``stop_after`` measures at most that many new
    entries and returns None, leaving the sidecar to resume from (as an interrupted build would).
    """
    out = Path(out)
    sidecar = out.with_name(out.name + ".partial")
    if out.exists() and not sidecar.exists() and not fresh:
        raise NasError(f"{out} already exists; pass --fresh to measure it again, or --out for another file")
    resolution = resolution or space.resolution
    num_classes = num_classes or default_num_classes(resolution)
    space = with_resolution(space, resolution)
    settings = _settings(space, target, resolution, num_classes, opset, protocol, calibration_archs, calibration_seed)
    started = time.perf_counter()
    partial = _Partial(sidecar, settings, fresh)

    blocks, heads = block_contexts(space, num_classes)
    items: list[BlockSpec | HeadSpec] = [*blocks, *heads]
    order = list(range(len(items)))
    random.Random(ENTRY_ORDER_SEED).shuffle(order)
    todo = [items[i] for i in order if items[i].key not in partial.entries]
    if stop_after is not None:
        todo = todo[:stop_after]

    done = sum(item.key in partial.entries for item in items)
    bar = tqdm(total=len(items), initial=done, desc=f"{space.name} entries", unit="entry", disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            models = [_entry_model(item, target, opset) for item in part]
            measured = measure_models(models, target, protocol)
            partial.append("entry", [item.key for item in part], measured)
            partial.entries.update((item.key, m) for item, m in zip(part, measured))
            bar.update(len(part))
    if any(item.key not in partial.entries for item in items):
        return None

    entries = {item.key: _entry_dict(partial.entries[item.key]) for item in items}
    table = LatencyTable(settings, entries, None, str(out))
    archs = sample_archs(space, calibration_archs, calibration_seed)
    calibration = _calibrate(table, archs, target, protocol, partial, num_classes, calibration_seed, chunk, progress)
    unstable = sum(not entry["stable"] for entry in entries.values())
    if unstable:
        log.warning("%d of %d entries kept a session spread above %.0f%% after %d retries (machine busy?); "
                    "they are marked stable=false in %s", unstable, len(entries), protocol.spread_tol * 100,
                    protocol.retries, out)
    metadata = {
        **settings,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 1),  # this run only, when resumed
        "entries": len(entries), "unstable_entries": unstable,
        "python": platform.python_version(), "platform": platform.platform(), "nas": nas.__version__,
        "command": " ".join(sys.argv),
    }
    table = LatencyTable(metadata, entries, calibration, str(out))
    table.save(out)
    partial.path.unlink()
    return table


def _calibrate(table: LatencyTable, archs: list[Arch], target: Target, protocol: Protocol, partial: _Partial,
               num_classes: int, seed: int, chunk: int, progress: bool) -> Calibration | None:
    """Measure the calibration networks end to end (resumable, interleaved) and fit the calibration."""
    todo = [arch for arch in archs if arch.to_string() not in partial.calibration]
    with tqdm(total=len(archs), initial=len(archs) - len(todo), desc="calibration networks", unit="net",
              disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            models = [export_onnx(arch, batch=target.batch, num_classes=num_classes) for arch in part]
            measured = measure_models(models, target, protocol)
            partial.append("calibration", [arch.to_string() for arch in part], measured)
            partial.calibration.update((arch.to_string(), m) for arch, m in zip(part, measured))
            bar.update(len(part))
    if not archs:
        return None
    raw = [table.predict_raw(arch) for arch in archs]
    return Calibration.fit(archs, [r for r, _ in raw], [n for _, n in raw],
                           [partial.calibration[arch.to_string()].median_ms for arch in archs], seed)


def estimate_build_seconds(space: SearchSpace, target: Target, *, resolution: int | None = None,
                           num_classes: int | None = None, sample: int = 48, opset: int = MIN_OPSET,
                           protocol: Protocol = Protocol(), chunk: int = 32, seed: int = 0) -> dict[str, Any]:
    """Time the full per-entry pipeline on a random sample of entries and project the whole build."""
    resolution = resolution or space.resolution
    num_classes = num_classes or default_num_classes(resolution)
    space = with_resolution(space, resolution)
    blocks, heads = block_contexts(space, num_classes)
    items: list[BlockSpec | HeadSpec] = [*blocks, *heads]
    picked = random.Random(seed).sample(items, min(sample, len(items)))
    started = time.perf_counter()
    exporting = 0.0
    for start in range(0, len(picked), chunk):
        t0 = time.perf_counter()
        models = [_entry_model(item, target, opset) for item in picked[start:start + chunk]]
        exporting += time.perf_counter() - t0
        measure_models(models, target, protocol)
    per_entry = (time.perf_counter() - started) / len(picked)
    return {"entries": len(items), "sampled": len(picked), "per_entry_ms": round(per_entry * 1e3, 2),
            "export_ms": round(exporting / len(picked) * 1e3, 2), "projected_entries_s": round(per_entry * len(items), 1)}
