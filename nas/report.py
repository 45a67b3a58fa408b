"""What a run leaves for people: the verdicts against the baselines, pareto.json, pareto.png and report.md.

A baseline is beaten when a front point's mean test accuracy is at least the baseline's mean and its
measured latency is at most 1/1.8 of the baseline's (MnasNet's headline speed-up over MobileNetV2).
Accuracies are means over the final trainings' seeds, on the test split that no search decision saw.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from nas.trial import COMPLETE, PRUNED, Trial  # noqa: E402

MNASNET_SPEEDUP = 1.8  # MnasNet's headline: 1.8x faster than MobileNetV2 at the same accuracy


@dataclass(frozen=True)
class Point:
    """A front point or a baseline after the final phase: measured latency, test accuracy over seeds."""

    name: str
    arch: str
    latency_ms: float  # measured end to end
    latency_spread: float
    predicted_latency_ms: float | None  # None for baselines (they are not searched)
    search_accuracy: float | None  # what the search saw (validation; supernet, predictor or scratch)
    accuracy_source: str | None
    test_accuracy_mean: float | None
    test_accuracy_std: float | None
    val_accuracy_mean: float | None
    seeds: tuple[int, ...]
    flops: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seeds"] = list(self.seeds)
        return data


@dataclass(frozen=True)
class Verdict:
    """One baseline against the front: beaten or not, the best latency ratio at equal or higher mean
    test accuracy and the point that reaches it, with the accuracy margin and its spread."""

    name: str
    beaten: bool
    ratio: float | None  # front latency / baseline latency; None when no front point is as accurate
    by: str | None
    accuracy_margin: float | None  # the point's mean test accuracy minus the baseline's
    margin_std: float | None  # sqrt of the two standard deviations squared

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdicts(front: list[Point], baselines: list[Point], speedup: float = MNASNET_SPEEDUP) -> list[Verdict]:
    rows = []
    for b in baselines:
        rivals = [f for f in front if f.test_accuracy_mean is not None and b.test_accuracy_mean is not None
                  and f.test_accuracy_mean >= b.test_accuracy_mean]
        best = min(rivals, key=lambda f: f.latency_ms, default=None)
        if best is None:
            rows.append(Verdict(b.name, False, None, None, None, None))
            continue
        ratio = best.latency_ms / b.latency_ms
        spread = math.hypot(best.test_accuracy_std or 0.0, b.test_accuracy_std or 0.0)
        rows.append(Verdict(b.name, ratio <= 1 / speedup, ratio, best.name,
                            best.test_accuracy_mean - b.test_accuracy_mean, spread))
    return rows


def write_pareto_json(path: Path, front: list[Point], baselines: list[Point], verdict_rows: list[Verdict],
                      winner: str) -> None:
    path.write_text(json.dumps({
        "pareto": [p.to_dict() for p in front],
        "baselines": [b.to_dict() for b in baselines],
        "verdicts": [v.to_dict() for v in verdict_rows],
        "speedup_bar": MNASNET_SPEEDUP,
        "winner": winner,
    }, indent=2))


def plot_pareto(path: Path, trials: list[Trial], front: list[Point], baselines: list[Point], title: str) -> None:
    """Left: every trial as the search saw it (predicted latency). Right: the front and the baselines
    after the final trainings, test accuracy mean +- std against measured latency, and each baseline's
    1.8x latency bar."""
    fig, (search_ax, final_ax) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for state, style in ((PRUNED, dict(c="0.75", s=8, label="pruned early (lower fidelity)")),
                         (COMPLETE, dict(c="tab:blue", s=8, alpha=0.4, label="evaluated candidates"))):
        pts = [(t.metrics["predicted_latency_ms"], t.metrics["accuracy"]) for t in trials
               if t.state == state and t.metrics.get("accuracy") is not None]
        if pts:
            search_ax.scatter(*zip(*pts), **style)
    search_ax.scatter([p.predicted_latency_ms for p in front], [p.search_accuracy for p in front], c="tab:red",
                      s=30, label="Pareto front", zorder=3)
    search_ax.set_xscale("log")
    search_ax.set_xlabel("predicted latency (ms)")
    search_ax.set_ylabel("validation accuracy seen by the search")
    search_ax.set_title("search", fontsize=10)
    search_ax.legend(fontsize=7, loc="lower right")

    def errorbars(points: list[Point], **style) -> None:
        done = sorted((p for p in points if p.test_accuracy_mean is not None), key=lambda p: p.latency_ms)
        if done:
            final_ax.errorbar([p.latency_ms for p in done], [p.test_accuracy_mean for p in done],
                              yerr=[p.test_accuracy_std or 0.0 for p in done], capsize=3, **style)

    errorbars(front, fmt="o-", c="tab:red", label="front (measured, test mean +- std)")
    errorbars(baselines, fmt="s--", c="black", label="MobileNetV2 baselines")
    for b in baselines:
        if b.test_accuracy_mean is not None:
            final_ax.axvline(b.latency_ms / MNASNET_SPEEDUP, c="0.6", lw=0.7, ls=":")
            final_ax.annotate(b.name.replace("mobilenet_v2 ", ""), (b.latency_ms, b.test_accuracy_mean),
                              textcoords="offset points", xytext=(4, -10), fontsize=7)
    final_ax.set_xscale("log")
    final_ax.set_xlabel("latency (ms, ONNX Runtime, measured); dotted: baseline / 1.8")
    final_ax.set_ylabel("test accuracy")
    final_ax.set_title("final trainings", fontsize=10)
    final_ax.legend(fontsize=7, loc="lower right")
    for ax in (search_ax, final_ax):
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # log axes label every minor tick otherwise
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if std is None else f"{100 * x:.2f} ± {100 * std:.2f}%"


def _table(points: list[Point]) -> list[str]:
    lines = ["| network | test accuracy (mean ± std) | seeds | latency ms (measured) | predicted ms | "
             "search accuracy | FLOPs | params | architecture |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        predicted = "-" if p.predicted_latency_ms is None else f"{p.predicted_latency_ms:.4f}"
        search = "-" if p.search_accuracy is None else f"{_pct(p.search_accuracy)} ({p.accuracy_source})"
        lines.append(f"| {p.name} | {_pct(p.test_accuracy_mean, p.test_accuracy_std)} | {len(p.seeds)} | "
                     f"{p.latency_ms:.4f} | {predicted} | {search} | {p.flops:,} | {p.params:,} | `{p.arch}` |")
    return lines


def write_report(path: Path, *, header: list[str], front: list[Point], baselines: list[Point],
                 verdict_rows: list[Verdict], winner: dict[str, Any]) -> None:
    errors = [abs(p.predicted_latency_ms - p.latency_ms) / p.latency_ms for p in front
              if p.predicted_latency_ms is not None]
    lines = [*header, "", "## Winner", "", f"`{winner['arch']}`", "",
             f"test accuracy {_pct(winner['test_accuracy_mean'], winner['test_accuracy_std'])} over "
             f"{len(winner['seeds'])} seeds (seed 0 under ONNX Runtime: {_pct(winner['onnx_test_accuracy'])}), "
             f"latency {winner['latency_ms']:.4f} ms measured / {winner['predicted_latency_ms']:.4f} ms predicted, "
             f"{winner['flops']:,} FLOPs, {winner['params']:,} parameters; chosen by {winner['chosen_by']}; "
             f"ONNX parity {winner['parity_rel_max_abs']:.1e}.",
             "", "## Pareto front (measured end to end, trained with the final recipe)", "", *_table(front), ""]
    if errors:
        lines.append(f"Latency table on the front: mean absolute error {100 * sum(errors) / len(errors):.1f}%, "
                     f"{sum(e <= 0.10 for e in errors)}/{len(errors)} within ±10%.")
    lines += ["", "## Baselines (the same recipe and seeds)", "", *_table(baselines), "",
              f"## Verdicts (beaten: mean test accuracy at least the baseline's and latency at most "
              f"1/{MNASNET_SPEEDUP:g} = {1 / MNASNET_SPEEDUP:.2f}x)", "",
              "| baseline | verdict | by | latency ratio | accuracy margin (± spread) |", "|---|---|---|---|---|"]
    for v in verdict_rows:
        ratio = "-" if v.ratio is None else f"{v.ratio:.2f}x ({1 / v.ratio:.2f}x faster)"
        margin = "-" if v.accuracy_margin is None else f"{100 * v.accuracy_margin:+.2f} ± {100 * v.margin_std:.2f} points"
        verdict = "**beaten**" if v.beaten else ("missed: no front point is as accurate" if v.by is None else "missed")
        lines.append(f"| {v.name} | {verdict} | {v.by or '-'} | {ratio} | {margin} |")
    lines += ["", "![pareto](pareto.png)", ""]
    path.write_text("\n".join(lines))
