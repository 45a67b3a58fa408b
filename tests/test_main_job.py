"""scripts/search.py end to end on tiny.yaml with a small budget: the run folder (splits, seeds, error
bars, verdicts), resume across phases, and the bad inputs."""

import json
import random
import re
import shutil

import onnx
import pytest

from conftest import run_script
from nas.arch import Arch
from nas.config import RUN_FORMAT, SearchConfig, add_config_arguments, check_resumable, config_from_args
from nas.errors import NasError
from nas.pipeline import Setup, select_front
from nas.report import Point, verdicts
from nas.space import load_space
from nas.trial import COMPLETE, Trial

ARGS = ("--target", "cpu", "--space", "search_spaces/tiny.yaml", "--evaluator", "supernet", "--supernet-epochs", "2",
        "--trials", "48",
        "--final-epochs", "2", "--final-seeds", "2", "--front-size", "3", "--baselines", "0.35,1.0",
        "--workers", "1", "--seed", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_script("search.py", *ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_run_folder_holds_everything(run):
    out, result = run
    assert f"run folder: {out}" in result.stdout
    for name in ("config.json", "window.json", "trials.jsonl", "finals.jsonl", "measured.json", "best.json",
                 "best.onnx", "pareto.json", "pareto.png", "report.md", "manifest.json", "supernet"):
        assert (out / name).exists(), name
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 48 and all(t["metrics"]["accuracy_source"] == "supernet" for t in trials)
    # the supernet's health is printed and reported, with the warning exactly where it scores near chance
    health = re.search(r"supernet: 20 random subnets score ([\d.]+)% on average", result.stdout)
    assert health and f"- supernet: 20 random subnets score {health.group(1)}%" in (out / "report.md").read_text()
    assert ("WARNING: the supernet scores random subnets" in result.stdout) == (float(health.group(1)) < 32.5)
    best = json.loads((out / "best.json").read_text())
    assert Arch.parse(best["arch"]).resolution == best["resolution"] == 16
    model = onnx.load(str(out / "best.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]
    assert best["parity_rel_max_abs"] <= 1e-4

    pareto = json.loads((out / "pareto.json").read_text())
    keys = {"test_accuracy_mean", "test_accuracy_std", "seeds", "latency_ms"}
    assert pareto["pareto"] and all(keys <= p.keys() and p["seeds"] == [0, 1] for p in pareto["pareto"])
    assert [b["name"] for b in pareto["baselines"]] == ["mobilenet_v2 x0.35", "mobilenet_v2 x1"]
    assert all(keys <= b.keys() and b["latency_ms"] > 0 for b in pareto["baselines"])
    # every mean and std is the finals journal's: two seeds per network, scored on the test split
    finals = [json.loads(line) for line in (out / "finals.jsonl").read_text().splitlines()]
    for p in pareto["pareto"] + pareto["baselines"]:
        runs = sorted((f["seed"], f["test_accuracy"]) for f in finals if f["arch"] == p["arch"])
        assert [s for s, _ in runs] == [0, 1]
        values = [a for _, a in runs]
        assert p["test_accuracy_mean"] == pytest.approx(sum(values) / 2)
        assert p["test_accuracy_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert [v["name"] for v in pareto["verdicts"]] == ["mobilenet_v2 x0.35", "mobilenet_v2 x1"]
    assert all({"name", "beaten", "ratio", "by"} <= v.keys() for v in pareto["verdicts"])
    # the winner's ONNX model is scored on the same test split as its seed-0 PyTorch training
    seed0 = next(f for f in finals if f["arch"] == best["arch"] and f["seed"] == 0)
    assert abs(best["onnx_test_accuracy"] - seed0["test_accuracy"]) <= 0.01
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"seed", "versions", "onnxruntime", "cpu", "latency_table", "command"} <= manifest.keys()
    report = (out / "report.md").read_text()
    assert best["arch"] in report and "±" in report and "Verdicts" in report


@pytest.mark.slow
def test_default_search_trains_from_scratch_inside_the_window_from_the_fastest_network_up(tmp_path):
    """The default evaluator is short training from scratch; the search stays below the slowest baseline's
    measured latency / 1.8, starts from points spread from the space's fastest network upwards, and
    compares candidates within the latency bands the baselines' bars cut (the trials' second value)."""
    out = tmp_path / "scratch"
    result = run_script("search.py", "--target", "cpu", "--space", "search_spaces/tiny.yaml", "--trials", "10",
                        "--epochs", "1", "--final-epochs", "1", "--final-seeds", "2", "--front-size", "2",
                        "--baselines", "0.35,1.0", "--workers", "1", "--seed", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["evaluator"] == "scratch"
    window = json.loads((out / "window.json").read_text())
    slowest = float(window["reason"].split(" at ")[1].split(" ms")[0])
    assert window["limit_ms"] == pytest.approx(slowest / 1.8, rel=1e-3)
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 10 and all(t["metrics"]["predicted_latency_ms"] <= window["limit_ms"] for t in trials)
    by_number = sorted(trials, key=lambda t: t["number"])
    start = [t["metrics"]["predicted_latency_ms"] for t in by_number[:8]]
    assert start == sorted(start) and start[0] == min(t["metrics"]["predicted_latency_ms"] for t in trials)
    assert "search window: latency below" in (out / "report.md").read_text()
    bands = window["bands"]
    assert len(bands) == 2 and bands[-1] == pytest.approx(window["limit_ms"] / 1.15, rel=1e-3)
    for t in trials:
        below = sum(b < t["metrics"]["predicted_latency_ms"] for b in bands)
        assert t["values"][1] == -below, t


@pytest.mark.slow
def test_same_command_resumes_without_redoing_anything(run):
    out, _ = run
    before = {name: (out / name).read_text() for name in ("trials.jsonl", "finals.jsonl", "measured.json")}
    again = run_script("search.py", *ARGS, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "final trainings:" not in again.stdout
    assert "measuring" not in again.stdout
    for name, text in before.items():
        assert (out / name).read_text() == text, name


@pytest.mark.slow
def test_interrupted_final_phase_resumes_where_it_stopped(run, tmp_path):
    """Ctrl-C after the first final training: the rerun keeps it and trains only the rest, and the run
    ends with the same trainings as the uninterrupted one."""
    from nas.pipeline import run_main_job

    full, _ = run
    out = tmp_path / "tiny"
    args = dict(space="search_spaces/tiny.yaml", evaluator="supernet", supernet_epochs=2, trials=48, final_epochs=2, final_seeds=2,
                front_size=3, baselines=(0.35, 1.0), workers=1, seed=1)
    lines = []

    def interrupting(line: str) -> None:
        lines.append(line)
        if line.startswith("[final 1/"):
            raise KeyboardInterrupt

    # the same latency measurements as the uninterrupted run (timing noise would move the search window)
    out.mkdir()
    for name in ("window.json", "measured.json"):
        shutil.copy(full / name, out / name)
    with pytest.raises(KeyboardInterrupt):
        run_main_job(SearchConfig(**args), out, interrupting)
    first = (out / "finals.jsonl").read_text().splitlines()
    assert len(first) == 1
    resumed = []
    run_main_job(SearchConfig(**args), out, resumed.append)
    assert any("1 kept from before" in line for line in resumed)
    after = (out / "finals.jsonl").read_text().splitlines()
    assert after[0] == first[0]

    def results(folder):
        rows = [json.loads(line) for line in (folder / "finals.jsonl").read_text().splitlines()]
        return sorted((r["arch"], r["seed"], r["test_accuracy"]) for r in rows)

    assert results(out) == results(full)  # seeded: resumed equals uninterrupted


def point(name, latency, mean, std=0.0):
    return Point(name, "i16-x", latency, 0.0, None, None, None, mean, std, mean, (0, 1, 2), 0, 0)


def test_verdicts_follow_the_rule_with_margins():
    base = [point("b fast", 1.0, 0.90, 0.01), point("b slow", 4.0, 0.95, 0.02)]
    front = [point("p1", 0.5, 0.91, 0.01), point("p2", 2.0, 0.96, 0.02), point("p3", 0.3, 0.80)]
    rows = {v.name: v for v in verdicts(front, base)}
    assert rows["b fast"].by == "p1" and rows["b fast"].ratio == pytest.approx(0.5) and rows["b fast"].beaten
    assert rows["b fast"].accuracy_margin == pytest.approx(0.01)
    assert rows["b fast"].margin_std == pytest.approx(2 ** 0.5 * 0.01)
    assert rows["b slow"].by == "p2" and rows["b slow"].ratio == pytest.approx(0.5) and rows["b slow"].beaten
    slower = verdicts([point("p", 0.6, 0.99)], [point("b", 1.0, 0.9)])[0]
    assert not slower.beaten and slower.ratio == pytest.approx(0.6)  # 1/0.6 = 1.67x < 1.8x
    less_accurate = verdicts([point("p", 0.1, 0.89)], [point("b", 1.0, 0.9)])[0]
    assert not less_accurate.beaten and less_accurate.by is None and less_accurate.ratio is None


def test_the_front_holds_each_architecture_once_even_when_the_search_asked_for_it_twice(tmp_path):
    """A supernet scores a repeated architecture the same, so both trials are non-dominated; the final
    phase must train it once (two copies would each add seeds 0 and 1 to the finals journal)."""
    space = load_space("search_spaces/tiny.yaml")
    rng = random.Random(0)
    archs = [space.decode(space.sample(rng)) for _ in range(3)]
    scored = [(archs[0], 0.9, 0.30), (archs[0], 0.9, 0.30), (archs[1], 0.8, 0.20), (archs[2], 0.7, 0.10)]
    trials = [Trial(i, {}, a.to_string(), COMPLETE, (acc, -ms), {"accuracy": acc, "predicted_latency_ms": ms})
              for i, (a, acc, ms) in enumerate(scored)]
    setup = Setup(SearchConfig(front_size=8), space, space, None, None, tmp_path)
    front = select_front(setup, trials)
    assert [c.name for c in front] == ["trial 3", "trial 2", "trial 0"]
    assert len({c.arch.to_string() for c in front}) == 3


def test_parser_is_generated_from_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(["--baselines", "0.5,1", "--search-hparams", "--evaluator",
                                                 "scratch", "--strategy-options", '{"population_size": 5}']))
    assert config.baselines == (0.5, 1.0) and config.search_hparams and config.evaluator == "scratch"
    assert config.strategy_options == {"population_size": 5}
    assert config_from_args(parser.parse_args([])) == SearchConfig()


def test_a_run_folder_of_an_older_version_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"space": "search_spaces/mnasnet.yaml", "trials": 300}))
    with pytest.raises(NasError, match="older version.*delete"):
        check_resumable(tmp_path, SearchConfig())
    (tmp_path / "config.json").write_text(json.dumps({"format": RUN_FORMAT, **SearchConfig(seed=4).to_dict()}))
    with pytest.raises(NasError, match="seed=4"):
        check_resumable(tmp_path, SearchConfig())
    check_resumable(tmp_path, SearchConfig(seed=4, trials=10))  # budgets may grow


@pytest.mark.parametrize("args,fragment", [
    (("--space", "nope.yaml"), "nope.yaml"),
    (("--strategy", "annealing"), "annealing"),
    (("--trials", "0"), "--trials"),
    (("--data", "cifar10:/no/such/folder"), "/no/such/folder"),
    (("--evaluator", "oracle"), "--evaluator"),
    (("--search-hparams", "--evaluator", "supernet"), "--search-hparams"),
    (("--final-seeds", "0"), "--final-seeds"),
    (("--baselines", "0,1"), "--baselines"),
    (("--target", "tpu"), "tpu"),
    (("--epochs", "many"), "--epochs"),
    (("--objectives", "reward"), "--latency-target-ms"),
    (("--latency-limit-ms", "0.0001"), "--latency-limit-ms"),
    # hyperparameters are not searched without --search-hparams: a grid over one is a mistake
    (("--strategy", "grid", "--strategy-options", '{"only": ["hp.lr"]}'), "hp.lr"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, fragment):
    result = run_script("search.py", "--space", "search_spaces/tiny.yaml", *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "supernet").exists()  # found before any training
    assert not (tmp_path / "r" / "measured.json").exists()  # and before any measurement


def test_help_states_each_default_once():
    result = run_script("search.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "(default: cpu)" in text and "(default: scratch)" in text
    assert "(default: the space's) (default" not in text


@pytest.mark.slow
def test_export_script_reuses_the_runs_trained_weights(run, tmp_path):
    out, _ = run
    result = run_script("export.py", str(out), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout)
    best = json.loads((out / "best.json").read_text())
    assert "using trained weights" in result.stderr
    assert row["arch"] == best["arch"] and row["parity_rel_max_abs"] <= 1e-4
    assert row["split"] == "test" and row["onnx_accuracy"] == best["onnx_test_accuracy"]
