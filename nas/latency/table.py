"""Latency lookup tables: the file (schema, load, save) and prediction through one memo.

A table is versioned data (JSON, ``SCHEMA``): metadata saying where and how it was measured, one entry
per ``BlockSpec.key`` / ``HeadSpec.key`` (the protocol's figure ``ms``, with median, p10, p90, run count
and session spread) and a ``Calibration`` fitted on whole networks measured end to end
(``nas.latency.calibration``). Keys are readable shapes, so a missing one says exactly which block the
table lacks (``MissingEntryError``), never a silent default; ``nas.latency.adapt`` measures such
entries on demand.

Tables of schema 2 (whose calibration was one of a dozen models with cache and bandwidth grids) still
load: they keep their calibration networks and measured times, so their calibration is fitted again to
this module's model on loading, without measuring anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec, resolve, resolve_layer
from nas.errors import NasError
from nas.latency.calibration import RAW, Calibration, NetworkTerms, network_terms
from nas.latency.targets import Target
from nas.latency.traffic import head_weight_bytes, weight_bytes
from nas.space import SearchSpace, block_contexts, with_resolution

# 3: one calibration model (named terms); 2 is read and its calibration refitted from its networks
SCHEMA = 3
READABLE_SCHEMAS = (2, 3)
TABLES_DIR = Path("latency_tables")


class MissingEntryError(NasError):
    """The table has no entry for a block: names the key, the table file and how to add it."""

    def __init__(self, key: str, source: str, metadata: dict[str, Any]):
        self.key, self.source = key, source
        super().__init__(
            f"{source}: no latency entry for {key!r} (the table covers space {metadata.get('space')!r} at "
            f"resolution {metadata.get('resolution')} with {metadata.get('num_classes')} classes); measure the "
            f"missing entries with python scripts/adapt_lut.py --target {metadata.get('target', 'cpu')} --table "
            f"{source} --space <space.yaml> --resolution <R> --num-classes <N>"
        )


def default_table_path(space_name: str, resolution: int, target: Target) -> Path:
    """``latency_tables/<space>-r<resolution>-<target>-t<threads>-b<batch>.json`` (relative to the cwd)."""
    return TABLES_DIR / f"{space_name}-r{resolution}-{target.name}-t{target.threads}-b{target.batch}.json"


class _Layer(NamedTuple):
    """A layer in one context (input resolution of the network, channels and size coming in)."""

    value: float  # its calibrated share of a prediction (``Calibration.block_value``)
    weight_bytes: int
    out: tuple[int, int]  # (channels, size) going out


class _Head(NamedTuple):
    value: float
    weight_bytes: int


class LatencyTable:
    """Measured per-block latencies of one space on one target; ``predict(arch)`` gives ms.

    Treated as immutable: ``with_entries`` and ``with_calibration`` return new tables.
    """

    def __init__(self, metadata: dict[str, Any], entries: dict[str, dict[str, Any]],
                 calibration: Calibration | None = None, source: str = "<memory>", sha256: str | None = None):
        self.metadata = metadata
        self.entries = entries
        self.calibration = calibration
        self.source = source
        self.sha256 = sha256  # of the file it was loaded from (provenance of adapted tables)
        self._ms = {key: entry["ms"] for key, entry in entries.items()}
        self._cal = calibration or RAW
        # input resolution -> {(layer, (in_ch, size)): _Layer}: a space has few distinct layer contexts and
        # resolving one costs far more than this lookup; heads likewise
        self._layers: dict[int, dict[tuple, _Layer]] = {}
        self._heads: dict[int, dict[tuple, _Head]] = {}

    @property
    def num_classes(self) -> int:
        return self.metadata["num_classes"]

    @property
    def resolution(self) -> int:
        return self.metadata["resolution"]

    # --- files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise NasError(f"{path}: no such latency table; build one with python scripts/build_lut.py")
        raw = path.read_bytes()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NasError(f"{path}: not a latency table (invalid JSON: {exc})") from None
        return cls.from_dict(data, str(path), hashlib.sha256(raw).hexdigest())

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>", sha256: str | None = None) -> "LatencyTable":
        if not isinstance(data, dict) or data.get("schema") not in READABLE_SCHEMAS:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise NasError(f"{source}: not a latency table of schema {SCHEMA} (found schema {found!r}); "
                           "rebuild it with python scripts/build_lut.py --fresh")
        for field in ("metadata", "entries"):
            if not isinstance(data.get(field), dict):
                raise NasError(f"{source}: latency table lacks its {field!r} mapping")
        for field in ("num_classes", "resolution", "target", "threads", "batch"):
            if field not in data["metadata"]:
                raise NasError(f"{source}: latency table metadata lacks {field!r}")
        for key, entry in data["entries"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("ms"), (int, float)):
                raise NasError(f"{source}: entry {key!r} lacks a numeric 'ms'")
        table = cls(data["metadata"], data["entries"], None, source, sha256)
        stored = data.get("calibration")
        if not stored:
            return table
        if data["schema"] == SCHEMA:
            return table.with_calibration(Calibration.from_dict(stored, source))
        try:  # schema 2: the same networks and times, fitted again to this model
            archs = [Arch.parse(row["arch"]) for row in stored["rows"]]
            measured = [float(row["measured_ms"]) for row in stored["rows"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise NasError(f"{source}: schema-2 calibration without readable networks ({exc}); rebuild the table "
                           "with python scripts/build_lut.py --fresh") from None
        return table.with_calibration(table.fit_calibration(archs, measured))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "metadata": self.metadata,
                "calibration": self.calibration.to_dict() if self.calibration else None, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename): an interrupted save never leaves half a table. One entry a
        line, so that a diff of two tables reads entry by entry."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        entries = data.pop("entries")
        head = json.dumps(data, indent=1)[:-2]  # drop the closing "\n}" to append the entries
        lines = [f" {json.dumps(key)}: {json.dumps(entry)}" for key, entry in entries.items()]
        text = head + ',\n "entries": {\n' + ",\n".join(lines) + "\n }\n}\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # --- derived tables -----------------------------------------------------------------------
    def with_entries(self, entries: dict[str, dict[str, Any]], **metadata: Any) -> "LatencyTable":
        """This table with ``entries`` added or replaced (and ``metadata`` fields set), calibration kept."""
        return LatencyTable({**self.metadata, **metadata}, {**self.entries, **entries}, self.calibration, self.source)

    def with_calibration(self, calibration: Calibration | None) -> "LatencyTable":
        return LatencyTable(self.metadata, self.entries, calibration, self.source, self.sha256)

    def fit_calibration(self, archs: list[Arch], measured: list[float], num_classes: int | None = None) -> Calibration:
        """The calibration fitted to whole networks measured end to end, from this table's entries."""
        return Calibration.fit([(a.to_string(), a.key) for a in archs], [self.terms(a, num_classes) for a in archs],
                               measured)

    # --- checks -------------------------------------------------------------------------------
    def require_target(self, target: Target) -> None:
        """A table of another target, thread count or batch predicts something else: the user's mistake."""
        meta = self.metadata
        for field, here in (("target", target.name), ("threads", target.threads), ("batch", target.batch)):
            if meta.get(field) != here:
                flag = {"target": "--target", "threads": "--threads", "batch": "--batch"}[field]
                raise NasError(f"{self.source}: table {field} is {meta.get(field)!r}, this run's {flag} is {here!r}; "
                               f"pass {flag} {meta.get(field)} or a table built for {flag} {here} "
                               f"(python scripts/build_lut.py {flag} {here} ...)")

    def require_space(self, space: SearchSpace) -> None:
        if self.metadata.get("space") not in (None, space.name):
            raise NasError(f"{self.source} was built for space {self.metadata.get('space')!r}, not {space.name!r} "
                           f"({space.source}); pass the table of that space or omit --table")

    def missing(self, space: SearchSpace, resolution: int, num_classes: int) -> list[BlockSpec | HeadSpec]:
        """The blocks and heads ``space`` can produce at ``resolution`` with ``num_classes`` that lack an entry."""
        blocks, heads = block_contexts(with_resolution(space, resolution), num_classes)
        return [item for item in [*blocks, *heads] if item.key not in self._ms]

    # --- prediction ---------------------------------------------------------------------------
    def entry_ms(self, key: str) -> float:
        try:
            return self._ms[key]
        except KeyError:
            raise MissingEntryError(key, self.source, self.metadata) from None

    def terms(self, arch: Arch, num_classes: int | None = None) -> NetworkTerms:
        """``arch`` as the calibration sees it."""
        specs, head = resolve(arch, num_classes or self.num_classes)
        return network_terms([(item, self.entry_ms(item.key)) for item in (*specs, head)], arch.resolution)

    def predict_raw(self, arch: Arch, num_classes: int | None = None) -> float:
        """The bare sum of the entries of the arch's blocks and head."""
        specs, head = resolve(arch, num_classes or self.num_classes)
        return sum(self.entry_ms(item.key) for item in (*specs, head))

    def _learn(self, arch: Arch, num_classes: int) -> None:
        """Resolve the arch's layers once, memoising each layer context's calibrated value."""
        res, cal = arch.resolution, self._cal
        layers, heads = self._layers.setdefault(res, {}), self._heads.setdefault(res, {})
        state = (3, res)
        for layer in arch.layers:
            spec = resolve_layer(layer, *state)
            out = (spec.out_ch, spec.out_resolution)
            layers[layer, state] = _Layer(cal.block_value(spec, self.entry_ms(spec.key), res), weight_bytes(spec), out)
            state = out
        head = HeadSpec(arch.pool, state[0], arch.hidden, arch.hidden_act, num_classes, state[1])
        heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state] = _Head(
            cal.block_value(head, self.entry_ms(head.key), res) + cal.constant, head_weight_bytes(head))

    def _predict(self, arch: Arch, num_classes: int) -> float:
        """From the memo alone; a KeyError means a context not seen yet."""
        layers, cache = self._layers[arch.resolution], self._cal.cache_bytes
        total, nbytes, big = 0.0, 0, []
        state = (3, arch.resolution)
        for layer in arch.layers:
            row = layers[layer, state]
            total += row.value
            nbytes += row.weight_bytes
            if row.weight_bytes > cache:
                big.append(row.weight_bytes)
            state = row.out
        head = self._heads[arch.resolution][arch.pool, arch.hidden, arch.hidden_act, num_classes, state]
        if nbytes + head.weight_bytes <= cache:
            return total + head.value
        big.append(head.weight_bytes)
        return total + head.value + self._cal.spill_ms(len(arch.layers) + 1, nbytes + head.weight_bytes, big)

    def predict(self, arch: Arch, num_classes: int | None = None) -> float:
        """Predicted end-to-end latency in ms (``num_classes`` defaults to the table's)."""
        num_classes = num_classes or self.num_classes
        try:
            return self._predict(arch, num_classes)
        except KeyError:
            self._learn(arch, num_classes)
            return self._predict(arch, num_classes)

    def predict_many(self, archs: Iterable[Arch], num_classes: int | None = None) -> list[float]:
        return [self.predict(arch, num_classes) for arch in archs]
