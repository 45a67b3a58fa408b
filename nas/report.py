"""What a run leaves for people: pareto.json, pareto.png and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nas.config import SearchConfig  # noqa: E402
from nas.space import SearchSpace  # noqa: E402
from nas.trial import COMPLETE, PRUNED, Trial  # noqa: E402


def plot_pareto(path: Path, trials: list[Trial], front: list, baselines: list, title: str) -> None:
    """Accuracy vs latency: every trial (predicted), the front and the baselines (measured)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for state, style in ((PRUNED, dict(c="0.75", s=12, label="pruned early (lower fidelity)")),
                         (COMPLETE, dict(c="tab:blue", s=18, alpha=0.6, label="trials (predicted latency)"))):
        pts = [(t.metrics["predicted_latency_ms"], t.metrics["accuracy"]) for t in trials
               if t.state == state and t.metrics.get("accuracy") is not None]
        if pts:
            ax.scatter(*zip(*pts), **style)
    f = sorted((c.latency_ms, c.accuracy) for c in front)
    ax.plot(*zip(*f), "o-", c="tab:red", label="Pareto front (measured)")
    b = sorted((c.latency_ms, c.accuracy) for c in baselines if c.accuracy is not None)
    if b:
        widths = ", ".join(c.name.split(" x")[-1] for c in baselines)
        ax.plot(*zip(*b), "s--", c="black", label=f"MobileNetV2 x{{{widths}}} (measured)")
    ax.set_xlabel("latency (ms, ONNX Runtime)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def write_report(run_dir: Path, space: SearchSpace, config: SearchConfig, trials: list[Trial], front: list,
                 baselines: list, best: dict[str, Any], num_classes: int, seconds: float) -> None:
    from nas.pipeline import MNASNET_SPEEDUP, speedup_verdict

    verdict = speedup_verdict(front, baselines)
    (run_dir / "pareto.json").write_text(json.dumps({
        "pareto": [c.row(num_classes) for c in front],
        "baselines": [c.row(num_classes) for c in baselines],
        "bar": verdict,
    }, indent=2, default=str))
    title = f"{space.name} / {config.strategy} / {config.data} @ {best['resolution']}px"
    plot_pareto(run_dir / "pareto.png", trials, front, baselines, title)

    errors = [abs(c.predicted_latency_ms - c.latency_ms) / c.latency_ms for c in front if c.latency_ms]
    lines = [
        f"# Search report: {run_dir.name}",
        "",
        f"- space: `{space.source}` ({space.description}), {space.size():.3g} architectures, resolution {best['resolution']}",
        f"- strategy: {config.strategy}, objectives: {config.objectives}, data: {config.data}, seed {config.seed}",
        f"- trials trained: {len(trials)} ({sum(t.state == COMPLETE for t in trials)} to the top rung of "
        f"{config.rungs}, eta {config.eta}, top rung {config.epochs} epochs x {config.fraction:g} of the data)",
        f"- wall time: {seconds / 60:.1f} min",
        "",
        "## Winner",
        "",
        f"`{best['arch']}`",
        "",
        f"accuracy {_pct(best['accuracy'])} (ONNX Runtime: {_pct(best['onnx_accuracy'])}), latency "
        f"{best['latency_ms']:.4f} ms measured / {best['predicted_latency_ms']:.4f} ms predicted, "
        f"{best['flops']:,} FLOPs, {best['params']:,} parameters, MnasNet reward ({config.reward}, "
        f"T = {best['latency_target_ms']:.4f} ms) {best['reward']:.4f}; ONNX parity {best['parity_rel_max_abs']:.1e}.",
        "",
        "## Pareto front (measured end to end)",
        "",
        "| candidate | accuracy | latency ms | predicted ms | error | FLOPs | params | architecture |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in front:
        row = c.row(num_classes)
        err = (c.predicted_latency_ms - c.latency_ms) / c.latency_ms
        lines.append(f"| {c.name} | {_pct(c.accuracy)} | {c.latency_ms:.4f} | {c.predicted_latency_ms:.4f} | "
                     f"{100 * err:+.1f}% | {row['flops']:,} | {row['params']:,} | `{row['arch']}` |")
    lines += [
        "",
        f"Latency table on the front: mean absolute error {100 * sum(errors) / len(errors):.1f}%, "
        f"{sum(e <= 0.10 for e in errors)}/{len(errors)} within ±10%.",
        "",
        f"## Against MobileNetV2 (bar: as accurate and at most 1/{MNASNET_SPEEDUP:g} = "
        f"{1 / MNASNET_SPEEDUP:.2f}x the latency)",
        "",
        "| baseline | accuracy | latency ms | fastest front point as accurate | its latency | ratio | bar |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdict:
        ratio = "-" if v["match"] is None else f"{v['latency_ratio']:.2f}x"
        status = "met" if v["meets_bar"] else ("missed: no front point is as accurate" if v["match"] is None else
                                               f"missed: {v['latency_ratio']:.2f}x, needs {1 / MNASNET_SPEEDUP:.2f}x")
        lines.append(f"| {v['baseline']} | {_pct(v['baseline_accuracy'])} | {v['baseline_latency_ms']:.4f} | "
                     f"{v['match'] or '-'} | {'-' if v['match'] is None else format(v['match_latency_ms'], '.4f')} | "
                     f"{ratio} | {status} |")
    lines += ["", "![pareto](pareto.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
