"""The search loop: ask a strategy, train with successive halving, journal everything, resume on rerun.

Each round asks the strategy for a batch of candidates, trains them at the lowest fidelity rung (or,
with ``scheduler="hyperband"``, at the rung of the round's Hyperband bracket), promotes the top 1/eta
(by the objective: reward, or Pareto rank for multi-objective searches) to the next rung, and so on;
a candidate's trial is its result at the highest rung it reached (COMPLETE at the top rung, PRUNED
below). ``scheduler="asha"`` has no rounds: each result promotes its candidate at once or ends its
trial, and the free worker starts a new candidate. Latency, FLOPs and parameters come from the
latency table and the cost model before training, so hard limits reject a candidate without training it.

Resume: the strategy is rebuilt with the same seed and the journal's asks and tells are replayed in
order; candidates asked but never told (a crash mid-round) are retrained from their journaled rung
results on. Training is seeded, so with one worker a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nas.arch import Arch
from nas.config import SearchConfig
from nas.cost import arch_cost
from nas.errors import NasError
from nas.executor import EvaluatorExecutor, TrainJob, make_executor, threads_per_worker
from nas.fidelity import ASHA, Bracket, Evaluation, Fidelity, Hyperband, SuccessiveHalving, ladder, maximize
from nas.journal import Journal, Replay
from nas.objectives import Limits, Objective
from nas.pareto import crowding_distance, non_dominated_sort
from nas.space import SearchSpace
from nas.strategies import Exhausted, WarmStart, make_strategy
from nas.trial import COMPLETE, FAIL, PRUNED, Trial

MAX_CONSECUTIVE_REJECTS = 1000  # duplicates or limit violations in a row before giving up
EVALUATION_ROUND = 16  # candidates per round when accuracy comes without training: one batched evaluation
LINE_METRICS = ("accuracy", "latency_ms")  # printed on every trial line as acc= and lat=


def searched_space(space: SearchSpace, search_hparams: bool) -> SearchSpace:
    """The decisions a search explores: with one fixed training recipe the space's hyperparameters mean
    nothing, and two points that differ only in them are the same candidate."""
    if search_hparams:
        return space
    reduced = dataclasses.replace(space, hyperparameters=())
    if not reduced.decisions:
        raise NasError(f"{space.source}: every choice of the space is a training hyperparameter, which the fixed "
                       "recipe ignores; pass --search-hparams or give the space architecture choices")
    return reduced


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs beyond the space: strategy, budget, objective, fidelity, workers."""

    strategy: str = "evolution"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    trials: int = 30  # candidates trained (duplicates and limit rejections do not count)
    time_budget: float | None = None  # seconds; no new round starts after it
    objective: Objective = Objective("pareto")
    limits: Limits = Limits()
    data: str = "digits"
    top: Fidelity = Fidelity(epochs=8, fraction=1.0, resolution=32)  # the last rung's training
    rungs: int = 2
    eta: int = 3
    scheduler: str = "halving"  # halving: rounds start at rung 0 | hyperband: rounds cycle brackets | asha: no rounds
    num_classes: int = 10
    workers: int = 1
    executor: str = "local"
    ray_address: str | None = None
    seed: int = 0
    search_hparams: bool = True  # train with the space's hyperparameters; False: the fixed training recipe
    round_size: int | None = None  # candidates per round; None: what successive halving needs
    start_points: tuple[dict[str, Any], ...] = ()  # proposed before the strategy's own (nas.strategies.WarmStart)

    @classmethod
    def from_config(cls, config: SearchConfig, *, objective: Objective, limits: Limits, top: Fidelity,
                    num_classes: int, start_points: tuple[dict[str, Any], ...] = ()) -> "LoopSettings":
        """The loop's view of the main job's configuration: evaluated without training (supernet,
        predictor), a candidate has one rung and rounds are large enough to evaluate in batches."""
        scratch = config.evaluator == "scratch"
        return cls(strategy=config.strategy, strategy_options=config.resolved_strategy_options,
                   trials=config.trial_budget, time_budget=config.search_seconds, objective=objective,
                   limits=limits, data=config.data, top=top, rungs=config.rungs if scratch else 1, eta=config.eta,
                   scheduler=config.scheduler if scratch else "halving", num_classes=num_classes,
                   workers=config.workers, executor=config.executor, ray_address=config.ray_address,
                   seed=config.seed, search_hparams=config.search_hparams,
                   round_size=None if scratch else EVALUATION_ROUND, start_points=start_points)

    @property
    def fidelities(self) -> tuple[Fidelity, ...]:
        return ladder(self.top, self.eta, self.rungs)

    @property
    def single_worker_round(self) -> int:
        """Candidates per round on one worker: what successive halving keeps one of per eta at each
        rung, or the fixed round size (more workers make halving rounds larger)."""
        return self.round_size if self.round_size is not None else self.eta ** (self.rungs - 1)

    @property
    def batch_size(self) -> int:
        """Candidates per round: the single-worker round, and at least one per worker."""
        if self.round_size is not None:
            return self.round_size
        return max(self.workers, self.single_worker_round)

    def bracket(self, round_index: int) -> Bracket:
        """Where round ``round_index`` starts and how many candidates it takes.

        Successive halving starts every round at rung 0. Hyperband (Li et al., 2018) cycles through
        its brackets, from many candidates at rung 0 to a few trained at the top rung directly, which
        hedges against low fidelities that rank candidates badly.
        """
        if self.scheduler == "halving":
            return Bracket(0, self.batch_size)
        bracket = Hyperband(self.fidelities, self.eta).brackets()[round_index % self.rungs]
        return Bracket(bracket.start_rung, max(self.workers, bracket.candidates))


def rank_key(objective: Objective) -> Callable[[list[dict]], list[float]]:
    """Lower is better: -value for one objective; front index + (1 - crowding share) for Pareto."""
    if objective.n_objectives == 1:
        return maximize(lambda r: r["values"][0] if r["values"] else None)

    def pareto_rank(results: list[dict]) -> list[float]:
        ok = [i for i, r in enumerate(results) if r["values"]]
        scores = [math.inf] * len(results)
        points = [tuple(results[i]["values"]) for i in ok]
        for depth, front in enumerate(non_dominated_sort(points)):
            crowd = crowding_distance([points[j] for j in front])
            order = sorted(range(len(front)), key=lambda j: -crowd[j])
            for position, j in enumerate(order):
                scores[ok[front[j]]] = depth + position / (len(front) + 1)
        return scores

    return pareto_rank


class Search:
    def __init__(self, space: SearchSpace, settings: LoopSettings, run_dir: Path,
                 predict_latency: Callable[[Arch], float], log: Callable[[str], None] | None = None,
                 evaluator: EvaluatorExecutor | None = None):
        """``evaluator``: where accuracy comes from without training (supernet, predictor); None trains
        every candidate from scratch on the configured executor."""
        space = searched_space(space, settings.search_hparams)
        self.space, self.settings = space, settings
        self.evaluator = evaluator
        self.log = log or (lambda line: print(line, flush=True))  # one line per trial, even into a file
        self.predict_latency = predict_latency
        self.journal = Journal(run_dir)
        self.strategy = make_strategy(settings.strategy, space, settings.seed, settings.objective.n_objectives,
                                      **settings.strategy_options)
        if settings.start_points:
            self.strategy = WarmStart(self.strategy, list(settings.start_points))
        self.halving = SuccessiveHalving(settings.fidelities, settings.eta)
        self.rank = rank_key(settings.objective)
        self.trials: list[Trial] = []  # finished, trained (not cached) trials in finishing order
        self.by_key: dict[str, Trial] = {}
        self.pending: set[str] = set()  # candidate keys asked and being evaluated, not yet told
        self.held: dict[str, list[tuple[int, dict]]] = {}  # repeats of a pending candidate, told with it
        self.next_number = 0
        self.started = time.monotonic()
        self.rejects = 0
        self.resumed = 0  # trials finished before this session (for the ETA)
        self.spent_before = 0.0  # seconds searched by earlier sessions of this run (from the journal)
        self.rounds = 0  # rounds started, earlier sessions included (Hyperband's bracket cycle)

    # --- cheap, pre-training measurements -----------------------------------------------------
    def static_metrics(self, params: dict[str, Any]) -> dict[str, Any]:
        arch = self.space.decode(params, resolution=self.settings.top.resolution)
        cost = arch_cost(arch, self.settings.num_classes)
        latency = self.predict_latency(arch)
        return {"arch": arch.to_string(), "flops": cost.flops, "params": cost.params,
                "latency_ms": latency, "predicted_latency_ms": latency}

    # --- resume --------------------------------------------------------------------------------
    def _replay(self) -> tuple[list[tuple[int, dict]], int, set[int], Replay]:
        """Replay the journal into the strategy; return the round left open by a crash (its members
        and start rung, those of them already told; with ASHA, every candidate not yet told) and the
        replay with every journaled rung result."""
        replay = self.journal.replay()
        params: dict[int, dict[str, Any]] = {}
        told: set[int] = set()
        open_round: list[int] = []
        start_rung = 0
        for event in replay.events:
            if event["event"] == "ask":
                proposed = self.strategy.ask()
                if proposed != event["params"]:
                    warnings.warn(f"trial {event['number']}: the strategy proposes differently on replay "
                                  "(was the configuration changed?); keeping the journaled candidate")
                params[event["number"]] = event["params"]
                self.next_number = event["number"] + 1
            elif event["event"] == "round":
                open_round, start_rung = event["numbers"], event.get("start_rung", 0)
                self.rounds += 1
            elif event["event"] == "clock":
                self.spent_before = event["elapsed"]
            else:
                trial = Trial.from_dict(event["trial"])
                self.strategy.tell(trial)
                told.add(trial.number)
                self._remember(trial, event.get("skipped", False))
        untold = self._hold_repeats([n for n in params if n not in told], params)
        if open_round and all(n in told for n in open_round):
            open_round = []
        if not open_round:  # crashed while collecting a round (its asks never reached training), or ASHA
            open_round = untold
            if self.settings.scheduler != "asha":
                start_rung = self.settings.bracket(self.rounds).start_rung
                self.rounds += bool(untold)
        if self.trials or open_round:
            self.log(f"resuming {self.journal.folder}: {len(self.trials)} finished trials, "
                     f"{sum(n not in told for n in open_round)} unfinished to retry")
        return [(n, params[n]) for n in open_round], start_rung, told, replay

    def _hold_repeats(self, untold: list[int], params: dict[int, dict]) -> list[int]:
        """Sort a crashed session's untold asks as it had: a repeat of a told candidate is told its result
        now (the crash fell between the two tells), a repeat of an untold one is held again; returns the
        rest, the candidates to evaluate."""
        first = []
        for n in untold:
            key = self.space.candidate_key(params[n])
            if key in self.by_key:
                self._tell(dataclasses.replace(self.by_key[key], number=n, params=params[n]), skipped=True)
            elif key in self.pending:
                self.held.setdefault(key, []).append((n, params[n]))
            else:
                self.pending.add(key)
                first.append(n)
        return first

    # --- one round ------------------------------------------------------------------------------
    def _ask(self) -> tuple[int, dict[str, Any]] | None:
        """The next candidate worth training. Limit violations and repeats of a told candidate are told at
        once; a repeat of a candidate still being evaluated is held and told its result with it."""
        while True:
            try:
                params = self.strategy.ask()
            except Exhausted:
                return None
            number = self.next_number
            self.next_number += 1
            self.journal.ask(number, params)
            key = self.space.candidate_key(params)
            if key in self.by_key:  # never train a candidate twice: tell the cached result
                cached = dataclasses.replace(self.by_key[key], number=number, params=params)
                self._tell(cached, skipped=True)
                self._count_reject(f"the strategy keeps proposing candidates it has seen (last: {cached.arch})")
                continue
            if key in self.pending:  # asked in this round (or running under ASHA): told when it is
                self.held.setdefault(key, []).append((number, params))
                self._count_reject("the strategy keeps proposing candidates it has seen (last: one being evaluated)")
                continue
            static = self.static_metrics(params)
            broken = self.settings.limits.violations(static)
            if broken:
                self._tell(Trial(number, params, static["arch"], FAIL, None, static, "limits: " + ", ".join(broken)),
                           skipped=True)
                self._count_reject(f"no candidate met the limits ({', '.join(broken)} for the last one); "
                                   "raise --latency-limit-ms / --flops-limit / --params-limit")
                continue
            self.rejects = 0
            self.pending.add(key)
            return number, params

    def _count_reject(self, why: str) -> None:
        self.rejects += 1
        if self.rejects >= MAX_CONSECUTIVE_REJECTS:
            raise NasError(f"{self.space.source}: {MAX_CONSECUTIVE_REJECTS} proposals in a row were skipped: {why}")

    def _tell(self, trial: Trial, skipped: bool = False) -> None:
        """Journal and tell a trial; ``skipped`` ones (duplicates, limit violations) were not trained.
        Repeats asked while it was evaluated are told its result right after it."""
        self.journal.tell(trial, skipped=skipped)
        self.strategy.tell(trial)
        self._remember(trial, skipped)
        if not skipped:
            key = self.space.candidate_key(trial.params)
            self.pending.discard(key)
            for number, params in self.held.pop(key, []):
                self._tell(dataclasses.replace(trial, number=number, params=params), skipped=True)

    def _remember(self, trial: Trial, skipped: bool) -> None:
        if not skipped:
            self.trials.append(trial)
        self.by_key.setdefault(self.space.candidate_key(trial.params), trial)

    def _round(self, batch: list[tuple[int, dict]], start_rung: int, done: dict[int, dict[int, dict]], executor,
               told: set[int] = frozenset()) -> None:
        """Successive halving over one batch from ``start_rung`` up; rung results already journaled
        are reused and trials already told (before a crash) are not told again."""
        statics = {n: self.static_metrics(p) for n, p in batch}
        params = dict(batch)
        survivors = [n for n, _ in batch]
        best: dict[int, tuple[int, dict]] = {}
        for rung in range(start_rung, len(self.halving.rungs)):
            fidelity = self.halving.rungs[rung]
            jobs = [self._job(n, params[n], rung, fidelity, statics[n]) for n in survivors
                    if rung not in done.get(n, {})]

            def finished(job: TrainJob, result: dict) -> None:
                result = self._score(result, statics[job.number], fidelity)
                self.journal.rung(job.number, job.rung, result)
                done.setdefault(job.number, {})[job.rung] = result

            executor.run(jobs, finished)
            results = [done[n][rung] for n in survivors]
            for n in survivors:
                best[n] = (rung, done[n][rung])
            if rung == len(self.halving.rungs) - 1:
                break
            survivors = [survivors[i] for i in self.halving.promote(results, self.rank)]
            if not survivors:
                break
        for n, _ in batch:
            if n not in told:
                self._finish(n, params[n], statics[n]["arch"], *best[n])

    def _finish(self, number: int, params: dict, arch: str, rung: int, result: dict) -> None:
        """Tell and log a candidate's trial: its result at the highest rung it reached."""
        top = len(self.halving.rungs) - 1
        state = FAIL if result["error"] else (COMPLETE if rung == top else PRUNED)
        values = tuple(result["values"]) if result["values"] else None
        metrics = {k: v for k, v in result.items() if k not in ("values", "error")}
        trial = Trial(number, params, arch, state, values, metrics, result["error"], result["seconds"])
        self._tell(trial)
        self._log_trial(trial)

    # --- ASHA: no rounds ---------------------------------------------------------------------------
    def _run_asha(self, unfinished: list[tuple[int, dict]], replay: Replay, executor) -> None:
        """Asynchronous successive halving: whenever a result arrives, the candidate goes on to the next
        rung if it is in the top 1/eta of its rung so far (``ASHA.promotes``), else its trial is told,
        and a free worker starts a new candidate at rung 0. No worker waits for a round to fill.

        Every decision depends only on the results journaled before it, so a resumed run remakes the
        decisions a crash interrupted and, with one worker, equals an uninterrupted run.
        """
        s = self.settings
        asha = ASHA(s.fidelities, s.eta)
        results = replay.rungs
        evaluations = [Evaluation(n, r, results[n][r]) for n, r in replay.order]
        params: dict[int, dict] = {}
        statics: dict[int, dict] = {}
        active: set[int] = set()  # candidates started and not yet told
        exhausted = False

        def start(number: int, rung: int) -> TrainJob:
            active.add(number)
            return self._job(number, params[number], rung, asha.rungs[rung], statics[number])

        def settle(number: int, done: list[Evaluation]) -> list[TrainJob]:
            """After the candidate's latest result (the last of ``done``): its promotion, or its trial."""
            rung = done[-1].rung
            result = results[number][rung]
            if not result["error"] and not self._out_of_time() and asha.promotes(done, self.rank):
                return [start(number, rung + 1)]
            active.discard(number)
            self._finish(number, params[number], statics[number]["arch"], rung, result)
            self.journal.clock(self.searched())
            return fresh()

        def fresh() -> list[TrainJob]:
            """A new candidate at rung 0 while the budget has room for it."""
            nonlocal exhausted
            if exhausted or self._out_of_time() or len(self.trials) + len(active) >= s.trials:
                return []
            item = self._ask()
            if item is None:
                exhausted = True
                self.log("the strategy has no candidates left")
                return []
            number, params[number] = item
            statics[number] = self.static_metrics(params[number])
            return [start(number, 0)]

        def finished(job: TrainJob, result: dict) -> list[TrainJob]:
            result = self._score(result, statics[job.number], asha.rungs[job.rung])
            self.journal.rung(job.number, job.rung, result)
            results.setdefault(job.number, {})[job.rung] = result
            evaluations.append(Evaluation(job.number, job.rung, result))
            return settle(job.number, evaluations)

        for number, p in unfinished:  # a crash left these asked, and perhaps trained, but not told
            params[number], statics[number] = p, self.static_metrics(p)
            active.add(number)  # all of them count against the budget before any new candidate is asked
        jobs: list[TrainJob] = []
        for number, _ in unfinished:
            if number in results:  # the decision its last journaled result was waiting for
                last = max(i for i, e in enumerate(evaluations) if e.candidate == number)
                jobs += settle(number, evaluations[:last + 1])
            else:
                jobs.append(start(number, 0))
        while len(jobs) < s.workers and (more := fresh()):
            jobs += more
        executor.run(jobs, finished)

    def _job(self, number: int, params: dict, rung: int, fidelity: Fidelity, static: dict) -> TrainJob:
        s = self.settings
        hparams = self.space.hyperparameters_of(params) if s.search_hparams else {}
        return TrainJob(number, rung, static["arch"], hparams, fidelity, s.data, s.seed, threads_per_worker(s.workers),
                        params=params)

    def _score(self, train: dict[str, Any], static: dict[str, Any], fidelity: Fidelity) -> dict[str, Any]:
        source = train.get("source", "scratch")
        trained = {"epochs": fidelity.epochs, "fraction": fidelity.fraction, "val_accuracies": train["val_accuracies"],
                   "train_seconds": train["seconds"]} if source == "scratch" else {}
        metrics = {**{k: v for k, v in static.items() if k != "arch"}, "accuracy": train["accuracy"],
                   "resolution": fidelity.resolution, **trained, "seconds": train["seconds"], "accuracy_source": source}
        error = f"{'training' if source == 'scratch' else source}: {train['error']}" if train["error"] else None
        values = None if error else list(self.settings.objective.values(metrics))
        if values is not None and any(math.isnan(v) for v in values):
            values, error = None, "training: accuracy is not a number"
        return {**metrics, "values": values, "error": error}

    def _log_trial(self, trial: Trial) -> None:
        s = self.settings
        finished = len(self.trials)
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(1, finished - self.resumed) * max(0, s.trials - finished)
        if s.time_budget is not None:  # no new round starts after the budget: it bounds the wait too
            eta = min(eta, max(0.0, s.time_budget - self.searched()))
        acc = trial.metrics.get("accuracy")
        # objective values not already on the line (a Pareto vector repeats accuracy and negated latency)
        others = [f"{name.lstrip('-')}={-v if name.startswith('-') else v:.4g}"
                  for name, v in zip(s.objective.names, trial.values or ()) if name.lstrip("-") not in LINE_METRICS]
        self.log(f"[{finished}/{s.trials}] trial {trial.number} {trial.state:8} acc="
                 f"{acc if acc is None else format(acc, '.4f')} lat={trial.metrics.get('latency_ms', 0):.3f}ms "
                 + "".join(f"{value} " for value in others)
                 + f"({self._evaluation_note(trial)}, {trial.seconds:.2g}s) "
                 f"{trial.error or ''}| elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")

    @staticmethod
    def _evaluation_note(trial: Trial) -> str:
        source = trial.metrics.get("accuracy_source", "scratch")
        return f"{trial.metrics.get('epochs')} ep" if source == "scratch" else source

    # --- the whole search ----------------------------------------------------------------------
    def searched(self) -> float:
        """Seconds of search in this run, earlier sessions included (what ``time_budget`` bounds)."""
        return self.spent_before + time.monotonic() - self.started

    def _out_of_time(self) -> bool:
        return self.settings.time_budget is not None and self.searched() > self.settings.time_budget

    def run(self) -> list[Trial]:
        s = self.settings
        unfinished, start_rung, told, replay = self._replay()
        done = replay.rungs
        self.resumed = len(self.trials)
        executor = self.evaluator or make_executor(s.executor, s.workers, threads_per_worker(s.workers), s.ray_address)
        try:
            if s.scheduler == "asha":
                self._run_asha(unfinished, replay, executor)
                if self._out_of_time():
                    self.log(f"time budget of {s.time_budget:.0f}s reached after {len(self.trials)} trials")
                return self.trials
            if unfinished:
                self._round(unfinished, start_rung, done, executor, told)
                self.journal.clock(self.searched())
            while len(self.trials) < s.trials:
                if self._out_of_time():
                    self.log(f"time budget of {s.time_budget:.0f}s reached after {len(self.trials)} trials")
                    break
                bracket = s.bracket(self.rounds)
                batch = []
                while len(batch) < min(bracket.candidates, s.trials - len(self.trials)):
                    item = self._ask()
                    if item is None:
                        break
                    batch.append(item)
                if not batch:
                    self.log("the strategy has no candidates left")
                    break
                self.journal.round([n for n, _ in batch], bracket.start_rung)
                self.rounds += 1
                self._round(batch, bracket.start_rung, done, executor)
                self.journal.clock(self.searched())
        finally:
            executor.close()
        return self.trials
