"""Regularized (aging) evolution, Real et al. 2019 ("Regularized Evolution for Image Classifier
Architecture Search", Algorithm 1), in its asynchronous form: each tell adds a member and retires the
oldest, so every architecture dies young however good its (possibly lucky) score was.
"""

from __future__ import annotations

from typing import Any

from nas.pareto import pareto_front
from nas.strategies.base import Params, Strategy, check_option
from nas.trial import Trial


class RegularizedEvolution(Strategy):
    """Population ``population_size``, tournaments of ``sample_size``, mutation via ``space.mutate``.

    The first ``population_size`` asks (and any ask while no trial has succeeded yet) are random. Then
    the parent is the winner of a tournament among ``sample_size`` random members; with probability
    ``crossover_prob`` it is first crossed with a second winner. Members join in the order they are told
    and the oldest leaves when the population is full; failed trials never join.

    A tournament's winner is drawn uniformly from the sample's non-dominated members, which is the
    best member for one objective (ties drawn) and a Pareto-rank selection for several.
    """

    name = "evolution"

    def __init__(self, space, seed: int = 0, n_objectives: int = 1, *, population_size: int = 20,
                 sample_size: int = 5, crossover_prob: float = 0.0):
        super().__init__(space, seed, n_objectives)
        check_option(self.name, "population_size", population_size,
                     isinstance(population_size, int) and population_size >= 2, "an integer >= 2")
        check_option(self.name, "sample_size", sample_size,
                     isinstance(sample_size, int) and 1 <= sample_size <= population_size,
                     f"an integer between 1 and population_size ({population_size})")
        check_option(self.name, "crossover_prob", crossover_prob,
                     isinstance(crossover_prob, (int, float)) and 0 <= crossover_prob <= 1, "a number in [0, 1]")
        self.population_size = population_size
        self.sample_size = sample_size
        self.crossover_prob = crossover_prob
        self._population: list[tuple[Params, tuple[float, ...]]] = []  # oldest first
        self._random_asks = 0

    def ask(self) -> Params:
        if self._random_asks < self.population_size or not self._population:
            self._random_asks += 1
            return self.space.sample(self.rng)
        child = self._tournament()
        if self.rng.random() < self.crossover_prob:
            child = self.space.crossover(child, self._tournament(), self.rng)
        return self.space.mutate(child, self.rng)

    def _tournament(self) -> Params:
        sample = self.rng.sample(self._population, min(self.sample_size, len(self._population)))
        front = pareto_front([values for _, values in sample])
        return sample[front[self.rng.randrange(len(front))]][0]

    def tell(self, trial: Trial) -> None:
        result = self._result(trial)
        if result is None:
            return
        self._population.append(result)
        if len(self._population) > self.population_size:
            self._population.pop(0)

    def _state(self) -> dict[str, Any]:
        return {"population": [[params, list(values)] for params, values in self._population],
                "random_asks": self._random_asks}

    def _load(self, state: dict[str, Any]) -> None:
        self._population = [(params, tuple(values)) for params, values in state["population"]]
        self._random_asks = state["random_asks"]
