"""Pareto utilities against hand-computed fronts, crowding distances and hypervolumes."""

import itertools
import math
import random

import pytest

from nas.pareto import crowding_distance, dominates, hypervolume, non_dominated_sort, pareto_front, pareto_trials
from nas.trial import COMPLETE, FAIL, PRUNED, Trial

INF = math.inf


@pytest.mark.parametrize("a, b, expected", [
    ((2, 2), (1, 1), True),
    ((2, 1), (1, 1), True),
    ((1, 1), (1, 1), False),   # equal points do not dominate each other
    ((2, 0), (1, 1), False),   # a trade-off
    ((1, 1), (2, 2), False),
])
def test_dominates(a, b, expected):
    assert dominates(a, b) is expected


@pytest.mark.parametrize("points, fronts", [
    ([], []),
    ([(3,), (1,), (3,), (2,)], [[0, 2], [3], [1]]),
    ([(1, 5), (2, 4), (3, 3), (2, 2), (1, 1), (3, 3)], [[0, 1, 2, 5], [3], [4]]),
    ([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)], [[0, 1, 2], [3]]),
    ([(0, 0), (1, 1), (2, 2)], [[2], [1], [0]]),
])
def test_non_dominated_sort(points, fronts):
    assert non_dominated_sort(points) == fronts
    assert pareto_front(points) == (fronts[0] if fronts else [])


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(1, 2)], [INF]),
    ([(1, 2), (2, 1)], [INF, INF]),
    ([(1, 1), (1, 1), (1, 1)], [0.0, 0.0, 0.0]),          # all tied: no spread to reward
    # obj 0 gives (5-0)/10 and (10-1)/10, obj 1 gives (10-5)/10 and (9-0)/10
    ([(0, 10), (1, 9), (5, 5), (10, 0)], [INF, 1.0, 1.8, INF]),
])
def test_crowding_distance(points, expected):
    assert crowding_distance(points) == pytest.approx(expected)


@pytest.mark.parametrize("points, reference, volume", [
    ([], (0, 0), 0.0),
    ([(3,), (5,)], (1,), 4.0),
    ([(2, 3)], (1, 1), 2.0),
    ([(1, 3), (2, 2), (3, 1)], (0, 0), 6.0),                  # staircase 3 + 2 + 1
    ([(1, 3), (2, 2), (3, 1), (1, 1), (2, 2)], (0, 0), 6.0),  # dominated and duplicate points add nothing
    ([(1, 3), (-1, 5)], (0, 0), 3.0),                        # a point not beating the reference adds nothing
    ([(-1, -1)], (-3, -2), 2.0),                              # negated costs: references may be negative
    ([(1, 1, 1)], (0, 0, 0), 1.0),
    ([(2, 2, 2), (1, 1, 1)], (0, 0, 0), 8.0),
    ([(2, 1, 1), (1, 2, 1), (1, 1, 2)], (0, 0, 0), 4.0),      # 3 * 2 - 3 * 1 + 1 by inclusion-exclusion
    ([(2, 1, 1, 1), (1, 2, 1, 1)], (0, 0, 0, 0), 3.0),
])
def test_hypervolume_table(points, reference, volume):
    assert hypervolume(points, reference) == pytest.approx(volume)


def test_hypervolume_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="every point needs 2 objectives"):
        hypervolume([(1, 2, 3)], (0, 0))


def _lattice_volume(points, side):
    """Independent exact count: unit cells of [0, side]^n covered by some point's box."""
    n = len(points[0])
    return sum(
        any(all(c + 1 <= p[k] for k, c in enumerate(cell)) for p in points)
        for cell in itertools.product(range(side), repeat=n)
    )


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_matches_lattice_count(n, seed):
    rng = random.Random(seed)
    side = 5
    points = [tuple(rng.randint(1, side) for _ in range(n)) for _ in range(rng.randint(1, 9))]
    assert hypervolume(points, (0,) * n) == pytest.approx(_lattice_volume(points, side))


def test_pareto_trials_skips_failed_trials():
    def trial(number, state, values):
        return Trial(number, {}, "a", state, values)

    trials = [trial(0, COMPLETE, (1.0, -2.0)), trial(1, FAIL, None), trial(2, PRUNED, (2.0, -3.0)),
              trial(3, COMPLETE, (0.5, -2.5))]
    assert [t.number for t in pareto_trials(trials)] == [0, 2]
