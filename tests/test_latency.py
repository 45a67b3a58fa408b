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
import platform
import random
import signal
import subprocess
import sys
import textwrap
import time
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
from nas.latency.calibration import SUM_TERMS
from nas.latency.table import LatencyTable, MissingEntryError, default_table_path
from nas.latency.targets import PROVIDERS, Target, _session_options, cpu_model, get_target
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
    assert loaded.calibration.method == "fit" and len(loaded.calibration.rows) == 6


def test_calibration_networks_include_the_fast_end():
    """A fifth of the calibration networks are the fastest of a larger random pool, by their entries' sum:
    the rest are the plain random sample, and none repeats."""
    from nas.latency.build import FAST_POOL, calibration_networks

    table = LatencyTable.load(TINY_TABLE)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    raw = table.predict_raw
    picked = calibration_networks(space, 20, 3, raw)
    assert picked[:16] == sample_archs(space, 16, 3) and len({a.key for a in picked}) == 20
    pool = sample_archs(space, 4 * FAST_POOL, 4, exclude=frozenset(a.key for a in picked[:16]))
    assert picked[16:] == sorted(pool, key=raw)[:4]
    assert max(raw(a) for a in picked[16:]) < np.percentile([raw(a) for a in picked[:16]], 25)


def test_prediction_is_calibrated_sum_of_entries(micro_table, micro):
    for arch in sample_archs(micro, 8, seed=3):
        specs, head = resolve(arch, 10)
        raw = sum(micro_table.entries[s.key]["ms"] for s in specs) + micro_table.entries[head.key]["ms"]
        assert micro_table.predict_raw(arch) == pytest.approx(raw)
        terms = micro_table.terms(arch)
        assert (terms.raw_ms, len(terms.block_bytes)) == (pytest.approx(raw), len(specs) + 1)
        assert micro_table.predict(arch) == pytest.approx(micro_table.calibration.apply(terms))
    archs = sample_archs(micro, 4, seed=4)
    assert micro_table.predict_many(archs) == [micro_table.predict(a) for a in archs]


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
    with pytest.raises(MissingEntryError, match="python scripts/adapt_lut.py") as info:
        table.predict(arch)
    assert isinstance(info.value, NasError)
    assert specs[-1].key in str(info.value) and str(path) in str(info.value)
    with pytest.raises(MissingEntryError, match="head_avg_i16_cls1000_h4"):
        micro_table.predict(arch, num_classes=1000)


def test_load_rejects_non_tables(tmp_path):
    with pytest.raises(NasError, match="no such latency table"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"schema": 99}')
    with pytest.raises(NasError, match="not a latency table of schema 3"):
        LatencyTable.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"schema": 1, "metadata": {}, "entries": {}}')  # median-based entries
    with pytest.raises(NasError, match=r"old.json: .*found schema 1\); rebuild it with python scripts/build_lut.py"):
        LatencyTable.load(tmp_path / "old.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["calibration"]["coef"].update(quadratic=1.0), r"calibration term 'quadratic' is not one of level0_ms"),
    (lambda d: d["calibration"].pop("coef"), r"calibration lacks 'coef'"),
    (lambda d: d["calibration"].update(coef="fast"), r"malformed calibration"),
    (lambda d: d["calibration"]["rows"][0].pop("measured_ms"), r"calibration lacks 'measured_ms'"),
    (lambda d: d["entries"].update(stem={"p10_ms": 1.0}), r"entry 'stem' lacks a numeric 'ms'"),
])
def test_load_rejects_a_malformed_calibration_or_entry(edit, message, tmp_path):
    """A hand-edited table fails on loading with the file and the key, not with a KeyError at predict time."""
    data = json.loads(TINY_TABLE.read_text())
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

    monkeypatch.setattr(build, "entry_model", lambda item, target, opset: item.key.encode())
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
    assert len(rows) == 6 and {times_measured[row.arch] for row in rows} == {3}
    assert (table.metadata["passes"], table.metadata["calibration_passes"]) == (2, 3)
    for key in keys:
        assert table.entries[key]["ms"] == pytest.approx(0.5 * base(key), abs=1e-6)
    for row in rows:
        assert row.measured_ms == pytest.approx(0.125 ** (1 / 3) * base(row.arch))


def test_resume_refuses_other_settings_and_existing_table(micro, micro_table, tmp_path):
    out = tmp_path / "t.json"
    build_table(micro, get_target("cpu"), out, protocol=FAST, stop_after=2, progress=False)
    with pytest.raises(NasError, match="other settings \\(num_classes: 10 there, 1000 now\\)"):
        build_table(micro, get_target("cpu"), out, protocol=FAST, num_classes=1000, progress=False)
    with pytest.raises(NasError, match="already exists; pass --fresh"):
        build_table(micro, get_target("cpu"), tmp_path / "micro.json", protocol=FAST, progress=False)


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
        act_mb = table.terms(arch).sums[SUM_TERMS.index("act_mb")]
        assert act_mb == pytest.approx(sum(plain_activation_bytes(s) for s in specs if not s.se_ch) / 1e6) and act_mb > 0


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


def test_validation_excludes_calibration_networks(micro_table, micro):
    report = validate_table(micro_table, micro, get_target("cpu"), n=4, seed=1, protocol=FAST, progress=False,
                            passes=1)
    assert report["n"] == 4 and len(report["rows"]) == 4
    assert not {row["key"] for row in report["rows"]} & {row.key for row in micro_table.calibration.rows}
    for key in ("within_10pct", "within_5pct", "mape", "spearman", "kendall", "flops_spearman", "flops_kendall"):
        assert key in report
    assert 0 <= report["within_5pct"] <= report["within_10pct"] <= 1
    row = report["rows"][0]
    assert row["error_pct"] == pytest.approx((row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"] * 100)
    assert report["ceiling_within_10pct"] is None  # one pass: nothing to agree with


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
    ("validate_lut", ["--space", "search_spaces/tiny.yaml", "--table", "none.json"], "none.json: no such file"),
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
                      "--adapt", "never", "--quiet", cwd=tmp_path)  # the plot goes beside the JSON by default
    assert checked.returncode == 0, checked.stderr
    assert "within +-10%" in checked.stdout and "this machine's ceiling" in checked.stdout
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["n"] == 3 and report["table"] == str(Path("latency_tables") / "micro-r16-cpu-t1-b1.json")
    assert 0 <= report["ceiling_within_5pct"] <= report["ceiling_within_10pct"] <= 1
    assert report["provenance"]["action"] == "as built"
    assert (tmp_path / "v.png").stat().st_size > 0
