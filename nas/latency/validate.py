"""Does a table predict what this machine measures? Held-out networks, predicted vs measured end to end.

The networks are sampled with ``random.Random(seed)``, skipping every network that calibrated the table
(or a table it is compared with), so the figures are out of sample. They are measured with the table's
own protocol in ``VALIDATION_PASSES`` passes, each in a new shuffled order; a network's figure is the
geometric mean of its passes. Reported: the share predicted within +-5% / +-10%, the mean absolute
error, Spearman and Kendall rank agreement, FLOPs' rank agreement (the naive predictor a table must
beat), and this machine's repeatability ceiling: how often a network's passes agree with each other
within +-10% / +-5%, i.e. about what even a perfect table could score here today. Other predictors
(the source table re-levelled by one factor, say) are scored on the same measurements (``compare``).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from scipy import stats
from tqdm import tqdm

from nas.arch import Arch
from nas.cost import arch_cost
from nas.errors import NasError
from nas.latency.build import combined_network, sample_archs
from nas.latency.measure import BusyMonitor, Protocol, measure_archs
from nas.latency.table import LatencyTable
from nas.latency.targets import Target
from nas.space import SearchSpace, with_resolution

# passes over every validation network, each figure the geometric mean of its passes: one pass's figure
# carries noise of its own that the +-5% band would charge to the table (docs/latency.md)
VALIDATION_PASSES = 3


def _finite(value: float) -> float | None:
    """JSON has no NaN: a correlation of fewer than two distinct values is reported as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _correlations(x: list[float], y: list[float]) -> tuple[float | None, float | None]:
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    return _finite(stats.spearmanr(x, y)[0]), _finite(stats.kendalltau(x, y)[0])


def accuracy(predicted: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
    """Shares within +-10% / +-5%, mean |error| and bias in %, and the rank agreement."""
    errors = (np.asarray(predicted) - measured) / measured * 100
    spearman, kendall = _correlations(list(map(float, predicted)), list(map(float, measured)))
    return {"within_10pct": float(np.mean(np.abs(errors) <= 10)), "within_5pct": float(np.mean(np.abs(errors) <= 5)),
            "mape": float(np.abs(errors).mean()), "mean_error_pct": float(errors.mean()),
            "max_abs_error_pct": float(np.abs(errors).max()), "spearman": spearman, "kendall": kendall}


def repeatability_ceiling(passes_ms: list[list[float]]) -> dict[str, float | None]:
    """How often a network's passes agree within +-10% / +-5% of each other (slowest over fastest)."""
    spreads = np.array([max(p) / min(p) - 1 for p in passes_ms if len(p) > 1])
    if not spreads.size:
        return {"ceiling_within_10pct": None, "ceiling_within_5pct": None}
    return {"ceiling_within_10pct": float(np.mean(spreads <= 0.10)),
            "ceiling_within_5pct": float(np.mean(spreads <= 0.05))}


def table_space(table: LatencyTable, space: SearchSpace) -> SearchSpace:
    """The space at the table's resolution; a table of another space is the user's mistake."""
    table.require_space(space)
    return with_resolution(space, table.resolution)


def validate_table(table: LatencyTable, space: SearchSpace, target: Target, n: int, seed: int, *,
                   protocol: Protocol | None = None, passes: int = VALIDATION_PASSES, chunk: int = 10,
                   compare: Mapping[str, Callable[[Arch], float]] | None = None,
                   exclude: frozenset[str] = frozenset(), progress: bool = True) -> dict[str, Any]:
    """Measure ``n`` held-out networks of ``space`` and compare them with the table's predictions (and with
    each predictor of ``compare``). ``exclude``: more network keys to hold out (another table's calibration)."""
    if n < 1:
        raise NasError(f"--n must be at least 1, got {n}")
    if passes < 1:
        raise NasError(f"--passes must be at least 1, got {passes}")
    space = table_space(table, space)
    protocol = protocol or Protocol.from_dict(table.metadata.get("protocol") or {})
    num_classes = table.num_classes
    calibrated = frozenset(row.key for row in table.calibration.rows) if table.calibration else frozenset()
    archs = sample_archs(space, n, seed, exclude=calibrated | exclude)
    if not archs:
        raise NasError(f"{space.source}: no held-out architectures left; the space holds only the calibration ones")
    predicted = table.predict_many(archs)  # before measuring: a missing entry fails fast
    others = {name: [predict(a) for a in archs] for name, predict in (compare or {}).items()}
    started = time.perf_counter()
    monitor = BusyMonitor(target, protocol, table.metadata.get("reference_ms")) if protocol.reference else None
    rng = random.Random(seed)
    per_pass = []
    with tqdm(total=len(archs) * passes, desc="validation networks", unit="net", disable=not progress,
              dynamic_ncols=True) as bar:
        for _ in range(passes):
            order = rng.sample(range(len(archs)), len(archs))
            timed = measure_archs([archs[i] for i in order], target, protocol, num_classes, chunk=chunk,
                                  monitor=monitor, progress=bar.update)
            by_index = dict(zip(order, timed))
            per_pass.append([by_index[i] for i in range(len(archs))])
    combined = [combined_network(p[i] for p in per_pass) for i in range(len(archs))]
    measured = np.array([m.ms for m in combined])
    rows = []
    for i, (arch, pred, m) in enumerate(zip(archs, predicted, combined)):
        cost = arch_cost(arch, num_classes)
        rows.append({"arch": arch.to_string(), "key": arch.key, "flops": cost.flops, "params": cost.params,
                     "predicted_ms": pred, "measured_ms": m.ms, "passes_ms": [p[i].ms for p in per_pass],
                     "spread": m.spread, "stable": m.stable, "error_pct": (pred - m.ms) / m.ms * 100,
                     **{f"{name}_ms": values[i] for name, values in others.items()}})
    flops_spearman, flops_kendall = _correlations([float(r["flops"]) for r in rows], list(measured))
    summary = {
        "n": len(rows), **accuracy(np.array(predicted), measured),
        **repeatability_ceiling([r["passes_ms"] for r in rows]),
        "flops_spearman": flops_spearman, "flops_kendall": flops_kendall,
        "compared": {name: accuracy(np.array(values), measured) for name, values in others.items()},
        "unstable": sum(not r["stable"] for r in rows), "passes": passes, "seed": seed, "space": space.name,
        "resolution": space.resolution, "num_classes": num_classes, "table": table.source,
        "target": target.name, "threads": target.threads, "batch": target.batch,
        "calibration": table.calibration.method if table.calibration else None,
        "protocol": protocol.to_dict(), "measure_seconds": round(time.perf_counter() - started, 1),
    }
    return {**summary, "rows": rows}


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines for the terminal."""
    def corr(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    ceiling = f"(this machine's ceiling: {pct(report['ceiling_within_10pct'])} / {pct(report['ceiling_within_5pct'])})"
    lines = [
        f"{report['n']} held-out {report['space']} networks at {report['resolution']} px, target {report['target']} "
        f"threads {report['threads']}, table {report['table']}",
        f"within +-10%: {report['within_10pct']:.1%}   within +-5%: {report['within_5pct']:.1%}   {ceiling}   "
        f"mean |error|: {report['mape']:.2f}%   bias: {report['mean_error_pct']:+.2f}%   "
        f"max |error|: {report['max_abs_error_pct']:.1f}%",
        f"rank vs measured: table Spearman {corr(report['spearman'])} Kendall {corr(report['kendall'])}   "
        f"FLOPs Spearman {corr(report['flops_spearman'])} Kendall {corr(report['flops_kendall'])}",
        f"unstable measurements: {report['unstable']}",
    ]
    for name, a in report.get("compared", {}).items():
        lines.append(f"{name} on the same measurements: within +-10%: {a['within_10pct']:.1%}   within +-5%: "
                     f"{a['within_5pct']:.1%}   mean |error|: {a['mape']:.2f}%   Kendall {corr(a['kendall'])}")
    return "\n".join(lines)


def plot_validation(report: dict[str, Any], path: str | Path) -> None:
    """Predicted vs measured on log axes (the networks span 10x and more; a relative error is a fixed
    distance there), with the y = x line and the +-5% and +-10% bands the figures count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = np.array([r["measured_ms"] for r in report["rows"]])
    predicted = np.array([r["predicted_ms"] for r in report["rows"]])
    low, high = 0.9 * min(measured.min(), predicted.min()), 1.1 * max(measured.max(), predicted.max())
    line = np.geomspace(low, high, 2)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.fill_between(line, 0.9 * line, 1.1 * line, color="tab:green", alpha=0.12, label="±10%")
    ax.fill_between(line, 0.95 * line, 1.05 * line, color="tab:green", alpha=0.2, label="±5%")
    ax.plot(line, line, color="black", linewidth=1, label="y = x")
    for name in report.get("compared", {}):
        ax.scatter(measured, [r[f"{name}_ms"] for r in report["rows"]], s=8, alpha=0.5, label=name)
    ax.scatter(measured, predicted, s=14, color="tab:blue", label="table")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{report['space']} r{report['resolution']} {report['target']} t{report['threads']}: "
                 f"{report['within_10pct']:.0%} within ±10%, {report['within_5pct']:.0%} within ±5%, "
                 f"Kendall τ={report['kendall'] or float('nan'):.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prediction_throughput(table: LatencyTable, space: SearchSpace, n: int = 20000, seed: int = 0,
                          repeats: int = 3) -> dict[str, Any]:
    """Architectures predicted per second, as a search sees it: new ``Arch`` objects, memo already warm.

    ``first_pass_per_s`` starts from an empty memo (every distinct layer context resolved once).
    """
    space = table_space(table, space)
    fresh = table.with_calibration(table.calibration)  # an empty memo
    rng = random.Random(seed)
    warm = [space.decode(space.sample(rng)) for _ in range(n)]
    timed = [space.decode(space.sample(rng)) for _ in range(n)]
    start = time.perf_counter()
    fresh.predict_many(warm)
    first = n / (time.perf_counter() - start)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fresh.predict_many(timed)
        best = max(best, n / (time.perf_counter() - start))
    return {"archs": n, "first_pass_per_s": round(first), "per_s": round(best),
            "mean_layers": round(sum(len(a.layers) for a in timed) / n, 1)}
