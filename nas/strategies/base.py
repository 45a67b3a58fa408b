"""The strategy interface: propose points of a space (``ask``) and learn from finished trials (``tell``).

Modelled on Optuna's sampler ABC, and held by tests/test_strategies.py to one contract:

- Deterministic: asks are a pure function of the constructor arguments (``seed`` included) and the
  sequence of tells, with all randomness drawn from one ``random.Random(seed)``. A killed search
  resumes by replaying its journal into a fresh instance (same arguments; ask, tell, ... in order).
- Asynchronous: any number of asks may be outstanding and trials may be told in any order.
- Robust: a FAIL trial, a trial with non-finite values or one whose params lie outside the space
  teaches nothing and is skipped; a PRUNED trial's low-fidelity values are used as they are (real,
  only pessimistic). Every proposal lies in the space.
- Checkpointable: ``state_dict()`` is plain JSON and ``load_state_dict`` on a fresh instance built
  with the same arguments continues with exactly the proposals the original would have made.
- ``ask`` raises ``Exhausted`` when nothing is left to propose (a finished grid); the loop stops.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from nas.errors import NasError
from nas.space import Decision, SearchSpace
from nas.trial import Trial

Params = dict[str, Any]


class Exhausted(Exception):
    """``ask`` has nothing left to propose; the search ends normally."""


class Strategy(ABC):
    """Proposes points of ``space``; ``n_objectives`` is the length of every told ``Trial.values``."""

    name: ClassVar[str]
    multi_objective: ClassVar[bool] = True

    def __init__(self, space: SearchSpace, seed: int = 0, n_objectives: int = 1):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise NasError(f"the strategy seed should be an integer instead of {seed!r}")
        if not isinstance(n_objectives, int) or n_objectives < 1:
            raise NasError(f"n_objectives should be a positive integer instead of {n_objectives!r}")
        if n_objectives > 1 and not self.multi_objective:
            raise NasError(
                f"strategy {self.name!r} optimises one value but the objective has {n_objectives}; "
                "use the scalar MnasNet reward or a multi-objective strategy (random, grid, evolution, nsga2, tpe, gp)"
            )
        self.space = space
        self.seed = seed
        self.n_objectives = n_objectives
        self.rng = random.Random(seed)

    @abstractmethod
    def ask(self) -> Params:
        """The next point to evaluate (a fresh dict the caller may keep)."""

    @abstractmethod
    def tell(self, trial: Trial) -> None:
        """Learn from a finished trial (COMPLETE, PRUNED or FAIL), in any order relative to asks."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this instance is, as plain JSON data."""
        version, internal, gauss = self.rng.getstate()
        return {"strategy": self.name, "seed": self.seed, "n_objectives": self.n_objectives,
                "rng": [version, list(internal), gauss], **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of an instance built with the same arguments (options included)."""
        mine = (self.name, self.seed, self.n_objectives)
        saved = (state.get("strategy"), state.get("seed"), state.get("n_objectives"))
        if saved != mine:
            raise NasError(
                f"saved state is for strategy {saved[0]!r} with seed {saved[1]} and {saved[2]} objective(s); "
                f"cannot load it into {self.name!r} with seed {self.seed} and {self.n_objectives}"
            )
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._load(state)

    def _state(self) -> dict[str, Any]:
        """Subclass state beyond the random generator (JSON data)."""
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        """Restore what ``_state`` saved."""

    def _result(self, trial: Trial) -> tuple[Params, tuple[float, ...]] | None:
        """``(params, values)`` of a trial that can teach something, else ``None`` (see the module notes).

        Params are cut down to the space's decisions so that nothing foreign is inherited.
        """
        if not trial.ok:
            return None
        if len(trial.values) != self.n_objectives:
            raise ValueError(
                f"trial {trial.number} has {len(trial.values)} values but strategy {self.name!r} "
                f"was built for n_objectives={self.n_objectives}"
            )
        values = tuple(float(v) for v in trial.values)
        if not all(math.isfinite(v) for v in values) or not self.space.contains(trial.params):
            return None
        return {d.name: trial.params[d.name] for d in self.space.decisions}, values


def discretise(decision: Decision, points: int) -> tuple:
    """A decision's values on a finite grid: all choices, or ``points`` (>= 2) spread over a numeric range.

    ``int`` ranges keep at most ``points`` evenly spaced steps (both ends included); ``log_float``
    ranges get ``points`` geometrically spaced values rounded to 4 significant digits, ends exact
    (0.001 .. 0.1 with 5 points: 0.001, 0.003162, 0.01, 0.03162, 0.1).
    """
    if decision.kind == "categorical":
        return decision.choices
    if decision.kind == "int":
        steps = list(range(int(decision.low), int(decision.high) + 1, decision.step))
        if len(steps) <= points:
            return tuple(steps)
        return tuple(dict.fromkeys(steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)))
    lo, hi = math.log(decision.low), math.log(decision.high)
    inner = (float(f"{math.exp(lo + (hi - lo) * i / (points - 1)):.4g}") for i in range(1, points - 1))
    return (decision.low, *inner, decision.high)


def check_option(strategy: str, option: str, value: Any, ok: bool, requirement: str) -> None:
    """Reject a bad strategy option with one line that echoes it."""
    if not ok:
        raise NasError(f"strategy {strategy!r}: option {option} should be {requirement} instead of {value!r}")


class WarmStart:
    """``points`` first, in order, then whatever ``strategy`` proposes; every result goes to ``strategy``,
    which learns from the start points as from its own asks (every Strategy accepts trials it did not
    ask for). Deterministic, so replaying a journal re-proposes the same points."""

    def __init__(self, strategy: Strategy, points: list[Params]):
        self.strategy = strategy
        self.points = [dict(p) for p in points]
        self.used = 0

    @property
    def name(self) -> str:
        return self.strategy.name

    def ask(self) -> Params:
        if self.used < len(self.points):
            self.used += 1
            return dict(self.points[self.used - 1])
        return self.strategy.ask()

    def tell(self, trial: Trial) -> None:
        self.strategy.tell(trial)
