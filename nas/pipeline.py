"""The main job, as a short pipeline of steps whose results are typed values passed on:

    prepare -> latency model -> accuracy evaluator -> search -> front -> end-to-end latency
            -> final trainings (front and baselines, same recipe, several seeds, test split)
            -> verdicts -> export of the winner -> report

Order matters for measurement: latency is measured (table adaptation, missing entries) before any
training starts, and the front and the baselines are measured together after the search, with
nothing else running. Each step keeps what it finished in the run folder, so a rerun of the same
command resumes the step it was in (supernet checkpoint, journal, measurements, final trainings).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nas.arch import Arch
from nas.config import SearchConfig, check_resumable, write_config
from nas.cost import arch_cost
from nas.errors import NasError
from nas.fidelity import Fidelity
from nas.objectives import REWARD_PRESETS, Limits, Objective, check_reachable, reward
from nas.pareto import pareto_front
from nas.references import mobilenet_v2_width
from nas.report import MNASNET_SPEEDUP, Point, plot_pareto, verdicts, write_pareto_json, write_report
from nas.space import SearchSpace, load_space, with_resolution
from nas.trial import COMPLETE, Trial

Log = Callable[[str], None]
PREDICTOR_SAMPLES = 500  # random subnets scored on the supernet to fit the accuracy predictor
START_POINTS = 8  # first candidates of the search, spread over the latency window
# Predicted latency may read this much low end to end (the adapted tables read the fastest networks up
# to 13% low), so a latency band ends this far below the baseline's bar it stands for.
BAND_MARGIN = 1.15


def default_run_dir(config: SearchConfig, space: SearchSpace) -> Path:
    """Deterministic, so that running the same command again finds and resumes the same folder."""
    return Path("runs") / f"{space.name}-{config.objectives}-{config.evaluator}-{config.strategy}-seed{config.seed}"


@dataclass(frozen=True)
class Setup:
    """Everything checked before any measurement or training: the user's mistakes stop here."""

    config: SearchConfig  # resolved: resolution filled in
    space: SearchSpace  # at the run's resolution
    declared_space: SearchSpace  # as the file declares it (its own resolution finds its latency table)
    data: Any  # nas.data.Dataset
    target: Any  # nas.latency.targets.Target
    run_dir: Path


@dataclass(frozen=True)
class LatencyModel:
    """The table this machine predicts with, and where it came from (for the manifest)."""

    table: Any  # nas.latency.table.LatencyTable
    provenance: dict[str, Any]
    num_classes: int

    def predict(self, arch: Arch) -> float:
        return self.table.predict(arch, self.num_classes)


@dataclass(frozen=True)
class Candidate:
    """An architecture chosen for the final phase: a front point or a baseline."""

    name: str
    arch: Arch
    search_accuracy: float | None = None
    accuracy_source: str | None = None
    predicted_latency_ms: float | None = None
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)  # searched ones (--search-hparams)


@dataclass(frozen=True)
class SearchWindow:
    """Where the search looks: below ``limit_ms`` (the user's latency limit, else the slowest baseline's
    measured latency / 1.8, beyond which no point can decide a verdict; None: anywhere), starting from
    ``start_points`` spread from the fastest network of the space up to the limit. ``bands``: the
    baselines' bars (measured latency / 1.8, less ``BAND_MARGIN``), which cut the window into the
    latency bands the search compares candidates within (empty under a user's limit)."""

    limit_ms: float | None
    start_points: tuple[dict[str, Any], ...]
    reason: str
    bands: tuple[float, ...] = ()


@dataclass(frozen=True)
class Measured:
    candidate: Candidate
    latency_ms: float
    spread: float


# --- steps ----------------------------------------------------------------------------------------------


def prepare(config: SearchConfig, out: str | Path | None, log: Log) -> Setup:
    """Load and check the space, data, target and evaluator support: one line and exit 2 on a mistake,
    before anything is measured or trained."""
    space = load_space(config.space)
    resolution = config.resolution or space.resolution
    config = dataclasses.replace(config, resolution=resolution)
    from nas.search import searched_space
    from nas.strategies import make_strategy

    # the strategy and its options, on the decisions it will search (a grid naming hp.lr without
    # --search-hparams fails here, not after the baselines are measured)
    make_strategy(config.strategy, searched_space(space, config.search_hparams), config.seed,
                  1 if config.objectives == "reward" else 2, **config.resolved_strategy_options)
    if config.evaluator != "scratch":
        from nas.supernet import check_supported

        check_supported(space)
    from nas.data import load_dataset  # torch import deferred until the configuration is valid
    from nas.latency.targets import get_target

    target = get_target(config.target, threads=config.threads)
    data = load_dataset(config.data, seed=config.seed)
    run_dir = Path(out) if out else default_run_dir(config, space)
    check_resumable(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    log(f"run folder: {run_dir}")
    return Setup(config, with_resolution(space, resolution), space, data, target, run_dir)


def latency_model(setup: Setup, log: Log) -> LatencyModel:
    """This machine's table: the shipped (or given) one, adapted here where it came from another machine,
    with any entry the space needs at this resolution and class count measured first."""
    from nas.latency.machine import table_for_machine

    c = setup.config
    # an impossible limit (or hard-reward target) stops before anything is measured
    goal = c.latency_limit_ms if c.latency_limit_ms is not None else (
        c.latency_target_ms if c.objectives == "reward" and c.reward == "hard" else None)
    table, provenance = table_for_machine(setup.declared_space, setup.target, resolution=c.resolution,
                                          num_classes=setup.data.num_classes, table=c.table, log=log,
                                          latency_limit_ms=goal)
    log(f"latency table: {provenance.summary}")
    return LatencyModel(table, provenance.to_dict(), setup.data.num_classes)


def search_window(setup: Setup, latency: LatencyModel, log: Log) -> SearchWindow:
    """Measure the baselines end to end (before anything trains) and put the search where a front
    point can beat one of them by the bar; a user's --latency-limit-ms takes the place of that bound.
    The bound is kept in ``window.json``, so that a resumed run searches the same window."""
    from nas.objectives import spread_points

    c = setup.config
    path = setup.run_dir / "window.json"

    def costs(params: dict[str, Any]) -> dict[str, Any]:
        return {"latency_ms": latency.predict(setup.space.decode(params))}

    bands: tuple[float, ...] = ()
    if path.exists():
        saved = json.loads(path.read_text())
        limit, reason, bands = saved["limit_ms"], saved["reason"], tuple(saved["bands"])
    elif c.latency_limit_ms is not None:
        limit, reason = c.latency_limit_ms, f"--latency-limit-ms {c.latency_limit_ms:g}"
    else:
        measured = measure(setup, baselines(setup), log)
        slowest = max(measured, key=lambda m: m.latency_ms)
        limit = slowest.latency_ms / MNASNET_SPEEDUP
        reason = f"the slowest baseline, {slowest.candidate.name} at {slowest.latency_ms:.4f} ms, / {MNASNET_SPEEDUP:g}"
        bands = tuple(sorted({m.latency_ms / MNASNET_SPEEDUP / BAND_MARGIN for m in measured}))
    if limit is not None:  # the first point is the space's fastest network
        points = spread_points(setup.space, costs, "latency_ms", limit, START_POINTS, c.seed)
        fastest = costs(points[0])["latency_ms"]
        if fastest > limit:  # only the baselines' bound can be out of reach: a user's limit failed earlier
            log(f"no network of {setup.space.source} is predicted faster than {limit:.4f} ms ({reason}; the fastest: "
                f"{fastest:.4f} ms): searching the whole space")
            limit, reason, bands = None, "none: no network of the space can beat a baseline by the bar", ()
    path.write_text(json.dumps({"limit_ms": limit, "reason": reason, "bands": list(bands)}))
    if limit is None:
        rng = random.Random(c.seed)
        high = max(costs(setup.space.sample(rng))["latency_ms"] for _ in range(200))
        points = spread_points(setup.space, costs, "latency_ms", high, START_POINTS, c.seed)
    spread = [costs(p)["latency_ms"] for p in points]
    log(f"search window: latency below {'-' if limit is None else f'{limit:.4f} ms'} ({reason}); "
        f"{len(points)} start points predicted at {min(spread):.4f}-{max(spread):.4f} ms"
        + (f"; candidates compared within latency bands cut at {', '.join(f'{b:.4f}' for b in bands)} ms"
           if bands else ""))
    return SearchWindow(limit, tuple(points), reason, bands)


def objective(setup: Setup, latency: LatencyModel, window: SearchWindow) -> tuple[Objective, Limits]:
    c = setup.config
    limits = Limits(window.limit_ms, c.flops_limit, c.params_limit)

    def costs(params: dict[str, Any]) -> dict[str, Any]:
        arch = setup.space.decode(params)
        cost = arch_cost(arch, setup.data.num_classes)
        return {"latency_ms": latency.predict(arch), "flops": cost.flops, "params": cost.params}

    if limits.active():
        check_reachable(setup.space, costs, limits)
    if c.objectives == "pareto":
        return Objective("pareto", latency_bands=window.bands), limits
    if c.reward == "hard":
        from nas.latency.machine import fastest_reachable_ms

        fastest_ms = fastest_reachable_ms(latency.table, setup.space, setup.data.num_classes)
        if c.latency_target_ms < fastest_ms:
            raise NasError(f"--latency-target-ms {c.latency_target_ms} is impossible with --reward hard: the fastest "
                           f"architecture of {setup.space.source} is predicted at {fastest_ms:.4g} ms; raise the target")
    return Objective.mnasnet(c.latency_target_ms, c.reward), limits


def accuracy_evaluator(setup: Setup, log: Log):
    """(evaluator, supernet health): (None, None) for scratch training; otherwise the supernet (trained
    here, or resumed from the run folder's checkpoint) or the predictor fitted on its accuracies, as the
    search loop's evaluator, and how the supernet scores random subnets (a warning where near chance)."""
    c = setup.config
    if c.evaluator == "scratch":
        return None, None
    from nas.executor import EvaluatorExecutor
    from nas.supernet import SupernetEvaluator, SupernetRecipe, load_supernet, supernet_health, train_supernet

    recipe = SupernetRecipe() if c.supernet_epochs is None else dataclasses.replace(SupernetRecipe(),
                                                                                      epochs=c.supernet_epochs)
    folder = setup.run_dir / "supernet"
    train_supernet(setup.space, c.data, c.resolution, folder, recipe=recipe, seed=c.seed, log=log)
    supernet = load_supernet(folder, setup.space, c.data, c.resolution)
    # one thread: a subnet's evaluation is small batches of small images, where a second thread mostly waits
    evaluator = SupernetEvaluator(supernet, setup.data, c.resolution, seed=c.seed, threads=1)
    health = supernet_health(evaluator, c.seed)
    log(f"supernet: {health.summary()}")
    if health.near_chance:
        log(f"WARNING: the supernet scores random subnets of {setup.space.source} near chance, so its accuracies "
            "rank noise; search with --evaluator scratch (the default) or train it longer (--supernet-epochs); "
            "docs/supernet.md")
    if c.evaluator == "supernet":
        return EvaluatorExecutor(lambda archs, points: evaluator.accuracy_many(archs), "supernet"), health
    from nas.surrogate import fit_predictor, sample_point

    points = [sample_point(setup.space, i, seed=c.seed) for i in range(PREDICTOR_SAMPLES)]
    log(f"fitting the accuracy predictor on {len(points)} random subnets scored on the supernet")
    accuracies = evaluator.accuracy_many([setup.space.decode(p) for p in points])
    predictor = fit_predictor(setup.space, points, accuracies, c.seed)
    log(f"accuracy predictor: Kendall {predictor.holdout.kendall:.3f} against the supernet on "
        f"{predictor.holdout.n_holdout} held-out subnets")
    return EvaluatorExecutor(lambda archs, points: predictor.predict_many(points), "predictor"), health


def search(setup: Setup, latency: LatencyModel, goal: Objective, limits: Limits, window: SearchWindow, evaluator,
           log: Log) -> list[Trial]:
    from nas.search import LoopSettings, Search

    c = setup.config
    settings = LoopSettings.from_config(c, objective=goal, limits=limits, top=scratch_fidelity(setup),
                                        num_classes=setup.data.num_classes, start_points=window.start_points)
    if goal.latency_bands and c.strategy == "evolution" and c.strategy_options is None:
        # a population per latency band, each band's turn one round long where rounds have a fixed size
        # (RegularizedEvolution's niches); not the worker count, which may change when a run resumes
        turn = settings.single_worker_round if settings.scheduler == "halving" else 1
        settings = dataclasses.replace(settings, strategy_options={**settings.strategy_options, "niches": True,
                                                                   "asks_per_niche": turn})
    return Search(setup.space, settings, setup.run_dir, latency.predict, log, evaluator).run()


def scratch_fidelity(setup: Setup) -> Fidelity:
    from nas.train import default_recipe

    c = setup.config
    return Fidelity(c.epochs or default_recipe(c.data).epochs, c.fraction, c.resolution)


def final_fidelity(setup: Setup) -> Fidelity:
    from nas.train import default_recipe

    c = setup.config
    return Fidelity(c.final_epochs or default_recipe(c.data).epochs, 1.0, c.resolution)


def select_front(setup: Setup, trials: list[Trial]) -> list[Candidate]:
    """Top-rung trials that are Pareto-optimal in (search accuracy, predicted latency), one per
    architecture: at most the configured front size, the extremes and an even spread between them."""
    size = setup.config.front_size
    complete = [t for t in trials if t.state == COMPLETE and t.metrics.get("accuracy") is not None]
    points = [(t.metrics["accuracy"], -t.metrics["predicted_latency_ms"]) for t in complete]
    chosen = sorted((complete[i] for i in pareto_front(points)), key=lambda t: t.metrics["predicted_latency_ms"])
    # with --search-hparams one architecture may be on the front under several hyperparameter settings;
    # the finals train architectures with one recipe: train it once
    firsts: dict[str, Trial] = {}
    for t in chosen:
        firsts.setdefault(t.arch, t)
    chosen = list(firsts.values())
    if len(chosen) > size:
        picks = np.linspace(0, len(chosen) - 1, size).round().astype(int)
        chosen = [chosen[i] for i in sorted(set(picks))]
    searched = setup.config.search_hparams
    return [Candidate(f"trial {t.number}", Arch.parse(t.arch), t.metrics["accuracy"],
                      t.metrics.get("accuracy_source", "scratch"), t.metrics["predicted_latency_ms"],
                      setup.space.hyperparameters_of(t.params) if searched else {}) for t in chosen]


def training_hyperparameters(setup: Setup, trials: list[Trial], front: list[Measured], base: list[Measured],
                             log: Log) -> dict[str, dict[str, Any]]:
    """Per architecture, what replaces the fixed recipe's optimizer, lr and batch size: nothing unless
    hyperparameters were searched. Then each front point keeps its own, and each baseline gets its share
    of the search's top-rung trainings as a hyperparameter search of its own: the same budget."""
    c = setup.config
    if not c.search_hparams:
        return {}
    from nas.finals import tune_hyperparameters

    chosen = {m.candidate.arch.to_string(): m.candidate.hparams for m in front}
    budget = max(1, round(sum(t.state == COMPLETE for t in trials) / max(1, len(front))))
    for m in base:
        chosen[m.candidate.arch.to_string()] = tune_hyperparameters(
            m.candidate.arch, setup.space, budget, run_dir=setup.run_dir, data=c.data, split_seed=c.seed,
            fidelity=scratch_fidelity(setup), workers=c.workers, executor=c.executor, ray_address=c.ray_address,
            log=log)
    return chosen


def baselines(setup: Setup) -> list[Candidate]:
    return [Candidate(f"mobilenet_v2 x{w:g}", mobilenet_v2_width(w, setup.config.resolution))
            for w in setup.config.baselines]


def measure(setup: Setup, candidates: list[Candidate], log: Log) -> list[Measured]:
    """End-to-end ONNX Runtime latency of all candidates, interleaved, with nothing else running;
    kept in ``measured.json`` so that a resumed run does not measure them again."""
    path = setup.run_dir / "measured.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    wanted = [c.arch.to_string() for c in candidates]
    if not all(a in saved for a in wanted):
        from nas.latency.measure import measure_archs

        log(f"measuring {len(candidates)} networks end to end with ONNX Runtime ({setup.target.name}, "
            f"{setup.target.threads} thread(s))")
        results = measure_archs([c.arch for c in candidates], setup.target, num_classes=setup.data.num_classes)
        saved = {a: {"ms": m.ms, "spread": m.spread} for a, m in zip(wanted, results)}
        path.write_text(json.dumps(saved, indent=2))
    return [Measured(c, saved[a]["ms"], saved[a]["spread"]) for c, a in zip(candidates, wanted)]


def decisive(front: list[Measured], base: list[Measured]) -> list[Measured]:
    """The front points that can decide a verdict: fast enough to beat at least one baseline by the bar
    (the fastest point always, so that the report has a trained front)."""
    bar = max(b.latency_ms for b in base) / MNASNET_SPEEDUP
    chosen = [f for f in front if f.latency_ms <= bar]
    return chosen or [min(front, key=lambda f: f.latency_ms)]


def to_point(m: Measured, score, num_classes: int) -> Point:
    cost = arch_cost(m.candidate.arch, num_classes)
    c = m.candidate
    return Point(c.name, c.arch.to_string(), m.latency_ms, m.spread, c.predicted_latency_ms, c.search_accuracy,
                 c.accuracy_source, score.mean(), score.std(), score.mean("val_accuracy"), tuple(score.seeds),
                 cost.flops, cost.params)


def choose_winner(front: list[Point], target_ms: float, preset: str) -> Point:
    """The MnasNet reward on mean validation accuracy and measured latency: the test split decides nothing."""
    alpha, beta = REWARD_PRESETS[preset]
    scored = [p for p in front if p.val_accuracy_mean is not None]
    if not scored:
        raise NasError("every final training of the front failed; see finals.jsonl in the run folder")
    return max(scored, key=lambda p: reward(p.val_accuracy_mean, p.latency_ms, target_ms, alpha, beta))


def export_winner(setup: Setup, winner: Point, log: Log) -> dict[str, Any]:
    """best.onnx from the winner's seed-0 weights, parity-checked, its ONNX Runtime test accuracy measured."""
    import torch

    from nas.builder import build_model
    from nas.export import export_checked
    from nas.finals import weights_path

    arch = Arch.parse(winner.arch)
    model = build_model(arch, setup.data.num_classes).eval()
    weights = weights_path(setup.run_dir, arch, 0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    torch.save(model.state_dict(), setup.run_dir / "weights.pt")
    check = export_checked(model, setup.run_dir / "best.onnx", setup.data, setup.config.resolution, split="test")
    log(f"exported {check.path} (parity {check.parity_rel_max_abs:.2e}); ONNX Runtime test accuracy "
        f"{check.onnx_accuracy:.4f}")
    return {"onnx": check.path, "parity_rel_max_abs": check.parity_rel_max_abs, "onnx_test_accuracy": check.onnx_accuracy}


def manifest(setup: Setup, latency: LatencyModel, seconds: float) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import optuna
    import torch
    import torchvision

    from nas.latency.targets import cpu_model

    return {
        "seed": setup.config.seed, "command": " ".join(sys.argv), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "optuna": optuna.__version__, "numpy": np.__version__},
        "onnxruntime": onnxruntime.__version__, "cpu": cpu_model(), "platform": platform.platform(),
        "latency_table": latency.provenance, "target": setup.target.to_dict(), "wall_seconds": seconds,
    }


# --- the whole job ----------------------------------------------------------------------------------------


def run_main_job(config: SearchConfig, out: str | Path | None = None, log: Log | None = None) -> Path:
    log = log or (lambda line: print(line, flush=True))
    started = time.monotonic()
    setup = prepare(config, out, log)
    c = setup.config
    latency = latency_model(setup, log)
    window = search_window(setup, latency, log)
    goal, limits = objective(setup, latency, window)
    evaluator, health = accuracy_evaluator(setup, log)
    trials = search(setup, latency, goal, limits, window, evaluator, log)
    front = select_front(setup, trials)
    if not front:
        raise NasError(f"{setup.run_dir}: no candidate finished its evaluation; raise --trials")
    measured = measure(setup, front + baselines(setup), log)
    measured_front, measured_base = measured[:len(front)], measured[len(front):]
    train_front = decisive(measured_front, measured_base)
    from nas.finals import train_finals

    hparams = training_hyperparameters(setup, trials, train_front, measured_base, log)
    to_train = [m.candidate.arch for m in train_front + measured_base]
    scores = train_finals(to_train, run_dir=setup.run_dir, data=c.data, split_seed=c.seed,
                          fidelity=final_fidelity(setup), seeds=c.final_seeds, workers=c.workers, hparams=hparams,
                          executor=c.executor, ray_address=c.ray_address, log=log)
    points = [to_point(m, scores[m.candidate.arch.to_string()], setup.data.num_classes) for m in train_front]
    base_points = [to_point(m, scores[m.candidate.arch.to_string()], setup.data.num_classes) for m in measured_base]
    verdict_rows = verdicts(points, base_points)
    target_ms = c.latency_target_ms or min(b.latency_ms for b in base_points) / MNASNET_SPEEDUP
    winner = choose_winner(points, target_ms, c.reward)
    exported = export_winner(setup, winner, log)
    seconds = time.monotonic() - started
    best = {**winner.to_dict(), **exported, "resolution": c.resolution, "trials": len(trials),
            "latency_target_ms": target_ms, "chosen_by": f"MnasNet {c.reward} reward on mean validation accuracy, "
            f"T = {target_ms:.4f} ms"}
    (setup.run_dir / "best.json").write_text(json.dumps(best, indent=2))
    write_pareto_json(setup.run_dir / "pareto.json", points, base_points, verdict_rows, winner.name)
    title = f"{setup.space.name} / {c.evaluator} / {c.strategy} / {c.data} @ {c.resolution}px / seed {c.seed}"
    plot_pareto(setup.run_dir / "pareto.png", trials, points, base_points, title)
    skipped = [m.candidate.name for m in measured_front if m not in train_front]
    header = [
        f"# Search report: {setup.run_dir.name}", "",
        f"- space: `{setup.space.source}` ({setup.space.description}), {setup.space.size():.3g} architectures, "
        f"resolution {c.resolution}",
        f"- evaluator: {c.evaluator}; strategy: {c.strategy}; objectives: {c.objectives}; data: {c.data} "
        f"(train / validation / test: {len(setup.data.train)} / {len(setup.data.val)} / {len(setup.data.test)} "
        f"images); seed {c.seed}",
        *([f"- supernet: {health.summary()}" + (": near chance, so its accuracies ranked noise" if health.near_chance
                                                  else "")] if health else []),
        f"- search window: latency below {'-' if window.limit_ms is None else f'{window.limit_ms:.4f} ms'} "
        f"({window.reason}), {len(window.start_points)} start points spread from the space's fastest network up",
        f"- candidates evaluated: {len(trials)}; front points measured: {len(front)}, trained: {len(points)}"
        + (f" (not trained, too slow to beat any baseline by the bar: {', '.join(skipped)})" if skipped else ""),
        f"- final trainings: {final_fidelity(setup).epochs} epochs, {c.final_seeds} seeds each, the same recipe "
        "for front and baselines; accuracies are on the test split, which no decision used",
        f"- latency table: {latency.provenance.get('summary', latency.provenance.get('path'))}",
        f"- wall time: {seconds / 60:.1f} min",
    ]
    write_report(setup.run_dir / "report.md", header=header, front=points, baselines=base_points,
                 verdict_rows=verdict_rows, winner=best)
    (setup.run_dir / "manifest.json").write_text(json.dumps(manifest(setup, latency, seconds), indent=2))
    log(f"done in {seconds / 60:.1f} min: {setup.run_dir}")
    return setup.run_dir
