"""Conformance suite every registered strategy must pass (after Optuna's sampler tests), then
strategy-specific behaviour. The objective is a cheap real signal: analytic FLOPs and parameters plus
a learning-rate term, so hyperparameters matter too.
"""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from nas.cost import arch_cost
from nas.errors import NasError
from nas.space import load_space
from nas.strategies import STRATEGIES, Exhausted, WarmStart, make_strategy, strategy_options
from nas.strategies.base import discretise
from nas.trial import COMPLETE, FAIL, PRUNED, Trial

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
BUDGET = 12
MULTI = [name for name, cls in STRATEGIES.items() if cls.multi_objective]


@pytest.fixture(scope="module", params=["tiny", "mnasnet"])
def space(request):
    return load_space(SPACES / f"{request.param}.yaml")


def options(name, space):
    """Small settings so that every strategy gets past its random start within BUDGET trials."""
    if name == "grid":
        return {"only": ("width_mult", "s0.op", "s1.op", "hp.lr")}
    if name == "evolution":
        return {"population_size": 4, "sample_size": 2}
    if name == "nsga2":
        return {"population_size": 4}
    if name == "tpe":
        return {"n_startup_trials": 4}
    if name == "gp":  # model-based asks take seconds here (more with pending trials): see test_gp_model_asks_replay
        return {"n_startup_trials": 100}
    return {}


def build(name, space, seed=0, n_objectives=1):
    return make_strategy(name, space, seed, n_objectives, **options(name, space))


def evaluate(space, params, number, n_objectives=1, state=COMPLETE):
    """A finished trial; PRUNED ones get worse (lower-fidelity) values, FAIL ones none."""
    if state == FAIL:
        return Trial(number, params, "", FAIL, None, error="diverged")
    cost = arch_cost(space.decode(params), num_classes=10)
    lr_term = abs(math.log10(params["hp.lr"]) + 2)
    values = (-math.log10(cost.flops) - lr_term,) if n_objectives == 1 else (math.log10(cost.params) - lr_term, -math.log10(cost.flops))
    if state == PRUNED:
        values = tuple(v - 1 for v in values)
    return Trial(number, params, space.decode(params).to_string(), state, values)


def run(strategy, space, n=BUDGET, n_objectives=1, seed=0, states=(COMPLETE,)):
    """Ask in random-sized batches (parallel workers), tell each batch back in a random order.

    Returns the journal: ('ask', params) and ('tell', trial) events in the order they happened.
    """
    rng, journal, number = random.Random(seed), [], 0
    while number < n:
        batch = []
        for _ in range(min(rng.randint(1, 3), n - number)):
            params = strategy.ask()
            journal.append(("ask", params))
            batch.append(evaluate(space, params, number, n_objectives, states[number % len(states)]))
            number += 1
        rng.shuffle(batch)
        for trial in batch:
            strategy.tell(trial)
            journal.append(("tell", trial))
    return journal


def asks(journal):
    return [params for event, params in journal if event == "ask"]


# --- conformance -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_proposals(name, space):
    first = asks(run(build(name, space, seed=7), space))
    assert asks(run(build(name, space, seed=7), space)) == first
    assert asks(run(build(name, space, seed=8), space)) != first


@pytest.mark.parametrize("name", STRATEGIES)
def test_replaying_the_journal_reproduces_every_ask(name, space):
    """How the search loop resumes a killed search: a fresh instance fed the journal in order."""
    journal = run(build(name, space, seed=3), space, seed=5)
    replay = build(name, space, seed=3)
    for event, item in journal:
        if event == "ask":
            assert replay.ask() == item
        else:
            replay.tell(Trial.from_dict(json.loads(json.dumps(item.to_dict()))))


@pytest.mark.parametrize("name", STRATEGIES)
def test_proposals_lie_in_the_space(name, space):
    decisions = {d.name for d in space.decisions}
    for params in asks(run(build(name, space), space, states=(COMPLETE, PRUNED, COMPLETE, FAIL))):
        assert set(params) == decisions
        assert space.contains(params), params
        space.decode(params)


@pytest.mark.parametrize("name", STRATEGIES)
def test_failed_trials_do_not_break_it(name, space):
    strategy = build(name, space)
    run(strategy, space, n=6, states=(FAIL,))                       # nothing has succeeded yet
    run(strategy, space, n=BUDGET, states=(FAIL, PRUNED, COMPLETE))
    assert space.contains(strategy.ask())


@pytest.mark.parametrize("name", STRATEGIES)
def test_trials_from_outside_the_space_are_never_proposed_back(name, space):
    strategy = build(name, space)
    run(strategy, space, n=4)
    good = space.sample(random.Random(9))
    foreign = [{**good, "hp.lr": 10.0}, {**good, "s0.op": "transformer"}, {k: v for k, v in good.items() if k != "s0.op"}]
    for number, params in enumerate(foreign, start=100):
        strategy.tell(Trial(number, params, "", COMPLETE, (1e9,)))   # tempting values
    proposals = asks(run(strategy, space))
    assert all(space.contains(p) for p in proposals)


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_round_trips_through_json(name, space):
    original = build(name, space, seed=4)
    run(original, space, n=BUDGET - 3)
    outstanding = [original.ask(), original.ask()]                  # asked, not yet told
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    restored = build(name, space, seed=4)
    restored.load_state_dict(state)
    for strategy in (original, restored):
        for number, params in reversed(list(enumerate(outstanding))):
            strategy.tell(evaluate(space, params, 50 + number))
    assert asks(run(restored, space, n=3)) == asks(run(original, space, n=3))


@pytest.mark.parametrize("name", MULTI)
def test_multi_objective(name, space):
    first = asks(run(build(name, space, seed=2, n_objectives=2), space, n_objectives=2, states=(COMPLETE, FAIL, PRUNED)))
    assert all(space.contains(p) for p in first)
    assert asks(run(build(name, space, seed=2, n_objectives=2), space, n_objectives=2, states=(COMPLETE, FAIL, PRUNED))) == first


@pytest.mark.parametrize("name", ["evolution", "nsga2", "rl", "tpe"])
def test_learning_strategies_improve_on_their_start(name):
    """On tiny.yaml the last quarter of 80 proposals beats the first quarter (random search does not)."""
    space = load_space(SPACES / "tiny.yaml")
    values = [t.values[0] for event, t in run(make_strategy(name, space, 0), space, n=80) if event == "tell"]
    assert sum(values[-20:]) / 20 > sum(values[:20]) / 20 + 0.3


@pytest.mark.parametrize("name", ["evolution", "rl"])
def test_beats_random_search_over_seeds(name):
    """On mnasnet.yaml with the fixed objective, the best after 150 evaluations, averaged over five seeds."""
    space = load_space(SPACES / "mnasnet.yaml")

    def best(strategy_name, seed):
        strategy = make_strategy(strategy_name, space, seed, **({"population_size": 20, "sample_size": 5}
                                                               if strategy_name == "evolution" else {}))
        return max(t.values[0] for event, t in run(strategy, space, n=150, seed=seed) if event == "tell")

    ours = [best(name, seed) for seed in range(5)]
    theirs = [best("random", seed) for seed in range(5)]
    assert sum(ours) / 5 > sum(theirs) / 5 + 0.1, (ours, theirs)


def test_gp_model_asks_replay():
    """The Gaussian process proper (two model-based asks after four random ones) replays exactly."""
    space = load_space(SPACES / "tiny.yaml")
    journal = run(make_strategy("gp", space, 5, n_startup_trials=4), space, n=6, seed=1)
    replay = make_strategy("gp", space, 5, n_startup_trials=4)
    for event, item in journal:
        if event == "ask":
            assert replay.ask() == item
        else:
            replay.tell(item)


# --- registry and options --------------------------------------------------------------------

def test_registry_names_every_strategy():
    assert set(STRATEGIES) == {"random", "grid", "evolution", "nsga2", "rl", "tpe", "gp"}


@pytest.mark.parametrize("call, message", [
    (lambda s: make_strategy("annealing", s, 0), r"unknown strategy 'annealing'; choose from \['random'"),
    (lambda s: make_strategy("evolution", s, 0, populaton_size=5), r"no option 'populaton_size'.*'population_size': 20"),
    (lambda s: make_strategy("evolution", s, 0, population_size=1), r"population_size should be an integer >= 2 instead of 1"),
    (lambda s: make_strategy("evolution", s, 0, sample_size=30), r"sample_size should be .* instead of 30"),
    (lambda s: make_strategy("nsga2", s, 0, crossover_prob=1.5), r"crossover_prob .* instead of 1.5"),
    (lambda s: make_strategy("rl", s, 0, n_objectives=2), r"'rl' optimises one value but the objective has 2"),
    (lambda s: make_strategy("random", s, 0, n_objectives=0), r"instead of 0"),
    (lambda s: make_strategy("random", s, None), r"seed should be an integer instead of None"),
])
def test_bad_arguments_name_the_value(call, message):
    with pytest.raises(NasError, match=message):
        call(load_space(SPACES / "tiny.yaml"))


@pytest.mark.parametrize("other", [("random", 0), ("evolution", 1)])
def test_state_of_another_strategy_or_seed_is_refused(other):
    space = load_space(SPACES / "tiny.yaml")
    with pytest.raises(NasError, match=f"saved state is for strategy '{other[0]}' with seed {other[1]}"):
        make_strategy("evolution", space, 0).load_state_dict(make_strategy(*other[:1], space, other[1]).state_dict())


def test_strategy_options_lists_defaults():
    assert strategy_options("evolution") == {"population_size": 20, "sample_size": 5, "crossover_prob": 0.0,
                                             "niches": False, "asks_per_niche": 1}


# --- grid ------------------------------------------------------------------------------------

def test_discretise():
    space = load_space(SPACES / "mnasnet.yaml")
    hp = {d.name: d for d in space.hyperparameters}
    assert discretise(hp["hp.lr"], 5) == (0.001, 0.003162, 0.01, 0.03162, 0.1)
    assert discretise(hp["hp.batch_size"], 3) == (32, 96, 128)
    assert discretise(hp["hp.batch_size"], 4) == (32, 64, 96, 128)
    assert discretise(hp["hp.optimizer"], 2) == ("sgd", "adam", "adamw")


def test_grid_proposes_each_distinct_candidate_once_then_is_exhausted():
    space = load_space(SPACES / "tiny.yaml")
    grid = make_strategy("grid", space, 0, only=["s0.op", "s0.expansion"], fixed={"hp.lr": 0.05})
    # conv and ds ignore the expansion: 6 grid points are 4 candidates
    proposals = [grid.ask() for _ in range(2)]
    state = grid.state_dict()
    proposals += [grid.ask() for _ in range(2)]
    with pytest.raises(Exhausted, match="all 4 distinct candidates of its 6 points"):
        grid.ask()
    assert len({space.candidate_key(p) for p in proposals}) == 4
    assert {(p["s0.op"], p["s0.expansion"] if p["s0.op"] == "ir" else None) for p in proposals} == {
        ("conv", None), ("ds", None), ("ir", 3.0), ("ir", 6.0)}
    assert all(p["hp.lr"] == 0.05 and p["s1.op"] == "ds" for p in proposals)   # fixed, and the middle choice
    resumed = make_strategy("grid", space, 0, only=["s0.op", "s0.expansion"], fixed={"hp.lr": 0.05})
    resumed.load_state_dict(state)
    assert [resumed.ask() for _ in range(2)] == proposals[2:]
    with pytest.raises(Exhausted):
        resumed.ask()


@pytest.mark.parametrize("grid_options, message", [
    ({}, r"has 42,467,328 points, more than limit=10,000 \(widest axes: s0.op 3, .*only=.*fixed=.*points= \(now 3\)"),
    ({"only": ["s0.opp"]}, r"'s0.opp' is not a decision of .*tiny.yaml"),
    ({"fixed": {"hp.lr": 1.0}}, r"fixed hp.lr=1.0 is outside"),
    ({"only": ["hp.lr"], "fixed": {"hp.lr": 0.01}}, r"\['hp.lr'\] are both fixed and listed in only"),
    ({"points": 1}, r"points should be an integer >= 2 instead of 1"),
])
def test_grid_refuses_bad_or_oversized_grids(grid_options, message):
    with pytest.raises(NasError, match=message):
        make_strategy("grid", load_space(SPACES / "tiny.yaml"), 0, **grid_options)


# --- evolution -------------------------------------------------------------------------------

def test_evolution_ages_out_the_oldest_and_mutates_the_tournament_winner():
    space = load_space(SPACES / "tiny.yaml")
    evo = make_strategy("evolution", space, 0, population_size=4, sample_size=4)
    told = [evo.ask() for _ in range(6)]
    for number, params in enumerate(told):
        evo.tell(Trial(number, params, "", COMPLETE, (float(number == 3),)))
    population = evo.state_dict()["population"]
    assert [p for p, _ in population] == told[2:]                    # the two oldest were retired
    child = evo.ask()                                                # the whole population competes
    assert sum(child[k] != told[3][k] for k in child) == 1


def test_evolution_niches_age_apart_take_turns_and_compare_accuracy_only():
    """Values (accuracy, -band): the fast band (0) keeps its members however inaccurate they are next to
    the slow band's, its turn comes first and twice as often, and each turn lasts asks_per_niche asks."""
    space = load_space(SPACES / "tiny.yaml")
    evo = make_strategy("evolution", space, 0, n_objectives=2, population_size=3, sample_size=3, niches=True,
                        asks_per_niche=2)
    assert evo.ask() is not None  # random while nothing succeeded
    rng = random.Random(1)
    fast = [space.sample(rng) for _ in range(5)]
    slow = [space.sample(rng) for _ in range(2)]
    # the fast band's accuracies 0.1..0.5: its best is fast[4] unless aging retired it
    for number, params in enumerate(fast):
        evo.tell(Trial(number, params, "", COMPLETE, (0.1 * (number + 1), 0.0)))
    for number, params in enumerate(slow):
        evo.tell(Trial(10 + number, params, "", COMPLETE, (0.9 - 0.1 * number, -1.0)))
    population = evo.state_dict()["population"]
    assert [p for p, v in population if v[1] == 0.0] == fast[2:]    # three per band, the oldest fast ones gone
    assert [p for p, v in population if v[1] == -1.0] == slow
    # turns: fast, slow, fast (the better band takes two of three), asks_per_niche=2 asks each;
    # the whole band competes, so its best is the parent
    parents = [fast[4], fast[4], slow[0], slow[0], fast[4], fast[4], fast[4]]
    for parent in parents:
        child = evo.ask()
        assert sum(child[k] != parent[k] for k in child) == 1


def banded(space, params, number):
    """(accuracy stand-in, -band): three bands, as the main job's latency bands (any deterministic cut)."""
    flops = arch_cost(space.decode(params), num_classes=10).flops
    return Trial(number, params, "", COMPLETE, (math.log10(flops) % 1, -float(flops % 3)))


def test_evolution_niches_replay_and_round_trip(space):
    """The strategy contract with niches: a journal replays to the same asks, and state_dict resumes."""
    make = lambda: make_strategy("evolution", space, 3, n_objectives=2, population_size=3, sample_size=2,
                                 niches=True, asks_per_niche=2)
    original, journal = make(), []
    for number in range(30):
        params = original.ask()
        journal.append(params)
        original.tell(banded(space, params, number))
    assert len({round(-banded(space, p, 0).values[1]) for p in journal}) > 1  # several bands took turns
    replay = make()
    for number, params in enumerate(journal):
        assert replay.ask() == params
        replay.tell(banded(space, params, number))
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert [restored.ask() for _ in range(5)] == [original.ask() for _ in range(5)]


def test_evolution_niches_need_a_second_objective():
    with pytest.raises(NasError, match="niches should be true only with two or more objectives"):
        make_strategy("evolution", load_space(SPACES / "tiny.yaml"), 0, niches=True)


# --- NSGA-II ---------------------------------------------------------------------------------

def test_nsga2_keeps_the_best_fronts_and_the_least_crowded_of_the_last():
    space = load_space(SPACES / "tiny.yaml")
    nsga = make_strategy("nsga2", space, 0, n_objectives=2, population_size=4)
    rng = random.Random(0)
    values = [(0, 10), (10, 0), (5, 5), (1, 1),                     # generation 0: all survive
              (2, 8), (8, 2), (4.9, 5.1), (7, 1)]                   # front of 6 with (0,10) (10,0) (5,5); 4 fit
    for number, v in enumerate(values):
        nsga.tell(Trial(number, space.sample(rng), "", COMPLETE, tuple(map(float, v))))
        if number == 3:
            assert sorted(tuple(v) for _, v in nsga.state_dict()["parents"]) == sorted(values[:4])
    # crowding: (8,2) 1.0 and (2,8) 0.98 beat (5,5) 0.62 and (4.9,5.1) 0.6; extremes are infinite
    assert sorted(tuple(v) for _, v in nsga.state_dict()["parents"]) == [(0, 10), (2, 8), (8, 2), (10, 0)]
    assert nsga.state_dict()["offspring"] == []


# --- RL controller ---------------------------------------------------------------------------

def test_rl_gradient_matches_finite_differences():
    space = load_space(SPACES / "tiny.yaml")
    rl = make_strategy("rl", space, 0, hidden_size=4)
    params = rl.ask()
    grads = rl._grad_log_prob(params)
    rng = np.random.default_rng(0)
    for key in ("start", "recurrent", "embed0", "embed5", "out3", "bias7"):
        index = tuple(rng.integers(n) for n in rl.weights[key].shape)
        if key.startswith("embed"):   # only the chosen option's row of an embedding is used
            index = (rl._choices(params)[int(key[5:])],) + index[1:]
        saved = rl.weights[key][index]
        rl.weights[key][index] = saved + 1e-6
        up = rl.log_prob(params)
        rl.weights[key][index] = saved - 1e-6
        down = rl.log_prob(params)
        rl.weights[key][index] = saved
        assert grads[key][index] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-8), key


def test_rl_learns_a_rewarded_choice():
    space = load_space(SPACES / "tiny.yaml")
    rl = make_strategy("rl", space, 1)
    untrained = [make_strategy("rl", space, seed).ask()["s1.op"] == "ir" for seed in range(300)]
    assert 0.25 < sum(untrained) / 300 < 0.42                       # starts close to uniform over 3 ops
    picks = []
    for number in range(150):
        params = rl.ask()
        picks.append(params["s1.op"] == "ir")
        rl.tell(Trial(number, params, "", COMPLETE, (float(picks[-1]),)))
    assert sum(picks[-30:]) >= 28


@pytest.mark.parametrize("name", ["random", "evolution", "nsga2", "tpe", "rl"])
def test_warm_start_proposes_its_points_first_and_the_strategy_learns_from_them(name, space):
    """The main job starts every strategy from points spread over the latency window: they come first,
    in order; then the strategy proposes, having been told their results, and a replay repeats it all."""
    rng = random.Random(11)
    points = [space.sample(rng) for _ in range(5)]
    warm = WarmStart(build(name, space, seed=2), points)
    journal = run(warm, space, n=BUDGET, seed=4)
    assert asks(journal)[:5] == points and len(asks(journal)) == BUDGET
    replay = WarmStart(build(name, space, seed=2), points)
    for event, item in journal:
        if event == "ask":
            assert replay.ask() == item
        else:
            replay.tell(item)
    cold = asks(run(build(name, space, seed=2), space, n=BUDGET, seed=4))
    assert asks(journal)[5:] != cold[5:]  # the strategy saw other results, or started later in its stream
