"""A table for this machine: the machine check, adaptation of another machine's table, entries on demand.

A table describes the machine it was measured on; this module makes one for the machine it runs on,
in a bounded time, keeping the source table's measurements as the prior (after HELP / LitePred):

1. Entries. A sample of the entries the space needs, weighted by their share of random networks'
   time (``sampling_order``), is measured here until about half the budget is spent. Gradient-boosted
   trees on block features (kind, level, kernel, stride, widths, SE, the
   source entry's size) map a source entry to the log of its ratio here, starting from the mean ratio
   (the one-factor re-levelling), so with few samples they stay close to it. Every unmeasured entry is
   its source entry times its predicted ratio; measured ones keep their measurement.
2. Entries the source lacks (another class count's head, another resolution, a block the space file
   gained) are measured here: a table never answers with a default.
3. Whole networks (the source's own calibration networks where they fit, so the one-factor ratio
   comes for free, else random and fast ones) are measured in the rest of the budget, and the
   calibration is either the source's corrected (``a * prediction + b * lookups + c``) or fitted anew,
   whichever has the lower leave-one-out error.

``table_for_machine`` decides: a table from another CPU is adapted; one from this CPU is checked
(``machine_check``: its calibration networks timed again) and adapted when the check reads beyond
``ADAPT_BEYOND``; entries the space needs are measured in any case. The result is cached per machine
under ``cache_dir()`` (a path the log line prints; delete the file to adapt again) and reused.
Everything here measures: never call it while training runs (``measurement_lock`` waits for training).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec, resolve
from nas.errors import NasError
from nas.export import MIN_OPSET
from nas.latency.build import calibration_networks, entry_dict, entry_model, sample_archs
from nas.latency.calibration import KIND_TERMS, KINDS, LEVELS, TERMS, Calibration, fit_relative, loo_mape, \
    resolution_level
from nas.latency.measure import BusyMonitor, Protocol, measure_archs, measure_models, measurement_lock
from nas.latency.table import LatencyTable, default_table_path
from nas.latency.targets import Target, cpu_model
from nas.space import SearchSpace, block_contexts, with_resolution

log_ = logging.getLogger(__name__)

# beyond it, a table of this CPU is adapted rather than trusted: within it the check cannot tell the
# machine's level from its own scatter (docs/latency.md)
ADAPT_BEYOND = 0.05
# how much faster than a table of another CPU this machine may run: a latency limit the source table
# misses by more fails before adapting (this machine kind's hosts ran one table from x0.75 to x1.53)
FOREIGN_SLACK = 2.0
BUDGET_S = 120.0
ENTRY_SHARE = 0.5  # of the budget, for sampled entries; whole networks get the rest
MIN_NETWORKS = 10  # measured even when the budget is spent: a correction needs points beyond its 3 coefficients
CHECK_NETWORKS = 60  # the machine check: the table's calibration networks timed again, in CHECK_PASSES passes
CHECK_PASSES = 2
CHECK_SECONDS = 60.0  # ... fewer networks where they take longer (224 px)
ENTRY_CHUNK = 32
NETWORK_CHUNK = 10
USAGE_NETWORKS = 400  # random networks whose block usage weights the sampled entries
CALIBRATION_NETWORKS = 150  # candidates where the source has none at this resolution and class count
HEAVY_NETWORKS = 10  # the slowest of HEAVY_POOL times as many random networks join them
HEAVY_POOL = 30
ADAPT_MODES = ("auto", "always", "never")


def cache_dir() -> Path:
    """Where adapted tables are kept: ``$NAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/nas``, else ``~/.cache/nas``."""
    base = os.environ.get("NAS_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nas"
    return Path(base) / "latency_tables"


def machine_slug(cpu: str | None = None) -> str:
    """This machine's CPU as a file-name part: readable, plus a short hash so that long names stay distinct."""
    cpu = cpu or cpu_model()
    readable = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:48]
    return f"{readable}-{hashlib.sha256(cpu.encode()).hexdigest()[:6]}"


def machine_table_path(source: LatencyTable, space: SearchSpace, resolution: int, num_classes: int, target: Target,
                       directory: Path | None = None) -> Path:
    """The cached copy of ``source`` for this machine, space, resolution and class count."""
    origin = (source.sha256 or "none")[:10]
    name = (f"{space.name}-r{resolution}-c{num_classes}-{target.name}-t{target.threads}-b{target.batch}"
            f"-from-{origin}-on-{machine_slug()}.json")
    return (directory or cache_dir()) / name


@dataclass(frozen=True)
class TableProvenance:
    """Where the table a run predicts with comes from, and what was done to it on this machine."""

    source: str  # the table file asked for (or found by its default name)
    source_sha256: str | None
    path: str  # the file the returned table lives in (the source itself, or this machine's cached copy)
    action: str  # "as built" | "adapted" | "reused" | "entries added"
    reason: str  # why (empty for "as built")
    cpu: str  # this machine's
    source_cpu: str | None
    machine_check: float | None = None  # this machine's time over the table's on its calibration networks
    relevel_ratio: float | None = None  # the one factor re-levelling would have used
    on_demand_entries: int = 0
    loo_mape: float | None = None  # the calibration's leave-one-out error on networks measured here
    adapt_seconds: float | None = None  # how long adapting took, measuring included

    @property
    def summary(self) -> str:
        """One line for a report: the file, and what was done to it here and why."""
        what = self.action + (f" ({self.reason})" if self.reason else "")
        took = f" in {self.adapt_seconds:.0f} s" if self.adapt_seconds is not None else ""
        fit = f", calibration leave-one-out error {self.loo_mape:.2f}%" if self.loo_mape is not None else ""
        return f"{self.path}: {what}{took}{fit}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "summary": self.summary}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TableProvenance":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# --- measuring ----------------------------------------------------------------------------------


def _protocol(table: LatencyTable) -> Protocol:
    return Protocol.from_dict(table.metadata["protocol"]) if table.metadata.get("protocol") else Protocol()


def _require_provider(target: Target, key: str, table: LatencyTable) -> None:
    """Measuring needs the target's provider here; without it a missing entry cannot be had."""
    if target.provider not in ort.get_available_providers():
        raise NasError(f"{table.source}: no latency entry for {key!r}, and it cannot be measured here: target "
                       f"{target.name!r} needs ONNX Runtime's {target.provider}, which this onnxruntime "
                       f"{ort.__version__} lacks; add the entry on that device with python scripts/adapt_lut.py")


def measure_entries(items: Sequence[BlockSpec | HeadSpec], target: Target, protocol: Protocol, *,
                    opset: int = MIN_OPSET, monitor: BusyMonitor | None = None, deadline: float = math.inf) -> dict[str, dict[str, Any]]:
    """Entries (``build.entry_dict``) for ``items``, measured in chunks until ``deadline``
    (``time.monotonic``); at least one chunk."""
    out: dict[str, dict[str, Any]] = {}
    with measurement_lock():
        if monitor is None and protocol.reference:
            monitor = BusyMonitor(target, protocol)
        last = 0.0  # the last chunk's seconds: a chunk that would end past the deadline is not started
        for start in range(0, len(items), ENTRY_CHUNK):
            if out and time.monotonic() + last > deadline:
                break
            began = time.monotonic()
            part = items[start:start + ENTRY_CHUNK]
            models = [entry_model(item, target, opset) for item in part]
            for item, m in zip(part, measure_models(models, target, protocol, monitor)):
                out[item.key] = entry_dict(m)
            last = time.monotonic() - began
    return out


def measure_networks(archs: Sequence[Arch], target: Target, protocol: Protocol, num_classes: int, *,
                     monitor: BusyMonitor | None = None, deadline: float = math.inf,
                     at_least: int = MIN_NETWORKS) -> list[float]:
    """End-to-end ms of a prefix of ``archs``: chunks until ``deadline``, but at least ``at_least`` networks."""
    measured: list[float] = []
    with measurement_lock():
        if monitor is None and protocol.reference:
            monitor = BusyMonitor(target, protocol)
        last = 0.0
        for start in range(0, len(archs), NETWORK_CHUNK):
            if len(measured) >= at_least and time.monotonic() + last > deadline:
                break
            began = time.monotonic()
            part = archs[start:start + NETWORK_CHUNK]
            measured += [m.ms for m in measure_archs(part, target, protocol, num_classes, monitor=monitor)]
            last = time.monotonic() - began
    return measured


def machine_check(table: LatencyTable, target: Target, *, networks: int = CHECK_NETWORKS, passes: int = CHECK_PASSES,
                  seconds: float = CHECK_SECONDS) -> float | None:
    """This machine's time now over the table's, on a seeded sample of the table's own calibration networks
    timed again (each the geometric mean of ``passes`` passes, shuffled anew in each): the median ratio.
    Fewer networks where the first pass would take more than ``seconds / passes``. None for a table without
    calibration networks at its own resolution and class count."""
    rows = list(table.calibration.rows) if table.calibration else []
    if not rows:
        return None
    rng = random.Random(0)
    picked = rng.sample(rows, min(networks, len(rows)))
    archs = [Arch.parse(row.arch) for row in picked]
    protocol = _protocol(table)
    with measurement_lock():
        monitor = BusyMonitor(target, protocol, table.metadata.get("reference_ms")) if protocol.reference else None
        deadline = time.monotonic() + seconds / passes
        first = measure_networks(archs, target, protocol, table.num_classes, monitor=monitor, deadline=deadline)
        archs, picked = archs[:len(first)], picked[:len(first)]
        timed = [[ms] for ms in first]
        for _ in range(passes - 1):
            order = rng.sample(range(len(archs)), len(archs))
            for i, m in zip(order, measure_archs([archs[i] for i in order], target, protocol, table.num_classes,
                                                 monitor=monitor)):
                timed[i].append(m.ms)
    return float(np.median([math.exp(np.mean(np.log(t))) / row.measured_ms for t, row in zip(timed, picked)]))


# --- the transfer model of entries ----------------------------------------------------------------

ENTRY_KINDS = (*KINDS, "head")


def _kind(item: BlockSpec | HeadSpec) -> str:
    return "head" if isinstance(item, HeadSpec) else item.op


def sampling_order(items: Sequence[BlockSpec | HeadSpec], source: LatencyTable, space: SearchSpace,
                   num_classes: int, seed: int) -> list[BlockSpec | HeadSpec]:
    """``items`` in the order to measure them: a weighted sample without replacement (Efraimidis-Spirakis),
    each entry weighted by its share of what random networks of the space spend in the source table
    (how often ``USAGE_NETWORKS`` of them use it, times its time). An entry's error reaches a network's
    prediction in that proportion: on the Zen 3 -> Zen 4 tables, 320 entries drawn so predicted random
    networks' entry sums within 1.5% on average, drawn evenly over kind, level and width within 2.4%."""
    usage: dict[str, int] = {}
    for arch in sample_archs(space, USAGE_NETWORKS, seed + 3):
        specs, head = resolve(arch, num_classes)
        for item in (*specs, head):
            usage[item.key] = usage.get(item.key, 0) + 1
    rng = random.Random(seed)

    def key(item: BlockSpec | HeadSpec) -> float:
        weight = usage.get(item.key, 0) * source.entry_ms(item.key)
        return math.log(1 - rng.random()) / weight if weight > 0 else -math.inf

    return sorted(items, key=key, reverse=True)


def entry_features(item: BlockSpec | HeadSpec, source_ms: float, resolution: int) -> list[float]:
    """What the ratio of an entry here to its source entry may depend on."""
    kind = ENTRY_KINDS.index(_kind(item))
    level = resolution_level(item.resolution, resolution)
    onehot_kind = [float(k == kind) for k in range(len(ENTRY_KINDS))]
    onehot_level = [float(k == level) for k in range(LEVELS)]
    log_ms = math.log(source_ms)
    if isinstance(item, HeadSpec):
        shape = [math.log2(item.in_ch), math.log2(item.num_classes), math.log2(item.hidden or 1), 0, 0, 0, 0, 0, 0, 0]
    else:
        shape = [math.log2(item.in_ch), math.log2(max(item.out_ch, 1)), math.log2(max(item.mid_ch, 1)),
                 float(item.kernel == 3), float(item.kernel == 5), float(item.kernel >= 7), float(item.stride > 1),
                 float(item.se_ch > 0), float(item.residual), math.log2(item.resolution)]
    return [*onehot_kind, *onehot_level, *shape, log_ms, *(k * log_ms for k in onehot_kind),
            *(a * b for a in onehot_kind for b in onehot_level)]


@dataclass(frozen=True)
class EntryTransfer:
    """log(entry here / source entry) learnt from the sampled entries by gradient-boosted trees on
    ``entry_features``. Trees start from the mean log ratio (the one-factor re-levelling) and add only
    splits the samples support, so with few samples they stay close to it; the relative costs that move
    between CPU generations depend on kind, level and shape jointly, which a linear model missed
    (docs/latency.md)."""

    model: Any  # a fitted sklearn HistGradientBoostingRegressor
    samples: int
    cv_mape: float  # 5-fold cross-validated mean |error| in % of a sampled entry predicted from the others
    global_factor: float  # the one factor: exp of the mean log ratio

    @classmethod
    def fit(cls, features: np.ndarray, log_ratios: np.ndarray, seed: int = 0) -> "EntryTransfer":
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.model_selection import KFold, cross_val_predict

        def model():
            return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, min_samples_leaf=10,
                                                 random_state=seed)

        folds = min(5, len(log_ratios))
        if folds >= 2:
            folding = KFold(folds, shuffle=True, random_state=seed)
            held_out = cross_val_predict(model(), features, log_ratios, cv=folding)
            cv = float(np.mean(np.abs(np.expm1(held_out - log_ratios))) * 100)
        else:
            cv = math.nan
        return cls(model().fit(features, log_ratios), len(log_ratios), cv, float(np.exp(np.mean(log_ratios))))

    def ratios(self, features: np.ndarray) -> np.ndarray:
        return np.exp(self.model.predict(features))

    def summary(self) -> dict[str, Any]:
        return {"model": "gradient-boosted trees on log ratio", "samples": self.samples,
                "global_factor": self.global_factor, "cv_mape": self.cv_mape}


# --- adaptation ---------------------------------------------------------------------------------


def _correction(prior: Sequence[float], lookups: Sequence[int], measured: np.ndarray) -> tuple[np.ndarray, float]:
    design = np.column_stack([prior, lookups, np.ones(len(prior))])
    return fit_relative(design, measured), loo_mape(design, measured)


def corrected(source: Calibration, a: float, per_lookup: float, constant: float) -> tuple[float, ...]:
    """The coefficients of ``a * source + per_lookup * lookups + constant`` (the head's lookup is in the constant)."""
    coef = dict(zip(TERMS, (a * c for c in source.coef)))
    for name in KIND_TERMS:
        coef[name] += per_lookup
    coef["one"] += per_lookup + constant
    return tuple(coef[name] for name in TERMS)


def adapt_table(source: LatencyTable, space: SearchSpace, target: Target, *, resolution: int, num_classes: int,
                budget_s: float = BUDGET_S, transfer: bool = True, seed: int = 0, reason: str = "",
                log: Callable[[str], None] = log_.info) -> LatencyTable:
    """A table of ``space`` at ``resolution`` with ``num_classes`` for this machine, from ``source``
    (see the module's docstring); its ``metadata["adaptation"]`` records what was measured and fitted.
    ``transfer``: correct the source entries by a sample measured here (False: they are of this machine)."""
    started = time.monotonic()
    deadline = started + budget_s
    protocol = _protocol(source)
    space = with_resolution(space, resolution)
    missing = source.missing(space, resolution, num_classes)
    missing_keys = {item.key for item in missing}
    blocks, heads = block_contexts(space, num_classes)
    present = [item for item in (*blocks, *heads) if item.key not in missing_keys]
    if missing:
        _require_provider(target, missing[0].key, source)
    entries = {item.key: dict(source.entries[item.key]) for item in present}
    record: dict[str, Any] = {"source": source.source, "source_sha256": source.sha256,
                              "source_cpu": source.metadata.get("cpu"), "reason": reason, "budget_s": budget_s}
    with measurement_lock():
        monitor = BusyMonitor(target, protocol) if protocol.reference else None
        if transfer and present:
            order = sampling_order(present, source, space, num_classes, seed)
            sampled = measure_entries(order, target, protocol, monitor=monitor,
                                      deadline=started + ENTRY_SHARE * budget_s)
            items = {item.key: item for item in present}
            src = {key: source.entry_ms(key) for key in items}
            x = np.array([entry_features(items[k], src[k], resolution) for k in sampled])
            y = np.log([sampled[k]["ms"] / src[k] for k in sampled])
            model = EntryTransfer.fit(x, y, seed)
            ratios = model.ratios(np.array([entry_features(item, src[item.key], resolution) for item in present]))
            for item, ratio in zip(present, ratios):
                entries[item.key] = {"ms": round(src[item.key] * float(ratio), 6), "origin": "transferred"}
            for key, entry in sampled.items():
                entries[key] = {**entry, "origin": "measured"}
            record["entries"] = {**model.summary(), "measured": sorted(sampled),
                                 "transferred": len(present) - len(sampled)}
        if missing:
            log(f"measuring {len(missing)} latency entries {source.source} lacks for {space.name} at {resolution} px "
                f"with {num_classes} classes")
            for key, entry in measure_entries(missing, target, protocol, monitor=monitor).items():
                entries[key] = {**entry, "origin": "on demand"}
        record["on_demand"] = sorted(missing_keys)
        # the reference block's time here: a validation holds its measurements to this machine's state
        reference = round(monitor.reference_ms, 6) if monitor else None
        table = LatencyTable({**source.metadata, **target.settings(), "cpu": cpu_model(), "space": space.name,
                              "resolution": resolution, "num_classes": num_classes, "reference_ms": reference},
                             entries, source.calibration, source.source)
        # entries the source lacks are measured whatever they cost; the networks still get their share
        deadline = max(deadline, time.monotonic() + (1 - ENTRY_SHARE) * budget_s)
        table = _calibrate(table, source, space, target, protocol, monitor, deadline, seed, record)
    record["seconds"] = round(time.monotonic() - started, 1)
    record["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return LatencyTable({**table.metadata, "adaptation": record}, table.entries, table.calibration, table.source)


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix spreads evenly over the range (van der Corput points):
    applied to networks sorted by latency, any prefix spans the fast end to the heavy end."""
    order, seen = [], set()
    for i in range(4 * n):  # the points i / 2^m with 2^m >= n hit every index before i reaches 2n
        x, f, k = 0.0, 0.5, i
        while k:
            x, f, k = x + f * (k & 1), f / 2, k >> 1
        j = min(n - 1, int(x * n))
        if j not in seen:
            seen.add(j)
            order.append(j)
    return order


def adaptation_networks(table: LatencyTable, source: LatencyTable, space: SearchSpace,
                        seed: int) -> tuple[list[Arch], dict[str, float]]:
    """Networks to measure, in the order to measure them, and the source's time of those it has (the
    source's calibration networks where it was calibrated at this resolution and class count, so that
    the one-factor ratio comes for free; else random and fast ones as a build picks them), plus the
    heaviest of many random ones: random samples seldom reach the heavy end, where the spill terms act.
    Sorted by predicted latency and taken in ``spread_order``."""
    rows = source.calibration.rows if source.calibration else ()
    if rows and (source.resolution, source.num_classes) == (table.resolution, table.num_classes):
        archs = [Arch.parse(row.arch) for row in rows]
        known = {row.key: row.measured_ms for row in rows}
    else:
        archs, known = calibration_networks(space, CALIBRATION_NETWORKS, seed, table.predict_raw), {}
    pool = sample_archs(space, HEAVY_NETWORKS * HEAVY_POOL, seed + 2, exclude=frozenset(a.key for a in archs))
    archs += sorted(pool, key=table.predict, reverse=True)[:HEAVY_NETWORKS]
    archs.sort(key=table.predict)
    return [archs[i] for i in spread_order(len(archs))], known


def _calibrate(table: LatencyTable, source: LatencyTable, space: SearchSpace, target: Target, protocol: Protocol,
               monitor: BusyMonitor | None, deadline: float, seed: int, record: dict[str, Any]) -> LatencyTable:
    """Whole networks measured until ``deadline``: the source calibration corrected, or one fitted anew."""
    archs, known = adaptation_networks(table, source, space, seed)
    measured = np.array(measure_networks(archs, target, protocol, table.num_classes, monitor=monitor,
                                         deadline=deadline))
    archs = archs[:len(measured)]
    prior = table.predict_many(archs)
    lookups = [len(a.layers) + 1 for a in archs]
    coef, correction_loo = _correction(prior, lookups, measured)
    base = table.calibration or Calibration(tuple(1.0 if n.startswith("level") else 0.0 for n in TERMS))
    calibration = Calibration(corrected(base, *coef), base.cache_mb, correction_loo, "correction")
    candidates = {"correction": correction_loo}
    if len(measured) >= len(TERMS) + 5:
        fitted = table.with_calibration(None).fit_calibration(archs, list(measured))
        candidates["fit"] = fitted.loo_mape
        if fitted.loo_mape < correction_loo:
            calibration = fitted
    pairs = [(a.to_string(), a.key) for a in archs]
    calibration = calibration.with_rows(pairs, [table.terms(a) for a in archs], measured)
    record["networks"] = {"measured": len(measured), "candidates_loo_mape": candidates, "chosen": calibration.method,
                          "correction": [float(c) for c in coef]}
    ratios = [ms / known[a.key] for a, ms in zip(archs, measured) if a.key in known]
    if ratios:
        record["relevel_ratio"] = float(np.median(ratios))
    return table.with_calibration(calibration)


# --- the entry point a run uses ------------------------------------------------------------------


def find_table(space: SearchSpace, target: Target, resolution: int, table: str | Path | None) -> Path:
    """``table``, else the default name at ``resolution``, else at the space's own resolution (its entries
    at ``resolution`` are then measured on demand)."""
    if table is not None:
        if not Path(table).is_file():
            raise NasError(f"--table {table}: no such file; omit --table to use latency_tables/ by default")
        return Path(table)
    for res in dict.fromkeys((resolution, space.resolution)):
        path = default_table_path(space.name, res, target)
        if path.is_file():
            return path
    raise NasError(f"no latency table for {space.name} on {target.name} t{target.threads} b{target.batch} "
                   f"({default_table_path(space.name, resolution, target)}); build one with python "
                   f"scripts/build_lut.py --target {target.name} --threads {target.threads} --space {space.source} "
                   f"--resolution {resolution}")


def check_latency_limit(table: LatencyTable, space: SearchSpace, num_classes: int, limit_ms: float | None,
                        slack: float = 1.0) -> None:
    """NasError when no network of ``space`` can meet ``limit_ms``: the fastest reachable one is predicted
    above it by more than the factor ``slack`` (1: exactly; more for a table not yet of this machine)."""
    if limit_ms is None or table.missing(space, table.resolution, num_classes):
        return
    fastest = fastest_reachable_ms(table, space, num_classes)
    if limit_ms * slack < fastest:
        where = ("on this machine" if slack == 1
                 else f"by {table.source}, and no machine of this kind runs it {slack:g}x as fast")
        raise NasError(f"--latency-limit-ms {limit_ms:g} is impossible: the fastest network of {space.source} is "
                       f"predicted at {fastest:.4g} ms {where}; raise the limit")


def table_for_machine(space: SearchSpace, target: Target, *, resolution: int, num_classes: int,
                      table: str | Path | None = None, log: Callable[[str], None] = print, budget_s: float = BUDGET_S,
                      adapt: str = "auto", directory: Path | None = None,
                      latency_limit_ms: float | None = None) -> tuple[LatencyTable, TableProvenance]:
    """The table to predict with on this machine, and where it came from.

    Loads ``table`` (or the shipped one by its default name) and fails fast (``NasError``, before any
    measurement) on a table of another target, thread count, batch or space. Then: a cached copy for this
    machine is reused; else a table from another CPU is adapted (``adapt_table``, within ``budget_s``),
    one from this CPU checked (``machine_check``) and adapted when the check reads beyond ``ADAPT_BEYOND``;
    entries the space needs at ``resolution`` with ``num_classes`` are measured if missing. Anything
    changed is saved to this machine's copy under ``directory`` (default ``cache_dir()``). ``adapt``:
    "auto", "never" (only missing entries are measured) or "always". ``latency_limit_ms``: fail (NasError)
    when no network of the space can meet it, before measuring where the source table already shows it
    (allowing ``FOREIGN_SLACK`` for a table of another CPU), else once the table is this machine's.
    Never call it while training runs.
    """
    if adapt not in ADAPT_MODES:
        raise NasError(f"--adapt must be one of {', '.join(ADAPT_MODES)}, got {adapt!r}")
    path = find_table(space, target, resolution, table)
    source = LatencyTable.load(path)
    source.require_target(target)
    source.require_space(space)
    here, source_cpu = cpu_model(), source.metadata.get("cpu")
    if source.resolution == resolution:
        check_latency_limit(source, space, num_classes, latency_limit_ms,
                            1 + ADAPT_BEYOND if source_cpu == here else FOREIGN_SLACK)
    table, provenance = _for_machine(source, path, space, target, resolution, num_classes, log, budget_s, adapt,
                                     directory)
    check_latency_limit(table, space, num_classes, latency_limit_ms)
    return table, provenance


def _for_machine(source: LatencyTable, path: Path, space: SearchSpace, target: Target, resolution: int,
                 num_classes: int, log: Callable[[str], None], budget_s: float, adapt: str,
                 directory: Path | None) -> tuple[LatencyTable, TableProvenance]:
    here, source_cpu = cpu_model(), source.metadata.get("cpu")
    cached = machine_table_path(source, space, resolution, num_classes, target, directory)
    base = dict(source=str(path), source_sha256=source.sha256, cpu=here, source_cpu=source_cpu)
    if cached.is_file() and adapt != "always":
        copy = LatencyTable.load(cached)
        record = copy.metadata.get("adaptation", {})
        if record.get("source_sha256") == source.sha256 and copy.metadata.get("cpu") == here:
            copy, added = _add_missing(copy, space, target, resolution, num_classes, log)
            if added:
                copy.save(cached)
            log(f"latency table: this machine's copy of {path} at {cached} (delete it to adapt again)")
            loo = copy.calibration.loo_mape if copy.calibration else None
            return copy, TableProvenance(**base, path=str(cached), action="reused", reason=record.get("reason", ""),
                                         relevel_ratio=record.get("relevel_ratio"), on_demand_entries=added,
                                         loo_mape=loo)
    reason, check = "", None
    if adapt == "always":
        reason = "asked to adapt"
    elif adapt == "auto" and source_cpu != here:
        reason = f"built on {source_cpu!r}, this machine is {here!r}"
    elif adapt == "auto" and source.resolution == resolution:  # at another resolution it adapts anyway
        check = machine_check(source, target)
        if check is not None and abs(math.log(check)) > math.log1p(ADAPT_BEYOND):
            reason = f"the machine check reads x{check:.3f} of the table's time (beyond +-{ADAPT_BEYOND:.0%})"
    transfer = bool(reason)  # the entries are another machine's (or another state of this one's)
    if not reason and source.resolution != resolution and adapt != "never":
        reason = f"built at {source.resolution} px, this run is at {resolution} px"  # its calibration does not carry
    if reason:
        log(f"latency table {path}: {reason}: adapting it here within about {budget_s:.0f} s; this machine's copy "
            f"goes to {cached}")
        adapted = adapt_table(source, space, target, resolution=resolution, num_classes=num_classes, budget_s=budget_s,
                              transfer=transfer, reason=reason, log=log)
        adapted.save(cached)
        record = adapted.metadata["adaptation"]
        return LatencyTable.load(cached), TableProvenance(
            **base, path=str(cached), action="adapted", reason=reason, machine_check=check,
            relevel_ratio=record.get("relevel_ratio"), on_demand_entries=len(record["on_demand"]),
            loo_mape=adapted.calibration.loo_mape, adapt_seconds=record["seconds"])
    copy, added = _add_missing(source, space, target, resolution, num_classes, log)
    if added:
        copy = LatencyTable({**copy.metadata, "adaptation": {"source": str(path), "source_sha256": source.sha256,
                                                             "reason": "entries added", "machine_check": check}},
                            copy.entries, copy.calibration, copy.source)
        copy.save(cached)
        log(f"latency table {path}: {added} entries measured here, kept in this machine's copy {cached}")
        return LatencyTable.load(cached), TableProvenance(**base, path=str(cached), action="entries added", reason="",
                                                          machine_check=check, on_demand_entries=added)
    return source, TableProvenance(**base, path=str(path), action="as built", reason="", machine_check=check)


def _add_missing(table: LatencyTable, space: SearchSpace, target: Target, resolution: int, num_classes: int,
                 log: Callable[[str], None]) -> tuple[LatencyTable, int]:
    missing = table.missing(space, resolution, num_classes)
    if not missing:
        return table, 0
    _require_provider(target, missing[0].key, table)
    log(f"measuring {len(missing)} latency entries {table.source} lacks for {space.name} at {resolution} px with "
        f"{num_classes} classes (e.g. {missing[0].key})")
    measured = measure_entries(missing, target, _protocol(table))
    return table.with_entries({k: {**e, "origin": "on demand"} for k, e in measured.items()}), len(missing)


def fastest_reachable_ms(table: LatencyTable, space: SearchSpace, num_classes: int) -> float:
    """The lowest predicted latency a network of ``space`` (at the table's resolution) reaches, by coordinate
    descent over the architecture decisions (``nas.objectives.cheapest``): a latency limit below it is impossible."""
    from nas.objectives import cheapest

    def measure(params: dict[str, Any]) -> dict[str, Any]:
        return {"latency_ms": table.predict(space.decode(params, table.resolution), num_classes)}

    return cheapest(space, measure, "latency_ms")[1]
