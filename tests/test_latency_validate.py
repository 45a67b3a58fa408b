"""Validation's figures from given measurements (nothing measured): accuracy, the repeatability ceiling,
other predictors on the same measurements; and the adapt_lut.py front end's one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from nas.latency import validate
from nas.latency.measure import Measurement, Protocol
from nas.latency.table import LatencyTable
from nas.latency.targets import get_target
from nas.latency.validate import repeatability_ceiling, validate_table
from nas.space import load_space

ROOT = Path(__file__).resolve().parents[1]
TINY_TABLE = ROOT / "latency_tables" / "tiny-r16-cpu-t1-b1.json"


def test_ceiling_counts_networks_whose_passes_agree():
    passes = [[1.0, 1.04, 1.02], [1.0, 1.08], [1.0, 1.2], [2.0]]  # the last has nothing to agree with
    assert repeatability_ceiling(passes) == {"ceiling_within_10pct": pytest.approx(2 / 3),
                                             "ceiling_within_5pct": pytest.approx(1 / 3)}
    assert repeatability_ceiling([[1.0]]) == {"ceiling_within_10pct": None, "ceiling_within_5pct": None}


def test_validation_reports_the_ceiling_and_compared_predictors(monkeypatch):
    """A fake machine running every network at 1.1x the table, its passes 0% / 3% / 12% apart by network."""
    table = LatencyTable.load(TINY_TABLE)
    space = load_space(ROOT / "search_spaces" / "tiny.yaml")
    spreads = [1.0, 1.03, 1.12]
    calls = []

    def fake_measure(archs, target, protocol, num_classes, **kwargs):
        calls.append(len(archs))
        out = []
        for arch in archs:
            base = 1.1 * table.predict(arch)
            ms = base * (spreads[int(arch.key, 16) % 3] if len(calls) > 1 else 1.0)
            out.append(Measurement(ms, ms, ms, ms, 3, (ms,), 0.0, 0.0, True))
        if kwargs.get("progress"):
            kwargs["progress"](len(archs))
        return out

    monkeypatch.setattr(validate, "measure_archs", fake_measure)
    monkeypatch.setattr(validate, "BusyMonitor", lambda *args, **kwargs: None)
    report = validate_table(table, space, get_target("cpu"), 30, seed=4, passes=2, progress=False,
                            protocol=Protocol(reference=False),
                            compare={"relevelled": lambda a: 1.1 * table.predict(a)})
    rows = report["rows"]
    spread = np.array([max(r["passes_ms"]) / min(r["passes_ms"]) - 1 for r in rows])
    assert report["ceiling_within_10pct"] == pytest.approx(np.mean(spread <= 0.10)) and np.mean(spread <= 0.10) < 1
    assert report["ceiling_within_5pct"] == pytest.approx(np.mean(spread <= 0.05))
    measured = np.array([r["measured_ms"] for r in rows])
    predicted = np.array([r["predicted_ms"] for r in rows])
    assert measured == pytest.approx(np.sqrt([r["passes_ms"][0] * r["passes_ms"][1] for r in rows]))
    assert report["within_5pct"] == pytest.approx(np.mean(np.abs(predicted / measured - 1) <= 0.05))
    relevelled = report["compared"]["relevelled"]
    assert relevelled["mape"] < report["mape"] and relevelled["kendall"] is not None
    assert rows[0]["relevelled_ms"] == pytest.approx(1.1 * rows[0]["predicted_ms"])
    assert not {r["key"] for r in rows} & {row.key for row in table.calibration.rows}
    json.dumps(report)  # the report is what --json writes


def _main(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args, message", [
    (["--table", "none.json"], "none.json: no such latency table"),
    (["--table", str(TINY_TABLE), "--threads", "2"], "table threads is 1, this run's --threads is 2"),
    (["--table", str(TINY_TABLE), "--budget-s", "0"], "--budget-s must be positive"),
    (["--table", str(TINY_TABLE), "--space", "search_spaces/mnasnet.yaml"],
     "was built for space 'tiny', not 'mnasnet'"),
])
def test_adapt_script_bad_input_is_one_line(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _main("adapt_lut")(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
