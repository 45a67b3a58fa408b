"""The search loop: resume equals an uninterrupted run, dedup, retries, bounded limits, Ray."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SPACES
from nas.cost import arch_cost
from nas.errors import NasError
from nas.fidelity import ASHA, Evaluation, Fidelity
from nas.journal import read_jsonl
from nas.objectives import Limits, Objective
from nas.search import LoopSettings, Search, rank_key
from nas.space import load_space
from nas.trial import COMPLETE, PRUNED

TOP = Fidelity(epochs=2, fraction=0.15, resolution=16)  # seconds per candidate on tiny.yaml


def flops_latency(arch):
    """A cheap, real, deterministic latency stand-in: analytic MFLOPs."""
    return arch_cost(arch, 10).flops / 1e6


def settings(**overrides) -> LoopSettings:
    base = dict(strategy="evolution", strategy_options={"population_size": 4, "sample_size": 2}, trials=6,
                objective=Objective.mnasnet(0.5, "soft"), top=TOP, rungs=2, eta=2, seed=3)
    return LoopSettings(**{**base, **overrides})


def comparable(path: Path) -> list[dict]:
    """trials.jsonl without wall-clock fields."""
    rows = read_jsonl(path)
    for row in rows:
        row.pop("seconds")
        for key in ("seconds", "train_seconds"):
            row["metrics"].pop(key, None)
    return rows


class Interrupt(Exception):
    pass


def interrupt_after(n_lines: int):
    seen = []

    def log(line: str) -> None:
        seen.append(line)
        if sum(line.startswith("[") for line in seen) >= n_lines:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of a round

    return log


def test_round_size_follows_the_halving_ladder_and_grows_with_workers_only_past_it():
    """Latency-band turns last one single-worker round, so that a resumed run with another worker
    count keeps its turns; the loop's rounds still give every worker a candidate."""
    assert settings(rungs=3, eta=3).single_worker_round == 9
    assert settings(rungs=3, eta=3, workers=4).batch_size == 9
    assert settings(rungs=2, eta=2, workers=4).single_worker_round == 2
    assert settings(rungs=2, eta=2, workers=4).batch_size == 4
    assert settings(round_size=16, workers=4).single_worker_round == settings(round_size=16).batch_size == 16


def test_journal_holds_every_finished_trial_and_successive_halving_prunes(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    trials = Search(space, settings(), tmp_path, flops_latency, log=lambda _: None).run()
    rows = read_jsonl(tmp_path / "trials.jsonl")
    assert [r["number"] for r in rows] == [t.number for t in trials] and len(rows) == 6
    for row in rows:
        assert {"number", "arch", "params", "state", "metrics"} <= row.keys()
        assert space.decode(row["params"]).to_string().replace("i16", "i16") == row["arch"]
    states = [t.state for t in trials]
    # batches of eta=2: one of each pair goes on to the top rung (two epochs), the other stops after one
    assert states.count(COMPLETE) == 3 and states.count(PRUNED) == 3
    assert all(t.metrics["epochs"] == (2 if t.state == COMPLETE else 1) for t in trials)


def test_time_budget_spans_resumed_sessions(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    quiet = dict(log=lambda _: None)
    assert len(Search(space, settings(trials=2), tmp_path, flops_latency, **quiet).run()) == 2
    spent = [e for e in read_jsonl(tmp_path / "journal.jsonl") if e["event"] == "clock"][-1]["elapsed"]
    assert spent > 0
    # the first session used the whole budget: rerunning the same command trains nothing new
    assert len(Search(space, settings(trials=6, time_budget=spent * 0.99), tmp_path, flops_latency, **quiet).run()) == 2
    # a larger budget continues the run
    assert len(Search(space, settings(trials=6, time_budget=spent * 100), tmp_path, flops_latency, **quiet).run()) == 6


def test_asha_decides_each_result_at_once_from_the_results_before_it(tmp_path):
    """No rounds: a candidate goes on exactly when it is in the top floor(n/eta) of its rung so far."""
    space = load_space(SPACES / "tiny.yaml")
    config = settings(scheduler="asha", trials=8)
    trials = Search(space, config, tmp_path, flops_latency, log=lambda _: None).run()
    events = read_jsonl(tmp_path / "journal.jsonl")
    assert not any(e["event"] == "round" for e in events)
    asha, rank = ASHA(config.fidelities, config.eta), rank_key(config.objective)
    done, reached = [], {}
    for e in events:
        if e["event"] == "rung":
            done.append(Evaluation(e["number"], e["rung"], e["result"]))
            if e["rung"] == 0:
                reached[e["number"]] = 1 if asha.promotes(done, rank) else 0
            else:
                assert reached[e["number"]] == 1  # trained at rung 1 only when its rung-0 result promoted it
    states = {t.number: t.state for t in trials}
    assert len(trials) == 8 and sum(reached.values()) >= 2  # floor(n/2): some go on, the first one never
    assert {n: COMPLETE if r else PRUNED for n, r in reached.items()} == states
    assert reached[min(reached)] == 0
    assert all(t.metrics["epochs"] == config.fidelities[reached[t.number]].epochs for t in trials)


def test_asha_keeps_two_workers_busy(tmp_path):
    """With two workers a new candidate starts before the first is told: no worker waits for a round."""
    space = load_space(SPACES / "tiny.yaml")
    trials = Search(space, settings(scheduler="asha", trials=4, workers=2), tmp_path, flops_latency,
                    log=lambda _: None).run()
    assert len(trials) == 4 and all(t.state in (COMPLETE, PRUNED) for t in trials)
    events = [e for e in read_jsonl(tmp_path / "journal.jsonl") if e["event"] in ("ask", "tell")]
    assert [e["event"] for e in events[:2]] == ["ask", "ask"]


def test_hyperband_rounds_cycle_its_brackets(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    # rungs 2, eta 2: bracket 0 starts 2 candidates at rung 0 (one promoted), bracket 1 trains 2 at the top
    trials = Search(space, settings(scheduler="hyperband"), tmp_path, flops_latency, log=lambda _: None).run()
    events = read_jsonl(tmp_path / "journal.jsonl")
    rounds = [(e["numbers"], e["start_rung"]) for e in events if e["event"] == "round"]
    assert [start for _, start in rounds] == [0, 1, 0] and all(len(numbers) == 2 for numbers, _ in rounds)
    rungs = {}
    for e in events:
        if e["event"] == "rung":
            rungs.setdefault(e["number"], []).append(e["rung"])
    for numbers, start in rounds:
        assert all(rungs[n][0] == start for n in numbers)  # nothing below the bracket's rung is trained
    states = {t.number: t.state for t in trials}
    assert [states[n] for n in rounds[1][0]] == [COMPLETE, COMPLETE]
    assert sorted(states[n] for n in rounds[0][0]) == [COMPLETE, PRUNED]


@pytest.mark.parametrize("strategy,options,scheduler", [
    ("evolution", {"population_size": 4, "sample_size": 2}, "halving"),
    ("rl", {}, "halving"),
    ("evolution", {"population_size": 4, "sample_size": 2}, "hyperband"),  # interrupted in a top-rung bracket
    ("evolution", {"population_size": 4, "sample_size": 2}, "asha"),
])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, strategy, options, scheduler):
    space = load_space(SPACES / "tiny.yaml")
    config = settings(strategy=strategy, strategy_options=options, scheduler=scheduler)
    whole = tmp_path / "whole"
    Search(space, config, whole, flops_latency, log=lambda _: None).run()
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        Search(space, config, broken, flops_latency, log=interrupt_after(3)).run()
    assert len(read_jsonl(broken / "trials.jsonl")) == 3  # nothing finished was lost
    Search(space, config, broken, flops_latency, log=lambda _: None).run()
    assert comparable(broken / "trials.jsonl") == comparable(whole / "trials.jsonl")


KILLABLE = textwrap.dedent("""
    import sys
    from nas.cost import arch_cost
    from nas.fidelity import Fidelity
    from nas.objectives import Objective
    from nas.search import LoopSettings, Search
    from nas.space import load_space
    space = load_space(sys.argv[1])
    s = LoopSettings(strategy="rl", trials=6, objective=Objective.mnasnet(0.5, "soft"),
                     top=Fidelity(2, 0.15, 16), rungs=2, eta=2, seed=3, scheduler=sys.argv[3])
    Search(space, s, sys.argv[2], lambda a: arch_cost(a, 10).flops / 1e6, log=lambda _: None).run()
""")


@pytest.mark.parametrize("scheduler", ["halving", "asha"])  # asha: killed before the journaled result's decision
def test_kill_9_mid_round_loses_nothing_and_resumes_identically(tmp_path, scheduler):
    space_file = str(SPACES / "tiny.yaml")
    script = tmp_path / "run.py"
    script.write_text(KILLABLE)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), space_file, str(whole), scheduler], check=True, env=env, timeout=600)
    proc = subprocess.Popen([sys.executable, str(script), space_file, str(killed), scheduler], env=env)
    journal = killed / "journal.jsonl"
    deadline = time.monotonic() + 600
    # kill once a round has a rung result journaled but the round is not finished
    while time.monotonic() < deadline and proc.poll() is None:
        events = read_jsonl(journal) if journal.exists() else []
        told = sum(e["event"] == "tell" for e in events)
        if told >= 2 and events[-1]["event"] == "rung":
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_jsonl(killed / "trials.jsonl")
    assert 2 <= len(before) < 6
    subprocess.run([sys.executable, str(script), space_file, str(killed), scheduler], check=True, env=env, timeout=600)
    assert comparable(killed / "trials.jsonl") == comparable(whole / "trials.jsonl")
    assert comparable(killed / "trials.jsonl")[: len(before)] == [comparable_row(r) for r in before]


def comparable_row(row: dict) -> dict:
    row = json.loads(json.dumps(row))
    row.pop("seconds")
    for key in ("seconds", "train_seconds"):
        row["metrics"].pop(key, None)
    return row


def small_space(tmp_path: Path, lrs=(0.01,)) -> Path:
    """Two architectures (and fixed hyperparameters unless ``lrs`` has several): a strategy must repeat itself."""
    data = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    data["width_mult"] = [1.0]
    data["defaults"].update(op=["ds"], kernel=[3, 5], se=[0], skip=[True], expansion=[3])
    data["stages"] = [{"channels": 16, "stride": 2, "layers": [1]}]
    data["hyperparameters"] = {"optimizer": {"type": "categorical", "choices": ["adam"]},
                               "lr": {"type": "categorical", "choices": list(lrs)},
                               "batch_size": {"type": "categorical", "choices": [64]}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_never_trains_a_candidate_twice_and_stops_when_only_repeats_remain(tmp_path):
    space = load_space(small_space(tmp_path))
    assert space.size() == 2
    config = settings(strategy="random", strategy_options={}, trials=3, rungs=1)
    with pytest.raises(NasError, match="keeps proposing candidates it has seen"):
        Search(space, config, tmp_path / "run", flops_latency, log=lambda _: None).run()
    trained = read_jsonl(tmp_path / "run" / "trials.jsonl")
    assert len(trained) == 2 and len({r["arch"] for r in trained}) == 2
    skipped = [e for e in read_jsonl(tmp_path / "run" / "journal.jsonl") if e["event"] == "tell" and e["skipped"]]
    assert skipped and all(e["trial"]["arch"] in {r["arch"] for r in trained} for e in skipped)


class Scripted:
    """Proposes a fixed list of points (A, A, B, ...): repeats inside one round, made to order."""

    def __init__(self, points: list[dict]):
        self.points, self.asked, self.told = points, 0, []

    def ask(self) -> dict:
        self.asked += 1
        return dict(self.points[self.asked - 1])

    def tell(self, trial) -> None:
        self.told.append(trial.number)


def repeating_search(space, run_dir: Path, log=lambda _: None) -> Search:
    """Rounds of 3 on tiny.yaml whose strategy asks A, A, B, A, C (round 1: A, B, C), then B (told at
    once from the cache) and D (round 2)."""
    a, b, c, d = (space.sample(random.Random(seed)) for seed in (1, 2, 3, 4))
    assert len({space.candidate_key(p) for p in (a, b, c, d)}) == 4
    search = Search(space, settings(trials=4, round_size=3), run_dir, flops_latency, log=log)
    search.strategy = Scripted([a, a, b, a, c, b, d])
    return search


def tells(run_dir: Path) -> list[tuple[int, bool, str, list | None]]:
    return [(e["trial"]["number"], e["skipped"], e["trial"]["arch"], e["trial"]["values"])
            for e in read_jsonl(run_dir / "journal.jsonl") if e["event"] == "tell"]


def test_a_repeat_asked_within_a_round_is_held_and_told_its_original_result(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    search = repeating_search(space, tmp_path / "run")
    search.run()
    trained = read_jsonl(tmp_path / "run" / "trials.jsonl")
    assert [r["number"] for r in trained] == [0, 2, 4, 6]  # A, B, C, D: each trained once
    assert sorted(search.strategy.told) == list(range(7))  # every ask told exactly once
    told = tells(tmp_path / "run")
    for repeat, original in ((1, 0), (3, 0), (5, 2)):
        i = [t[0] for t in told].index(repeat)
        assert told[i][1] and told[i][2:] == told[[t[0] for t in told].index(original)][2:]
    # the held repeats of A follow A's own tell directly, before B's
    assert [t[0] for t in told][:3] == [0, 1, 3]


class CrashOnTell(Exception):
    pass


def test_a_crash_between_a_candidate_and_its_held_repeat_resumes_identically(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    repeating_search(space, tmp_path / "whole").run()
    broken = repeating_search(space, tmp_path / "broken")
    journal_tell = broken.journal.tell

    def tell(trial, skipped=False):
        if trial.number == 3:
            raise CrashOnTell  # A and its first repeat are journaled, the second repeat is not
        journal_tell(trial, skipped=skipped)

    broken.journal.tell = tell
    with pytest.raises(CrashOnTell):
        broken.run()
    assert [t[0] for t in tells(tmp_path / "broken")] == [0, 1]
    repeating_search(space, tmp_path / "broken").run()
    assert tells(tmp_path / "broken") == tells(tmp_path / "whole")
    assert comparable(tmp_path / "broken" / "trials.jsonl") == comparable(tmp_path / "whole" / "trials.jsonl")


def test_an_interrupted_round_holds_its_repeats_again_on_resume(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    repeating_search(space, tmp_path / "whole").run()
    broken = repeating_search(space, tmp_path / "broken")
    journal_rung = broken.journal.rung

    def rung(number, rung, result):
        journal_rung(number, rung, result)
        if number == 2:
            raise KeyboardInterrupt  # A's and B's first rung journaled, nothing told yet

    broken.journal.rung = rung
    with pytest.raises(KeyboardInterrupt):
        broken.run()
    assert tells(tmp_path / "broken") == []
    resumed = repeating_search(space, tmp_path / "broken")
    resumed.run()
    assert sorted(resumed.strategy.told) == list(range(7))
    assert tells(tmp_path / "broken") == tells(tmp_path / "whole")
    assert comparable(tmp_path / "broken" / "trials.jsonl") == comparable(tmp_path / "whole" / "trials.jsonl")


def test_with_the_fixed_recipe_points_differing_only_in_hyperparameters_are_one_candidate(tmp_path):
    space = load_space(small_space(tmp_path, lrs=(0.01, 0.02, 0.05)))
    config = settings(strategy="random", strategy_options={}, trials=3, rungs=1, search_hparams=False)
    with pytest.raises(NasError, match="keeps proposing candidates it has seen"):
        Search(space, config, tmp_path / "run", flops_latency, log=lambda _: None).run()
    trained = read_jsonl(tmp_path / "run" / "trials.jsonl")
    assert len(trained) == 2 and len({r["arch"] for r in trained}) == 2


def test_a_space_of_hyperparameters_alone_needs_search_hparams(tmp_path):
    data = yaml.safe_load(small_space(tmp_path, lrs=(0.01, 0.02)).read_text())
    data["defaults"]["kernel"] = [3]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(data))
    space = load_space(tmp_path / "one.yaml")
    with pytest.raises(NasError, match="every choice of the space is a training hyperparameter.*--search-hparams"):
        Search(space, settings(search_hparams=False), tmp_path / "run", flops_latency, log=lambda _: None)


def test_impossible_limits_end_with_a_clear_error_not_a_loop(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    config = settings(strategy="random", strategy_options={}, limits=Limits(flops=10))
    with pytest.raises(NasError, match="no candidate met the limits"):
        Search(space, config, tmp_path, flops_latency, log=lambda _: None).run()
    assert read_jsonl(tmp_path / "trials.jsonl") == []  # nothing was trained


def test_a_failing_candidate_becomes_a_failed_trial_and_the_search_goes_on(tmp_path):
    space = load_space(SPACES / "tiny.yaml")
    data = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    data["hyperparameters"]["lr"] = {"type": "categorical", "choices": [1.0e6]}  # diverges: NaN loss
    data["hyperparameters"]["optimizer"] = {"type": "categorical", "choices": ["sgd"]}
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    trials = Search(space, settings(strategy="random", strategy_options={}, trials=2, rungs=1), tmp_path / "run",
                    flops_latency, log=lambda _: None).run()
    assert len(trials) == 2 and all(t.state == "FAIL" and "non-finite" in t.error for t in trials)


def test_ray_executor_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        space = load_space(SPACES / "tiny.yaml")
        local = Search(space, settings(trials=2), tmp_path / "local", flops_latency, log=lambda _: None).run()
        remote = Search(space, settings(trials=2, executor="ray"), tmp_path / "ray", flops_latency,
                        log=lambda _: None).run()
    finally:
        ray.shutdown()
    # seeded training gives the same result wherever it runs
    assert [(t.arch, t.values) for t in remote] == [(t.arch, t.values) for t in local]


def test_trial_lines_name_each_metric_once(tmp_path):
    """A Pareto vector repeats accuracy and negated latency: the line shows them once, costs positive."""
    space = load_space(SPACES / "tiny.yaml")
    lines = []
    objective = Objective("pareto", minimise=("latency_ms", "flops"))
    Search(space, settings(trials=2, objective=objective), tmp_path, flops_latency, log=lines.append).run()
    trial_lines = {int(line.split(" trial ")[1].split()[0]): line for line in lines if line.startswith("[")}
    rows = read_jsonl(tmp_path / "trials.jsonl")
    assert sorted(trial_lines) == sorted(row["number"] for row in rows)
    for row in rows:
        line = trial_lines[row["number"]]
        assert line.count("acc=") == 1 and "accuracy=" not in line and "latency_ms=" not in line
        assert f" flops={row['metrics']['flops']:.4g} " in line


def test_asha_stops_once_when_the_strategy_runs_out(tmp_path):
    space = load_space(small_space(tmp_path))
    lines = []
    trials = Search(space, settings(strategy="grid", strategy_options={}, trials=5, scheduler="asha"),
                    tmp_path / "run", flops_latency, log=lines.append).run()
    assert len(trials) == 2 and len({t.arch for t in trials}) == 2
    assert lines.count("the strategy has no candidates left") == 1


def test_asha_resume_settles_every_journaled_result_before_asking_anew(tmp_path):
    """Two candidates trained but not told (a crash before their decisions): resuming settles both from
    the journal, retrains neither, and asks no candidate beyond the budget."""
    space = load_space(SPACES / "tiny.yaml")
    config = settings(scheduler="asha", trials=4)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    Search(space, config, whole, flops_latency, log=lambda _: None).run()
    events = read_jsonl(whole / "journal.jsonl")
    untold = [e["trial"]["number"] for e in events if e["event"] == "tell" and not e["skipped"]][-2:]
    cut.mkdir()
    (cut / "journal.jsonl").write_text("".join(
        json.dumps(e, sort_keys=True) + "\n" for e in events
        if not (e["event"] == "tell" and e["trial"]["number"] in untold)))
    (cut / "trials.jsonl").write_text("".join(
        json.dumps(r, sort_keys=True) + "\n" for r in read_jsonl(whole / "trials.jsonl") if r["number"] not in untold))
    Search(space, config, cut, flops_latency, log=lambda _: None).run()
    assert comparable(cut / "trials.jsonl") == comparable(whole / "trials.jsonl")
    rung_events = [e for e in read_jsonl(cut / "journal.jsonl") if e["event"] == "rung"]
    assert len(rung_events) == sum(e["event"] == "rung" for e in events)  # nothing trained again
