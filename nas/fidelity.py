"""Multi-fidelity scheduling: spend little training on many candidates and more on the promising ones.

Pure Python (no torch), so any search strategy can use it and its tests run in milliseconds.

- ``Fidelity``: how much training one evaluation gets (epochs, share of the training data, resolution).
- ``ladder``: rungs of fidelities, each ``eta`` times the budget of the one below.
- ``SuccessiveHalving``: synchronous; evaluate a batch at a rung, promote the top ``ceil(n / eta)``.
- ``Hyperband``: several successive-halving brackets that start at different rungs, hedging between
  "many candidates, little training" and "few candidates, full training".
- ``ASHA``: asynchronous; a free worker promotes any candidate that is in the top ``floor(n / eta)``
  of its rung's completed results, otherwise it starts a new candidate at the bottom rung
  (``next_job``); or, as the search loop uses it, each result is judged the moment it arrives, so a
  candidate that stops is done for good (``promotes``).

Ranking is delegated to a ``RankKey``: a function from the results of one rung (in completion order)
to one score per result, lower is better. ``maximize(value)`` covers a single objective; a
multi-objective search passes its non-dominated-sorting ranks (e.g. front index + a crowding tie-break
in [0, 1)). A non-finite score (a failed candidate) is never promoted. Ties keep completion order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

from nas.errors import NasError

RankKey = Callable[[Sequence[Any]], Sequence[float]]


@dataclass(frozen=True)
class Fidelity:
    """One evaluation's training budget: epochs over ``fraction`` of the training split at ``resolution``."""

    epochs: int
    fraction: float = 1.0
    resolution: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise NasError(f"fidelity epochs must be a positive integer, got {self.epochs!r}")
        if not 0 < self.fraction <= 1:
            raise NasError(f"fidelity fraction must be in (0, 1], got {self.fraction!r}")
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise NasError(f"fidelity resolution must be a positive integer, got {self.resolution!r}")

    @property
    def budget(self) -> float:
        """Relative training cost (epochs x fraction x pixels), to compare rungs."""
        return self.epochs * self.fraction * self.resolution**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fidelity":
        return cls(**data)


def ladder(top: Fidelity, eta: float = 3, rungs: int = 3) -> tuple[Fidelity, ...]:
    """``rungs`` fidelities ending at ``top``, each with 1/eta of the next one's budget (lowest first).

    The reduction is shared between epochs and data: epochs shrink by about sqrt of the factor
    (at least 1), the fraction absorbs the rest, so a low rung still sees a whole cosine schedule.
    Example: top 8 epochs x 1.0, eta 3, 3 rungs -> (3 x 0.296), (5 x 0.533), (8 x 1.0).
    """
    if eta <= 1:
        raise NasError(f"eta must be greater than 1, got {eta!r}")
    if rungs < 1:
        raise NasError(f"a ladder needs at least one rung, got {rungs!r}")
    out = []
    for k in range(rungs - 1, -1, -1):
        share = eta**-k  # this rung's budget / top budget
        epochs = max(1, min(top.epochs, round(top.epochs * math.sqrt(share))))
        fraction = min(top.fraction, top.fraction * share * top.epochs / epochs)
        out.append(dataclasses.replace(top, epochs=epochs, fraction=round(fraction, 6)))
    return tuple(out)


def maximize(value: Callable[[Any], float | None]) -> RankKey:
    """A RankKey for one objective to maximise; ``None`` or NaN (a failed result) ranks last."""

    def key(results: Sequence[Any]) -> list[float]:
        scores = []
        for result in results:
            v = value(result)
            scores.append(math.inf if v is None or math.isnan(v) else -v)
        return scores

    return key


def top_k(results: Sequence[Any], k: int, rank_key: RankKey) -> list[int]:
    """Indices of the best ``k`` results by ``rank_key`` (ties keep order), skipping non-finite scores."""
    scores = list(rank_key(results))
    if len(scores) != len(results):
        raise ValueError(f"rank_key returned {len(scores)} scores for {len(results)} results")
    order = sorted((i for i, s in enumerate(scores) if math.isfinite(s)), key=lambda i: scores[i])
    return order[:k]


@dataclass(frozen=True)
class Evaluation:
    """One finished evaluation: a candidate (any hashable id for ASHA) trained at a rung."""

    candidate: Any
    rung: int
    result: Any
    bracket: int = 0


def _check_rungs(rungs: Sequence[Fidelity], eta: float) -> tuple[Fidelity, ...]:
    if not rungs:
        raise NasError("a multi-fidelity schedule needs at least one rung")
    if eta <= 1:
        raise NasError(f"eta must be greater than 1, got {eta!r}")
    return tuple(rungs)


class SuccessiveHalving:
    """Synchronous successive halving: every survivor of rung r is evaluated before promoting to r+1."""

    def __init__(self, rungs: Sequence[Fidelity], eta: float = 3):
        self.rungs = _check_rungs(rungs, eta)
        self.eta = eta

    def promote(self, results: Sequence[Any], rank_key: RankKey) -> list[int]:
        """Indices of the results to promote: the top ``ceil(n / eta)``, best first, failures never."""
        return top_k(results, math.ceil(len(results) / self.eta), rank_key)

    def run(
        self,
        candidates: Sequence[Any],
        evaluate: Callable[[Any, Fidelity], Any],
        rank_key: RankKey,
        start_rung: int = 0,
        bracket: int = 0,
    ) -> list[Evaluation]:
        """Evaluate ``candidates`` from ``start_rung`` up; returns every evaluation in the order made.

        The candidates evaluated at the last rung are the bracket's finalists; the others were
        stopped early (a search journals them as pruned).
        """
        survivors = list(candidates)
        done: list[Evaluation] = []
        for rung in range(start_rung, len(self.rungs)):
            results = [evaluate(c, self.rungs[rung]) for c in survivors]
            done.extend(Evaluation(c, rung, r, bracket) for c, r in zip(survivors, results))
            if rung == len(self.rungs) - 1:
                break
            survivors = [survivors[i] for i in self.promote(results, rank_key)]
            if not survivors:
                break
        return done


@dataclass(frozen=True)
class Bracket:
    """One Hyperband bracket: ``candidates`` new candidates start at rung ``start_rung``."""

    start_rung: int
    candidates: int


class Hyperband:
    """Successive-halving brackets from the most aggressive (start at rung 0) to plain full training.

    Bracket ``s`` (s = R-1 .. 0 for R rungs) starts ``ceil(R / (s + 1) * eta**s)`` candidates at rung
    ``R-1-s``, so every bracket spends about the same budget (Li et al., 2018).
    """

    def __init__(self, rungs: Sequence[Fidelity], eta: float = 3):
        self.halving = SuccessiveHalving(rungs, eta)

    def brackets(self) -> list[Bracket]:
        n_rungs, eta = len(self.halving.rungs), self.halving.eta
        return [
            Bracket(n_rungs - 1 - s, math.ceil(n_rungs / (s + 1) * eta**s)) for s in range(n_rungs - 1, -1, -1)
        ]

    def run(
        self,
        ask: Callable[[int], Sequence[Any]],
        evaluate: Callable[[Any, Fidelity], Any],
        rank_key: RankKey,
    ) -> list[Evaluation]:
        """For each bracket, ``ask(n)`` for n new candidates and run successive halving on them."""
        done: list[Evaluation] = []
        for i, bracket in enumerate(self.brackets()):
            candidates = list(ask(bracket.candidates))
            done.extend(self.halving.run(candidates, evaluate, rank_key, bracket.start_rung, bracket=i))
        return done


@dataclass(frozen=True)
class Job:
    """What a free worker should do: train ``candidate`` at ``rung`` (a promotion)."""

    candidate: Hashable
    rung: int


class ASHA:
    """Asynchronous successive halving (Li et al., 2020), stateless: the caller's journal is the state.

    ``next_job(done, pending)`` looks from the top rung down for a candidate in the top
    ``floor(n / eta)`` of its rung's ``n`` completed results that is neither at the next rung nor
    pending there, and returns the best such as a ``Job``; ``None`` means: start a new candidate at
    rung 0. Floor, not ceil: the first result of a rung is not promoted before it has competition.
    """

    def __init__(self, rungs: Sequence[Fidelity], eta: float = 3):
        self.rungs = _check_rungs(rungs, eta)
        self.eta = eta

    def promotes(self, done: Sequence[Evaluation], rank_key: RankKey) -> bool:
        """Whether the last of ``done`` (completion order) goes on to the next rung, decided now: it is
        in the top ``floor(n / eta)`` of the ``n`` results its rung has so far, itself included.

        Deciding at once (as Optuna's successive-halving pruner does) makes a stopped candidate final,
        which strategies that learn from finished trials need; ``next_job`` may still promote it later.
        """
        last = done[-1]
        if last.rung >= len(self.rungs) - 1:
            return False
        peers = [e for e in done if e.rung == last.rung]
        k = math.floor(len(peers) / self.eta)
        return len(peers) - 1 in top_k([e.result for e in peers], k, rank_key)

    def next_job(
        self, done: Sequence[Evaluation], rank_key: RankKey, pending: Iterable[Job] = ()
    ) -> Job | None:
        by_rung: list[list[Evaluation]] = [[] for _ in self.rungs]
        for e in done:
            by_rung[e.rung].append(e)
        taken = {(e.candidate, e.rung) for e in done} | {(j.candidate, j.rung) for j in pending}
        for rung in range(len(self.rungs) - 2, -1, -1):
            completed = by_rung[rung]
            k = math.floor(len(completed) / self.eta)
            for i in top_k([e.result for e in completed], k, rank_key):
                candidate = completed[i].candidate
                if (candidate, rung + 1) not in taken:
                    return Job(candidate, rung + 1)
        return None
