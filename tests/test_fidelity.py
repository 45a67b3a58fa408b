"""Multi-fidelity schedulers: exact promotions on hand-made result tables."""

import math
import subprocess
import sys

import pytest

from nas.errors import NasError
from nas.fidelity import (
    ASHA,
    Evaluation,
    Fidelity,
    Hyperband,
    Job,
    SuccessiveHalving,
    ladder,
    maximize,
    top_k,
)

RUNGS = ladder(Fidelity(epochs=9, fraction=1.0, resolution=32), eta=3, rungs=3)
BY_ACCURACY = maximize(lambda r: r)  # results here are plain accuracies (None = failed)


def test_fidelity_rejects_bad_values_and_round_trips():
    f = Fidelity(epochs=4, fraction=0.5, resolution=16)
    assert Fidelity.from_dict(f.to_dict()) == f
    for bad in ({"epochs": 0}, {"epochs": 2, "fraction": 0.0}, {"epochs": 2, "fraction": 1.5}, {"epochs": 2, "resolution": 0}):
        with pytest.raises(NasError):
            Fidelity(**bad)


def test_ladder_multiplies_the_budget_by_eta_and_ends_at_the_top():
    top = Fidelity(epochs=8, fraction=1.0, resolution=32)
    rungs = ladder(top, eta=3, rungs=3)
    assert rungs[-1] == top
    assert [r.epochs for r in rungs] == [3, 5, 8]
    for low, high in zip(rungs, rungs[1:]):
        assert high.budget / low.budget == pytest.approx(3, rel=1e-4)
        assert low.epochs <= high.epochs and low.fraction <= high.fraction
    # a one-epoch top cannot lose epochs: the fraction takes the whole reduction
    assert ladder(Fidelity(1, 0.9), eta=2, rungs=2)[0] == Fidelity(1, 0.45)


def test_top_k_skips_failures_and_keeps_order_on_ties():
    assert top_k([0.5, None, 0.9, 0.5, float("nan")], 3, BY_ACCURACY) == [2, 0, 3]
    assert top_k([None, None], 1, BY_ACCURACY) == []


def test_successive_halving_promotes_the_top_third_of_nine():
    accuracy = {f"c{i}": a for i, a in enumerate([0.50, 0.91, 0.30, 0.88, 0.10, 0.70, 0.95, 0.20, 0.60])}
    seen: list[tuple[str, Fidelity]] = []

    def evaluate(candidate, fidelity):
        seen.append((candidate, fidelity))
        # higher rungs add a little; at rung 1, c3 overtakes c6 (promotion uses the new rung's results)
        bonus = {RUNGS[0]: 0.0, RUNGS[1]: 0.01, RUNGS[2]: 0.02}[fidelity]
        return accuracy[candidate] + bonus + (0.1 if candidate == "c3" and fidelity == RUNGS[1] else 0.0)

    sh = SuccessiveHalving(RUNGS, eta=3)
    done = sh.run(list(accuracy), evaluate, BY_ACCURACY)
    per_rung = [[e.candidate for e in done if e.rung == r] for r in range(3)]
    assert per_rung == [list(accuracy), ["c6", "c1", "c3"], ["c3"]]
    assert [f for c, f in seen].count(RUNGS[0]) == 9 and len(seen) == 13
    # promote(): ceil(n / eta) and never a failure
    assert sh.promote([0.9, None, 0.8, 0.7], BY_ACCURACY) == [0, 2]
    assert sh.promote([None, None, 0.1], BY_ACCURACY) == [2]


def test_successive_halving_ranks_with_any_key_such_as_pareto_fronts():
    # two objectives (accuracy up, latency down); the key is the non-dominated front index
    points = {"a": (0.9, 10.0), "b": (0.8, 5.0), "c": (0.7, 12.0), "d": (0.6, 4.0), "e": (0.85, 11.0), "f": (0.5, 20.0)}

    def pareto_front_index(results):
        def dominated_by(p, q):
            return q[0] >= p[0] and q[1] <= p[1] and q != p

        remaining, rank, out = set(range(len(results))), 0, [0.0] * len(results)
        while remaining:
            front = {i for i in remaining if not any(dominated_by(results[i], results[j]) for j in remaining)}
            for i in front:
                out[i] = float(rank)
            remaining -= front
            rank += 1
        return out

    sh = SuccessiveHalving(RUNGS[:2], eta=2)
    done = sh.run(list(points), lambda c, f: points[c], pareto_front_index)
    # fronts: {a, b, d} then {e} then {c} then {f}; top ceil(6/2) = 3 is the first front
    assert [e.candidate for e in done if e.rung == 1] == ["a", "b", "d"]


def test_hyperband_brackets_spend_the_budget_like_the_paper():
    hb = Hyperband(RUNGS, eta=3)
    assert [(b.start_rung, b.candidates) for b in hb.brackets()] == [(0, 9), (1, 5), (2, 3)]
    counter = iter(range(100))
    asked: list[int] = []

    def ask(n):
        asked.append(n)
        return [next(counter) for _ in range(n)]

    done = hb.run(ask, lambda c, f: c / 100, BY_ACCURACY)
    assert asked == [9, 5, 3]
    # bracket 0: 0..8 at rung 0, top 3 (8, 7, 6) at rung 1, 8 at rung 2
    assert [e.candidate for e in done if e.bracket == 0 and e.rung == 2] == [8]
    # bracket 1 starts at rung 1: 9..13, ceil(5/3) = 2 promoted (13, 12)
    assert [e.candidate for e in done if e.bracket == 1 and e.rung == 2] == [13, 12]
    assert [e.candidate for e in done if e.bracket == 2] == [14, 15, 16]
    assert {e.rung for e in done if e.bracket == 2} == {2}


def _done(rows):
    return [Evaluation(c, rung, acc) for c, rung, acc in rows]


def test_asha_starts_new_candidates_until_one_is_in_the_top_third():
    asha = ASHA(RUNGS, eta=3)
    assert asha.next_job([], BY_ACCURACY) is None
    # two results at rung 0: floor(2/3) = 0 may be promoted yet
    assert asha.next_job(_done([("a", 0, 0.9), ("b", 0, 0.5)]), BY_ACCURACY) is None
    # the third result makes the best of three promotable at once
    done = _done([("a", 0, 0.9), ("b", 0, 0.5), ("c", 0, 0.7)])
    assert asha.next_job(done, BY_ACCURACY) == Job("a", 1)
    # ... but not twice: while it runs, and after it finished at rung 1
    assert asha.next_job(done, BY_ACCURACY, pending=[Job("a", 1)]) is None
    assert asha.next_job(done + _done([("a", 1, 0.92)]), BY_ACCURACY) is None


def test_asha_promotes_from_the_highest_rung_first_and_never_a_failure():
    asha = ASHA(RUNGS, eta=3)
    rung0 = [("a", 0, 0.9), ("b", 0, 0.8), ("c", 0, None), ("d", 0, 0.1), ("e", 0, 0.2), ("f", 0, 0.3)]
    # floor(6/3) = 2: a and b; a is already at rung 1
    done = _done(rung0 + [("a", 1, 0.95)])
    assert asha.next_job(done, BY_ACCURACY) == Job("b", 1)
    # three results at rung 1 -> its best goes to rung 2 before anything else
    done = _done(rung0 + [("a", 1, 0.95), ("b", 1, 0.85), ("x", 1, 0.99)])
    assert asha.next_job(done, BY_ACCURACY) == Job("x", 2)
    # top rung is terminal: nothing above it to promote to; the failure c is never promoted
    done = _done([(c, 0, None) for c in "abcdef"])
    assert asha.next_job(done, BY_ACCURACY) is None


def test_schedulers_reject_bad_settings():
    with pytest.raises(NasError):
        SuccessiveHalving([], eta=3)
    with pytest.raises(NasError):
        ASHA(RUNGS, eta=1)
    with pytest.raises(NasError):
        ladder(Fidelity(4), eta=3, rungs=0)
    with pytest.raises(ValueError):
        top_k([1.0, 2.0], 1, lambda results: [0.0])


def test_fidelity_module_does_not_import_torch():
    code = "import sys, nas.fidelity; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_maximize_maps_failures_to_infinity():
    assert BY_ACCURACY([0.5, None, float("nan")]) == [-0.5, math.inf, math.inf]
