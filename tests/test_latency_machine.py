"""A table for this machine: adaptation, entries on demand, the per-machine cache and the fail-fast errors.

The fast tests replace the measuring functions with a fake machine whose entries are the source
table's scaled per block kind and whose networks take what a table of those entries predicts, so the
right answer is known; the ``slow`` ones measure for real on tiny.yaml with small budgets.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from nas.errors import NasError
from nas.latency import machine
from nas.latency.build import sample_archs
from nas.latency.calibration import KIND_TERMS, TERMS, Calibration, NetworkTerms, spilled_terms
from nas.latency.machine import (EntryTransfer, TableProvenance, adapt_table, corrected, fastest_reachable_ms,
                                 table_for_machine)
from nas.latency.table import LatencyTable
from nas.latency.targets import Target, cpu_model, get_target
from nas.space import block_contexts, load_space

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"
TINY_TABLE = ROOT / "latency_tables" / "tiny-r16-cpu-t1-b1.json"
# the fake machine: each block kind runs this many times as long as in the source table
FACTORS = {"conv": 0.6, "ds": 1.35, "ir": 0.8, "bot": 1.0, "maxpool": 1.0, "head": 0.7}


def _kind(key: str) -> str:
    return key.split("_")[0]


class FakeMachine:
    """Stands in for measuring: entries are the source's times ``FACTORS``, networks what a table of those
    entries predicts with the source's calibration. Counts what was measured; measures at most
    ``entries_per_call`` entries per call to mimic a budget."""

    def __init__(self, source: LatencyTable, entries_per_call: int | None = None, factors: dict | None = None,
                 network_ms=None):
        factors = factors or FACTORS
        self.truth = {key: entry["ms"] * factors[_kind(key)] for key, entry in source.entries.items()}
        self.network_ms = network_ms  # (table of the true entries, arch, num_classes) -> ms; default: its prediction
        self.source = source
        self.entries_per_call = entries_per_call
        self.entries: list[str] = []
        self.networks = 0

    def table(self, extra: dict[str, float] | None = None) -> LatencyTable:
        entries = {key: {"ms": ms} for key, ms in {**self.truth, **(extra or {})}.items()}
        return LatencyTable(self.source.metadata, entries, self.source.calibration)

    def measure_entries(self, items, target, protocol, *, opset=0, monitor=None, deadline=math.inf):
        items = list(items)[: self.entries_per_call] if deadline < math.inf and self.entries_per_call else list(items)
        out = {}
        for item in items:
            if item.key not in self.truth:  # an entry the source lacks: a made-up time of its own
                self.truth[item.key] = 0.001 * (1 + len(item.key) % 7)
            out[item.key] = {"ms": self.truth[item.key], "stable": True}
            self.entries.append(item.key)
        return out

    def measure_networks(self, archs, target, protocol, num_classes, *, monitor=None, deadline=math.inf, at_least=10):
        archs = list(archs)[:40]
        self.networks += len(archs)
        truth = self.table()
        if self.network_ms:
            return [self.network_ms(truth, a, num_classes) for a in archs]
        return [truth.predict(a, num_classes) for a in archs]


@pytest.fixture
def tiny():
    return load_space(TINY)


@pytest.fixture
def source(tmp_path):
    """The shipped tiny table as if built on another CPU."""
    data = json.loads(TINY_TABLE.read_text())
    data["metadata"]["cpu"] = "Other CPU (family 1, model 2)"
    path = tmp_path / "other-cpu.json"
    path.write_text(json.dumps(data))
    return LatencyTable.load(path)


@pytest.fixture
def fake(source, monkeypatch):
    fake = FakeMachine(source, entries_per_call=120)
    monkeypatch.setattr(machine, "measure_entries", fake.measure_entries)
    monkeypatch.setattr(machine, "measure_networks", fake.measure_networks)
    monkeypatch.setattr(machine, "BusyMonitor", lambda *args, **kwargs: None)

    def no_check(*args, **kwargs):
        raise AssertionError("machine check run for a table of another CPU")

    monkeypatch.setattr(machine, "machine_check", no_check)
    return fake


def test_adaptation_recovers_per_kind_factors_a_single_factor_cannot(source, tiny, fake):
    adapted = adapt_table(source, tiny, get_target("cpu"), resolution=16, num_classes=10, budget_s=60, seed=0,
                          log=lambda line: None)
    record = adapted.metadata["adaptation"]
    assert 0 < len(record["entries"]["measured"]) == len(fake.entries) <= 120 < len(adapted.entries)
    truth = fake.table()
    errors = [adapted.entries[key]["ms"] / truth.entries[key]["ms"] - 1 for key in adapted.entries]
    assert np.max(np.abs(errors)) < 0.02, "the transfer model should find each kind's factor"
    assert {adapted.entries[key]["origin"] for key in adapted.entries} == {"measured", "transferred"}
    held_out = sample_archs(tiny, 100, seed=9)
    predicted = np.array(adapted.predict_many(held_out))
    measured = np.array([truth.predict(a) for a in held_out])
    assert np.max(np.abs(predicted / measured - 1)) < 0.02
    relevelled = np.array(source.predict_many(held_out)) * record["relevel_ratio"]
    assert np.mean(np.abs(relevelled / measured - 1)) > 3 * np.mean(np.abs(predicted / measured - 1))
    assert record["source_sha256"] == source.sha256 and adapted.metadata["cpu"] == cpu_model()
    assert record["networks"]["measured"] == fake.networks == 40 and adapted.calibration.loo_mape < 1
    assert record["entries"]["cv_mape"] < 2 and record["entries"]["samples"] == len(fake.entries)


def test_correction_is_a_calibration_of_the_same_model():
    """a * source + b * lookups + c, folded into the one model's coefficients, predicts the same."""
    rng = random.Random(0)
    base = Calibration(tuple(rng.uniform(0.5, 1.5) for _ in TERMS), cache_mb=1)
    a, b, c = 0.8, 0.003, -0.01
    folded = Calibration(corrected(base, a, b, c), cache_mb=1)
    for _ in range(20):
        lookups = rng.randrange(3, 20)
        terms = NetworkTerms(tuple(rng.uniform(0, 2) for _ in range(len(TERMS) - 3)),
                             tuple(rng.randrange(1, 400_000) for _ in range(lookups)))
        kinds = sum(terms.sums[TERMS.index(name)] for name in KIND_TERMS)
        terms = NetworkTerms(tuple(s if TERMS[i] not in KIND_TERMS else s * (lookups - 1) / kinds
                                   for i, s in enumerate(terms.sums)), terms.block_bytes)  # every block has a kind
        assert folded.apply(terms) == pytest.approx(a * base.apply(terms) + b * lookups + c)
    assert spilled_terms(3, 10, [5, 5], None) == (0.0, 0.0)


def test_sampling_order_draws_what_networks_spend_most_on_first(tiny):
    table = LatencyTable.load(TINY_TABLE)
    blocks, heads = block_contexts(tiny, 10)
    items = [*blocks, *heads]
    order = machine.sampling_order(items, table, tiny, 10, seed=1)
    assert sorted(i.key for i in order) == sorted(i.key for i in items)
    again, other = (machine.sampling_order(items, table, tiny, 10, seed=s) for s in (1, 2))
    assert order == again != other
    usage = {}
    for arch in sample_archs(tiny, machine.USAGE_NETWORKS, 1 + 3):
        for spec in machine.resolve(arch, 10)[0]:
            usage[spec.key] = usage.get(spec.key, 0) + 1
    spend = [usage.get(i.key, 0) * table.entry_ms(i.key) for i in order]
    first, last = np.mean(spend[:len(spend) // 4]), np.mean(spend[-len(spend) // 4:])
    assert first > 3 * last and spend[-1] == 0  # never-used contexts come last


def test_spread_order_spans_the_range_in_every_prefix():
    order = machine.spread_order(100)
    assert sorted(order) == list(range(100))
    for k in (5, 10, 20):
        picked = sorted(order[:k])
        assert max(np.diff([0, *picked, 99])) <= 100 / k * 2


def test_entry_transfer_shrinks_to_one_factor_without_evidence_of_more():
    """Ratios that are one factor plus noise: the trees predict about that factor for every entry."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = np.log(0.7) + rng.normal(scale=0.01, size=60)
    model = EntryTransfer.fit(x, y)
    assert np.allclose(model.ratios(rng.normal(size=(5, 8))), 0.7, rtol=0.03)
    assert model.cv_mape < 3 and model.summary()["global_factor"] == pytest.approx(0.7, rel=0.01)


def test_table_from_another_cpu_is_adapted_once_then_reused(source, tiny, fake, tmp_path):
    lines = []
    table, prov = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=source.source,
                                    log=lines.append, budget_s=30, directory=tmp_path / "cache")
    assert prov.action == "adapted" and "Other CPU" in prov.reason and Path(prov.path).parent == tmp_path / "cache"
    assert any(prov.path in line for line in lines) and Path(prov.path).is_file()
    assert TableProvenance.from_dict(json.loads(json.dumps(prov.to_dict()))) == prov
    measured = len(fake.entries), fake.networks
    again, reused = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=source.source,
                                      log=lines.append, budget_s=30, directory=tmp_path / "cache")
    assert reused.action == "reused" and reused.path == prov.path and (len(fake.entries), fake.networks) == measured
    arch = sample_archs(tiny, 1, seed=3)[0]
    assert again.predict(arch) == pytest.approx(table.predict(arch))


def test_missing_entries_are_measured_on_demand_and_kept(tiny, monkeypatch, tmp_path):
    """A class count the table lacks heads for: only those are measured (the table is this machine's),
    into this machine's copy, which the next run reuses without measuring."""
    source = LatencyTable.load(TINY_TABLE)
    fake = FakeMachine(source)
    monkeypatch.setattr(machine, "measure_entries", fake.measure_entries)
    monkeypatch.setattr(machine, "machine_check", lambda *args, **kwargs: 1.01)
    heads = [h.key for h in block_contexts(tiny, 7)[1]]
    assert not set(heads) & set(source.entries)
    table, prov = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=7, log=lambda line: None,
                                    directory=tmp_path, table=TINY_TABLE)
    assert prov.action == "entries added" and prov.on_demand_entries == len(heads)
    assert sorted(fake.entries) == sorted(heads)
    arch = sample_archs(tiny, 1, seed=0)[0]
    assert table.predict(arch, 7) > 0 and table.entries[heads[0]]["origin"] == "on demand"
    again, reused = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=7, log=lambda line: None,
                                      directory=tmp_path, table=TINY_TABLE)
    assert reused.action == "reused" and len(fake.entries) == len(heads)
    as_built, same = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, log=lambda line: None,
                                       directory=tmp_path / "other", table=TINY_TABLE)
    assert same.action == "as built" and same.path == str(TINY_TABLE) and same.machine_check == 1.01


@pytest.mark.parametrize("check, action", [(1.08, "adapted"), (0.96, "as built")])
def test_this_cpus_table_is_adapted_only_beyond_the_check_tolerance(tiny, monkeypatch, tmp_path, check, action):
    source = LatencyTable.load(TINY_TABLE)
    fake = FakeMachine(source, entries_per_call=50)
    monkeypatch.setattr(machine, "measure_entries", fake.measure_entries)
    monkeypatch.setattr(machine, "measure_networks", fake.measure_networks)
    monkeypatch.setattr(machine, "BusyMonitor", lambda *args, **kwargs: None)
    monkeypatch.setattr(machine, "cpu_model", lambda: source.metadata["cpu"])
    monkeypatch.setattr(machine, "machine_check", lambda *args, **kwargs: check)
    _, prov = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=TINY_TABLE,
                                log=lambda line: None, directory=tmp_path)
    assert prov.action == action and prov.machine_check == check
    assert ("x1.080" in prov.reason) == (action == "adapted")


@pytest.mark.parametrize("target, flag", [(Target("cpu", 2, 1), "--threads"), (Target("cpu", 1, 8), "--batch"),
                                          (Target("cuda", 1, 1), "--target")])
def test_another_target_threads_or_batch_fails_before_measuring(tiny, monkeypatch, target, flag):
    def measuring(*args, **kwargs):
        raise AssertionError("measured before failing")

    for name in ("measure_entries", "measure_networks", "machine_check", "adapt_table"):
        monkeypatch.setattr(machine, name, measuring)
    with pytest.raises(NasError, match=f"tiny-r16-cpu-t1-b1.json: table .* this run's {flag} is") as info:
        table_for_machine(tiny, target, resolution=16, num_classes=10, table=TINY_TABLE, log=lambda line: None)
    assert "\n" not in str(info.value)


def test_a_missing_entry_of_a_target_without_its_provider_names_the_key(tiny, tmp_path, monkeypatch):
    data = json.loads(TINY_TABLE.read_text())
    data["metadata"].update(target="cuda", provider="CUDAExecutionProvider")
    path = tmp_path / "cuda.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(machine, "machine_check", lambda *args, **kwargs: None)
    cpu_only = type("Ort", (), {"get_available_providers": staticmethod(lambda: ["CPUExecutionProvider"]),
                                "__version__": "x"})
    monkeypatch.setattr(machine, "ort", cpu_only)
    with pytest.raises(NasError, match=r"no latency entry for 'head_.*_cls7_.*cannot be measured here.*CUDAExecution"):
        table_for_machine(tiny, Target("cuda"), resolution=16, num_classes=7, table=path, log=lambda line: None,
                          directory=tmp_path)


def test_no_table_for_the_space_names_the_build_command(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NasError, match=r"no latency table for tiny on cpu t1 b1 .*python scripts/build_lut.py"):
        table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, log=lambda line: None)
    with pytest.raises(NasError, match=r"--table nope.json: no such file"):
        table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table="nope.json")
    with pytest.raises(NasError, match="--adapt must be one of"):
        table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, adapt="sometimes")


def test_a_table_of_another_space_is_refused(tmp_path):
    mnasnet = load_space(ROOT / "search_spaces" / "mnasnet.yaml")
    with pytest.raises(NasError, match=r"was built for space 'tiny', not 'mnasnet'"):
        table_for_machine(mnasnet, get_target("cpu"), resolution=32, num_classes=10, table=TINY_TABLE,
                          directory=tmp_path)


def test_fastest_reachable_is_below_every_sampled_network(tiny):
    table = LatencyTable.load(TINY_TABLE)
    fastest = fastest_reachable_ms(table, tiny, 10)
    sampled = table.predict_many(sample_archs(tiny, 300, seed=2))
    assert 0 < fastest <= min(sampled)


@pytest.mark.slow
def test_adapting_for_real_within_a_small_budget(source, tiny, tmp_path):
    """Measures on this machine: a few entries and networks of tiny.yaml, a table that predicts them."""
    table, prov = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=source.source,
                                    budget_s=8, log=lambda line: None, directory=tmp_path)
    record = table.metadata["adaptation"]
    assert prov.action == "adapted" and record["networks"]["measured"] >= machine.MIN_NETWORKS
    assert len(record["entries"]["measured"]) >= 1 and table.calibration.loo_mape < 25
    rows = table.calibration.rows
    assert all(row.measured_ms > 0 and abs(row.error_pct) < 50 for row in rows)


def test_an_impossible_latency_limit_fails_before_measuring(tiny, monkeypatch, tmp_path):
    def measuring(*args, **kwargs):
        raise AssertionError("measured before failing")

    for name in ("measure_entries", "measure_networks", "machine_check", "adapt_table"):
        monkeypatch.setattr(machine, name, measuring)
    monkeypatch.setattr(machine, "cpu_model", lambda: "Other CPU")  # a table of another CPU: 2x slack
    table = LatencyTable.load(TINY_TABLE)
    fastest = fastest_reachable_ms(table, tiny, 10)
    with pytest.raises(NasError, match=r"--latency-limit-ms .* is impossible: the fastest network of .*tiny.yaml is "
                                       r"predicted at .* ms by .* 2x as fast; raise the limit"):
        table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=TINY_TABLE,
                          latency_limit_ms=fastest / 2.5, directory=tmp_path)


def test_the_latency_limit_is_checked_exactly_on_this_machines_table(tiny, monkeypatch, tmp_path):
    table = LatencyTable.load(TINY_TABLE)
    monkeypatch.setattr(machine, "machine_check", lambda *args, **kwargs: 1.0)
    fastest = fastest_reachable_ms(table, tiny, 10)
    _, prov = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=TINY_TABLE,
                                latency_limit_ms=fastest * 1.01, directory=tmp_path, log=lambda line: None)
    assert prov.action == "as built"
    with pytest.raises(NasError, match=r"predicted at .* ms on this machine; raise the limit"):
        table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=10, table=TINY_TABLE,
                          latency_limit_ms=fastest * 0.99, directory=tmp_path, log=lambda line: None)


@pytest.mark.slow
def test_missing_heads_measured_for_real_and_kept(tiny, tmp_path, monkeypatch):
    """Another class count on this machine's own table: only its heads are measured, for real."""
    monkeypatch.setattr(machine, "machine_check", lambda *args, **kwargs: 1.0)
    table, prov = table_for_machine(tiny, get_target("cpu"), resolution=16, num_classes=3, table=TINY_TABLE,
                                    log=lambda line: None, directory=tmp_path)
    heads = {h.key for h in block_contexts(tiny, 3)[1]}
    assert prov.action == "entries added" and prov.on_demand_entries == len(heads)
    assert all(table.entries[key]["ms"] > 0 and table.entries[key]["origin"] == "on demand" for key in heads)
    assert all(ms > 0 for ms in table.predict_many(sample_archs(tiny, 20, seed=1), 3))


def test_another_resolution_measures_every_entry_and_recalibrates(tiny, monkeypatch, tmp_path):
    """--resolution 32 with only the 16-px table: every entry the table lacks is measured, then whole
    networks recalibrate; no machine check, since the table is adapted anyway."""
    source = LatencyTable.load(TINY_TABLE)

    def network_ms(truth, arch, num_classes):  # a machine whose networks take 1.1x their entries + 2 us a block
        return 1.1 * truth.predict_raw(arch, num_classes) + 0.002 * (len(arch.layers) + 1)

    fake = FakeMachine(source, factors=dict.fromkeys(FACTORS, 1.0), network_ms=network_ms)
    monkeypatch.setattr(machine, "measure_entries", fake.measure_entries)
    monkeypatch.setattr(machine, "measure_networks", fake.measure_networks)
    monkeypatch.setattr(machine, "BusyMonitor", lambda *args, **kwargs: None)
    monkeypatch.setattr(machine, "machine_check", lambda *args, **kwargs: pytest.fail("checked"))
    monkeypatch.chdir(ROOT)  # the default table name, found at the space's own resolution
    table, prov = table_for_machine(tiny, get_target("cpu"), resolution=32, num_classes=10, log=lambda line: None,
                                    directory=tmp_path)
    needed = {i.key for i in (*block_contexts(machine.with_resolution(tiny, 32), 10)[0],
                              *block_contexts(machine.with_resolution(tiny, 32), 10)[1])}
    assert prov.action == "adapted" and "built at 16 px, this run is at 32 px" in prov.reason
    assert set(table.entries) == needed and table.resolution == 32
    # the blocks at 8 px and below are in the 16-px table already: this machine's, so kept as they are
    assert set(fake.entries) == needed - set(source.entries) != set()
    assert {table.entries[key].get("origin") for key in fake.entries} == {"on demand"}
    truth = fake.table()
    for seed in range(10):
        arch = tiny.decode(tiny.sample(random.Random(seed)), 32)
        assert table.predict(arch) == pytest.approx(network_ms(truth, arch, 10), rel=0.01)
    assert table.calibration.method == "fit" and table.calibration.loo_mape < 0.5
