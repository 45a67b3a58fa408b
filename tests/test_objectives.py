"""MnasNet reward, objective vectors and hard limits checked before training."""

import json
import re
import random
from pathlib import Path

import pytest

from nas.cost import arch_cost
from nas.errors import NasError
from nas.objectives import Limits, Objective, check_reachable, cheapest, reward, sample_feasible, spread_points
from nas.space import load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SOFT, HARD = (-0.07, -0.07), (0.0, -1.0)


@pytest.mark.parametrize("accuracy, latency, target, weights, expected", [
    (0.8, 10.0, 10.0, SOFT, 0.8),                       # on target: the accuracy itself
    (0.8, 20.0, 10.0, SOFT, 0.8 * 2 ** -0.07),          # twice as slow costs about 5%
    (0.8, 5.0, 10.0, SOFT, 0.8 * 0.5 ** -0.07),         # twice as fast earns about 5%
    (0.8, 5.0, 10.0, HARD, 0.8),                        # hard: no bonus under the target
    (0.8, 20.0, 10.0, HARD, 0.4),                       # hard: reward halves at twice the target
    (0.9, 40.0, 10.0, (-0.5, -0.5), 0.45),              # custom exponents
])
def test_reward_table(accuracy, latency, target, weights, expected):
    assert reward(accuracy, latency, target, *weights) == pytest.approx(expected)


def test_soft_preset_trades_five_percent_for_double_latency():
    obj = Objective.mnasnet(target_ms=10.0, preset="soft")
    slow, fast = obj.values({"accuracy": 1.0, "latency_ms": 20.0}), obj.values({"accuracy": 1.0, "latency_ms": 10.0})
    assert slow[0] / fast[0] == pytest.approx(0.95, abs=0.003)


def test_reward_rejects_non_positive_latency():
    with pytest.raises(ValueError, match="positive"):
        reward(0.5, 0.0, 10.0, *SOFT)


@pytest.mark.parametrize("objective, metrics, names, values", [
    (Objective.mnasnet(10.0, "hard"), {"accuracy": 0.6, "latency_ms": 20.0}, ("reward",), (0.3,)),
    (Objective("pareto"), {"accuracy": 0.6, "latency_ms": 20.0, "flops": 5e6}, ("accuracy", "-latency_ms"), (0.6, -20.0)),
    (Objective("pareto", minimise=("latency_ms", "flops", "params")),
     {"accuracy": 0.6, "latency_ms": 20.0, "flops": 5e6, "params": 1e4},
     ("accuracy", "-latency_ms", "-flops", "-params"), (0.6, -20.0, -5e6, -1e4)),
    # latency bands: a bound belongs to the band below it; beyond the last bound is one more band
    (Objective("pareto", latency_bands=(0.04, 0.06)), {"accuracy": 0.6, "latency_ms": 0.03},
     ("accuracy", "-latency_band"), (0.6, 0.0)),
    (Objective("pareto", latency_bands=(0.04, 0.06)), {"accuracy": 0.6, "latency_ms": 0.04}, None, (0.6, 0.0)),
    (Objective("pareto", latency_bands=(0.04, 0.06)), {"accuracy": 0.6, "latency_ms": 0.05}, None, (0.6, -1.0)),
    (Objective("pareto", latency_bands=(0.04, 0.06)), {"accuracy": 0.6, "latency_ms": 0.07}, None, (0.6, -2.0)),
])
def test_objective_values(objective, metrics, names, values):
    assert names is None or objective.names == names
    assert objective.n_objectives == len(values)
    assert objective.values(metrics) == pytest.approx(values)
    assert Objective.from_dict(json.loads(json.dumps(objective.to_dict()))) == objective


@pytest.mark.parametrize("make, message", [
    (lambda: Objective("accuracy"), "'accuracy'"),
    (lambda: Objective("reward"), "positive latency target"),
    (lambda: Objective("reward", target_ms=-1.0), "-1.0"),
    (lambda: Objective("pareto", minimise=("energy",)), "'energy'"),
    (lambda: Objective("pareto", minimise=("flops", "flops")), "twice"),
    (lambda: Objective.mnasnet(10.0, "medium"), "'medium'"),
    (lambda: Objective("pareto", latency_bands=(0.06, 0.04)), r"ascending .* instead of \[0.06, 0.04\]"),
    (lambda: Objective("pareto", minimise=("flops",), latency_bands=(0.04,)), "on latency_ms"),
    (lambda: Limits(latency_ms=0), "latency_ms limit"),
])
def test_bad_objectives_name_the_value(make, message):
    with pytest.raises(NasError, match=message):
        make()


def test_missing_metric_names_what_is_there():
    with pytest.raises(ValueError, match=r"no 'latency_ms'.*\['accuracy'\]"):
        Objective.mnasnet(10.0).values({"accuracy": 0.5})


def test_limits_violations():
    limits = Limits(latency_ms=2.0, params=1000)
    assert limits.violations({"latency_ms": 1.5, "flops": 1e9, "params": 900}) == []
    assert limits.violations({"latency_ms": 2.5, "flops": 1e9, "params": 1200}) == ["latency_ms 2.5 > 2", "params 1200 > 1000"]
    assert Limits.from_dict(limits.to_dict()) == limits


# --- feasibility before training, with the analytic cost as the measured metric -------------------

@pytest.fixture(scope="module", params=["tiny", "mnasnet"])
def space(request):
    return load_space(SPACES / f"{request.param}.yaml")


def measure_for(space):
    def measure(params):
        cost = arch_cost(space.decode(params), num_classes=10)
        return {"flops": cost.flops, "params": cost.params}
    return measure


def test_cheapest_is_no_worse_than_random_samples(space):
    measure = measure_for(space)
    params, lowest = cheapest(space, measure, "flops")
    assert space.contains(params) and measure(params)["flops"] == lowest
    rng = random.Random(0)
    assert lowest <= min(measure(space.sample(rng))["flops"] for _ in range(200))


def test_check_reachable_fails_fast_on_impossible_limits(space):
    measure = measure_for(space)
    _, lowest = cheapest(space, measure, "params")
    check_reachable(space, measure, Limits(params=lowest))
    expected = f"{space.source} can meet the params limit {lowest - 1:.6g}: the cheapest one found has params {lowest:.6g}"
    with pytest.raises(NasError, match=re.escape(expected)):
        check_reachable(space, measure, Limits(params=lowest - 1))


def test_sample_feasible_returns_a_candidate_within_limits(space):
    measure, rng = measure_for(space), random.Random(1)
    flops = sorted(measure(space.sample(rng))["flops"] for _ in range(21))
    rejected = []
    params, metrics = sample_feasible(space, lambda: space.sample(rng), measure, Limits(flops=flops[10]),
                                      on_reject=lambda p, m, broken: rejected.append(broken))
    assert metrics["flops"] <= flops[10] and measure(params) == metrics
    assert all(len(broken) == 1 and broken[0].startswith("flops ") for broken in rejected)


def test_sample_feasible_gives_up_after_max_tries_and_says_how_close_it_got(space):
    measure, rng = measure_for(space), random.Random(2)
    seen = []

    def propose():
        seen.append(space.sample(rng))
        return seen[-1]

    with pytest.raises(NasError, match=r"in 30 samples; the lowest seen: flops (\S+) \(limit 1\)") as error:
        sample_feasible(space, propose, measure, Limits(flops=1), max_tries=30)
    assert len(seen) == 30
    assert f"flops {min(measure(p)['flops'] for p in seen):.4g} " in str(error.value)


def test_spread_points_start_at_the_cheapest_and_climb_evenly_to_the_bound(space):
    import math

    measure = measure_for(space)
    _, lowest = cheapest(space, measure, "flops")
    rng = random.Random(3)
    high = sorted(measure(space.sample(rng))["flops"] for _ in range(50))[25]  # the median random network
    points = spread_points(space, measure, "flops", high, 6, seed=0, pool=600)
    values = [measure(p)["flops"] for p in points]
    assert values[0] == lowest and all(v <= high for v in values)
    assert len({space.decode(p).to_string() for p in points}) == len(points) == 6
    # each point sits near its log-spaced target, and the targets cover the window
    targets = [math.exp(math.log(lowest) + (math.log(high) - math.log(lowest)) * j / 5) for j in range(6)]
    assert all(abs(math.log(v / t)) < 0.5 * math.log(high / lowest) / 5 + 0.05 for v, t in zip(values, targets))
    assert spread_points(space, measure, "flops", high, 6, seed=0, pool=600) == points  # deterministic
