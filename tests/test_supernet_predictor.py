"""The accuracy predictor fitted on supernet evaluations (nas.surrogate.fit_predictor)."""

import math
import random

import numpy as np
import pytest

from nas.cost import arch_cost
from nas.errors import NasError
from nas.surrogate import Featurizer, fit_predictor


def test_decision_features_match_the_row_by_row_features(spaces):
    for name in ("mnasnet", "mobilenetv2"):
        space = spaces[name]
        rng = random.Random(0)
        points = [space.sample(rng) for _ in range(30)]
        featurizer = Featurizer(space, summaries=False, hyperparameters=False)
        matrix = featurizer.matrix(points)
        assert matrix.shape == (30, len(featurizer.names))
        assert np.array_equal(matrix, np.array([featurizer.features(p) for p in points]))
        assert not any(n.startswith("hp.") for n in featurizer.names)


def test_predictor_ranks_held_out_points_and_is_deterministic(spaces):
    space = spaces["mnasnet"]
    rng = random.Random(0)
    points = [space.sample(rng) for _ in range(300)]
    # a target the decisions determine: log FLOPs of the decoded network
    target = [math.log10(arch_cost(space.decode(p, 32), 10).flops) for p in points]
    predictor = fit_predictor(space, points, target, seed=0)
    assert predictor.holdout.n_holdout == 60 and predictor.holdout.kendall > 0.6
    fresh = [space.sample(rng) for _ in range(50)]
    again = fit_predictor(space, points, target, seed=0)
    assert np.array_equal(predictor.predict_many(fresh), again.predict_many(fresh))
    assert predictor.predict(fresh[0]) == pytest.approx(float(predictor.predict_many(fresh[:1])[0]))
    with pytest.raises(NasError, match="at least 10"):
        fit_predictor(space, points[:5], target[:5])
