"""Latency: targets, the measurement protocol, table building/resume, prediction, validation, CLIs.

Never asserts wall-clock times: the machine may be busy. Builds use a one-session protocol on a
micro space (nine entries) so that the whole file stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nas.blocks import resolve
from nas.errors import NasError
from nas.references import reference
from nas.latency import build, measure
from nas.latency.build import build_table, sample_archs
from nas.export import export_onnx
from nas.latency.measure import (BusyMonitor, Measurement, Protocol, faster, measure_archs, measure_models,
                                 measurement_lock, training_lock)
from nas.latency.table import Calibration, LatencyTable, MissingEntryError, TableMismatchWarning, default_table_path
from nas.latency.targets import PROVIDERS, Target, _session_options, get_target
from nas.latency.validate import validate_table
from nas.space import block_contexts, load_space

ROOT = Path(__file__).resolve().parents[1]
TINY_TABLE = ROOT / "latency_tables" / "tiny-r16-cpu-t1-b1.json"
FAST = Protocol(warmup=1, min_runs=2, max_runs=3, session_seconds=0, sessions=1, retries=0, reference=False)

MICRO = textwrap.dedent("""\
    name: micro
    resolution: 16
    width_mult: [1.0]
    choice_per: block
    stem:
      - {op: conv, kernel: 3, stride: 2, channels: 8}
    head: {channels: 16, pool: avg}
    defaults: {op: [ir, ds], expansion: [3], kernel: [3], se: [0], skip: [true], width: [1.0], act: relu}
    stages:
      - {channels: 8, stride: 1, layers: [1, 2]}
      - {channels: 16, stride: 2, layers: [1, 2]}
    hyperparameters:
      optimizer: {type: categorical, choices: [sgd]}
      lr: {type: log_float, low: 0.001, high: 0.1}
      batch_size: {type: int, low: 32, high: 64, step: 32}
""")


@pytest.fixture
def micro(tmp_path):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    return load_space(path)


@pytest.fixture
def micro_table(micro, tmp_path):
    return build_table(micro, get_target("cpu"), tmp_path / "micro.json", protocol=FAST, calibration_archs=6,
                       progress=False)


def _all_keys(space, num_classes):
    blocks, heads = block_contexts(space, num_classes)
    return {b.key for b in blocks} | {h.key for h in heads}


# --- targets ------------------------------------------------------------------------------------


def test_cpu_target_defaults():
    target = get_target("cpu")
    assert (target.threads, target.batch, target.providers) == (1, 1, ["CPUExecutionProvider"])
    options = _session_options(1)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert Target.from_dict(get_target("cpu", threads=2, batch=4).to_dict()) == Target("cpu", 2, 4)


def test_unknown_and_unavailable_targets():
    with pytest.raises(NasError, match="unknown target 'gpu'; known targets: cpu, cuda"):
        get_target("gpu")
    missing = [name for name, provider in PROVIDERS.items() if provider not in ort.get_available_providers()]
    assert missing, "every execution provider is installed: nothing to test"
    with pytest.raises(NasError, match=f"target '{missing[0]}' needs ONNX Runtime's {PROVIDERS[missing[0]]}"):
        get_target(missing[0])
    with pytest.raises(NasError, match="threads must be a positive integer"):
        get_target("cpu", threads=0)


# --- measurement protocol -------------------------------------------------------------------------


def test_protocol_rejects_bad_settings():
    with pytest.raises(NasError, match="sessions must be at least 1"):
        Protocol(sessions=0)
    with pytest.raises(NasError, match="max_runs"):
        Protocol(min_runs=10, max_runs=5)
    with pytest.raises(NasError, match="aggregate"):
        Protocol(aggregate="mean")


def test_sessions_interleave_and_disagreeing_ones_retry(monkeypatch):
    # model 1's first three sessions disagree (noise): it alone gets a second round, and the best wins
    script = {0: [1.0, 1.02, 1.01], 1: [2.0, 3.0, 2.05, 2.01, 2.02, 2.0]}
    calls = []

    def fake_session(target, model, protocol):
        calls.append(model)
        return np.full(4, round(script[model][sum(c == model for c in calls) - 1] * 1e6))

    monkeypatch.setattr(measure, "_time_session", fake_session)
    result = measure_models([0, 1], get_target("cpu"), Protocol(sessions=3, retries=1, spread_tol=0.1, reference=False))
    assert calls == [0, 1, 0, 1, 0, 1, 1, 1, 1]
    assert result[0].sessions_ms == (1.0, 1.02, 1.01) and result[0].median_ms == 1.0
    assert result[1].median_ms == 2.0 and len(result[1].sessions_ms) == 6
    assert result[1].stable and result[1].spread == pytest.approx(0.005, rel=1e-6)
    assert result[0].count == 12


def test_median_aggregate_and_unstable_flag(monkeypatch):
    medians = iter([1.0, 2.0, 4.0])
    monkeypatch.setattr(measure, "_time_session", lambda t, m, p: np.full(3, round(next(medians) * 1e6)))
    (m,) = measure_models([0], get_target("cpu"), Protocol(sessions=3, retries=0, aggregate="median", reference=False))
    assert m.median_ms == 2.0 and m.spread == 3.0 and not m.stable


class _ScriptedMonitor:
    """Stands in for BusyMonitor: the reference block's slowdown before and after each round."""

    def __init__(self, slowdowns):
        self.slowdowns = iter(slowdowns)

    def slowdown(self):
        return next(self.slowdowns)


@pytest.mark.parametrize("medians, slowdown, stable", [
    ([1.05, 1.0], 0.3, False),  # the best session ran while the reference block was 30% slow
    ([1.0, 1.05], 0.01, True),  # the best session ran on a quiet machine
])
def test_busy_round_marks_its_sessions(monkeypatch, medians, slowdown, stable):
    values = iter(medians)
    monkeypatch.setattr(measure, "_time_session", lambda t, m, p: np.full(3, round(next(values) * 1e6)))
    monitor = _ScriptedMonitor([0.0, 0.01, 0.3, 0.02])  # round 1 quiet, round 2 busy at its start
    (m,) = measure_models([0], get_target("cpu"), Protocol(sessions=2, retries=0), monitor)
    assert (m.median_ms, m.slowdown, m.stable) == (min(medians), slowdown, stable)


def test_measure_archs_measures_unstable_ones_again(micro, monkeypatch):
    def result(ms, stable):
        return Measurement(ms, ms, ms, 3, (ms,), 0.0, 0.0 if stable else 0.5, stable)

    rounds = iter([[result(2.0, False), result(1.0, True)], [result(1.5, True)]])
    calls = []
    monkeypatch.setattr(measure, "measure_models", lambda models, *a: calls.append(len(models)) or next(rounds))
    first, second = measure_archs(sample_archs(micro, 2, seed=0), get_target("cpu"), FAST, num_classes=10)
    assert calls == [2, 1] and (first.median_ms, first.stable) == (1.5, True) and second.median_ms == 1.0
    assert faster(result(1.0, False), result(1.2, True)).median_ms == 1.0  # noise only adds time


def test_real_measurement_statistics(micro):
    archs = sample_archs(micro, 2, seed=0)
    protocol = Protocol(warmup=2, min_runs=5, max_runs=5, sessions=2, retries=0)
    monitor = BusyMonitor(get_target("cpu"), protocol)
    assert monitor.reference_ms > 0 and monitor.slowdown() >= 0
    models = [export_onnx(arch, num_classes=10) for arch in archs]
    for m in measure_models(models, get_target("cpu"), protocol, monitor):
        assert m.count == 10 and len(m.sessions_ms) == 2 and m.slowdown >= 0
        assert 0 < m.p10_ms <= m.p90_ms and m.median_ms == min(m.sessions_ms)
        assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_lock_is_reentrant_and_refuses_measuring_inside_training():
    with measurement_lock(), measurement_lock():
        pass
    with training_lock(), pytest.raises(RuntimeError, match="inside training_lock"):
        with measurement_lock():
            pass


def test_lock_excludes_other_processes(tmp_path, monkeypatch):
    lock = tmp_path / "nas.lock"
    monkeypatch.setattr(measure, "LOCK_PATH", lock)
    probe = textwrap.dedent(f"""
        import fcntl
        with open({str(lock)!r}, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("free")
            except BlockingIOError:
                print("held")
    """)
    def other_process_sees() -> str:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip()

    with measurement_lock():
        assert other_process_sees() == "held"
    with training_lock():  # shared: other trainings may run, a measurement (exclusive) may not
        assert other_process_sees() == "held"
    assert other_process_sees() == "free"


# --- building, resuming, saving ------------------------------------------------------------------


def test_build_covers_every_context_and_round_trips(micro_table, micro, tmp_path):
    assert set(micro_table.entries) == _all_keys(micro, 10)
    meta = micro_table.metadata
    assert (meta["target"], meta["threads"], meta["batch"], meta["num_classes"], meta["resolution"]) == ("cpu", 1, 1, 10, 16)
    assert meta["onnxruntime"] == ort.__version__ and meta["opset"] >= 17 and meta["protocol"] == FAST.to_dict()
    assert not (tmp_path / "micro.json.partial").exists()
    loaded = LatencyTable.load(tmp_path / "micro.json")
    assert loaded.to_dict() == json.loads(json.dumps(micro_table.to_dict()))
    assert loaded.calibration.model in ("raw", "linear", "linear_blocks")
    assert len(loaded.calibration.rows) == 6


def test_prediction_is_calibrated_sum_of_entries(micro_table, micro):
    for arch in sample_archs(micro, 8, seed=3):
        specs, head = resolve(arch, 10)
        raw = sum(micro_table.entries[s.key]["median_ms"] for s in specs) + micro_table.entries[head.key]["median_ms"]
        assert micro_table.predict_raw(arch) == (pytest.approx(raw), len(specs) + 1)
        expected = micro_table.calibration.apply(raw, len(specs) + 1)
        assert micro_table.predict(arch) == pytest.approx(expected)
        assert micro_table.predict_specs(specs, head) == pytest.approx(expected)
    archs = sample_archs(micro, 4, seed=4)
    assert micro_table.predict_many(archs) == [micro_table.predict(a) for a in archs]


def test_missing_entry_names_key_and_file(micro_table, micro, tmp_path):
    data = micro_table.to_dict()
    arch = sample_archs(micro, 1, seed=0)[0]
    specs, _ = resolve(arch, 10)
    del data["entries"][specs[-1].key]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    table = LatencyTable.load(path)
    with pytest.raises(MissingEntryError, match="rebuild the table for this space") as info:
        table.predict(arch)
    assert isinstance(info.value, NasError)
    assert specs[-1].key in str(info.value) and str(path) in str(info.value)
    with pytest.raises(MissingEntryError, match="head_avg_i16_cls1000_h4"):
        micro_table.predict(arch, num_classes=1000)


def test_load_warns_on_other_conditions(micro_table, tmp_path):
    data = micro_table.to_dict()
    data["metadata"].update(onnxruntime="0.0.1", cpu="Other CPU", threads=4)
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    with pytest.warns(TableMismatchWarning) as caught:
        LatencyTable.load(path, expect_target="cpu", expect_threads=1, expect_batch=1)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert any("onnxruntime is '0.0.1', this machine" in m and str(path) in m for m in messages)
    assert any("cpu is 'Other CPU'" in m for m in messages)
    assert any("threads is 4, this run 1" in m for m in messages)


def test_table_from_a_machine_of_another_speed_warns(micro_table):
    """A VM may report the same CPU model on hosts of different speeds: the reference block tells."""
    target = get_target("cpu")
    here = BusyMonitor(target, Protocol()).reference_ms
    for factor in (10.0, 0.1):  # the table's machine 10x slower, then 10x faster
        data = micro_table.to_dict()
        data["metadata"]["reference_ms"] = here * factor
        table = LatencyTable.from_dict(data, "other.json")
        with pytest.warns(TableMismatchWarning, match=r"^other.json: this machine runs the reference block .* rebuild it"):
            ratio = table.check_machine_speed(target)
        assert 0.3 / factor < ratio < 3 / factor  # generous: the machine may be busy
    assert table.check_machine_speed(get_target("cpu", threads=2)) is None  # a 1-thread table: nothing to compare


def test_load_rejects_non_tables(tmp_path):
    with pytest.raises(NasError, match="no such latency table"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"schema": 99}')
    with pytest.raises(NasError, match="not a latency table of schema 1"):
        LatencyTable.load(tmp_path / "bad.json")


def test_interrupted_build_resumes(micro, tmp_path, monkeypatch):
    out = tmp_path / "t.json"
    target = get_target("cpu")
    assert build_table(micro, target, out, protocol=FAST, calibration_archs=4, stop_after=3, progress=False) is None
    sidecar = tmp_path / "t.json.partial"
    first = [json.loads(line) for line in sidecar.read_text().splitlines()[1:]]
    assert len(first) == 3
    with sidecar.open("a") as handle:
        handle.write('{"entry": "half a line')  # killed while writing
    measured = []
    real = build.measure_models
    monkeypatch.setattr(build, "measure_models", lambda models, *a: measured.append(len(models)) or real(models, *a))
    table = build_table(micro, target, out, protocol=FAST, calibration_archs=4, progress=False)
    total = len(_all_keys(micro, 10))
    assert sum(measured) == total - 3 + 4  # the remaining entries, then the calibration networks
    assert set(table.entries) == _all_keys(micro, 10)
    for record in first:  # kept, not measured again
        assert table.entries[record["entry"]]["median_ms"] == round(record["m"]["median_ms"], 6)
    assert not sidecar.exists()


def test_resume_refuses_other_settings_and_existing_table(micro, micro_table, tmp_path):
    out = tmp_path / "t.json"
    build_table(micro, get_target("cpu"), out, protocol=FAST, stop_after=2, progress=False)
    with pytest.raises(NasError, match="other settings \\(num_classes: 10 there, 1000 now\\)"):
        build_table(micro, get_target("cpu"), out, protocol=FAST, num_classes=1000, progress=False)
    with pytest.raises(NasError, match="already exists; pass --fresh"):
        build_table(micro, get_target("cpu"), tmp_path / "micro.json", protocol=FAST, progress=False)


def test_calibration_picks_the_model_that_generalises():
    rng = np.random.default_rng(0)
    raw = rng.uniform(1, 5, 20)
    lookups = rng.integers(10, 30, 20)
    archs = sample_archs(load_space(ROOT / "search_spaces" / "tiny.yaml"), 20, seed=0)
    exact = Calibration.fit(archs, list(raw), list(lookups), list(raw), seed=0)
    assert exact.model == "raw" and exact.apply(2.0, 7) == 2.0
    measured = 0.9 * raw - 0.01 * lookups + 0.3  # a per-lookup overhead, as single blocks pay
    fitted = Calibration.fit(archs, list(raw), list(lookups), list(measured), seed=0)
    assert fitted.model == "linear_blocks" and fitted.loo_mape["linear_blocks"] < 1e-6
    assert fitted.coef == pytest.approx((0.9, -0.01, 0.3))
    assert fitted.arch_keys == {a.key for a in archs}
    assert Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


# --- the shipped tiny table ---------------------------------------------------------------------


def test_shipped_tiny_table_covers_its_space():
    table = LatencyTable.load(TINY_TABLE)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    assert set(table.entries) == _all_keys(space, table.num_classes), "tiny.yaml changed: rebuild the tiny table"
    assert table.metadata["space_sha256"] == build._file_sha256(str(ROOT / "search_spaces" / "tiny.yaml"))
    rng = random.Random(0)
    assert all(ms > 0 for ms in table.predict_many(space.decode(space.sample(rng)) for _ in range(200)))
    assert TINY_TABLE.relative_to(ROOT) == default_table_path("tiny", 16, get_target("cpu"))


def test_mobilenetv2_table_will_price_the_mobilenet_v2_reference():
    space = load_space(ROOT / "search_spaces" / "mobilenetv2.yaml")
    num_classes = build.default_num_classes(space.resolution)
    specs, head = resolve(reference("mobilenet_v2"), num_classes)
    assert num_classes == 1000 and {s.key for s in specs} | {head.key} <= _all_keys(space, num_classes)


# --- validation and the scripts -----------------------------------------------------------------


def test_validation_excludes_calibration_networks(micro_table, micro):
    report = validate_table(micro_table, micro, get_target("cpu"), n=4, seed=1, protocol=FAST, progress=False)
    assert report["n"] == 4 and len(report["rows"]) == 4
    assert not {row["key"] for row in report["rows"]} & micro_table.calibration.arch_keys
    for key in ("within_10pct", "within_5pct", "mape", "spearman", "kendall", "flops_spearman", "flops_kendall"):
        assert key in report
    assert 0 <= report["within_5pct"] <= report["within_10pct"] <= 1
    row = report["rows"][0]
    assert row["error_pct"] == pytest.approx((row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"] * 100)


def _script(name, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _main(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("script, args, message", [
    ("build_lut", ["--space", "missing.yaml"], "missing.yaml: (file): no such file"),
    ("build_lut", ["--space", "search_spaces/tiny.yaml", "--target", "gpu"], "unknown target 'gpu'"),
    ("validate_lut", ["--space", "search_spaces/tiny.yaml", "--table", "none.json"], "no such latency table"),
    ("validate_lut", ["--space", "search_spaces/tiny.yaml", "--threads", "0"], "threads must be a positive integer"),
])
def test_scripts_bad_input_is_one_line(script, args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _main(script)(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.slow
def test_scripts_build_then_validate(tmp_path):
    space = tmp_path / "micro.yaml"
    space.write_text(MICRO)
    built = _script("build_lut.py", "--space", str(space), "--sessions", "1", "--calibration-archs", "4", "--quiet",
                    cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    table = tmp_path / "latency_tables" / "micro-r16-cpu-t1-b1.json"
    assert table.is_file()
    checked = _script("validate_lut.py", "--space", str(space), "--n", "3", "--seed", "5", "--json", "v.json",
                      "--quiet", cwd=tmp_path)  # the plot goes beside the JSON by default
    assert checked.returncode == 0, checked.stderr
    assert "within +-10%" in checked.stdout
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["n"] == 3 and report["table"] == str(Path("latency_tables") / "micro-r16-cpu-t1-b1.json")
    assert (tmp_path / "v.png").stat().st_size > 0
