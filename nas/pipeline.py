"""The main job: latency table -> search -> end-to-end re-measurement -> final training -> ONNX -> report.

Order matters for measurement: the search trains (workers busy), then the Pareto set and the
MobileNetV2 baselines are measured together with nothing else running, then the winner and the
baselines are trained with the final budget, then the exported model is checked and evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nas.arch import Arch
from nas.config import SearchConfig, check_resumable
from nas.cost import arch_cost
from nas.errors import NasError
from nas.fidelity import Fidelity
from nas.objectives import REWARD_PRESETS, Limits, Objective, check_reachable, reward
from nas.pareto import pareto_front
from nas.references import mobilenet_v2_width
from nas.search import LoopSettings, Search
from nas.space import SearchSpace, load_space
from nas.trial import COMPLETE, Trial

MNASNET_SPEEDUP = 1.8  # MnasNet's headline: 1.8x faster than MobileNetV2 at the same accuracy


def default_run_dir(config: SearchConfig, space: SearchSpace) -> Path:
    """Deterministic, so that running the same command again finds and resumes the same folder."""
    return Path("runs") / f"{space.name}-{config.objectives}-{config.strategy}-seed{config.seed}"


@dataclass
class Candidate:
    """An architecture on its way to the report: its trial metrics plus end-to-end measurements."""

    name: str
    arch: Arch
    accuracy: float | None
    predicted_latency_ms: float | None
    hparams: dict[str, Any]
    latency_ms: float | None = None
    latency_spread: float | None = None

    def row(self, num_classes: int) -> dict[str, Any]:
        cost = arch_cost(self.arch, num_classes)
        return {"name": self.name, "arch": self.arch.to_string(), "accuracy": self.accuracy,
                "latency_ms": self.latency_ms, "predicted_latency_ms": self.predicted_latency_ms,
                "latency_spread": self.latency_spread, "flops": cost.flops, "params": cost.params,
                "hparams": self.hparams}


class MainJob:
    def __init__(self, config: SearchConfig, run_dir: Path | None = None, log: Callable[[str], None] | None = None):
        self.space = load_space(config.space)
        self.resolution = config.resolution or self.space.resolution
        self.config = config = dataclasses.replace(config, resolution=self.resolution)  # the resolved configuration
        self.log = log or (lambda line: print(line, flush=True))
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(config, self.space)
        from nas.data import load_dataset  # torch import deferred until the configuration is valid

        self.data = load_dataset(config.data, seed=config.seed)
        from nas.latency.targets import get_target

        self.target = get_target(config.target, threads=config.threads)
        self.top = Fidelity(config.epochs, config.fraction, self.resolution)
        self.final = Fidelity(config.final_epochs or config.epochs, config.fraction, self.resolution)
        self.started = time.monotonic()

    # --- latency table ----------------------------------------------------------------------------
    def load_table(self):
        from nas.latency.build import build_table
        from nas.latency.table import LatencyTable, default_table_path

        path = Path(self.config.table) if self.config.table else default_table_path(self.space.name, self.resolution, self.target)
        if not path.exists():
            if self.config.table:
                raise NasError(f"--table {path}: no such file; omit --table to build the default one")
            self.log(f"no latency table at {path}: building it now (measures every block of {self.space.source})")
            build_table(self.space, self.target, path, resolution=self.resolution, num_classes=self.data.num_classes)
        table = LatencyTable.load(path, expect_target=self.target.name, expect_threads=self.target.threads,
                                  expect_batch=self.target.batch)
        if table.metadata["resolution"] != self.resolution:
            raise NasError(f"{path}: table built at resolution {table.metadata['resolution']}, the search runs at "
                           f"{self.resolution}; build one with scripts/build_lut.py --resolution {self.resolution}")
        self.table_path = path
        self.table_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.speed_ratio = self.machine_speed(table)
        table.relevel(self.speed_ratio)
        return table

    def machine_speed(self, table) -> float | None:
        """The table's calibration networks' time here over their time in it, measured once per run
        folder and reused on resume: the trials of a resumed search are predicted alike."""
        saved = self.run_dir / "machine_speed.json"
        if saved.exists() and (record := json.loads(saved.read_text())).get("table_sha256") == self.table_sha256:
            ratio = record["speed_ratio"]
            when = "when this run started"
        else:
            ratio = table.check_machine_speed(self.target)  # nothing runs yet: a fair comparison
            saved.write_text(json.dumps({"speed_ratio": ratio, "table_sha256": self.table_sha256}, indent=2))
            when = "now"
        if ratio is not None:
            self.log(f"latency table {self.table_path}: this machine runs its calibration networks at {ratio:.3f}x "
                     f"their time in the table ({when})")
        return ratio

    def predictor(self, table) -> Callable[[Arch], float]:
        return lambda arch: table.predict(arch, self.data.num_classes)

    # --- objective ----------------------------------------------------------------------------------
    def objective(self, predict: Callable[[Arch], float]) -> tuple[Objective, Limits]:
        c = self.config
        limits = Limits(c.latency_limit_ms, c.flops_limit, c.params_limit)
        fastest_ms = None
        if limits.active() or c.objectives == "reward":
            def measure(params: dict[str, Any]) -> dict[str, Any]:
                arch = self.space.decode(params, self.resolution)
                cost = arch_cost(arch, self.data.num_classes)
                return {"latency_ms": predict(arch), "flops": cost.flops, "params": cost.params}

            check_reachable(self.space, measure, limits)
            from nas.objectives import cheapest

            fastest_ms = cheapest(self.space, measure, "latency_ms")[1]
        if c.objectives == "pareto":
            return Objective("pareto"), limits
        target = c.latency_target_ms
        if target is None:
            raise NasError("--objectives reward needs --latency-target-ms T (MnasNet's target latency)")
        if c.reward == "hard" and fastest_ms is not None and target < fastest_ms:
            raise NasError(f"--latency-target-ms {target} is impossible with --reward hard: the fastest architecture "
                           f"of {self.space.source} is predicted at {fastest_ms:.4g} ms; raise the target")
        return Objective.mnasnet(target, c.reward), limits

    # --- steps ----------------------------------------------------------------------------------------
    def search(self, predict, objective: Objective, limits: Limits) -> list[Trial]:
        c = self.config
        settings = LoopSettings(
            strategy=c.strategy, strategy_options=dict(c.strategy_options), trials=c.trials,
            time_budget=c.time_budget, objective=objective, limits=limits, data=c.data, top=self.top,
            rungs=c.rungs, eta=c.eta, scheduler=c.scheduler, num_classes=self.data.num_classes, workers=c.workers,
            executor=c.executor, ray_address=c.ray_address, seed=c.seed,
        )
        return Search(self.space, settings, self.run_dir, predict, self.log).run()

    def front(self, trials: list[Trial]) -> list[Candidate]:
        """Top-rung trials that are Pareto-optimal in (accuracy, predicted latency), at most front_size."""
        complete = [t for t in trials if t.state == COMPLETE and t.metrics.get("accuracy") is not None]
        points = [(t.metrics["accuracy"], -t.metrics["predicted_latency_ms"]) for t in complete]
        chosen = sorted((complete[i] for i in pareto_front(points)), key=lambda t: t.metrics["predicted_latency_ms"])
        if len(chosen) > self.config.front_size:  # keep the extremes and an even spread between them
            picks = np.linspace(0, len(chosen) - 1, self.config.front_size).round().astype(int)
            chosen = [chosen[i] for i in sorted(set(picks))]
        return [Candidate(f"trial {t.number}", Arch.parse(t.arch), t.metrics["accuracy"],
                          t.metrics["predicted_latency_ms"], self.space.hyperparameters_of(t.params)) for t in chosen]

    def baselines(self) -> list[Candidate]:
        return [Candidate(f"mobilenet_v2 x{w:g}", mobilenet_v2_width(w, self.resolution), None, None, {})
                for w in self.config.baselines]

    def measure(self, candidates: list[Candidate]) -> None:
        """End-to-end ONNX Runtime latency of all candidates, interleaved, with nothing else running."""
        from nas.latency.measure import measure_archs

        self.log(f"measuring {len(candidates)} networks end to end with ONNX Runtime ({self.target.name}, "
                 f"{self.target.threads} thread(s))")
        for cand, m in zip(candidates, measure_archs([c.arch for c in candidates], self.target,
                                                     num_classes=self.data.num_classes)):
            cand.latency_ms, cand.latency_spread = m.ms, m.spread

    def train(self, cand: Candidate, fidelity: Fidelity, return_model: bool = False):
        from nas.train import train_candidate

        self.log(f"training {cand.name} for {fidelity.epochs} epochs: {cand.arch.to_string()}")
        result = train_candidate(cand.arch, cand.hparams or None, fidelity, self.data, seed=self.config.seed,
                                 return_model=return_model)
        if result.failed:
            self.log(f"  {cand.name} failed: {result.error}")
        else:
            self.log(f"  accuracy {result.accuracy:.4f} in {result.seconds:.1f}s")
        return result

    def export(self, model, path: Path) -> dict[str, Any]:
        """best.onnx with a parity check against PyTorch and its own accuracy under ONNX Runtime;
        the weights go to weights.pt beside it (scripts/export.py re-exports from them)."""
        import onnxruntime as ort
        import torch

        from nas.export import check_parity, export_onnx
        from nas.train import evaluate

        torch.save(model.state_dict(), path.with_name("weights.pt"))
        onnx_bytes = export_onnx(model, path, resolution=self.resolution)
        parity = check_parity(model, onnx_bytes)
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        accuracy = evaluate(lambda x: [session.run(None, {name: x[i:i + 1]})[0][0] for i in range(len(x))],
                            self.data, self.resolution)
        self.log(f"exported {path} (parity {parity:.2e}); ONNX Runtime validation accuracy {accuracy:.4f}")
        return {"onnx": str(path), "parity_rel_max_abs": parity, "onnx_accuracy": accuracy}

    # --- the whole job ----------------------------------------------------------------------------------
    def run(self) -> Path:
        from nas.report import write_report

        c = self.config
        check_resumable(self.run_dir, c)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        self.log(f"run folder: {self.run_dir}")
        table = self.load_table()
        predict = self.predictor(table)
        objective, limits = self.objective(predict)
        trials = self.search(predict, objective, limits)
        done = self.run_dir / "best.json"
        if done.exists() and json.loads(done.read_text()).get("trials") == len(trials) and (self.run_dir / "best.onnx").exists():
            self.log(f"this run is already complete ({len(trials)} trials): see {self.run_dir / 'report.md'}")
            return self.run_dir
        front, baselines = self.front(trials), self.baselines()
        if not front:
            raise NasError(f"{self.run_dir}: no candidate finished training at the top rung; raise --trials")
        self.measure(front + baselines)
        target_ms = c.latency_target_ms or min(b.latency_ms for b in baselines) / MNASNET_SPEEDUP
        alpha, beta = REWARD_PRESETS[c.reward]
        winner = max(front, key=lambda f: reward(f.accuracy, f.latency_ms, target_ms, alpha, beta))
        for b in baselines:  # the same budget as the front's top-rung trials
            b.accuracy = self.train(b, self.top).accuracy
        final = self.train(winner, self.final, return_model=True)
        if final.failed:
            raise NasError(f"the chosen architecture failed its final training: {final.error}")
        exported = self.export(final.model, self.run_dir / "best.onnx")
        summary = {
            "arch": winner.arch.to_string(), "name": winner.name, "accuracy": final.accuracy,
            "search_accuracy": winner.accuracy, "latency_ms": winner.latency_ms,
            "predicted_latency_ms": winner.predicted_latency_ms, "reward": reward(final.accuracy, winner.latency_ms, target_ms, alpha, beta),
            "latency_target_ms": target_ms, "reward_setting": c.reward, "hparams": winner.hparams,
            "resolution": self.resolution, "trials": len(trials), **{k: v for k, v in winner.row(self.data.num_classes).items() if k in ("flops", "params")},
            **exported,
        }
        (self.run_dir / "best.json").write_text(json.dumps(summary, indent=2))
        write_report(self.run_dir, self.space, c, trials, front, baselines, summary, self.data.num_classes,
                     time.monotonic() - self.started)
        (self.run_dir / "manifest.json").write_text(json.dumps(self.manifest(), indent=2))
        self.log(f"done in {(time.monotonic() - self.started) / 60:.1f} min: {self.run_dir}")
        return self.run_dir

    def manifest(self) -> dict[str, Any]:
        import onnx
        import onnxruntime
        import optuna
        import torch
        import torchvision

        from nas.latency.targets import cpu_model

        return {
            "seed": self.config.seed, "command": " ".join(sys.argv), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "optuna": optuna.__version__, "numpy": np.__version__},
            "onnxruntime": onnxruntime.__version__, "cpu": cpu_model(), "platform": platform.platform(),
            "latency_table": str(self.table_path),
            "latency_table_sha256": self.table_sha256,
            "latency_table_speed_ratio": self.speed_ratio,
            "target": self.target.to_dict(), "wall_seconds": time.monotonic() - self.started,
        }


def speedup_verdict(front: list[Candidate], baselines: list[Candidate]) -> list[dict[str, Any]]:
    """For each baseline: the fastest front point at least as accurate, and its latency ratio (bar: <= 1/1.8)."""
    rows = []
    for b in baselines:
        better = [f for f in front if f.accuracy is not None and b.accuracy is not None and f.accuracy >= b.accuracy
                  and f.latency_ms is not None]
        best = min(better, key=lambda f: f.latency_ms, default=None)
        ratio = best.latency_ms / b.latency_ms if best else math.inf
        rows.append({"baseline": b.name, "baseline_accuracy": b.accuracy, "baseline_latency_ms": b.latency_ms,
                     "match": best.name if best else None, "match_accuracy": best.accuracy if best else None,
                     "match_latency_ms": best.latency_ms if best else None, "latency_ratio": ratio,
                     "meets_bar": ratio <= 1 / MNASNET_SPEEDUP})
    return rows
