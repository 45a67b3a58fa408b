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

    ``niches=True`` keeps one population per value of the second objective (the main job's latency
    band, ``Objective.latency_bands``): each niche ages on its own, parents come from one niche at a
    time in turn (``asks_per_niche`` asks each, one successive-halving round, so that a round's
    candidates compete with their own kind; better niches get more turns, see ``_niche_cycle``), and
    tournaments compare the other objectives only. A niche of fast networks, which score lower at low
    fidelity, is then never crowded out by slower ones. Random asks come only while no trial has
    succeeded. The second objective should take few values (bands): each distinct value is a niche.
    """

    name = "evolution"

    def __init__(self, space, seed: int = 0, n_objectives: int = 1, *, population_size: int = 20,
                 sample_size: int = 5, crossover_prob: float = 0.0, niches: bool = False, asks_per_niche: int = 1):
        super().__init__(space, seed, n_objectives)
        check_option(self.name, "population_size", population_size,
                     isinstance(population_size, int) and population_size >= 2, "an integer >= 2")
        check_option(self.name, "sample_size", sample_size,
                     isinstance(sample_size, int) and 1 <= sample_size <= population_size,
                     f"an integer between 1 and population_size ({population_size})")
        check_option(self.name, "crossover_prob", crossover_prob,
                     isinstance(crossover_prob, (int, float)) and 0 <= crossover_prob <= 1, "a number in [0, 1]")
        check_option(self.name, "niches", niches, isinstance(niches, bool) and (not niches or n_objectives >= 2),
                     "true only with two or more objectives (the second one names the niche)")
        check_option(self.name, "asks_per_niche", asks_per_niche,
                     isinstance(asks_per_niche, int) and asks_per_niche >= 1, "an integer >= 1")
        self.population_size = population_size
        self.sample_size = sample_size
        self.crossover_prob = crossover_prob
        self.niches = niches
        self.asks_per_niche = asks_per_niche
        self._population: list[tuple[Params, tuple[float, ...]]] = []  # oldest first, all niches together
        self._random_asks = 0
        self._bred = 0  # asks answered by a tournament: they take the niches in turn

    def ask(self) -> Params:
        if not self._population or (not self.niches and self._random_asks < self.population_size):
            self._random_asks += 1
            return self.space.sample(self.rng)
        members = self._population
        if self.niches:
            cycle = self._niche_cycle()
            turn = cycle[(self._bred // self.asks_per_niche) % len(cycle)]
            members = [m for m in members if self._niche(m[1]) == turn]
        self._bred += 1
        child = self._tournament(members)
        if self.rng.random() < self.crossover_prob:
            child = self.space.crossover(child, self._tournament(members), self.rng)
        return self.space.mutate(child, self.rng)

    def _niche_cycle(self) -> list[float]:
        """The turns of one cycle over the niches present: with n niches, the best (on the niche objective)
        takes n turns, the next n - 1, ..., the worst one. The main job's fastest band can decide every
        verdict and the slowest only one, so they get their search in about that proportion."""
        niches = sorted({self._niche(values) for _, values in self._population}, reverse=True)
        return [niche for round_ in range(len(niches)) for niche in niches[:len(niches) - round_]]

    def _niche(self, values: tuple[float, ...]) -> float | None:
        return values[1] if self.niches else None

    def _tournament(self, members: list[tuple[Params, tuple[float, ...]]]) -> Params:
        sample = self.rng.sample(members, min(self.sample_size, len(members)))
        judged = [values[:1] + values[2:] if self.niches else values for _, values in sample]
        front = pareto_front(judged)
        return sample[front[self.rng.randrange(len(front))]][0]

    def tell(self, trial: Trial) -> None:
        result = self._result(trial)
        if result is None:
            return
        self._population.append(result)
        niche = self._niche(result[1])
        kin = [i for i, (_, values) in enumerate(self._population) if self._niche(values) == niche]
        if len(kin) > self.population_size:
            self._population.pop(kin[0])

    def _state(self) -> dict[str, Any]:
        return {"population": [[params, list(values)] for params, values in self._population],
                "random_asks": self._random_asks, "bred": self._bred}

    def _load(self, state: dict[str, Any]) -> None:
        self._population = [(params, tuple(values)) for params, values in state["population"]]
        self._random_asks = state["random_asks"]
        self._bred = state["bred"]
