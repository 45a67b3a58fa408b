"""Pareto utilities for objective vectors in which every entry is maximised (as in ``Trial.values``).

Non-dominated sorting and crowding distance are NSGA-II's (Deb et al. 2002); the hypervolume is exact:
a sweep in 2-D and the WFG recursion (While et al. 2012) above, which is fast for the few objectives
and small fronts a search produces.
"""

from __future__ import annotations

import math
from typing import Sequence

from nas.trial import Trial

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (maximisation)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """Indices of ``points`` grouped into fronts, best first; each front keeps the input order."""
    n = len(points)
    beaten_by = [0] * n  # how many points dominate i
    beats: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                beats[i].append(j)
                beaten_by[j] += 1
            elif dominates(points[j], points[i]):
                beats[j].append(i)
                beaten_by[i] += 1
    fronts = []
    front = [i for i in range(n) if beaten_by[i] == 0]
    while front:
        fronts.append(front)
        following = []
        for i in front:
            for j in beats[i]:
                beaten_by[j] -= 1
                if beaten_by[j] == 0:
                    following.append(j)
        front = sorted(following)
    return fronts


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points, in input order (duplicates of a front point all count)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def pareto_trials(trials: Sequence[Trial]) -> list[Trial]:
    """The finished trials (COMPLETE or PRUNED, with values) that no other finished trial dominates."""
    done = [t for t in trials if t.ok]
    return [done[i] for i in pareto_front([t.values for t in done])]


def crowding_distance(points: Sequence[Point]) -> list[float]:
    """NSGA-II crowding distance of each point within its front: larger means a lonelier point.

    Per objective, the extremes get ``inf`` and the others the normalised gap between their
    neighbours; an objective on which all points tie adds nothing. A front of one or two points is
    all extremes.
    """
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        if high == low:
            continue
        distance[order[0]] = distance[order[-1]] = math.inf
        for k in range(1, n - 1):
            distance[order[k]] += (points[order[k + 1]][m] - points[order[k - 1]][m]) / (high - low)
    return distance


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume dominated by ``points`` and bounded below by ``reference`` (all objectives maximised).

    Points that do not strictly beat the reference in every objective add nothing.
    """
    if any(len(p) != len(reference) for p in points):
        raise ValueError(f"every point needs {len(reference)} objectives, like the reference {tuple(reference)}")
    ref = tuple(-float(r) for r in reference)  # minimise internally: the reference is the upper corner
    flipped = [tuple(-float(x) for x in p) for p in points]
    inside = [p for p in flipped if all(x < r for x, r in zip(p, ref))]
    return _wfg(_minimal(inside), ref)


def _minimal(points: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """The distinct non-dominated points under minimisation, sorted by the first objective."""
    unique = sorted(set(points))
    return [p for p in unique if not any(q != p and all(a <= b for a, b in zip(q, p)) for q in unique)]


def _wfg(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Exact hypervolume of mutually non-dominated ``points`` (minimisation) sorted by objective 0."""
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - points[0][0]
    if len(ref) == 2:
        # sorted by x ascending, so y descends along the front: a staircase of slabs
        total, y_above = 0.0, ref[1]
        for x, y in points:
            total += (ref[0] - x) * (y_above - y)
            y_above = y
        return total
    total = 0.0
    for i, p in enumerate(points):
        box = math.prod(r - x for x, r in zip(p, ref))
        # the part of p's box already covered by later points, each clipped to p's box
        limited = [tuple(max(a, b) for a, b in zip(p, q)) for q in points[i + 1 :]]
        total += box - _wfg(_minimal(limited), ref)
    return total
