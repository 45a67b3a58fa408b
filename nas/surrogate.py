"""An accuracy predictor fitted on real low-fidelity training runs, for benchmarking search strategies.

Comparing strategies needs thousands of evaluations per space, far more than real training affords
on a CPU. The benchmark (scripts/bench_strategies.py) therefore scores candidates with this predictor,
fitted on a few hundred real trainings that ship in ``benchmarks/accuracy_runs/<space>.json`` (the idea
of surrogate NAS benchmarks such as NAS-Bench-301, at a much smaller scale).

- Collection (``collect``, driven by scripts/collect_accuracy.py): run ``i`` trains the point
  ``sample_point(space, i, seed)`` (a random architecture with its sampled hyperparameters) with
  training seed ``i`` at one low fidelity on the embedded digits data. The file is rewritten
  atomically after every run, so an interrupted collection resumes at the next index and the same
  command always trains the same candidates.
- Features (``Featurizer``): every decision of the space (numeric choices as ordinals, strings one-hot,
  booleans 0/1, the learning rate as log10), with decisions that do not affect the network zeroed (a
  layer beyond its stage's depth, an expansion under a plain conv), plus summaries of the decoded
  network: log10 FLOPs and parameters (``arch_cost``), depth, mean kernel and expansion, and counts of
  squeeze-excite, residual and each op.
- Model (``AccuracyPredictor``): scikit-learn's GradientBoostingRegressor with a fixed random_state,
  so the same runs always give the same predictor. A failed run (diverged loss) counts as chance
  accuracy (1 / classes): it is what the search would have got, and it teaches the predictor where
  training breaks. ``cross_validate`` reports the held-out Spearman correlation over k folds.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from nas.cost import arch_cost
from nas.errors import NasError
from nas.fidelity import Fidelity
from nas.space import SearchSpace

SCHEMA = 1
# Low fidelity of the shipped runs: 3 of the default proxy budget's 8 epochs, on all of the training
# split at 32x32. Cheaper budgets leave most candidates at chance: 2 epochs on half the data gave
# chance accuracy (10%) to all 8 random candidates tried (4 of mnasnet.yaml, 4 of mobilenetv2.yaml),
# which would teach the predictor nothing.
COLLECT_FIDELITY = Fidelity(epochs=3, fraction=1.0, resolution=32)
DATASET = "digits"
NUM_CLASSES = 10
RUNS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_runs"


def sample_point(space: SearchSpace, index: int, seed: int = 0) -> dict[str, Any]:
    """Run ``index``'s point: a uniform draw of every decision from its own seeded generator."""
    return space.sample(random.Random(f"accuracy-run:{seed}:{index}"))


@dataclass(frozen=True)
class AccuracyRun:
    """One real training: the point, its decoded architecture, and the validation accuracy it reached."""

    index: int
    params: dict[str, Any]
    arch: str  # canonical string at the training resolution
    accuracy: float | None  # None when the run failed
    fidelity: dict[str, Any]
    seconds: float
    seed: int  # training seed
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AccuracyRun":
        return cls(**{k: data.get(k) for k in ("index", "params", "arch", "accuracy", "fidelity", "seconds", "seed", "error")})


def default_runs_path(space: SearchSpace) -> Path:
    return RUNS_DIR / f"{space.name}.json"


def load_runs(path: str | Path, space: SearchSpace | None = None) -> tuple[dict[str, Any], list[AccuracyRun]]:
    """(header, runs) of a runs file; with ``space``, every run must be a point of it."""
    path = Path(path)
    if not path.is_file():
        raise NasError(f"{path}: no such accuracy-runs file; collect one with python scripts/collect_accuracy.py")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NasError(f"{path}: not an accuracy-runs file (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("runs"), list):
        raise NasError(f"{path}: not an accuracy-runs file of schema {SCHEMA}")
    runs = [AccuracyRun.from_dict(r) for r in data.pop("runs")]
    if space is not None:
        if data.get("space") != space.name:
            raise NasError(f"{path}: runs are of space {data.get('space')!r}, not {space.name!r} ({space.source})")
        for run in runs:
            if not space.contains(run.params):
                raise NasError(f"{path}: run {run.index} is not a point of {space.source}; collect again for this space")
    return data, runs


def _save(path: Path, header: dict[str, Any], runs: list[AccuracyRun]) -> None:
    """Atomic rewrite, one run per line (diffs stay readable)."""
    head = json.dumps({"schema": SCHEMA, **header}, indent=1)[:-2]
    lines = [f"  {json.dumps(run.to_dict(), sort_keys=True)}" for run in runs]
    text = head + ',\n "runs": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_run(space: SearchSpace, index: int, data, fidelity: Fidelity, seed: int = 0,
              threads: int | None = None) -> AccuracyRun:
    """Train run ``index`` of ``space`` (see ``sample_point``) at ``fidelity`` on ``data``."""
    from nas.train import train_candidate  # torch only when training

    params = sample_point(space, index, seed)
    arch = space.decode(params, resolution=fidelity.resolution)
    start = time.perf_counter()
    result = train_candidate(arch, space.hyperparameters_of(params), fidelity, data, seed=index, threads=threads)
    return AccuracyRun(index, params, arch.to_string(), result.accuracy, fidelity.to_dict(),
                       round(time.perf_counter() - start, 3), index, result.error)


def collect(space: SearchSpace, path: str | Path, n: int, *, fidelity: Fidelity = COLLECT_FIDELITY, seed: int = 0,
            threads: int | None = 1, max_seconds: float | None = None,
            log: Callable[[str], None] = print) -> list[AccuracyRun]:
    """Train runs until ``path`` holds ``n`` (or ``max_seconds`` of training have passed), resuming.

    The header (space, dataset, fidelity, seed) must match an existing file: mixing fidelities or
    sampling seeds in one file would make its runs incomparable.
    """
    from nas.data import load_dataset

    path = Path(path)
    header = {"space": space.name, "space_file": Path(space.source).name, "dataset": DATASET,
              "fidelity": fidelity.to_dict(), "sample_seed": seed,
              "note": "run i trains nas.surrogate.sample_point(space, i, sample_seed) with training seed i"}
    runs: list[AccuracyRun] = []
    if path.exists():
        old, runs = load_runs(path, space)
        for key in ("space", "dataset", "fidelity", "sample_seed"):
            if old.get(key) != header[key]:
                raise NasError(f"{path}: existing runs have {key}={old.get(key)!r}, this collection {header[key]!r}; "
                               "use another --out or the same settings")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_dataset(DATASET, seed=0)
    start = time.perf_counter()
    while len(runs) < n:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            log(f"stopping after {time.perf_counter() - start:.0f}s (--max-minutes): {len(runs)} runs in {path}")
            break
        run = train_run(space, len(runs), data, fidelity, seed, threads)
        runs.append(run)
        _save(path, header, runs)
        outcome = f"accuracy {run.accuracy:.4f}" if run.error is None else f"FAILED ({run.error})"
        log(f"run {run.index}: {outcome} in {run.seconds:.1f}s  {space.hyperparameters_of(run.params)}")
    return runs


# --- features --------------------------------------------------------------------------------------


class Featurizer:
    """Fixed-length numeric features of a point of ``space`` (see the module notes)."""

    def __init__(self, space: SearchSpace, resolution: int = COLLECT_FIDELITY.resolution, *,
                 summaries: bool = True, hyperparameters: bool = True):
        self.space = space
        self.resolution = resolution
        self.summaries = summaries
        self.decisions = tuple(d for d in space.decisions if hyperparameters or not d.is_hyperparameter)
        names: list[str] = []
        for d in self.decisions:
            if d.kind == "categorical" and any(isinstance(c, str) for c in d.choices):
                names += [f"{d.name}={c}" for c in d.choices]
            else:
                names.append(f"log10({d.name})" if d.kind == "log_float" else d.name)
        self.ops = sorted({op for stage in space.stages for op in stage.choices["op"]})
        if summaries:
            names += ["log10(flops)", "log10(params)", "depth", "mean_kernel", "mean_expansion", "se_layers",
                      "skip_layers", *(f"op_{op}" for op in self.ops)]
        self.names = tuple(names)

    def _relevant(self, params: dict[str, Any], name: str) -> bool:
        """False for a choice that does not change the network: a layer beyond its stage's depth, or an
        expansion (or squeeze-excite width of the expansion) of a conv/ds layer."""
        parts = name.split(".")
        if len(parts) == 3 and parts[1].startswith("l"):  # s{i}.l{j}.key (choice per layer)
            stage = int(parts[0][1:])
            depth = params.get(f"{parts[0]}.layers", self.space.stages[stage].choices["layers"][0])
            if int(parts[1][1:]) >= depth:
                return False
        if parts[-1] == "expansion":
            prefix = ".".join(parts[:-1])
            op = params.get(f"{prefix}.op", self.space.stages[int(parts[0][1:])].choices["op"][0])
            return op in ("ir", "bot")
        return True

    def features(self, params: dict[str, Any]) -> list[float]:
        row: list[float] = []
        for d in self.decisions:
            value = params[d.name]
            relevant = self._relevant(params, d.name)
            if d.kind == "categorical" and any(isinstance(c, str) for c in d.choices):
                row += [float(relevant and value == c) for c in d.choices]
            elif not relevant:
                row.append(0.0)
            elif d.kind == "log_float":
                row.append(math.log10(value))
            else:
                row.append(float(value))
        if not self.summaries:
            return row
        arch = self.space.decode(params, resolution=self.resolution)
        cost = arch_cost(arch, NUM_CLASSES)
        body = [layer for layer in arch.layers if layer.op in ("conv", "ds", "ir", "bot")]
        row += [math.log10(cost.flops), math.log10(cost.params), float(len(arch.layers)),
                sum(layer.kernel for layer in body) / len(body), sum(layer.expansion for layer in body) / len(body),
                float(sum(layer.se > 0 for layer in body)), float(sum(bool(layer.skip) for layer in body)),
                *(float(sum(layer.op == op for layer in body)) for op in self.ops)]
        return row

    def matrix(self, points: Iterable[dict[str, Any]]) -> np.ndarray:
        if self.summaries:
            return np.array([self.features(p) for p in points], dtype=float)
        return self._decision_matrix(list(points))

    def _decision_matrix(self, points: list[dict[str, Any]]) -> np.ndarray:
        """``features`` of many points at once, column by column (decisions only): 10^5 points/s."""
        columns = []
        for d in self.decisions:
            values = [p[d.name] for p in points]
            relevant = np.array([self._relevant(p, d.name) for p in points], dtype=bool) if self._conditional(d.name) \
                else np.ones(len(points), dtype=bool)
            if d.kind == "categorical" and any(isinstance(c, str) for c in d.choices):
                columns += [relevant & np.array([v == c for v in values], dtype=bool) for c in d.choices]
            else:
                numbers = np.log10(values) if d.kind == "log_float" else np.asarray(values, dtype=float)
                columns.append(np.where(relevant, numbers, 0.0))
        return np.stack(columns, axis=1).astype(float) if columns else np.zeros((len(points), 0))

    @staticmethod
    def _conditional(name: str) -> bool:
        parts = name.split(".")
        return parts[-1] == "expansion" or (len(parts) == 3 and parts[1].startswith("l"))


def targets(runs: Sequence[AccuracyRun]) -> np.ndarray:
    """Accuracies, a failed run counting as chance."""
    return np.array([run.accuracy if run.accuracy is not None else 1.0 / NUM_CLASSES for run in runs], dtype=float)


def _model(seed: int):
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(n_estimators=300, learning_rate=0.03, max_depth=3, min_samples_leaf=3,
                                     subsample=0.8, random_state=seed)


class AccuracyPredictor:
    """Predicts the accuracy a point of ``space`` reaches at the runs' fidelity; deterministic."""

    def __init__(self, space: SearchSpace, runs: Sequence[AccuracyRun], seed: int = 0):
        if len(runs) < 10:
            raise NasError(f"an accuracy predictor for {space.name} needs at least 10 training runs, got {len(runs)}")
        resolutions = {run.fidelity["resolution"] for run in runs}
        if len(resolutions) != 1:
            raise NasError(f"accuracy runs mix training resolutions {sorted(resolutions)}")
        self.space = space
        self.runs = list(runs)
        self.seed = seed
        self.featurizer = Featurizer(space, resolutions.pop())
        self._x = self.featurizer.matrix(run.params for run in self.runs)
        self._y = targets(self.runs)
        self.model = _model(seed).fit(self._x, self._y)
        self._cache: dict[str, float] = {}

    @classmethod
    def from_file(cls, space: SearchSpace, path: str | Path | None = None, seed: int = 0) -> "AccuracyPredictor":
        _, runs = load_runs(path or default_runs_path(space), space)
        return cls(space, runs, seed)

    def predict(self, params: dict[str, Any]) -> float:
        """Predicted accuracy in [0, 1] (memoised by the candidate's key)."""
        key = self.space.candidate_key(params)
        if key not in self._cache:
            value = float(self.model.predict(np.array([self.featurizer.features(params)]))[0])
            self._cache[key] = min(1.0, max(0.0, value))
        return self._cache[key]

    def predict_many(self, points: Sequence[dict[str, Any]]) -> np.ndarray:
        return np.clip(self.model.predict(self.featurizer.matrix(points)), 0.0, 1.0)

    def cross_validate(self, folds: int = 5, seed: int = 0) -> dict[str, Any]:
        """Held-out Spearman and mean absolute error of the same model over ``folds`` shuffled folds.

        Also the pooled Spearman of all out-of-fold predictions, and, as baselines, the held-out
        Spearman of log FLOPs alone and of the learning rate alone (signs as measured).
        """
        from scipy.stats import spearmanr
        from sklearn.model_selection import KFold

        oof = np.zeros(len(self._y))
        per_fold = []
        for train, test in KFold(folds, shuffle=True, random_state=seed).split(self._x):
            model = _model(self.seed).fit(self._x[train], self._y[train])
            oof[test] = model.predict(self._x[test])
            per_fold.append(float(spearmanr(oof[test], self._y[test]).statistic))
        names = self.featurizer.names
        flops = self._x[:, names.index("log10(flops)")]
        lr = self._x[:, names.index("log10(hp.lr)")] if "log10(hp.lr)" in names else None
        return {
            "runs": len(self._y), "failed_runs": sum(run.accuracy is None for run in self.runs), "folds": folds,
            "spearman_mean": float(np.mean(per_fold)), "spearman_std": float(np.std(per_fold)),
            "spearman_per_fold": per_fold, "spearman_pooled": float(spearmanr(oof, self._y).statistic),
            "mae": float(np.mean(np.abs(np.clip(oof, 0, 1) - self._y))),
            "baseline_spearman_log_flops": float(spearmanr(flops, self._y).statistic),
            "baseline_spearman_log_lr": float(spearmanr(lr, self._y).statistic) if lr is not None else None,
            "accuracy_range": [float(self._y.min()), float(self._y.max())], "accuracy_mean": float(self._y.mean()),
        }


# --- a predictor of supernet accuracy -------------------------------------------------------------


@dataclass(frozen=True)
class HoldoutScore:
    """Rank agreement of a predictor with the accuracies it was not fitted on."""

    n_fit: int
    n_holdout: int
    kendall: float
    spearman: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SupernetPredictor:
    """Accuracy of a point of ``space`` as the supernet would score it, from the decisions alone.

    Gradient boosting on ``Featurizer(summaries=False)`` features (no decoding, no cost model), so it
    scores well over 10,000 architectures per second. ``holdout`` is its rank agreement on a share of
    the evaluations kept out of the fit; the final model is then refitted on all of them.
    """

    def __init__(self, space: SearchSpace, params_list: Sequence[dict[str, Any]], accuracies: Sequence[float],
                 seed: int = 0, holdout_share: float = 0.2):
        from scipy.stats import kendalltau, spearmanr

        if len(params_list) != len(accuracies) or len(params_list) < 10:
            raise NasError(f"an accuracy predictor needs at least 10 evaluated points with one accuracy each, got "
                           f"{len(params_list)} points and {len(accuracies)} accuracies")
        self.space = space
        self.featurizer = Featurizer(space, summaries=False, hyperparameters=False)
        x = self.featurizer.matrix(params_list)
        y = np.asarray(accuracies, dtype=float)
        order = np.random.default_rng(seed).permutation(len(y))
        cut = max(1, round(holdout_share * len(y)))
        held, fit = order[:cut], order[cut:]
        predicted = _model(seed).fit(x[fit], y[fit]).predict(x[held])
        self.holdout = HoldoutScore(len(fit), len(held), float(kendalltau(predicted, y[held]).statistic),
                                    float(spearmanr(predicted, y[held]).statistic))
        self.model = _model(seed).fit(x, y)

    def predict_many(self, params_list: Sequence[dict[str, Any]]) -> np.ndarray:
        return np.clip(self.model.predict(self.featurizer.matrix(params_list)), 0.0, 1.0)

    def predict(self, params: dict[str, Any]) -> float:
        return float(self.predict_many([params])[0])


def fit_predictor(space: SearchSpace, params_list: Sequence[dict[str, Any]], accuracies: Sequence[float],
                  seed: int = 0) -> SupernetPredictor:
    """A ``SupernetPredictor`` fitted on (point, supernet accuracy) pairs; ``.holdout`` has its Kendall tau."""
    return SupernetPredictor(space, params_list, accuracies, seed)


# --- the strategy benchmark's objective and loop ---------------------------------------------------


def latency_from_table(space: SearchSpace, path: str | Path) -> tuple[Callable[[Any], float], str]:
    """(arch -> predicted ms, description) from a latency table built for ``space`` at its own resolution."""
    from nas.latency.table import LatencyTable

    path = Path(path)
    if not path.is_file():
        raise NasError(f"{path}: no such latency table; build it with python scripts/build_lut.py --target cpu "
                       f"--space {space.source} (or pass --flops-latency for a development run)")
    table = LatencyTable.load(path)
    if table.metadata.get("resolution") != space.resolution:
        raise NasError(f"{path}: table is for resolution {table.metadata.get('resolution')}, "
                       f"{space.source} has {space.resolution}")
    return table.predict, f"{path.name} (ONNX Runtime, predicted ms)"


def latency_from_flops(space: SearchSpace, num_classes: int) -> tuple[Callable[[Any], float], str]:
    """Development stand-in for a missing table: analytic MFLOPs in place of milliseconds."""
    return (lambda arch: arch_cost(arch, num_classes).flops / 1e6,
            f"analytic MFLOPs at {space.resolution}px (STAND-IN for a latency table)")


class BenchmarkObjective:
    """Cheap, deterministic, built from real signals: predicted accuracy and predicted latency.

    ``target_ms`` (T of the MnasNet soft reward) is the median latency of ``n_target`` random
    architectures of the space (``space.sample(random.Random(seed))``). The hypervolume is of
    (accuracy, -latency / T) against the fixed reference (chance accuracy, -2): a point counts when
    it beats chance and is faster than twice the target, and the volume is in accuracy x T units.
    """

    def __init__(self, space: SearchSpace, predictor: AccuracyPredictor, latency: Callable[[Any], float],
                 latency_source: str = "", n_target: int = 1000, seed: int = 0, preset: str = "soft"):
        from nas.objectives import Objective

        self.space = space
        self.predictor = predictor
        self.latency = latency
        self.latency_source = latency_source
        rng = random.Random(seed)
        self.target_ms = float(np.median([latency(space.decode(space.sample(rng))) for _ in range(n_target)]))
        self.reward_objective = Objective.mnasnet(self.target_ms, preset)
        self.reference = (1.0 / NUM_CLASSES, -2.0)
        self._cache: dict[str, dict[str, float]] = {}

    def metrics(self, params: dict[str, Any]) -> dict[str, float]:
        """{'accuracy', 'latency_ms', 'reward'} of a point, memoised by its candidate key."""
        key = self.space.candidate_key(params)
        if key not in self._cache:
            accuracy = self.predictor.predict(params)
            latency = float(self.latency(self.space.decode(params)))
            reward = self.reward_objective.values({"accuracy": accuracy, "latency_ms": latency})[0]
            self._cache[key] = {"accuracy": accuracy, "latency_ms": latency, "reward": reward}
        return self._cache[key]

    def values(self, metrics: dict[str, float], mode: str) -> tuple[float, ...]:
        """What a strategy is told: (reward,) in 'reward' mode, (accuracy, -latency) in 'pareto' mode."""
        if mode == "reward":
            return (metrics["reward"],)
        return (metrics["accuracy"], -metrics["latency_ms"])

    def hypervolume(self, evaluated: Sequence[dict[str, float]]) -> float:
        from nas.pareto import hypervolume

        return hypervolume([(m["accuracy"], -m["latency_ms"] / self.target_ms) for m in evaluated], self.reference)


def run_strategy(name: str, objective: BenchmarkObjective, seed: int, budget: int, mode: str = "reward",
                 options: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Ask/tell ``name`` for ``budget`` evaluations (fewer if it is exhausted); the metrics in ask order.

    Every evaluation counts, repeats of an already evaluated candidate included (they cost a real
    search a training too).
    """
    from nas.strategies import Exhausted, make_strategy
    from nas.trial import COMPLETE, Trial

    if mode not in ("reward", "pareto"):
        raise NasError(f"benchmark mode should be 'reward' or 'pareto' instead of {mode!r}")
    strategy = make_strategy(name, objective.space, seed, 1 if mode == "reward" else 2, **(options or {}))
    evaluated = []
    for number in range(budget):
        try:
            params = strategy.ask()
        except Exhausted:
            break
        metrics = objective.metrics(params)
        evaluated.append(metrics)
        strategy.tell(Trial(number, params, "", COMPLETE, objective.values(metrics, mode), dict(metrics)))
    return evaluated


def best_so_far(evaluated: Sequence[dict[str, float]]) -> list[float]:
    """Best reward after 1, 2, ... evaluations."""
    out, best = [], -math.inf
    for m in evaluated:
        best = max(best, m["reward"])
        out.append(best)
    return out


def evals_to_reach(evaluated: Sequence[dict[str, float]], threshold: float) -> int | None:
    """Evaluations until the best reward first reaches ``threshold``; None when it never does."""
    for i, best in enumerate(best_so_far(evaluated), start=1):
        if best >= threshold:
            return i
    return None


def median_evals(counts: Sequence[int | None]) -> float | None:
    """Median over seeds with never-reached counted as infinite; None when the median is not reached."""
    ordered = sorted(math.inf if c is None else c for c in counts)
    n = len(ordered)
    mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return None if math.isinf(mid) else float(mid)
