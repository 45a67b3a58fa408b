"""scripts/search.py end to end on tiny.yaml with a small budget: the run folder and resume."""

import json

import onnx
import pytest

from conftest import run_script
from nas.arch import Arch

ARGS = ("--target", "cpu", "--space", "search_spaces/tiny.yaml", "--trials", "3", "--epochs", "2",
        "--fraction", "0.2", "--eta", "3", "--baselines", "0.35,1.0", "--seed", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_script("search.py", *ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_run_folder_holds_everything(run):
    out, result = run
    assert f"run folder: {out}" in result.stdout
    for name in ("config.json", "trials.jsonl", "best.json", "best.onnx", "pareto.json", "pareto.png", "report.md",
                 "manifest.json"):
        assert (out / name).is_file(), name
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3 and all({"number", "arch", "params", "state", "metrics"} <= t.keys() for t in trials)
    best = json.loads((out / "best.json").read_text())
    arch = Arch.parse(best["arch"])
    assert arch.resolution == best["resolution"] == 16
    # the exported model takes the resolution its latency and accuracy were measured at
    model = onnx.load(str(out / "best.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 16, 16]
    assert best["parity_rel_max_abs"] <= 1e-4
    assert abs(best["onnx_accuracy"] - best["accuracy"]) <= 0.01  # ONNX Runtime agrees with PyTorch
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["pareto"] and all({"arch", "accuracy", "latency_ms", "predicted_latency_ms", "flops", "params"}
                                    <= p.keys() for p in pareto["pareto"])
    assert [b["name"] for b in pareto["baselines"]] == ["mobilenet_v2 x0.35", "mobilenet_v2 x1"]
    assert all(b["latency_ms"] > 0 and 0 <= b["accuracy"] <= 1 for b in pareto["baselines"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"seed", "versions", "onnxruntime", "cpu", "latency_table_sha256", "command"} <= manifest.keys()
    # the shipped table's calibration networks timed again here (any machine: only that they were), and
    # the search's predictions scaled by their ratio
    ratio = json.loads((out / "machine_speed.json").read_text())["speed_ratio"]
    assert manifest["latency_table_speed_ratio"] == ratio > 0
    assert f"runs its calibration networks at {ratio:.3f}x their time in the table (now)" in result.stdout
    report = (out / "report.md").read_text()
    assert best["arch"] in report and "MobileNetV2" in report


def test_same_command_resumes_without_retraining(run):
    out, _ = run
    before = (out / "trials.jsonl").read_text()
    again = run_script("search.py", *ARGS, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "3 finished trials" in again.stdout
    assert "their time in the table (when this run started)" in again.stdout  # predicted as before
    assert (out / "trials.jsonl").read_text() == before  # nothing trained twice


def test_a_changed_search_does_not_mix_into_an_existing_folder(run):
    out, _ = run
    result = run_script("search.py", *ARGS[:-1], "2", "--out", str(out))
    assert result.returncode == 2 and "seed" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,fragment", [
    (("--space", "nope.yaml"), "nope.yaml"),
    (("--strategy", "annealing"), "annealing"),
    (("--trials", "0"), "--trials"),
    (("--data", "cifar10:/no/such/folder"), "/no/such/folder"),
    (("--target", "tpu"), "tpu"),
    (("--epochs", "many"), "--epochs"),
    (("--objectives", "reward"), "--latency-target-ms"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, fragment):
    result = run_script("search.py", "--space", "search_spaces/tiny.yaml", *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr


def test_export_script_reuses_the_runs_trained_weights(run, tmp_path):
    out, _ = run
    result = run_script("export.py", str(out), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout)
    best = json.loads((out / "best.json").read_text())
    assert "using trained weights" in result.stderr
    assert row["arch"] == best["arch"] and row["parity_rel_max_abs"] <= 1e-4
    assert row["onnx_accuracy"] == best["onnx_accuracy"]


def test_help_states_each_default_once():
    result = run_script("search.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "(default: cpu)" in text and "(default: 300)" in text  # --target, --trials
    # options whose help already names the default get no second one
    assert "(default: the space's) (default" not in text and "(default: --epochs) (default" not in text
