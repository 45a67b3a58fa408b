"""Random search: the baseline every other strategy must beat (Li & Talwalkar 2019 found it hard to)."""

from __future__ import annotations

from nas.strategies.base import Params, Strategy
from nas.trial import Trial


class RandomSearch(Strategy):
    """Independent uniform draws of every decision (log-uniform for ``log_float`` hyperparameters)."""

    name = "random"

    def ask(self) -> Params:
        return self.space.sample(self.rng)

    def tell(self, trial: Trial) -> None:
        """Results do not change the next draw."""
