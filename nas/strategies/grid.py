"""Grid search over the space or a sub-space: for sweeps, ablations and small spaces.

Exhaustion is signalled by raising ``Exhausted`` from ``ask`` (not by returning ``None``) so that a
caller that forgets to check cannot evaluate a missing candidate; the search loop ends on it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from nas.errors import NasError
from nas.strategies.base import Exhausted, Params, Strategy, check_option, discretise
from nas.trial import Trial


class GridSearch(Strategy):
    """Every combination of the varied decisions, in a seeded random order, each candidate once.

    ``only`` lists the decisions to vary (default: all); ``fixed`` pins decisions to values. Any other
    decision takes the middle of its values (MobileNetV2's depth in mnasnet.yaml's layer choices).
    ``int`` and ``log_float`` hyperparameters are discretised to ``points`` values. The order is
    shuffled so that a budget smaller than the grid still spreads over every axis, and points that
    decode to an already proposed candidate (an expansion under a plain conv) are skipped. A grid of
    more than ``limit`` points is refused up front.
    """

    name = "grid"

    def __init__(self, space, seed: int = 0, n_objectives: int = 1, *, only: Iterable[str] | None = None,
                 fixed: dict[str, Any] | None = None, points: int = 3, limit: int = 10_000):
        super().__init__(space, seed, n_objectives)
        check_option(self.name, "points", points, isinstance(points, int) and points >= 2, "an integer >= 2")
        check_option(self.name, "limit", limit, isinstance(limit, int) and limit >= 1, "a positive integer")
        decisions = {d.name: d for d in space.decisions}
        fixed = dict(fixed or {})
        varied = set(decisions) if only is None else set(only)
        for name in [*fixed, *varied]:
            if name not in decisions:
                raise NasError(f"strategy 'grid': {name!r} is not a decision of {space.source}; decisions: {list(decisions)}")
        for name, value in fixed.items():
            if not decisions[name].contains(value):
                raise NasError(f"strategy 'grid': fixed {name}={value!r} is outside the decision's values in {space.source}")
        if only is not None and varied & set(fixed):
            raise NasError(f"strategy 'grid': {sorted(varied & set(fixed))} are both fixed and listed in only")
        axes = []
        for name, d in decisions.items():
            values = discretise(d, points)
            if name in fixed:
                values = (fixed[name],)
            elif name not in varied:
                values = (values[len(values) // 2],)
            axes.append((name, values))
        self.axes = tuple(axes)
        size = math.prod(len(values) for _, values in axes)
        if size > limit:
            widest = sorted((a for a in axes if len(a[1]) > 1), key=lambda a: -len(a[1]))[:6]
            raise NasError(
                f"strategy 'grid': the grid over {space.source} has {size:,} points, more than limit={limit:,} "
                f"(widest axes: {', '.join(f'{n} {len(v)}' for n, v in widest)}); shrink it with only=[decisions to vary], "
                f"fixed={{decision: value}} or fewer points= (now {points}) per numeric hyperparameter, or raise limit="
            )
        self._order = list(range(size))
        self.rng.shuffle(self._order)
        self._cursor = 0
        self._seen: set[str] = set()

    def _point(self, index: int) -> Params:
        """The grid point with mixed-radix ``index`` (last axis fastest)."""
        params = {}
        for name, values in reversed(self.axes):
            index, digit = divmod(index, len(values))
            params[name] = values[digit]
        return {name: params[name] for name, _ in self.axes}

    def ask(self) -> Params:
        while self._cursor < len(self._order):
            params = self._point(self._order[self._cursor])
            self._cursor += 1
            key = self.space.candidate_key(params)
            if key not in self._seen:
                self._seen.add(key)
                return params
        raise Exhausted(f"grid search is done: all {len(self._seen)} distinct candidates of its {len(self._order)} points were proposed")

    def tell(self, trial: Trial) -> None:
        """The grid's order does not depend on results."""

    def _state(self) -> dict[str, Any]:
        return {"cursor": self._cursor}

    def _load(self, state: dict[str, Any]) -> None:
        self._cursor = state["cursor"]
        self._seen = {self.space.candidate_key(self._point(i)) for i in self._order[: self._cursor]}
