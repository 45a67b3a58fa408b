"""Latency: targets, the measurement protocol, table building/resume, prediction, validation, CLIs.

Never asserts wall-clock times: the machine may be busy. Builds use a one-session protocol on a
micro space (nine entries), or on tiny.yaml (310) where the issue asks for it, so that the whole file
stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import platform
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nas.blocks import resolve
from nas.errors import NasError
from nas.references import reference
from nas.latency import build, measure, validate
from nas.latency.build import build_table, sample_archs
from nas.export import export_onnx
from nas.latency.measure import (BusyMonitor, Measurement, Protocol, faster, measure_archs, measure_models,
                                 measurement_lock, training_lock)
from nas.latency.table import CALIBRATION_MODELS, Calibration, LatencyTable, MissingEntryError, TableMismatchWarning, default_table_path
from nas.latency.targets import PROVIDERS, Target, _session_options, cpu_model, get_target
from nas.latency.validate import local_speed, validate_table
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


def test_cpu_model_tells_hosts_that_share_a_brand_apart(tmp_path):
    """Zen 3 and Zen 4 hosts of one VM type both call themselves "AMD EPYC" and ran networks 25% apart."""
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n" \
            "model name\t: AMD EPYC\nstepping\t: 1\ncache size\t: 512 KB\n\n"
    names = []
    for model in (1, 17):
        cpuinfo = tmp_path / f"cpuinfo{model}"
        cpuinfo.write_text(block.format(n=0, model=model) + block.format(n=1, model=99))  # first processor counts
        names.append(cpu_model(str(cpuinfo)))
    assert names == ["AMD EPYC (family 25, model 1, stepping 1)", "AMD EPYC (family 25, model 17, stepping 1)"]
    bare = tmp_path / "bare"
    bare.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert cpu_model(str(bare)) == "Some CPU"
    arm = tmp_path / "arm"  # many arm64 kernels give no name, only the core's design
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert cpu_model(str(arm)).endswith("(implementer 0x41, part 0xd0c)")
    assert cpu_model(str(tmp_path / "absent")) == (platform.processor() or platform.machine() or "unknown")


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
    assert result[0].sessions_ms == (1.0, 1.02, 1.01) and result[0].ms == 1.0
    assert result[1].ms == 2.0 and len(result[1].sessions_ms) == 6
    assert result[1].stable and result[1].spread == pytest.approx(0.005, rel=1e-6)
    assert result[0].count == 12


def test_median_aggregate_and_unstable_flag(monkeypatch):
    medians = iter([1.0, 2.0, 4.0])
    monkeypatch.setattr(measure, "_time_session", lambda t, m, p: np.full(3, round(next(medians) * 1e6)))
    (m,) = measure_models([0], get_target("cpu"), Protocol(sessions=3, retries=0, aggregate="median", reference=False))
    assert m.ms == 2.0 and m.median_ms == 1.0 and m.spread == 3.0 and not m.stable


def test_fastest_aggregate_takes_the_fastest_run_and_checks_session_minimums(monkeypatch):
    # two sessions whose medians disagree by 50% (a slow spell in the second) but whose fastest runs agree
    runs = iter([[1.0, 1.1, 1.2, 5.0], [1.02, 1.6, 1.8, 1.9]])
    monkeypatch.setattr(measure, "_time_session", lambda t, m, p: np.array(next(runs)) * 1e6)
    (m,) = measure_models([0], get_target("cpu"), Protocol(sessions=2, retries=0, reference=False))
    assert m.ms == 1.0 and m.median_ms == 1.15 and m.sessions_ms == (1.0, 1.02)
    assert m.spread == pytest.approx(0.02) and m.stable
    runs = iter([[1.0, 1.1, 1.2, 5.0], [1.02, 1.6, 1.8, 1.9]])
    (m,) = measure_models([0], get_target("cpu"), Protocol(sessions=2, retries=0, reference=False, aggregate="min"))
    assert m.ms == m.median_ms == 1.15 and m.spread == pytest.approx(0.55 / 1.15) and not m.stable


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
    assert (m.ms, m.slowdown, m.stable) == (min(medians), slowdown, stable)


def test_measure_archs_measures_unstable_ones_again(micro, monkeypatch):
    def result(ms, stable):
        return Measurement(ms, ms, ms, ms, 3, (ms,), 0.0, 0.0 if stable else 0.5, stable)

    rounds = iter([[result(2.0, False), result(1.0, True)], [result(1.5, True)]])
    calls = []
    monkeypatch.setattr(measure, "measure_models", lambda models, *a: calls.append(len(models)) or next(rounds))
    first, second = measure_archs(sample_archs(micro, 2, seed=0), get_target("cpu"), FAST, num_classes=10)
    assert calls == [2, 1] and (first.ms, first.stable) == (1.5, True) and second.ms == 1.0
    # noise only adds time, and a stable repeat that is no faster vouches for the faster figure
    kept = faster(result(1.0, False), result(1.2, True))
    assert (kept.ms, kept.stable) == (1.0, True) and not faster(result(1.0, False), result(1.2, False)).stable


def test_real_measurement_statistics(micro):
    archs = sample_archs(micro, 2, seed=0)
    protocol = Protocol(warmup=2, min_runs=5, max_runs=5, sessions=2, retries=0)
    monitor = BusyMonitor(get_target("cpu"), protocol)
    assert monitor.reference_ms > 0 and monitor.slowdown() >= 0
    models = [export_onnx(arch, num_classes=10) for arch in archs]
    for m in measure_models(models, get_target("cpu"), protocol, monitor):
        assert m.count == 10 and len(m.sessions_ms) == 2 and m.slowdown >= 0
        assert 0 < m.ms <= m.p10_ms <= m.median_ms <= m.p90_ms and m.ms == min(m.sessions_ms)
        assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_validation_is_held_to_the_tables_machine_state(micro_table, micro, monkeypatch):
    """A table built while the machine ran twice as fast: every validation network is timed again."""
    table = LatencyTable(dict(micro_table.metadata, reference_ms=1e-6), micro_table.entries, micro_table.calibration)
    protocol = Protocol(warmup=1, min_runs=2, max_runs=3, session_seconds=0, sessions=1, retries=0)
    models = []
    real = measure.measure_models
    monkeypatch.setattr(measure, "measure_models", lambda batch, *a: models.append(len(batch)) or real(batch, *a))
    report = validate_table(table, micro, get_target("cpu"), n=3, seed=1, protocol=protocol, progress=False,
                            anchor=False, passes=2)
    assert report["unstable"] == 3 and sum(models) == 2 * 3 * (1 + measure.UNSTABLE_PASSES)
    assert report["reference_ms"] > 1e-3  # this machine's own best, not the table's
    monitor = BusyMonitor(get_target("cpu"), protocol, baseline_ms=report["reference_ms"] / 2)
    assert monitor.slowdown() > 0.5 and monitor.reference_ms > report["reference_ms"] / 2


def test_anchoring_reads_the_machine_speed_from_the_calibration_networks(micro_table, micro):
    """A table whose calibration networks it says took twice as long: the machine reads ~2x faster now."""
    protocol = Protocol(warmup=3, min_runs=30, max_runs=60, sessions=3, retries=0, reference=False)
    cal = micro_table.calibration
    slow_rows = tuple(dict(row, measured_ms=2 * row["measured_ms"]) for row in cal.rows)
    slow = LatencyTable(micro_table.metadata, micro_table.entries, dataclasses.replace(cal, rows=slow_rows))
    target = get_target("cpu")
    ratios = []
    for _ in range(3):  # two validations seconds apart: on a shared machine a busy spell may fall on one
        here = validate_table(micro_table, micro, target, n=2, seed=3, protocol=protocol, progress=False)["anchored"]
        halved = validate_table(slow, micro, target, n=2, seed=3, protocol=protocol, progress=False)["anchored"]
        ratios.append(halved["speed_ratio"] / here["speed_ratio"])
        if 0.3 < ratios[-1] < 0.8:
            break
    else:
        pytest.fail(f"anchoring read the halved table's machine at {ratios} of the other's, not ~0.5")
    # repeatability: the calibration networks now against the build, with the common factor removed
    assert [row["build_ms"] for row in halved["rows"]] == [row["measured_ms"] for row in slow_rows]
    differences = np.array([row["now_ms"] / row["build_ms"] / halved["speed_ratio"] - 1 for row in halved["rows"]])
    assert halved["repeatability"]["within_5pct"] == np.mean(np.abs(differences) <= 0.05)
    assert halved["repeatability"]["mape"] == pytest.approx(np.mean(np.abs(differences)) * 100)
    # calibration networks timed in 3 passes at the build against p now: today's share of the difference is sqrt(3 / (3 + p))
    assert micro_table.metadata["calibration_passes"] == 3 and validate.VALIDATION_PASSES == 3
    assert halved["repeatability"]["perfect_table"]["mape"] == pytest.approx(halved["repeatability"]["mape"] * np.sqrt(3 / 6))
    assert validate_table(micro_table, micro, target, n=2, seed=3, protocol=protocol, progress=False,
                          anchor=False).get("anchored") is None


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
    assert loaded.calibration.model in CALIBRATION_MODELS
    assert len(loaded.calibration.rows) == 6


def test_calibration_networks_include_the_fast_end():
    """A fifth of the calibration networks are the fastest of a larger random pool, by their entries' sum:
    the rest are the plain random sample, and none repeats."""
    from nas.latency.build import FAST_POOL, calibration_networks

    table = LatencyTable.load(TINY_TABLE)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    raw = lambda arch: table.predict_raw(arch)[0]  # noqa: E731
    picked = calibration_networks(space, 20, 3, raw)
    assert picked[:16] == sample_archs(space, 16, 3) and len({a.key for a in picked}) == 20
    pool = sample_archs(space, 4 * FAST_POOL, 4, exclude=frozenset(a.key for a in picked[:16]))
    assert picked[16:] == sorted(pool, key=raw)[:4]
    assert max(raw(a) for a in picked[16:]) < np.percentile([raw(a) for a in picked[:16]], 25)


def test_prediction_is_calibrated_sum_of_entries(micro_table, micro):
    for arch in sample_archs(micro, 8, seed=3):
        specs, head = resolve(arch, 10)
        raw = sum(micro_table.entries[s.key]["ms"] for s in specs) + micro_table.entries[head.key]["ms"]
        assert micro_table.predict_raw(arch) == (pytest.approx(raw), len(specs) + 1)
        terms = micro_table.terms(arch)
        assert (terms.raw_ms, terms.lookups, terms.se_blocks) == (pytest.approx(raw), len(specs) + 1, 0)
        expected = micro_table.calibration.apply(terms)
        assert micro_table.predict(arch) == pytest.approx(expected)
        assert micro_table.predict_specs(specs, head) == pytest.approx(expected)
    archs = sample_archs(micro, 4, seed=4)
    assert micro_table.predict_many(archs) == [micro_table.predict(a) for a in archs]


@pytest.mark.parametrize("cache_mb", [None, 1e-4, 1e3])
def test_prediction_fast_path_equals_per_block_terms(cache_mb):
    """predict() sums memoised totals and goes per block only beyond the cache: both give the same."""
    table = LatencyTable.load(TINY_TABLE)
    table.calibration = Calibration("linear_blocks_se", (1.1, -0.002, 0.001, 0.01), 0, {}, (), cache_mb, 20.0)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    for arch in sample_archs(space, 20, seed=8):
        terms = table.terms(arch)
        by_hand = sum(terms.ms) if cache_mb != 1e-4 else sum(  # all weights miss but 1e-4 MB of them
            max(ms, b * (1 - 100 / sum(terms.weight_bytes)) / 20e6) for ms, b in zip(terms.ms, terms.weight_bytes))
        expected = 1.1 * by_hand - 0.002 * terms.lookups + 0.001 * terms.se_blocks + 0.01
        assert table.predict(arch) == pytest.approx(expected) == table.predict_specs(*resolve(arch, 10))
    assert sum(terms.weight_bytes) > 100 and by_hand >= terms.raw_ms


def test_weight_bytes_count_only_taps_that_touch_the_input():
    from nas.blocks import BlockSpec
    from nas.cost import block_cost
    from nas.latency.traffic import taps_used, weight_bytes

    assert [taps_used(size, 5, 1) for size in (1, 2, 3, 8)] == [1, 3, 5, 5]
    assert taps_used(2, 3, 2) == 2  # one output, window over rows -1..1
    dense = BlockSpec("conv", 32, 64, 64, 5, 1, 0, "relu", False, 8)
    assert weight_bytes(dense) == 4 * 32 * 64 * 25 == 4 * (block_cost(dense).params - 2 * 64)  # all but batch norm
    assert weight_bytes(BlockSpec("conv", 32, 64, 64, 5, 1, 0, "relu", False, 1)) == 4 * 32 * 64  # the centre tap
    mbconv = BlockSpec("ir", 16, 24, 96, 3, 2, 4, "relu", False, 8)
    assert weight_bytes(mbconv) == 4 * (16 * 96 + 96 * 24 + 2 * 96 * 4)  # depthwise weights left out


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


def _with_calibration_times(table, factor, source):
    """The table as if its machine had run its calibration networks ``factor`` times as long."""
    data = json.loads(json.dumps(table.to_dict()))  # a copy: to_dict shares the rows
    for row in data["calibration"]["rows"]:
        row["measured_ms"] *= factor
    return LatencyTable.from_dict(data, source)


def test_table_from_a_machine_of_another_speed_warns(micro_table):
    """A VM may report the same CPU model on hosts of different speeds: the table's own calibration
    networks, timed again here, tell."""
    target = get_target("cpu")
    for factor in (10.0, 0.1):  # the table's machine 10x slower, then 10x faster
        table = _with_calibration_times(micro_table, factor, "other.json")
        with pytest.warns(TableMismatchWarning, match=r"^other.json: 6 of its calibration networks run at .* "
                                                      r"rebuild it here with python scripts/build_lut.py"):
            ratio = table.check_machine_speed(target)
        assert 0.3 / factor < ratio < 3 / factor  # generous: the machine may be busy
    assert table.check_machine_speed(get_target("cpu", threads=2)) is None  # a 1-thread table: nothing to compare
    uncalibrated = LatencyTable(micro_table.metadata, micro_table.entries, None, "bare.json")
    assert uncalibrated.check_machine_speed(target) is None


def test_machine_speed_is_the_median_ratio_of_networks_timed_in_shuffled_passes(micro_table, monkeypatch):
    """Pass 1 times every network 1.1x its table figure and pass 2 1.3x, one network 3x in both:
    the ratio is the median over networks of their passes' geometric mean, sqrt(1.1 * 1.3)."""
    build_ms = {row["arch"]: row["measured_ms"] for row in micro_table.calibration.rows}
    passes = []

    def measure_slower(archs, target, protocol, num_classes, monitor):
        factor = (1.1, 1.3)[len(passes) % 2]
        passes.append([arch.to_string() for arch in archs])
        return [Measurement(build_ms[a.to_string()] * (3.0 if a.to_string() == passes[0][0] else factor),
                            0, 0, 0, 1, (), 0, 0, True) for a in archs]

    monkeypatch.setattr(measure, "measure_archs", measure_slower)
    monkeypatch.setattr(measure, "BusyMonitor", lambda *args: None)
    ratio = math.sqrt(1.1 * 1.3)
    with pytest.warns(TableMismatchWarning, match=r"^\S+micro.json: 6 of its calibration networks run at 1\.20x"):
        assert micro_table.check_machine_speed(get_target("cpu")) == pytest.approx(ratio)
    assert len(passes) == 2 and sorted(passes[0]) == sorted(passes[1]) == sorted(build_ms)
    assert passes[0] != passes[1]  # each pass in its own order
    passes.clear()
    with pytest.warns(TableMismatchWarning, match=r"^\S+micro.json: 3 of its calibration networks"):
        assert micro_table.check_machine_speed(get_target("cpu"), networks=3, passes=4) == pytest.approx(ratio)
    assert len(passes) == 4 and len(set(passes[0])) == 3 and all(sorted(p) == sorted(passes[0]) for p in passes)
    passes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the tolerance: silent
        assert micro_table.check_machine_speed(get_target("cpu"), tolerance=0.25) == pytest.approx(ratio)


def test_speed_ratio_scales_every_prediction(micro_table, micro):
    archs = sample_archs(micro, 6, seed=5)
    built = micro_table.predict_many(archs)
    specs = [resolve(arch, 10) for arch in archs]
    built_specs = [micro_table.predict_specs(*s) for s in specs]
    micro_table.speed_ratio = 1.25
    assert micro_table.predict_many(archs) == pytest.approx([1.25 * ms for ms in built])
    assert [micro_table.predict_specs(*s) for s in specs] == pytest.approx([1.25 * ms for ms in built_specs])
    bare = LatencyTable(micro_table.metadata, micro_table.entries, None)
    raw = bare.predict_many(archs)
    bare.speed_ratio = 0.5
    assert bare.predict_many(archs) == pytest.approx([0.5 * ms for ms in raw])
    # re-levelled only beyond +-5%: within it a ratio is the machine check's own scatter
    for ratio, level in [(1.06, 1.06), (1 / 1.06, 1 / 1.06), (1.04, 1.0), (1 / 1.04, 1.0), (None, 1.0)]:
        bare.relevel(ratio)
        assert bare.speed_ratio == level


def test_load_rejects_non_tables(tmp_path):
    with pytest.raises(NasError, match="no such latency table"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"schema": 99}')
    with pytest.raises(NasError, match="not a latency table of schema 2"):
        LatencyTable.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"schema": 1, "metadata": {}, "entries": {}}')  # median-based entries
    with pytest.raises(NasError, match=r"old.json: .*found schema 1\); rebuild it with python scripts/build_lut.py"):
        LatencyTable.load(tmp_path / "old.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["calibration"].update(model="quadratic"), r"calibration model 'quadratic' is not one of raw, linear"),
    (lambda d: d["calibration"].update(coef=[1.0]), r"calibration 'coef' has 1 values, model '\w+' takes \d+"),
    (lambda d: d["calibration"].pop("seed"), r"calibration lacks 'seed'"),
    (lambda d: d["calibration"].update(coef="fast"), r"malformed calibration"),
    (lambda d: d["calibration"].update(model="linear", coef=[1.0, 0.0], cache_mb=8, bandwidth_gbs=None),
     r"model 'linear' with 'cache_mb' 8 and 'bandwidth_gbs' None: a spill model sets only 'cache_mb'"),
    (lambda d: d["calibration"].update(model="linear_blocks_se_spill", coef=[1.0] * 6, cache_mb=None, bandwidth_gbs=None),
     r"model 'linear_blocks_se_spill' with 'cache_mb' None"),
    (lambda d: d["calibration"].update(model="linear_blocks_se_spill2", coef=[1.0] * 7, cache_mb=2, bandwidth_gbs=None,
                                       near_cache_mb=4), r"'near_cache_mb' 4 and 'cache_mb' 2: only a spill2 model"),
    (lambda d: d["entries"].update(stem={"p10_ms": 1.0}), r"entry 'stem' lacks a numeric 'ms'"),
])
def test_load_rejects_a_malformed_calibration_or_entry(edit, message, tmp_path):
    """A hand-edited table fails on loading with the file and the key, not with a KeyError at predict time."""
    data = json.loads(TINY_TABLE.read_text())
    if data["calibration"]["model"] == "raw":
        data["calibration"].update(model="linear", coef=[1.0, 0.0])
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(NasError, match=message) as info:
        LatencyTable.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    tiny = load_space(ROOT / "search_spaces" / "tiny.yaml")
    out = tmp_path / "t.json"
    target = get_target("cpu")
    assert build_table(tiny, target, out, protocol=FAST, calibration_archs=4, passes=1, stop_after=100,
                       progress=False) is None
    sidecar = tmp_path / "t.json.partial"
    first = [json.loads(line) for line in sidecar.read_text().splitlines()[1:]]
    assert len(first) == 100
    with sidecar.open("a") as handle:
        handle.write('{"entry": "half a line')  # killed while writing
    measured = []
    real = build.measure_models
    monkeypatch.setattr(build, "measure_models", lambda models, *a: measured.append(len(models)) or real(models, *a))
    table = build_table(tiny, target, out, protocol=FAST, calibration_archs=4, passes=1, progress=False)
    keys = _all_keys(tiny, 10)
    assert len(keys) > 300
    # the remaining entries, then the calibration networks in each of their passes
    assert sum(measured) == len(keys) - 100 + 4 * build.CALIBRATION_PASSES
    assert set(table.entries) == keys
    for record in first:  # kept, not measured again
        assert table.entries[record["entry"]]["ms"] == round(record["m"]["ms"], 6)
    assert not sidecar.exists()


@pytest.mark.slow
def test_build_script_resumes_after_ctrl_c(tmp_path):
    """The user's path: Ctrl-C in build_lut.py on tiny.yaml, then the same command again."""
    # the full protocol (3 sessions per entry): with one session a fast machine finished the whole
    # table before the Ctrl-C arrived
    command = [sys.executable, str(ROOT / "scripts" / "build_lut.py"), "--space", str(ROOT / "search_spaces" / "tiny.yaml"),
               "--calibration-archs", "4", "--out", str(tmp_path / "t.json")]
    sidecar = tmp_path / "t.json.partial"
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while (not sidecar.exists() or len(sidecar.read_text().splitlines()) < 1 + 64) and process.poll() is None:
        assert time.monotonic() < deadline, "build_lut.py wrote no progress"
        time.sleep(0.05)
    assert process.poll() is None, "build_lut.py finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "run the same command to resume" in err.strip().splitlines()[-1]
    before = {}
    for line in sidecar.read_text().splitlines()[1:]:
        with contextlib.suppress(json.JSONDecodeError):  # the line being written at Ctrl-C
            record = json.loads(line)
            before[record["entry"]] = record["m"]
    total = len(_all_keys(load_space(ROOT / "search_spaces" / "tiny.yaml"), 10))
    assert 64 <= len(before) < total

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)}/{total}" in resumed.stderr  # the progress bar starts where the build stopped
    table = json.loads((tmp_path / "t.json").read_text())
    assert len(table["entries"]) == total and not sidecar.exists()
    for key, m in before.items():  # kept; the second pass, or one over unstable entries, may only find faster
        assert table["entries"][key]["ms"] <= round(m["ms"], 6)


def test_passes_keep_fastest_entry_and_mean_network_and_resume(micro, tmp_path, monkeypatch):
    """Two passes over the entries and three over the calibration networks (one after each entry pass,
    the third at the end): an entry keeps its fastest pass, a calibration network the geometric mean
    of its three; a build interrupted in the second entry pass measures only what it still lacks."""
    base = lambda name: 0.01 + (sum(map(ord, name)) % 97) / 1000  # noqa: E731 - a fixed figure per model
    times_measured: dict[str, int] = {}
    calls = []

    def fake_measure(models, *args):
        calls.append(len(models))
        out = []
        for model in models:
            name = model.decode()
            n = times_measured[name] = times_measured.get(name, 0) + 1
            ms = base(name) * (1.0, 0.5, 0.25)[n - 1]  # each pass finds each model twice as fast
            out.append(Measurement(ms, ms, ms, ms, 3, (ms,), 0.0, 0.0, True))
        return out

    monkeypatch.setattr(build, "_entry_model", lambda item, target, opset: item.key.encode())
    monkeypatch.setattr(build, "export_onnx", lambda arch, **kwargs: arch.to_string().encode())
    monkeypatch.setattr(build, "measure_models", fake_measure)
    out, keys = tmp_path / "p.json", _all_keys(micro, 10)
    settings = dict(protocol=FAST, calibration_archs=6, passes=2, calibration_passes=3, progress=False)
    assert build_table(micro, get_target("cpu"), out, stop_after=len(keys) + 3, **settings) is None
    assert sum(calls) == len(keys) + 6 + 3  # pass 1 of everything, then 3 entries of pass 2
    calls.clear()
    table = build_table(micro, get_target("cpu"), out, **settings)
    assert sum(calls) == len(keys) - 3 + 6 + 6
    assert {times_measured[key] for key in keys} == {2}
    rows = table.calibration.rows
    assert len(rows) == 6 and {times_measured[row["arch"]] for row in rows} == {3}
    assert (table.metadata["passes"], table.metadata["calibration_passes"]) == (2, 3)
    for key in keys:
        assert table.entries[key]["ms"] == pytest.approx(0.5 * base(key), abs=1e-6)
    for row in rows:
        assert row["measured_ms"] == pytest.approx(0.125 ** (1 / 3) * base(row["arch"]))


def test_resume_refuses_other_settings_and_existing_table(micro, micro_table, tmp_path):
    out = tmp_path / "t.json"
    build_table(micro, get_target("cpu"), out, protocol=FAST, stop_after=2, progress=False)
    with pytest.raises(NasError, match="other settings \\(num_classes: 10 there, 1000 now\\)"):
        build_table(micro, get_target("cpu"), out, protocol=FAST, num_classes=1000, progress=False)
    with pytest.raises(NasError, match="already exists; pass --fresh"):
        build_table(micro, get_target("cpu"), tmp_path / "micro.json", protocol=FAST, progress=False)


def _terms(rng, n, weight_mb=0.0):
    """Random networks as the calibration sees them: 10-30 lookups of 0.01-0.3 ms, some SE blocks,
    0.05-2 MB of activations around the blocks without SE, blocks of random kinds and resolution
    levels (the last lookup is the head)."""
    from nas.latency.table import LEVELS, OP_TERMS, NetworkTerms

    out = []
    for _ in range(n):
        lookups = int(rng.integers(10, 30))
        share = rng.dirichlet(np.ones(lookups))
        ms = rng.uniform(0.01, 0.3, lookups)
        levels, kinds = rng.integers(0, LEVELS, lookups - 1), rng.integers(0, len(OP_TERMS) + 1, lookups - 1)
        out.append(NetworkTerms(tuple(ms), tuple(int(b) for b in share * weight_mb * 1e6),
                                int(rng.integers(0, lookups // 2)), int(rng.uniform(0.05, 2) * 1e6),
                                tuple(float(ms[:-1][levels == k].sum()) for k in range(LEVELS)),
                                tuple(int((kinds == k).sum()) for k in range(len(OP_TERMS)))))
    return out


def test_calibration_picks_the_model_that_generalises():
    rng = np.random.default_rng(0)
    archs = sample_archs(load_space(ROOT / "search_spaces" / "tiny.yaml"), 30, seed=0)
    terms = _terms(rng, 30)
    raw = np.array([t.raw_ms for t in terms])
    lookups = np.array([t.lookups for t in terms])
    se = np.array([t.se_blocks for t in terms])
    exact = Calibration.fit(archs, terms, list(raw), seed=0)
    assert exact.model == "raw" and exact.apply(terms[0]) == terms[0].raw_ms
    blocks = Calibration.fit(archs, terms, list(0.9 * raw - 0.01 * lookups + 0.3), seed=0)  # a per-lookup overhead
    assert blocks.name == "linear_blocks" and blocks.loo_mape["linear_blocks"] < 1e-6
    assert blocks.coef == pytest.approx((0.9, -0.01, 0.3))
    with_se = Calibration.fit(archs, terms, list(raw - 0.002 * lookups + 0.004 * se + 0.01), seed=0)
    assert with_se.name == "linear_blocks_se" and with_se.coef == pytest.approx((1.0, -0.002, 0.004, 0.01))
    assert with_se.loo_mape["linear_blocks_se"] < 1e-6 < with_se.loo_mape["linear_blocks"]
    assert blocks.arch_keys == {a.key for a in archs}
    assert Calibration.from_dict(json.loads(json.dumps(with_se.to_dict()))) == with_se


def test_calibration_finds_the_cache_networks_stream_beyond():
    """Networks of 2-200 MB of weights, timed as if those beyond 12 MB were read at 30 GB/s."""
    from nas.latency.table import BANDWIDTH_GRID_GBS, CACHE_GRID_MB, streaming_ms_per_byte

    rng = np.random.default_rng(1)
    terms = [t for mb in np.geomspace(2, 200, 40) for t in _terms(rng, 1, mb)]
    archs = sample_archs(load_space(ROOT / "search_spaces" / "tiny.yaml"), 40, seed=0)
    assert (12, 30) in {(c, b) for c in CACHE_GRID_MB for b in BANDWIDTH_GRID_GBS}
    measured = [t.block_sum(12, 30) - 0.002 * t.lookups + 0.01 for t in terms]
    assert sum(t.block_sum(12, 30) > 1.05 * t.raw_ms for t in terms) >= 10  # the term matters for many of them
    fitted = Calibration.fit(archs, terms, measured, seed=0)
    assert (fitted.name, fitted.cache_mb, fitted.bandwidth_gbs) == ("linear_blocks+streaming", 12, 30)
    assert fitted.loo_mape["linear_blocks+streaming"] < 1e-6 < fitted.loo_mape["linear_blocks"]
    assert streaming_ms_per_byte(13_000_000, 12, 30) > 0 == streaming_ms_per_byte(11_000_000, 12, 30)
    assert max(abs(row["error_pct"]) for row in fitted.rows) < 1e-6


def test_spilled_terms_charge_a_block_only_what_it_did_not_miss_alone():
    """A 0.5 MB and a 3 MB block beyond a 2 MB cache: the network misses 1 - 2/3.5 = 3/7 of its weights;
    the small block is charged all of that, the big one 3/7 - (1 - 2/3) = 2/21 (it missed 1/3 alone)."""
    from nas.latency.table import spilled_terms

    lookups, mb = spilled_terms(2, 3_500_000, [500_000, 3_000_000], 2)
    assert lookups == pytest.approx(3 / 7 + 2 / 21) and mb == pytest.approx(3 / 7 * 0.5 + 2 / 21 * 3)
    assert spilled_terms(2, 3_500_000, [3_000_000], 2) == (lookups, mb)  # blocks under the cache may be left out
    assert spilled_terms(2, 1_900_000, [1_400_000, 500_000], 2) == (0.0, 0.0)  # the network fits
    assert spilled_terms(3, 6_000_000, [2_000_000] * 3, 1) == pytest.approx((3 * (1 / 2 - 1 / 6), 3 * 2 * (1 / 3)))


def test_calibration_finds_the_cache_networks_spill_beyond():
    """Networks of 0.2-20 MB of weights, timed as if each lookup beyond a 1.5 MB cache cost 10 us more
    and each spilled MB 5 us: the spill model is chosen with that cache and its coefficients."""
    from nas.latency.table import SPILL_GRID_MB, spilled_share, spilled_terms

    rng = np.random.default_rng(2)
    terms = [t for mb in np.geomspace(0.2, 20, 40) for t in _terms(rng, 1, mb)]
    archs = sample_archs(load_space(ROOT / "search_spaces" / "tiny.yaml"), 40, seed=0)
    assert 1.5 in SPILL_GRID_MB and spilled_share(1_000_000, 1.5) == 0 < spilled_share(2_000_000, 1.5) == 0.25

    def timed(t):
        lookups, mb = spilled_terms(t.lookups, sum(t.weight_bytes), t.weight_bytes, 1.5)
        return t.raw_ms - 0.003 * t.lookups + 0.001 * t.se_blocks + 0.01 * lookups + 0.005 * mb + 0.02

    assert any(max(t.weight_bytes) > 1.5e6 for t in terms)  # blocks that spill alone are in the mix

    fitted = Calibration.fit(archs, terms, [timed(t) for t in terms], seed=0)
    assert (fitted.name, fitted.cache_mb, fitted.bandwidth_gbs) == ("linear_blocks_se_spill", 1.5, None)
    assert fitted.coef == pytest.approx((1.0, -0.003, 0.001, 0.01, 0.005, 0.02), abs=1e-9)
    # spill2 nests it (a zero near-cache term) and ties; the tie goes to fewer coefficients
    assert fitted.loo_mape["linear_blocks_se_spill"] < 1e-6 < min(v for k, v in fitted.loo_mape.items() if "spill" not in k)
    assert Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted
    table = LatencyTable.load(TINY_TABLE)  # the memoised fast path applies the same terms
    table.calibration = dataclasses.replace(fitted, cache_mb=0.01)  # tiny.yaml's networks hold ~0.02-0.1 MB
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    spilled = 0
    for arch in sample_archs(space, 20, seed=3):
        terms_now = table.terms(arch)
        spilled += spilled_share(sum(terms_now.weight_bytes), 0.01) > 0
        assert table.predict(arch) == pytest.approx(table.calibration.apply(terms_now))
    assert spilled >= 10


def _two_cache_networks(seed, n):
    """Networks of 0.1-20 MB of weights and their archs, timed (``_two_cache_ms``) as if each lookup
    beyond a 2 MB cache cost 10 us more and each spilled MB 5 us, and each lookup beyond a 0.5 MB cache 2 us."""
    rng = np.random.default_rng(seed)
    terms = [t for mb in np.geomspace(0.1, 20, n) for t in _terms(rng, 1, mb)]
    return terms, sample_archs(load_space(ROOT / "search_spaces" / "tiny.yaml"), n, seed=0)


def _two_cache_ms(t):
    from nas.latency.table import spilled_terms

    w = sum(t.weight_bytes)
    lookups, mb = spilled_terms(t.lookups, w, t.weight_bytes, 2)
    return (t.raw_ms - 0.003 * t.lookups + spilled_terms(t.lookups, w, t.weight_bytes, 0.5)[0] * 0.002
            + 0.01 * lookups + 0.005 * mb + 0.02)


def test_calibration_finds_a_second_smaller_cache():
    """As above, plus networks that fit a 0.5 MB cache saving 2 us per lookup: spill2 finds both caches."""
    terms, archs = _two_cache_networks(3, 50)
    fitted = Calibration.fit(archs, terms, [_two_cache_ms(t) for t in terms], seed=0)
    assert (fitted.name, fitted.cache_mb, fitted.near_cache_mb) == ("linear_blocks_se_spill2", 2, 0.5)
    assert fitted.coef == pytest.approx((1.0, -0.003, 0.0, 0.002, 0.01, 0.005, 0.02), abs=1e-9)
    assert fitted.loo_mape["linear_blocks_se_spill2"] < 1e-6 < fitted.loo_mape["linear_blocks_se_spill"]
    assert Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


@pytest.mark.parametrize("per_weight_mb, per_act_mb, model", [
    (0.004, 0.0, "linear_blocks_se_spill2_weights"),
    (0.0, -0.03, "linear_blocks_se_spill2_acts"),
    (0.004, -0.03, "linear_blocks_se_spill2_weights_acts"),
])
def test_calibration_finds_weight_and_activation_terms(per_weight_mb, per_act_mb, model):
    """The two-cache networks above, plus a cost per MB of weights and/or of plain-block activations:
    the candidate with exactly those terms wins, with their coefficients (a zero term would tie, and
    ties go to fewer coefficients)."""
    terms, archs = _two_cache_networks(4, 50)

    def timed(t):
        return _two_cache_ms(t) + per_weight_mb * sum(t.weight_bytes) / 1e6 + per_act_mb * t.plain_act_bytes / 1e6

    fitted = Calibration.fit(archs, terms, [timed(t) for t in terms], seed=0)
    assert (fitted.name, fitted.cache_mb, fitted.near_cache_mb) == (model, 2, 0.5)
    extra = [c for c in (per_weight_mb, per_act_mb) if c]
    assert fitted.coef == pytest.approx((1.0, -0.003, 0.0, 0.002, 0.01, 0.005, *extra, 0.02), abs=1e-9)
    assert fitted.loo_mape[model] < 1e-6 < fitted.loo_mape["linear_blocks_se_spill2"]
    assert fitted.rows[0]["plain_act_mb"] == terms[0].plain_act_bytes / 1e6
    assert Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


def test_calibration_finds_per_level_factors_and_per_kind_lookups():
    """The two-cache networks, with blocks at some resolution levels slower or faster than their
    entries say and some kinds cheaper per lookup: the levels model wins and recovers each factor."""
    from nas.latency.table import LEVEL_OP_TERMS, OP_TERMS

    assert LEVEL_OP_TERMS[:len(OP_TERMS)] == ("ds_lookups", "ir_lookups", "bot_lookups")
    terms, archs = _two_cache_networks(5, 90)
    per_kind, per_level = (-0.002, 0.001, 0.004), (0.0, 0.1, -0.1, 0.2, 0.0, -0.05)

    def timed(t):
        return _two_cache_ms(t) + np.dot(per_kind, t.op_lookups) + np.dot(per_level, t.level_ms)

    model = "linear_blocks_se_spill2_weights_acts_levels_ops"
    fitted = Calibration.fit(archs, terms, [timed(t) for t in terms], seed=0)
    assert (fitted.name, fitted.cache_mb, fitted.near_cache_mb) == (model, 2, 0.5)
    assert fitted.coef == pytest.approx((1.0, -0.003, 0.0, *per_kind, *per_level, 0.002, 0.01, 0.005, 0.0, 0.0, 0.02),
                                        abs=1e-9)
    assert fitted.loo_mape[model] < 1e-6 < fitted.loo_mape["linear_blocks_se_spill2_weights_acts"]


def test_levels_model_fast_path_equals_its_terms():
    """predict() keeps per-level sums and per-kind counts in its memo: the same as resolving every block."""
    from nas.latency.table import LEVELS, OP_TERMS, resolution_level

    assert [resolution_level(r, 224) for r in (224, 112, 56, 28, 14, 7, 4)] == [0, 1, 2, 3, 4, 5, 5]
    table = LatencyTable.load(TINY_TABLE)
    model = "linear_blocks_se_spill2_weights_acts_levels_ops"
    coef = tuple(np.random.default_rng(6).uniform(-0.01, 0.01, len(CALIBRATION_MODELS[model]) + 1))
    table.calibration = Calibration(model, (1.0,) + coef[1:], 0, {}, (), 0.05, None, 0.02)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    for arch in sample_archs(space, 30, seed=9):
        terms = table.terms(arch)
        specs, _ = resolve(arch, table.num_classes)
        assert sum(terms.level_ms) == pytest.approx(terms.raw_ms - terms.ms[-1])
        assert sum(terms.op_lookups) == sum(s.op in OP_TERMS for s in specs) and len(terms.level_ms) == LEVELS
        assert table.predict(arch) == pytest.approx(table.calibration.apply(terms), rel=1e-12)
    assert sum(t > 0 for t in terms.level_ms) >= 2 and sum(terms.op_lookups) > 0
    # the memo folds the calibration's per-block terms into one number per layer: a new calibration refolds
    table.calibration = Calibration(model, (0.5,) + coef[1:], 0, {}, (), 0.05, None, 0.02)
    assert table.predict(arch) == pytest.approx(table.calibration.apply(terms), rel=1e-12)


def test_plain_activation_bytes_count_blocks_without_se():
    from nas.blocks import BlockSpec
    from nas.latency.traffic import plain_activation_bytes

    mbconv = BlockSpec("ir", 16, 24, 96, 3, 2, 0, "relu", False, 8)  # 16x8x8 in, 24x4x4 out
    assert plain_activation_bytes(mbconv) == 4 * (16 * 64 + 24 * 16)
    assert plain_activation_bytes(dataclasses.replace(mbconv, se_ch=4)) == 0
    table = LatencyTable.load(TINY_TABLE)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    for arch in sample_archs(space, 10, seed=5):
        specs, _ = resolve(arch, table.num_classes)
        assert table.terms(arch).plain_act_bytes == sum(plain_activation_bytes(s) for s in specs if not s.se_ch) > 0


def test_refit_reproduces_the_calibration_from_the_networks_the_table_keeps(micro_table, micro, tmp_path, capsys,
                                                                           monkeypatch):
    """A table whose calibration was fitted otherwise (here: scaled coefficients) gets back exactly what
    fitting its stored networks gives, entries untouched and nothing measured; without networks, one line."""
    from nas.latency.build import refit_calibration

    cal = micro_table.calibration
    assert refit_calibration(micro_table).calibration == cal
    stale = LatencyTable(micro_table.metadata, micro_table.entries,
                         dataclasses.replace(cal, coef=tuple(2 * c for c in cal.coef)), str(tmp_path / "t.json"))
    stale.save(tmp_path / "t.json")
    def no_measuring(*args, **kwargs):
        raise AssertionError("--refit measured")

    monkeypatch.setattr(build, "measure_models", no_measuring)
    monkeypatch.setattr(build, "BusyMonitor", no_measuring)
    monkeypatch.chdir(ROOT)
    args = ["--space", str(tmp_path / "micro.yaml"), "--out", str(tmp_path / "t.json"), "--refit"]
    assert _main("build_lut")(args) == 0
    assert "refitted" in capsys.readouterr().out
    refitted = LatencyTable.load(tmp_path / "t.json")
    assert refitted.calibration == cal and refitted.entries == micro_table.entries
    LatencyTable(micro_table.metadata, micro_table.entries, None, "x").save(tmp_path / "t.json")
    assert _main("build_lut")(args) == 2
    assert "keeps no calibration networks" in capsys.readouterr().err


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


def test_local_speed_follows_a_drifting_machine():
    """Anchors timed 1.0x the build for the first half, 1.1x after: each network gets its moment's speed."""
    positions = list(range(0, 200, 2))  # anchors at even places, held-out networks at odd ones
    ratios = np.array([1.0 if p < 100 else 1.1 for p in positions])
    ratios[::7] *= 1.3  # single noisy anchors do not move a median of 20
    speed = local_speed(positions, ratios, [5, 61, 141, 195], window=20)
    assert speed == pytest.approx([1.0, 1.0, 1.1, 1.1])
    assert local_speed(positions[:6], ratios[:6], [5, 195]) == pytest.approx([np.median(ratios[:6])] * 2)


@pytest.mark.parametrize("speed_ratio", [1.0, 1.1])
def test_validation_passes_combine_by_geometric_mean_each_anchored_in_its_own_pass(micro_table, micro,
                                                                                   monkeypatch, speed_ratio):
    """Pass 2 finds the machine 21% slower than pass 1 for every network: each network measures 1.1x the
    table's prediction as built on average, and its speed factor, read from the anchors of each pass, is
    1.1x too. A table re-levelled by 1.1 (the machine check's ratio) then predicts every network exactly."""
    built = {row["arch"]: row["measured_ms"] for row in micro_table.calibration.rows}
    orders = []

    def fake_measure(archs, target, protocol, num_classes, chunk, monitor, progress):
        factor = 1.21 ** len(orders)
        orders.append([arch.key for arch in archs])
        progress(len(archs))
        figures = [built.get(arch.to_string()) or micro_table.predict(arch) / speed_ratio for arch in archs]
        return [Measurement(ms=factor * ms, median_ms=1.0, p10_ms=1.0, p90_ms=1.0, count=1, sessions_ms=(1.0,),
                            spread=0.0, slowdown=0.0, stable=True) for ms in figures]

    monkeypatch.setattr(validate, "measure_archs", fake_measure)
    micro_table.speed_ratio = speed_ratio
    report = validate_table(micro_table, micro, get_target("cpu"), n=4, seed=1, protocol=FAST, progress=False,
                            passes=2)
    assert len(orders) == 2 and sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    assert len(orders[0]) == 4 + len(micro_table.calibration.rows)
    for row in report["rows"]:
        built = row["as_built_ms"]
        assert row["predicted_ms"] == pytest.approx(speed_ratio * built)
        assert row["passes_ms"] == pytest.approx([built, 1.21 * built])
        assert row["measured_ms"] == pytest.approx(1.1 * built)
        assert row["pass_speeds"] == pytest.approx([1.0, 1.21]) and row["speed"] == pytest.approx(1.1)
        assert row["error_pct"] == pytest.approx((speed_ratio / 1.1 - 1) * 100)
        assert row["anchored_error_pct"] == pytest.approx(0)  # anchoring starts from the table as built
    anchored = report["anchored"]
    assert anchored["speed_ratio"] == pytest.approx(1.1) and anchored["within_5pct"] == 1.0
    assert anchored["global"]["mape"] == pytest.approx(0)
    assert anchored["pass_spread"]["mape"] == pytest.approx(0)
    assert report["speed_ratio"] == speed_ratio and report["within_5pct"] == (speed_ratio == 1.1)
    if speed_ratio == 1.0:
        assert "as_built" not in report
    else:
        assert report["as_built"]["within_5pct"] == 0.0
        assert report["as_built"]["mean_error_pct"] == pytest.approx((1 / 1.1 - 1) * 100)
    with pytest.raises(NasError, match="--passes must be at least 1"):
        validate_table(micro_table, micro, get_target("cpu"), n=4, seed=1, protocol=FAST, passes=0)


def test_validation_excludes_calibration_networks(micro_table, micro):
    report = validate_table(micro_table, micro, get_target("cpu"), n=4, seed=1, protocol=FAST, progress=False,
                            passes=1)
    assert report["n"] == 4 and len(report["rows"]) == 4
    assert not {row["key"] for row in report["rows"]} & micro_table.calibration.arch_keys
    for key in ("within_10pct", "within_5pct", "mape", "spearman", "kendall", "flops_spearman", "flops_kendall"):
        assert key in report
    assert 0 <= report["within_5pct"] <= report["within_10pct"] <= 1
    row = report["rows"][0]
    assert row["error_pct"] == pytest.approx((row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"] * 100)
    anchored = report["anchored"]  # the six calibration networks timed again among the held-out ones
    assert anchored["networks"] == 6 and anchored["speed_ratio"] > 0
    assert row["anchored_error_pct"] == pytest.approx(
        (row["predicted_ms"] * anchored["speed_ratio"] - row["measured_ms"]) / row["measured_ms"] * 100)
    candidates = report["calibration_candidates"]
    assert {"raw", "linear", "linear_blocks+streaming"} <= set(candidates)
    chosen = candidates[report["calibration"]]  # refitted on the same networks: the table's own calibration
    assert (chosen["within_5pct"], chosen["mape"]) == (report["within_5pct"], pytest.approx(report["mape"]))


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
