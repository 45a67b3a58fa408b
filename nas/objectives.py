"""What a search optimises: the MnasNet reward or a Pareto vector, and hard limits checked before training.

``Objective.values(metrics)`` is what the search loop stores in ``Trial.values`` (every entry
maximised, costs negated). ``Limits`` are hard caps on predicted latency and analytic cost:
``check_reachable`` fails fast when even the cheapest candidate breaks one, and ``sample_feasible``
draws candidates with a bounded number of tries, never ``while True`` (OFA hangs on impossible
latency targets).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nas.errors import NasError
from nas.space import SearchSpace

# (alpha, beta) of MnasNet's reward, Tan et al. 2019 section 3: "soft" trades about 5% accuracy for
# 2x latency on either side of the target; "hard" ignores latency under the target and penalises it
# sharply above.
REWARD_PRESETS = {"soft": (-0.07, -0.07), "hard": (0.0, -1.0)}
KINDS = ("reward", "pareto")
COSTS = ("latency_ms", "flops", "params")


def reward(accuracy: float, latency_ms: float, target_ms: float, alpha: float, beta: float) -> float:
    """MnasNet's ACC * (LAT / T)^w with w = alpha if LAT <= T else beta."""
    if latency_ms <= 0 or target_ms <= 0:
        raise ValueError(f"latency ({latency_ms} ms) and target ({target_ms} ms) must be positive")
    w = alpha if latency_ms <= target_ms else beta
    return accuracy * (latency_ms / target_ms) ** w


def _metric(metrics: Mapping[str, Any], name: str) -> float:
    if name not in metrics:
        raise ValueError(f"metrics have no {name!r} (they have {sorted(metrics)})")
    return float(metrics[name])


@dataclass(frozen=True)
class Objective:
    """``kind='reward'``: one value, the MnasNet reward with ``target_ms``, ``alpha`` and ``beta``.
    ``kind='pareto'``: accuracy, then each metric of ``minimise`` negated (default: latency).

    ``latency_bands`` (pareto only, ascending ms): latency counts by the band it falls in, not by its
    value: -(number of bounds below it). The main job's bands are the baselines' bars, so that a search
    compares candidates by accuracy among those that beat the same baselines on latency.
    """

    kind: str = "reward"
    target_ms: float | None = None
    alpha: float = REWARD_PRESETS["soft"][0]
    beta: float = REWARD_PRESETS["soft"][1]
    minimise: tuple[str, ...] = ("latency_ms",)
    latency_bands: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NasError(f"objective should be one of {list(KINDS)} instead of {self.kind!r}")
        object.__setattr__(self, "latency_bands", tuple(self.latency_bands))
        bands = self.latency_bands
        if bands and (self.kind != "pareto" or "latency_ms" not in self.minimise or list(bands) != sorted(set(bands))
                      or not bands[0] > 0):
            raise NasError(f"latency bands should be ascending positive bounds of a Pareto objective on latency_ms "
                           f"instead of {list(bands)}")
        if self.kind == "reward" and (self.target_ms is None or not self.target_ms > 0):
            raise NasError(f"the reward needs a positive latency target in ms instead of {self.target_ms!r}")
        object.__setattr__(self, "minimise", tuple(self.minimise))
        if self.kind == "pareto":
            for name in self.minimise:
                if name not in COSTS:
                    raise NasError(f"a Pareto objective minimises metrics from {list(COSTS)}, not {name!r}")
            if len(set(self.minimise)) != len(self.minimise):
                raise NasError(f"a Pareto objective lists a metric twice: {list(self.minimise)}")

    @classmethod
    def mnasnet(cls, target_ms: float, preset: str = "soft") -> "Objective":
        """The MnasNet reward with a named (alpha, beta) preset."""
        if preset not in REWARD_PRESETS:
            raise NasError(f"reward preset should be one of {list(REWARD_PRESETS)} instead of {preset!r}")
        alpha, beta = REWARD_PRESETS[preset]
        return cls("reward", target_ms, alpha, beta)

    @property
    def names(self) -> tuple[str, ...]:
        """One label per value, costs marked as negated: ('accuracy', '-latency_ms')."""
        if self.kind == "reward":
            return ("reward",)
        return ("accuracy", *(f"-{self._cost_name(name)}" for name in self.minimise))

    def _cost_name(self, name: str) -> str:
        return "latency_band" if name == "latency_ms" and self.latency_bands else name

    def _cost(self, metrics: Mapping[str, Any], name: str) -> float:
        value = _metric(metrics, name)
        if name == "latency_ms" and self.latency_bands:
            return float(bisect.bisect_left(self.latency_bands, value))
        return value

    @property
    def n_objectives(self) -> int:
        return len(self.names)

    def values(self, metrics: Mapping[str, Any]) -> tuple[float, ...]:
        """``Trial.values`` for a trial's metrics; a NaN accuracy gives NaN, which strategies skip."""
        accuracy = _metric(metrics, "accuracy")
        if self.kind == "reward":
            return (reward(accuracy, _metric(metrics, "latency_ms"), self.target_ms, self.alpha, self.beta),)
        return (accuracy, *(-self._cost(metrics, name) for name in self.minimise))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["minimise"] = list(self.minimise)
        data["latency_bands"] = list(self.latency_bands)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Objective":
        return cls(**data)


@dataclass(frozen=True)
class Limits:
    """Hard caps on a candidate's predicted latency (ms), FLOPs and parameters; ``None`` = no cap."""

    latency_ms: float | None = None
    flops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        for name, limit in self.active():
            if not limit > 0:
                raise NasError(f"the {name} limit should be positive instead of {limit!r}")

    def active(self) -> list[tuple[str, float]]:
        return [(name, getattr(self, name)) for name in COSTS if getattr(self, name) is not None]

    def violations(self, metrics: Mapping[str, Any]) -> list[str]:
        """Each broken limit as 'latency_ms 1.3 > 1'; empty when the candidate is feasible."""
        return [f"{name} {_metric(metrics, name):.4g} > {limit:.4g}"
                for name, limit in self.active() if _metric(metrics, name) > limit]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Limits":
        return cls(**data)


Measure = Callable[[dict[str, Any]], Mapping[str, Any]]


def cheapest(space: SearchSpace, measure: Measure, metric: str, max_passes: int = 3) -> tuple[dict[str, Any], float]:
    """A point of ``space`` with a low ``metric`` by coordinate descent over the architecture decisions.

    Each pass tries every option of every decision in turn and keeps the best; passes repeat until
    nothing improves. Costs that grow with depth, width, kernel and expansion make this the true
    minimum in practice; it costs sum(options) * passes calls to ``measure``.
    """
    params = {d.name: d.choices[0] if d.kind == "categorical" else d.low for d in space.decisions}
    best = _metric(measure(params), metric)
    for _ in range(max_passes):
        improved = False
        for d in space.decisions:
            if d.is_hyperparameter:
                continue
            for option in d.choices:
                trial = {**params, d.name: option}
                value = _metric(measure(trial), metric)
                if value < best:
                    params, best, improved = trial, value, True
        if not improved:
            break
    return params, best


def spread_points(space: SearchSpace, measure: Measure, metric: str, high: float, n: int, seed: int,
                  pool: int = 4000) -> list[dict[str, Any]]:
    """``n`` points whose ``metric`` spreads evenly on a log scale from the cheapest point's value to
    ``high``: the cheapest point itself, then for each target value the nearest point of a pool of random
    samples and short random mutation walks from the cheapest point (random samples alone seldom come
    near it). Ordered by ``metric``; deterministic for a seed."""
    rng = random.Random(seed)
    start, low = cheapest(space, measure, metric)
    candidates = [space.sample(rng) for _ in range(pool // 2)]
    for _ in range(pool - pool // 2):
        point = start
        for _ in range(rng.randint(1, 8)):
            point = space.mutate(point, rng)
        candidates.append(point)
    scored = [(math.log(v), p) for p in candidates if 0 < (v := _metric(measure(p), metric)) <= high]
    chosen, seen = [(math.log(low), start)], {space.decode(start).to_string()}
    for j in range(1, n if high > low else 1):
        target = math.log(low) + (math.log(high) - math.log(low)) * j / (n - 1)
        for value, point in sorted(scored, key=lambda item: abs(item[0] - target)):
            if space.decode(point).to_string() not in seen:
                chosen.append((value, point))
                seen.add(space.decode(point).to_string())
                break
    return [point for _, point in sorted(chosen, key=lambda item: item[0])][:n]


def check_reachable(space: SearchSpace, measure: Measure, limits: Limits) -> None:
    """Fail fast, before any training, when even the cheapest candidate breaks a limit."""
    for name, limit in limits.active():
        _, lowest = cheapest(space, measure, name)
        if lowest > limit:
            raise NasError(
                f"no architecture of {space.source} can meet the {name} limit {limit:.6g}: the cheapest one "
                f"found has {name} {lowest:.6g}; raise the limit or use a smaller space"
            )


def sample_feasible(space: SearchSpace, propose: Callable[[], dict[str, Any]], measure: Measure, limits: Limits,
                    max_tries: int = 1000,
                    on_reject: Callable[[dict[str, Any], Mapping[str, Any], list[str]], None] | None = None,
                    ) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The first of at most ``max_tries`` proposals within ``limits``, with its measured metrics.

    ``on_reject(params, metrics, violations)`` sees every rejected proposal: when ``propose`` is a
    strategy's ask, the loop must tell (and journal) rejects as FAIL trials so that replay stays exact.
    """
    if max_tries < 1:
        raise ValueError(f"max_tries should be positive instead of {max_tries}")
    lowest: dict[str, float] = {}
    for _ in range(max_tries):
        params = propose()
        metrics = measure(params)
        broken = limits.violations(metrics)
        if not broken:
            return params, metrics
        for name, _ in limits.active():
            lowest[name] = min(lowest.get(name, math.inf), _metric(metrics, name))
        if on_reject is not None:
            on_reject(params, metrics, broken)
    seen = ", ".join(f"{name} {value:.4g} (limit {getattr(limits, name):.4g})" for name, value in lowest.items())
    raise NasError(
        f"no architecture of {space.source} met the limits in {max_tries} samples; the lowest seen: {seen}; "
        "raise the limits or use a smaller space"
    )
