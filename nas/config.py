"""The main job's configuration: one dataclass with commented defaults, the single source of the
command-line options of ``scripts/search.py`` (the parser is generated from its fields) and written
next to the results.

Defaults are chosen so that ``python scripts/search.py --target cpu`` finishes within 15 minutes on a
2-core CPU on the embedded digits data, table adaptation and the final 3-seed trainings included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.errors import NasError

SCHEDULERS = ("halving", "hyperband", "asha")  # --scheduler: see nas.search
EVALUATORS = ("supernet", "predictor", "scratch")  # --evaluator: where a candidate's accuracy comes from
RUN_FORMAT = 3  # run folders written by another format cannot be resumed: config.json records it

# The search with supernet accuracy scores thousands of candidates, so evolution gets a population of
# its textbook size; trained from scratch, a run sees a few dozen candidates and evolves after 8.
SMALL_BUDGET_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "scratch": {"evolution": {"population_size": 8, "sample_size": 3}},
    "supernet": {"evolution": {"population_size": 64, "sample_size": 16}},
    "predictor": {"evolution": {"population_size": 64, "sample_size": 16}},
}


def option(help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """Field metadata: the option's help text (and its choices) for the generated parser."""
    return {"help": help, "flag": flag, "choices": choices}


@dataclass(frozen=True)
class SearchConfig:
    target: str = field(default="cpu", metadata=option(
        "where latency counts: cpu, or an ONNX Runtime provider target such as cuda or openvino"))
    threads: int = field(default=1, metadata=option("ONNX Runtime intra-op threads on the target"))
    space: str = field(default="search_spaces/mnasnet.yaml", metadata=option("search-space YAML file"))
    data: str = field(default="digits", metadata=option("digits, cifar10:PATH or imagefolder:PATH"))
    resolution: int | None = field(default=None, metadata=option(
        "input resolution of search, latency and export (default: the space's)"))
    evaluator: str = field(default="scratch", metadata=option(
        "where a candidate's accuracy comes from: supernet (weights inherited from one trained supernet, "
        "BN recalibrated), predictor (a model fitted on supernet accuracies) or scratch (short training "
        "with successive halving)", choices=EVALUATORS))
    supernet_epochs: int | None = field(default=5, metadata=option(
        "supernet training epochs (the default fits the 15-minute job on 2 cores; the supernet recipe's own "
        "8 train a better ranker)"))
    strategy: str = field(default="evolution", metadata=option("random, grid, evolution, nsga2, rl, tpe or gp"))
    strategy_options: dict[str, Any] | None = field(default=None, metadata=option(
        "JSON object of strategy options, e.g. '{\"population_size\": 12}' (default: sized for the evaluator)"))
    trials: int | None = field(default=None, metadata=option(
        "candidates to evaluate (default: 2000 with supernet or predictor, 300 with scratch)"))
    time_budget: float | None = field(default=None, metadata=option(
        "seconds of search; no new round starts after it (default: 150 with supernet or predictor, "
        "360 with scratch)"))
    objectives: str = field(default="pareto", metadata=option(
        "pareto: accuracy up and latency down; reward: MnasNet's ACC x (LAT/T)^w", choices=("pareto", "reward")))
    reward: str = field(default="soft", metadata=option(
        "soft: w = -0.07; hard: w = 0 under T, -1 over it (also picks the winner)", choices=("soft", "hard")))
    latency_target_ms: float | None = field(default=None, metadata=option(
        "T of the MnasNet reward (default: 0.56 x the fastest MobileNetV2 baseline)"))
    latency_limit_ms: float | None = field(default=None, metadata=option("hard limit on predicted latency"))
    flops_limit: float | None = field(default=None, metadata=option("hard limit on FLOPs"))
    params_limit: float | None = field(default=None, metadata=option("hard limit on parameters"))
    search_hparams: bool = field(default=False, metadata=option(
        "search the space's training hyperparameters with the architecture (scratch evaluator only); the "
        "baselines then get the same hyperparameter search budget"))
    epochs: int | None = field(default=None, metadata=option(
        "top-rung training epochs of the scratch evaluator (default: the training recipe's)"))
    fraction: float = field(default=1.0, metadata=option("top-rung share of the training data (scratch)"))
    rungs: int = field(default=2, metadata=option("successive-halving rungs (scratch)"))
    eta: int = field(default=3, metadata=option("successive-halving reduction factor (scratch)"))
    scheduler: str = field(default="halving", metadata=option(
        "multi-fidelity schedule of the scratch evaluator: successive halving from the lowest rung every round, "
        "Hyperband's brackets in turn, or asha (no rounds)", choices=SCHEDULERS))
    final_epochs: int | None = field(default=None, metadata=option(
        "epochs of the final trainings of front and baselines (default: the training recipe's)"))
    final_seeds: int = field(default=3, metadata=option("seeds of every final training (mean +- std reported)"))
    baselines: tuple[float, ...] = field(default=(0.35, 0.5, 0.75, 1.0), metadata=option(
        "MobileNetV2 width multipliers to compare with (comma-separated)"))
    front_size: int = field(default=8, metadata=option("most Pareto points re-measured end to end and trained"))
    workers: int = field(default=2, metadata=option("parallel training processes (scratch search, final trainings)"))
    executor: str = field(default="local", metadata=option("where trainings run", choices=("local", "ray")))
    ray_address: str | None = field(default=None, metadata=option("Ray cluster address (default: a local Ray)"))
    table: str | None = field(default=None, metadata=option(
        "latency table JSON (default: latency_tables/<space>-r<res>-<target>-t<threads>-b1.json, adapted to "
        "this machine when it came from another)"))
    seed: int = field(default=0, metadata=option("seed of data splits, supernet, search and trainings"))

    def __post_init__(self) -> None:
        checks = [
            (self.objectives in ("pareto", "reward"), "--objectives", "pareto or reward", self.objectives),
            (self.reward in ("soft", "hard"), "--reward", "soft or hard", self.reward),
            (self.evaluator in EVALUATORS, "--evaluator", " or ".join(EVALUATORS), self.evaluator),
            (self.trials is None or self.trials >= 1, "--trials", "at least 1", self.trials),
            (self.epochs is None or self.epochs >= 1, "--epochs", "at least 1", self.epochs),
            (self.supernet_epochs is None or self.supernet_epochs >= 1, "--supernet-epochs", "at least 1",
             self.supernet_epochs),
            (0 < self.fraction <= 1, "--fraction", "in (0, 1]", self.fraction),
            (self.rungs >= 1, "--rungs", "at least 1", self.rungs),
            (self.eta >= 2, "--eta", "at least 2", self.eta),
            (self.scheduler in SCHEDULERS, "--scheduler", "halving, hyperband or asha", self.scheduler),
            (self.workers >= 1, "--workers", "at least 1", self.workers),
            (self.threads >= 1, "--threads", "at least 1", self.threads),
            (self.front_size >= 1, "--front-size", "at least 1", self.front_size),
            (self.final_seeds >= 1, "--final-seeds", "at least 1", self.final_seeds),
            (self.executor in ("local", "ray"), "--executor", "local or ray", self.executor),
            (self.resolution is None or self.resolution >= 8, "--resolution", "at least 8", self.resolution),
            (self.time_budget is None or self.time_budget > 0, "--time-budget", "positive", self.time_budget),
            (self.final_epochs is None or self.final_epochs >= 1, "--final-epochs", "at least 1", self.final_epochs),
            (not (self.search_hparams and self.evaluator != "scratch"), "--search-hparams",
             "used with --evaluator scratch (a supernet is trained with one recipe)", self.search_hparams),
        ]
        for name in ("latency_target_ms", "latency_limit_ms", "flops_limit", "params_limit"):
            value = getattr(self, name)
            checks.append((value is None or value > 0, "--" + name.replace("_", "-"), "positive", value))
        if self.objectives == "reward":
            checks.append((self.latency_target_ms is not None, "--latency-target-ms",
                           "given with --objectives reward (MnasNet's target latency T)", None))
        for ok, flag, allowed, value in checks:
            if not ok:
                raise NasError(f"{flag} should be {allowed}, got {value!r}")
        object.__setattr__(self, "baselines", tuple(float(w) for w in self.baselines))
        if not self.baselines or any(not 0 < w <= 4 for w in self.baselines):
            raise NasError(f"--baselines should be width multipliers in (0, 4], got {list(self.baselines)}")

    # --- what the defaults resolve to ---------------------------------------------------------------
    @property
    def trial_budget(self) -> int:
        return self.trials if self.trials is not None else (300 if self.evaluator == "scratch" else 2000)

    @property
    def search_seconds(self) -> float | None:
        if self.time_budget is not None:
            return self.time_budget
        return 360.0 if self.evaluator == "scratch" else 150.0

    @property
    def resolved_strategy_options(self) -> dict[str, Any]:
        if self.strategy_options is not None:
            return dict(self.strategy_options)
        return dict(SMALL_BUDGET_OPTIONS[self.evaluator].get(self.strategy, {}))

    # --- files --------------------------------------------------------------------------------------
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
        for name in ("trials", "time_budget", "workers", "executor", "ray_address", "baselines", "front_size"):
            data.pop(name)
        return data


# --- the command line, generated from the fields -------------------------------------------------------


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``tuple[float, ...]`` -> tuple; ``dict[str, Any] | None`` -> dict."""
    hint = annotation
    if isinstance(hint, (types.UnionType,)) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _converter(kind: Any, flag: str):
    if kind is tuple:
        def floats(text: str) -> tuple[float, ...]:
            try:
                return tuple(float(w) for w in text.split(",") if w.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        return floats
    if kind is dict:
        def json_object(text: str) -> dict[str, Any]:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise argparse.ArgumentTypeError(f"not JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError("expected a JSON object")
            return value
        return json_object
    return kind


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``SearchConfig`` field, named ``--field-name``, typed and documented by the field."""
    hints = typing.get_type_hints(SearchConfig)
    for f in dataclasses.fields(SearchConfig):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        default = f.default
        if kind is tuple:
            default = ",".join(f"{w:g}" for w in default)
        parser.add_argument(flag, dest=f.name, type=_converter(kind, flag), default=default,
                            choices=meta.get("choices"), help=meta["help"])


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)}
    if isinstance(values["baselines"], str):  # the untouched default string
        values["baselines"] = tuple(float(w) for w in values["baselines"].split(","))
    return SearchConfig(**values)


def check_resumable(run_dir: Path, config: SearchConfig) -> None:
    """A run folder resumes only the same search by the same format of this tool: a changed setting
    would mix two searches' trials, and an older folder lacks what this version writes."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    fresh = f"pass another --out, or delete {run_dir} to start afresh"
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise NasError(f"{path}: not a run configuration (unreadable JSON); {fresh}") from None
    if not isinstance(saved, dict) or saved.get("format") != RUN_FORMAT:
        found = saved.get("format", "none") if isinstance(saved, dict) else "none"
        raise NasError(f"{run_dir}: written by an older version of nas (run format {found}, this version "
                       f"writes {RUN_FORMAT}); {fresh}")
    saved = {k: v for k, v in saved.items() if k != "format"}
    try:
        previous = SearchConfig.from_dict(saved)
    except (NasError, TypeError) as exc:
        raise NasError(f"{path}: not a configuration of this version ({exc}); {fresh}") from None
    old, new = previous.search_identity(), config.search_identity()
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        k = changed[0]
        raise NasError(f"{run_dir}: this run folder holds a search with {k}={old.get(k)!r}, not {new[k]!r}; "
                       f"rerun with the same settings to resume it, or {fresh}")


def write_config(run_dir: Path, config: SearchConfig) -> None:
    (run_dir / "config.json").write_text(json.dumps({"format": RUN_FORMAT, **config.to_dict()}, indent=2))
