"""The main job's configuration: one dataclass with commented defaults, written next to the results.

Defaults are chosen so that ``python scripts/search.py --target cpu`` finishes within about 15 minutes
on a 2-core laptop-class CPU on the embedded digits data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.errors import NasError

SCHEDULERS = ("halving", "hyperband", "asha")  # --scheduler: see nas.search


# A default run trains a few dozen candidates: evolution's textbook population (20) would leave it
# almost no generations, so the main job starts evolving after 8.
SMALL_BUDGET_OPTIONS: dict[str, dict[str, Any]] = {"evolution": {"population_size": 8, "sample_size": 3}}


@dataclass(frozen=True)
class SearchConfig:
    space: str = "search_spaces/mnasnet.yaml"
    strategy: str = "evolution"  # random | grid | evolution | nsga2 | rl | tpe | gp
    strategy_options: dict[str, Any] | None = None  # e.g. {"population_size": 12}; None: SMALL_BUDGET_OPTIONS
    trials: int = 300  # most candidates trained (successive halving stops most early) ...
    time_budget: float | None = 720.0  # ... within this many seconds of search: no new round starts after it.
    # On digits at 32 px a 2-core CPU trains ~20 candidates a minute, so the time budget binds and the
    # whole default run (search, end-to-end measurements, baselines, final training, export) takes ~13 min;
    # with 9 minutes of search, how far evolution got depended on the machine's speed that day.
    objectives: str = "pareto"  # pareto: accuracy up, latency down | reward: MnasNet's ACC x (LAT/T)^w
    reward: str = "soft"  # soft (alpha = beta = -0.07) | hard (alpha = 0, beta = -1)
    latency_target_ms: float | None = None  # T; default 0.56 x the fastest MobileNetV2 baseline (MnasNet's 1.8x)
    latency_limit_ms: float | None = None  # hard limits, checked on predictions before training
    flops_limit: float | None = None
    params_limit: float | None = None
    data: str = "digits"  # digits | cifar10:PATH | imagefolder:PATH
    resolution: int | None = None  # input resolution of search, latency and export; default: the space's
    epochs: int = 6  # top rung (and final training) epochs
    fraction: float = 1.0  # top rung share of the training data
    rungs: int = 2  # successive-halving rungs; each lower rung gets 1/eta of the budget
    eta: int = 3
    scheduler: str = "halving"  # halving: rounds from rung 0 | hyperband: rounds cycle its brackets | asha: no rounds
    final_epochs: int | None = None  # the winner's and baselines' training; default: epochs
    baselines: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0)  # MobileNetV2 width multipliers to compare with
    front_size: int = 8  # most Pareto points re-measured end to end
    workers: int = 1
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    target: str = "cpu"
    threads: int = 1  # ONNX Runtime intra-op threads of the target
    table: str | None = None  # latency table; default latency_tables/<space>-r<res>-<target>-t<threads>-b1.json
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.objectives in ("pareto", "reward"), "--objectives", "pareto or reward", self.objectives),
            (self.reward in ("soft", "hard"), "--reward", "soft or hard", self.reward),
            (self.trials >= 1, "--trials", "at least 1", self.trials),
            (self.epochs >= 1, "--epochs", "at least 1", self.epochs),
            (0 < self.fraction <= 1, "--fraction", "in (0, 1]", self.fraction),
            (self.rungs >= 1, "--rungs", "at least 1", self.rungs),
            (self.eta >= 2, "--eta", "at least 2", self.eta),
            (self.scheduler in SCHEDULERS, "--scheduler", "halving, hyperband or asha", self.scheduler),
            (self.workers >= 1, "--workers", "at least 1", self.workers),
            (self.threads >= 1, "--threads", "at least 1", self.threads),
            (self.front_size >= 1, "--front-size", "at least 1", self.front_size),
            (self.executor in ("local", "ray"), "--executor", "local or ray", self.executor),
            (self.resolution is None or self.resolution >= 8, "--resolution", "at least 8", self.resolution),
            (self.time_budget is None or self.time_budget > 0, "--time-budget", "positive", self.time_budget),
            (self.final_epochs is None or self.final_epochs >= 1, "--final-epochs", "at least 1", self.final_epochs),
        ]
        for name in ("latency_target_ms", "latency_limit_ms", "flops_limit", "params_limit"):
            value = getattr(self, name)
            checks.append((value is None or value > 0, "--" + name.replace("_", "-"), "positive", value))
        for ok, option, allowed, value in checks:
            if not ok:
                raise NasError(f"{option} should be {allowed}, got {value!r}")
        object.__setattr__(self, "baselines", tuple(float(w) for w in self.baselines))
        if self.strategy_options is None:
            object.__setattr__(self, "strategy_options", dict(SMALL_BUDGET_OPTIONS.get(self.strategy, {})))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["baselines"] = list(self.baselines)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NasError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def search_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it resumes (budgets may grow)."""
        data = self.to_dict()
        for name in ("trials", "time_budget", "workers", "executor", "ray_address", "final_epochs", "baselines",
                     "front_size"):
            data.pop(name)
        return data


def check_resumable(run_dir: Path, config: SearchConfig) -> None:
    """A run folder resumes only the same search: a changed setting would mix two searches' trials."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    previous = SearchConfig.from_dict(json.loads(path.read_text()))
    old, new = previous.search_identity(), config.search_identity()
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        k = changed[0]
        raise NasError(f"{run_dir}: this run folder holds a search with {k}={old.get(k)!r}, not {new[k]!r}; "
                       "rerun with the same settings to resume it, or pass another --out")
