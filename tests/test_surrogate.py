"""The strategy benchmark's accuracy predictor, its shipped training runs, and its objective code path."""

import importlib.util
import json
import random

import numpy as np
import pytest

from nas.errors import NasError
from nas.fidelity import Fidelity
from nas.space import load_space
from nas.surrogate import (COLLECT_FIDELITY, RUNS_DIR, AccuracyPredictor, BenchmarkObjective, Featurizer, collect,
                           evals_to_reach, latency_from_flops, latency_from_table, load_runs, median_evals,
                           run_strategy, sample_point)

from conftest import ROOT, SPACES

BENCHED = ("mnasnet", "mobilenetv2")
MIN_SHIPPED_RUNS = 100


def _script_main(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predictors():
    return {name: AccuracyPredictor.from_file(load_space(SPACES / f"{name}.yaml")) for name in BENCHED}


@pytest.mark.parametrize("name", BENCHED)
def test_shipped_runs_are_real_trainings_of_the_space(name):
    space = load_space(SPACES / f"{name}.yaml")
    header, runs = load_runs(RUNS_DIR / f"{name}.json", space)
    assert header["dataset"] == "digits" and header["fidelity"] == COLLECT_FIDELITY.to_dict()
    assert len(runs) >= MIN_SHIPPED_RUNS
    assert [run.index for run in runs] == list(range(len(runs)))
    for run in runs[:20]:  # each run is the point its index names, decoded at the training resolution
        assert run.params == sample_point(space, run.index, header["sample_seed"])
        assert run.arch == space.decode(run.params, resolution=COLLECT_FIDELITY.resolution).to_string()
    accuracies = [run.accuracy for run in runs if run.accuracy is not None]
    assert all(0 <= a <= 1 for a in accuracies) and max(accuracies) > 0.8 and min(accuracies) < 0.2


@pytest.mark.parametrize("name", BENCHED)
def test_predictor_has_positive_held_out_spearman(predictors, name):
    quality = predictors[name].cross_validate(folds=5)
    assert quality["spearman_mean"] > 0.3 and quality["spearman_pooled"] > 0.3
    assert all(s > 0 for s in quality["spearman_per_fold"])


def test_predictor_is_deterministic(predictors):
    space = predictors["mnasnet"].space
    again = AccuracyPredictor.from_file(space)
    rng = random.Random(3)
    points = [space.sample(rng) for _ in range(20)]
    first = predictors["mnasnet"].predict_many(points)
    assert np.array_equal(first, again.predict_many(points))
    assert [predictors["mnasnet"].predict(p) for p in points] == pytest.approx(list(first), abs=1e-12)
    assert all(0 <= a <= 1 for a in first)


def test_features_ignore_choices_that_do_not_change_the_network(spaces):
    space = spaces["mobilenetv2"]
    featurize = Featurizer(space)
    params = space.sample(random.Random(0)) | {"s3.layers": 3}
    unused = params | {"s3.l4.kernel": 3 if params["s3.l4.kernel"] != 3 else 5}  # layer 4 of a 3-layer stage
    assert featurize.features(unused) == featurize.features(params)
    used = params | {"s3.l0.kernel": 3 if params["s3.l0.kernel"] != 3 else 5}
    assert featurize.features(used) != featurize.features(params)
    mnas = spaces["mnasnet"]
    point = mnas.sample(random.Random(1)) | {"s2.op": "ds"}
    assert Featurizer(mnas).features(point | {"s2.expansion": 3}) == Featurizer(mnas).features(point | {"s2.expansion": 6})
    assert len(featurize.features(params)) == len(featurize.names)


def test_benchmark_objective_and_loop_on_a_tiny_budget(predictors):
    predictor = predictors["mnasnet"]
    space = predictor.space
    latency, source = latency_from_flops(space, 10)
    objective = BenchmarkObjective(space, predictor, latency, source, n_target=50)
    assert objective.target_ms > 0 and objective.reference == (0.1, -2.0)
    runs = {}
    for name, mode, options in [("random", "reward", {}), ("evolution", "reward", {"population_size": 4, "sample_size": 2}),
                                ("evolution", "pareto", {"population_size": 4, "sample_size": 2}),
                                ("nsga2", "pareto", {"population_size": 4}), ("rl", "reward", {}),
                                ("grid", "reward", {"only": ("width_mult",)})]:
        evaluated = run_strategy(name, objective, seed=1, budget=12, mode=mode, options=options)
        assert evaluated == run_strategy(name, objective, seed=1, budget=12, mode=mode, options=options)  # deterministic
        runs[name, mode] = evaluated
        for m in evaluated:
            assert 0 <= m["accuracy"] <= 1 and m["latency_ms"] > 0
            assert m["reward"] == pytest.approx(m["accuracy"] * (m["latency_ms"] / objective.target_ms) ** -0.07)
        assert objective.hypervolume(evaluated) >= 0
    assert len(runs["random", "reward"]) == 12
    assert len(runs["grid", "reward"]) == 5  # exhausted: the 5 global widths, every other decision fixed
    best = max(m["reward"] for m in runs["random", "reward"])
    assert evals_to_reach(runs["random", "reward"], best) <= 12
    assert evals_to_reach(runs["random", "reward"], best + 1) is None
    assert median_evals([3, None, 5]) == 5 and median_evals([None, None, 4]) is None and median_evals([2, 4]) == 3
    with pytest.raises(NasError, match="mode"):
        run_strategy("random", objective, 0, 3, mode="both")


def test_bench_script_tiny_run_writes_the_nested_json(tmp_path, capsys):
    bench = _script_main("bench_strategies")
    out = tmp_path / "bench.json"
    code = bench.main(["--spaces", "search_spaces/mnasnet.yaml", "--seeds", "2", "--budget", "10",
                       "--strategies", "random", "evolution", "rl", "--flops-latency", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {"mnasnet", "meta"}
    assert set(report["mnasnet"]) == {"random", "evolution", "evolution-pareto", "rl"}
    for figures in report["mnasnet"].values():
        for key in ("hypervolume_mean", "hypervolume_std", "best_reward_mean", "best_reward_std", "evals_to_random_best_300"):
            assert key in figures
    assert report["meta"]["flops_latency_standin"] is True
    assert "STAND-IN" in report["meta"]["spaces"]["mnasnet"]["latency"]
    assert "evolution-pareto" in capsys.readouterr().out


def test_bench_script_missing_table_is_one_line(tmp_path, capsys):
    bench = _script_main("bench_strategies")
    code = bench.main(["--spaces", "search_spaces/mnasnet.yaml", "--tables", str(tmp_path), "--budget", "5"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mnasnet-r32-cpu-t1-b1.json: no such latency table" in lines[0]
    with pytest.raises(NasError, match="no such latency table"):
        latency_from_table(load_space(SPACES / "mnasnet.yaml"), tmp_path / "none.json")


def test_collect_appends_and_resumes(tmp_path, spaces):
    space, path = spaces["tiny"], tmp_path / "tiny.json"
    fidelity = Fidelity(epochs=1, fraction=0.05, resolution=8)
    first = collect(space, path, 1, fidelity=fidelity, log=lambda line: None)
    both = collect(space, path, 2, fidelity=fidelity, log=lambda line: None)
    assert both[0] == first[0] and [r.index for r in both] == [0, 1]
    assert load_runs(path, space)[1] == both
    with pytest.raises(NasError, match="fidelity"):
        collect(space, path, 3, fidelity=Fidelity(epochs=2, fraction=0.05, resolution=8), log=lambda line: None)
