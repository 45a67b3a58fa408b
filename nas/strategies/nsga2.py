"""NSGA-II (Deb et al. 2002): elitist selection by non-dominated rank and crowding distance.

Generations are kept under ask/tell: asks draw children from the current parents, and once
``population_size`` new successful trials have been told (whenever they were asked) the parents and
those offspring compete and the best ``population_size`` become the next parents. Before the first
generation exists, asks are random.
"""

from __future__ import annotations

from typing import Any

from nas.pareto import crowding_distance, non_dominated_sort
from nas.strategies.base import Params, Strategy, check_option
from nas.trial import Trial

Member = tuple[Params, tuple[float, ...]]


class NSGA2(Strategy):
    """Binary tournaments on (rank, crowding), uniform crossover with ``crossover_prob``, then one mutation."""

    name = "nsga2"

    def __init__(self, space, seed: int = 0, n_objectives: int = 1, *, population_size: int = 20,
                 crossover_prob: float = 0.9):
        super().__init__(space, seed, n_objectives)
        check_option(self.name, "population_size", population_size,
                     isinstance(population_size, int) and population_size >= 2, "an integer >= 2")
        check_option(self.name, "crossover_prob", crossover_prob,
                     isinstance(crossover_prob, (int, float)) and 0 <= crossover_prob <= 1, "a number in [0, 1]")
        self.population_size = population_size
        self.crossover_prob = crossover_prob
        self._offspring: list[Member] = []
        self._set_parents([])

    def _set_parents(self, parents: list[Member]) -> None:
        """Parents plus the (rank, -crowding) key the tournaments compare, lower is better."""
        self._parents = parents
        self._keys: list[tuple[int, float]] = [(0, 0.0)] * len(parents)
        values = [v for _, v in parents]
        for rank, front in enumerate(non_dominated_sort(values)):
            for i, distance in zip(front, crowding_distance([values[i] for i in front])):
                self._keys[i] = (rank, -distance)

    def ask(self) -> Params:
        if not self._parents:
            return self.space.sample(self.rng)
        first = self._tournament()
        child = self.space.crossover(first, self._tournament(), self.rng) if self.rng.random() < self.crossover_prob else first
        return self.space.mutate(child, self.rng)

    def _tournament(self) -> Params:
        a, b = self.rng.randrange(len(self._parents)), self.rng.randrange(len(self._parents))
        if self._keys[a] == self._keys[b]:
            a = (a, b)[self.rng.randrange(2)]
        elif self._keys[b] < self._keys[a]:
            a = b
        return self._parents[a][0]

    def tell(self, trial: Trial) -> None:
        result = self._result(trial)
        if result is None:
            return
        self._offspring.append(result)
        if len(self._offspring) >= self.population_size:
            self._next_generation()

    def _next_generation(self) -> None:
        """Fill the next parents front by front; the front that overflows keeps its least crowded members."""
        pool = self._parents + self._offspring
        values = [v for _, v in pool]
        survivors: list[int] = []
        for front in non_dominated_sort(values):
            room = self.population_size - len(survivors)
            if len(front) > room:
                distance = crowding_distance([values[i] for i in front])
                by_crowding = sorted(range(len(front)), key=lambda k: -distance[k])  # stable: ties keep pool order
                front = [front[k] for k in by_crowding[:room]]
            survivors += front
            if len(survivors) == self.population_size:
                break
        self._offspring = []
        self._set_parents([pool[i] for i in survivors])

    def _state(self) -> dict[str, Any]:
        return {"parents": [[p, list(v)] for p, v in self._parents],
                "offspring": [[p, list(v)] for p, v in self._offspring]}

    def _load(self, state: dict[str, Any]) -> None:
        self._offspring = [(p, tuple(v)) for p, v in state["offspring"]]
        self._set_parents([(p, tuple(v)) for p, v in state["parents"]])
