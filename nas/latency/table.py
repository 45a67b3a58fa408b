"""Latency lookup tables: per-block measured latency, summed and calibrated to predict a network.

A table is versioned data (JSON, ``SCHEMA``): metadata saying where and how it was measured, one
entry per ``BlockSpec.key`` / ``HeadSpec.key`` (median, p10, p90, run count, session spread) and a
calibration fitted on whole networks measured end to end. Keys are readable shapes, so a missing one
says exactly which block the table lacks (``MissingEntryError``), never a silent default.

Prediction is ``calibration(sum of entries, number of lookups)``. A block measured alone pays a
per-call overhead and runs with warm caches, so raw sums drift from whole-network latency by a roughly
fixed amount per block; the calibration (raw sum, ``a*sum + b`` or ``a*sum + b*lookups + c``) is the
candidate with the lowest leave-one-out error on the calibration networks.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnxruntime as ort

from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec, resolve_layer
from nas.errors import NasError, NasWarning
from nas.latency.targets import Target, cpu_model

SCHEMA = 1
TABLES_DIR = Path("latency_tables")
CALIBRATION_MODELS = {"raw": 0, "linear": 2, "linear_blocks": 3}  # name -> number of coefficients
# the reference block's best time is compared, not a network's: on one shared VM it read 0.017-0.025 ms
# within an hour while whole networks kept their speed, and 0.041 ms a week earlier when they ran 2x slower
SPEED_TOLERANCE = 0.5
SPEED_READINGS = 10  # sessions of the reference block; the best counts (~0.1 s)

class MissingEntryError(NasError):
    """The table has no entry for a block: names the key and the table file."""

    def __init__(self, key: str, source: str, metadata: dict[str, Any]):
        self.key, self.source = key, source
        super().__init__(
            f"{source}: no latency entry for {key!r} (the table covers space {metadata.get('space')!r} at "
            f"resolution {metadata.get('resolution')} with {metadata.get('num_classes')} classes); rebuild the "
            f"table for this space: python scripts/build_lut.py --target {metadata.get('target', 'cpu')} "
            f"--space <space.yaml> --resolution <R> --num-classes <N>"
        )


class TableMismatchWarning(NasWarning):
    """The table was measured under other conditions than this machine or run: predictions may be off."""


def default_table_path(space_name: str, resolution: int, target: Target) -> Path:
    """``latency_tables/<space>-r<resolution>-<target>-t<threads>-b<batch>.json`` (relative to the cwd)."""
    return TABLES_DIR / f"{space_name}-r{resolution}-{target.name}-t{target.threads}-b{target.batch}.json"


# --- calibration --------------------------------------------------------------------------------


def _design(model: str, raw: np.ndarray, lookups: np.ndarray) -> np.ndarray:
    if model == "linear":
        return np.stack([raw, np.ones_like(raw)], axis=1)
    return np.stack([raw, lookups, np.ones_like(raw)], axis=1)


def _fit(model: str, raw: np.ndarray, lookups: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Least squares on relative error (networks differ several-fold in latency; errors are judged in %)."""
    x = _design(model, raw, lookups) / measured[:, None]
    coef, *_ = np.linalg.lstsq(x, np.ones_like(measured), rcond=None)
    return coef


def _apply(model: str, coef: Iterable[float], raw: float, lookups: float) -> float:
    c = tuple(coef)
    if model == "raw":
        return raw
    if model == "linear":
        return c[0] * raw + c[1]
    return c[0] * raw + c[1] * lookups + c[2]


@dataclass(frozen=True)
class Calibration:
    """Maps (raw sum, lookups) to predicted ms; keeps the networks and residuals it was fitted on."""

    model: str  # raw | linear | linear_blocks
    coef: tuple[float, ...]
    seed: int  # the random.Random seed that sampled the calibration networks
    loo_mape: dict[str, float]  # leave-one-out mean |error| in % of each candidate model
    rows: tuple[dict[str, Any], ...]  # per network: arch, key, raw_ms, lookups, measured_ms, predicted_ms, error_pct

    def apply(self, raw: float, lookups: int) -> float:
        return _apply(self.model, self.coef, raw, lookups)

    @property
    def arch_keys(self) -> frozenset[str]:
        return frozenset(row["key"] for row in self.rows)

    @classmethod
    def fit(cls, archs: list[Arch], raw: list[float], lookups: list[int], measured: list[float], seed: int) -> "Calibration":
        raw, lookups, measured = [float(v) for v in raw], [int(v) for v in lookups], [float(v) for v in measured]
        r, n, m = (np.asarray(v, dtype=float) for v in (raw, lookups, measured))
        loo = {"raw": float(np.mean(np.abs(r - m) / m) * 100)}
        for model, p in CALIBRATION_MODELS.items():
            if p == 0 or len(m) < p + 2:  # leave-one-out needs a point beyond a determined fit
                continue
            errors = []
            for i in range(len(m)):
                keep = np.arange(len(m)) != i
                coef = _fit(model, r[keep], n[keep], m[keep])
                errors.append(abs(_apply(model, coef, r[i], n[i]) - m[i]) / m[i])
            loo[model] = float(np.mean(errors) * 100)
        best = min(loo, key=lambda k: (round(loo[k], 6), CALIBRATION_MODELS[k]))  # ties: fewer coefficients
        coef = tuple(float(c) for c in _fit(best, r, n, m)) if best != "raw" else ()
        rows = []
        for arch, ri, ni, mi in zip(archs, raw, lookups, measured):
            predicted = _apply(best, coef, ri, ni)
            rows.append({"arch": arch.to_string(), "key": arch.key, "raw_ms": ri, "lookups": ni, "measured_ms": mi,
                         "predicted_ms": predicted, "error_pct": (predicted - mi) / mi * 100})
        return cls(best, coef, seed, loo, tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "coef": list(self.coef), "seed": self.seed, "loo_mape": self.loo_mape,
                "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls(data["model"], tuple(data["coef"]), data["seed"], dict(data["loo_mape"]), tuple(data["rows"]))


# --- the table ----------------------------------------------------------------------------------


class LatencyTable:
    """Measured per-block latencies of one space on one target; ``predict(arch)`` gives ms."""

    def __init__(self, metadata: dict[str, Any], entries: dict[str, dict[str, Any]],
                 calibration: Calibration | None = None, source: str = "<memory>"):
        self.metadata = metadata
        self.entries = entries
        self.calibration = calibration
        self.source = source
        self._ms = {key: entry["median_ms"] for key, entry in entries.items()}
        # (layer fields, (in_ch, size)) -> (ms, (out_ch, out_size)): resolving a layer costs far more
        # than this lookup, and a space has few distinct layer contexts; likewise for heads
        self._layers: dict[tuple, tuple[float, tuple[int, int]]] = {}
        self._heads: dict[tuple, float] = {}

    @property
    def num_classes(self) -> int:
        return self.metadata["num_classes"]

    # --- files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, expect_target: str | None = None, expect_threads: int | None = None,
             expect_batch: int | None = None) -> "LatencyTable":
        """Read a table; warn (one line per field) where it was made under other conditions.

        Compared: onnxruntime version and CPU model with this machine, and target, threads and batch
        with the ``expect_*`` values the caller is about to use.
        """
        path = Path(path)
        if not path.is_file():
            raise NasError(f"{path}: no such latency table; build one with python scripts/build_lut.py")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NasError(f"{path}: not a latency table (invalid JSON: {exc})") from None
        table = cls.from_dict(data, str(path))
        meta = table.metadata
        checks = [("onnxruntime", ort.__version__, "this machine"), ("cpu", cpu_model(), "this machine"),
                  ("target", expect_target, "this run"), ("threads", expect_threads, "this run"),
                  ("batch", expect_batch, "this run")]
        for field, here, whose in checks:
            if here is not None and meta.get(field) != here:
                warnings.warn(f"{path}: table {field} is {meta.get(field)!r}, {whose} {here!r}; its predictions "
                              f"may be off (rebuild with scripts/build_lut.py)", TableMismatchWarning, stacklevel=2)
        return table

    def check_machine_speed(self, target: Target, tolerance: float = SPEED_TOLERANCE) -> float | None:
        """Time the protocol's reference block here and compare it with the table's machine; warn when
        they differ by more than ``tolerance``. Returns this machine's time over the table's.

        Virtual machines often report one CPU model ("AMD EPYC") for hosts of different speeds, so the
        model name alone cannot tell that a table comes from elsewhere. Call it only when nothing else
        runs (it measures), on the target the table was built for.
        """
        then = self.metadata.get("reference_ms")
        if not then or self.metadata.get("target") != target.name or self.metadata.get("threads") != target.threads:
            return None
        from nas.latency.measure import BusyMonitor, Protocol, measurement_lock  # torch only when checking

        with measurement_lock():
            monitor = BusyMonitor(target, Protocol.from_dict(self.metadata.get("protocol", {})))
            for _ in range(SPEED_READINGS - 3):  # the monitor has taken three
                monitor.slowdown()
        now = monitor.reference_ms
        ratio = now / then
        if not 1 / (1 + tolerance) <= ratio <= 1 + tolerance:
            warnings.warn(
                f"{self.source}: this machine runs the reference block in {now:.4f} ms, the table's machine in "
                f"{then:.4f} ms ({ratio:.2f}x): the table was measured on another or differently loaded machine "
                f"and its predictions may be off by about as much; rebuild it here with python scripts/build_lut.py "
                f"--target {target.name} --threads {target.threads} --space {self.metadata.get('space_file', '<space.yaml>')} "
                "--fresh", TableMismatchWarning, stacklevel=2)
        return ratio

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> "LatencyTable":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise NasError(f"{source}: not a latency table of schema {SCHEMA} (found schema {found!r})")
        for field in ("metadata", "entries"):
            if not isinstance(data.get(field), dict):
                raise NasError(f"{source}: latency table lacks its {field!r} mapping")
        for field in ("num_classes", "resolution", "target", "threads", "batch"):
            if field not in data["metadata"]:
                raise NasError(f"{source}: latency table metadata lacks {field!r}")
        calibration = Calibration.from_dict(data["calibration"]) if data.get("calibration") else None
        return cls(data["metadata"], data["entries"], calibration, source)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "metadata": self.metadata,
                "calibration": self.calibration.to_dict() if self.calibration else None, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename): an interrupted save never leaves half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        entries = data.pop("entries")
        head = json.dumps(data, indent=1)[:-2]  # drop the closing "\n}" to append the entries
        lines = [f" {json.dumps(key)}: {json.dumps(entry)}" for key, entry in entries.items()]
        text = head + ',\n "entries": {\n' + ",\n".join(lines) + "\n }\n}\n"
        tmp = path.with_name(path.name + ".tmp")  # plain open(): the file gets the umask's permissions
        tmp.write_text(text)
        os.replace(tmp, path)

    # --- prediction ---------------------------------------------------------------------------
    def entry_ms(self, key: str) -> float:
        try:
            return self._ms[key]
        except KeyError:
            raise MissingEntryError(key, self.source, self.metadata) from None

    def _learn(self, arch: Arch, num_classes: int) -> None:
        """Resolve the arch's layers once, memoising each layer context's entry and output shape."""
        state = (3, arch.resolution)
        for layer in arch.layers:
            spec = resolve_layer(layer, *state)
            ms = self.entry_ms(spec.key)
            self._layers[layer, state] = ms, (spec.out_ch, spec.out_resolution)
            state = (spec.out_ch, spec.out_resolution)
        head = HeadSpec(arch.pool, state[0], arch.hidden, arch.hidden_act, num_classes, state[1])
        self._heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state] = self.entry_ms(head.key)

    def _lookup(self, arch: Arch, num_classes: int) -> float:
        """Sum of entries from the memo alone; a KeyError means a context not seen yet."""
        layers = self._layers
        total = 0.0
        state = (3, arch.resolution)
        for layer in arch.layers:
            ms, state = layers[layer, state]
            total += ms
        return total + self._heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state]

    def predict_raw(self, arch: Arch, num_classes: int | None = None) -> tuple[float, int]:
        """Sum of the entries of the arch's blocks and head, and the number of entries summed."""
        num_classes = num_classes or self.num_classes
        try:
            total = self._lookup(arch, num_classes)
        except KeyError:
            self._learn(arch, num_classes)
            total = self._lookup(arch, num_classes)
        return total, len(arch.layers) + 1

    def predict(self, arch: Arch, num_classes: int | None = None) -> float:
        """Predicted end-to-end latency in ms (``num_classes`` defaults to the table's)."""
        raw, lookups = self.predict_raw(arch, num_classes)
        return self.calibration.apply(raw, lookups) if self.calibration else raw

    def predict_many(self, archs: Iterable[Arch], num_classes: int | None = None) -> list[float]:
        return [self.predict(arch, num_classes) for arch in archs]

    def predict_specs(self, specs: Iterable[BlockSpec], head: HeadSpec) -> float:
        """Predicted ms from already resolved blocks (as ``nas.blocks.resolve`` returns them)."""
        keys = [spec.key for spec in specs] + [head.key]
        raw = sum(self.entry_ms(key) for key in keys)
        return self.calibration.apply(raw, len(keys)) if self.calibration else raw
