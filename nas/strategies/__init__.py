"""Search strategies behind one ask/tell interface (see base.py for the contract they all pass).

``make_strategy(name, space, seed, n_objectives, **options)`` builds one by name; ``STRATEGIES`` maps
each name to its class.
"""

from __future__ import annotations

import inspect
from typing import Any

from nas.errors import NasError
from nas.space import SearchSpace
from nas.strategies.base import Exhausted, Strategy, WarmStart
from nas.strategies.evolution import RegularizedEvolution
from nas.strategies.grid import GridSearch
from nas.strategies.nsga2 import NSGA2
from nas.strategies.optuna_samplers import GP, TPE
from nas.strategies.random_search import RandomSearch
from nas.strategies.rl import RLController

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RandomSearch, GridSearch, RegularizedEvolution, NSGA2, RLController, TPE, GP)
}

__all__ = ["STRATEGIES", "Exhausted", "Strategy", "WarmStart", "make_strategy", "strategy_options"]


def strategy_options(name: str) -> dict[str, Any]:
    """The options a strategy accepts, with their defaults."""
    if name not in STRATEGIES:
        raise NasError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)}")
    signature = inspect.signature(STRATEGIES[name].__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def make_strategy(name: str, space: SearchSpace, seed: int, n_objectives: int = 1, **options: Any) -> Strategy:
    """A fresh strategy; the same arguments always give the same proposals for the same tells."""
    allowed = strategy_options(name)
    for option in options:
        if option not in allowed:
            raise NasError(f"strategy {name!r} has no option {option!r}; its options are {allowed}")
    return STRATEGIES[name](space, seed=seed, n_objectives=n_objectives, **options)
