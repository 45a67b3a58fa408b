"""Trainings under several seeds (nas.finals.train_seeds): journalled, resumable, weights kept, old lines read."""

import json
import random

import pytest

from conftest import SPACES
from nas.errors import NasError
from nas.fidelity import Fidelity
from nas.finals import SeedRun, train_seeds
from nas.space import load_space
from nas.train import Recipe

FIDELITY = Fidelity(1, 0.1, 16)
RECIPE = Recipe(batch_size=32)


@pytest.fixture(scope="module")
def tiny_arch():
    space = load_space(SPACES / "tiny.yaml")
    return space.decode(space.sample(random.Random(1)))


def test_journal_resumes_without_retraining_and_keeps_seed0_weights(tmp_path, tiny_arch):
    journal, weights = tmp_path / "runs.jsonl", tmp_path / "seed0.pt"
    keep = {"journal": journal, "seed0_weights": lambda arch: weights}
    [[first]] = train_seeds([tiny_arch], [0], FIDELITY, "digits", [RECIPE], **keep, log=lambda _: None)
    assert first.error is None and 0 <= first.test_accuracy <= 1 and first.cpu_seconds > 0 and weights.exists()
    lines = []
    [both] = train_seeds([tiny_arch], [0, 1], FIDELITY, "digits", [RECIPE], **keep, log=lines.append)
    assert lines[0].startswith("seed trainings: 1 to run (1 networks x 2 seeds, 1 epochs; 1 kept from before")
    assert lines[1].startswith("[seed 1/1] network 0 seed 1: test ") and "ETA" in lines[1]
    assert both[0] == first and both[1].seed == 1 and len(journal.read_text().splitlines()) == 2
    assert SeedRun.from_dict(json.loads(journal.read_text().splitlines()[1])) == both[1]
    weights.unlink()  # seed 0's weights are gone: it trains again, seed 1 does not
    lines.clear()
    train_seeds([tiny_arch], [0, 1], FIDELITY, "digits", [RECIPE], **keep, log=lines.append)
    assert lines[1].startswith("[seed 1/1] network 0 seed 0") and weights.exists()


def test_a_shared_journal_tells_setups_apart_and_a_run_folders_does_not(tmp_path, tiny_arch):
    journal = tmp_path / "runs.jsonl"
    quiet = {"journal": journal, "log": lambda _: None}
    [[a]] = train_seeds([tiny_arch], [0], FIDELITY, "digits", [RECIPE], **quiet)
    [[b]] = train_seeds([tiny_arch], [0], FIDELITY, "digits", [Recipe(batch_size=16)], **quiet)
    assert a.setup["recipe"]["batch_size"] == 32 and b.setup["recipe"]["batch_size"] == 16
    assert len(journal.read_text().splitlines()) == 2
    lines = []
    [[c]] = train_seeds([tiny_arch], [0], FIDELITY, "digits", [RECIPE], journal=journal, log=lines.append)
    assert c == a and not lines  # nothing left to train
    # a run folder's finals.jsonl holds one setup: its lines name none and count for any
    folder = tmp_path / "finals.jsonl"
    [[d]] = train_seeds([tiny_arch], [0], FIDELITY, "digits", [RECIPE], journal=folder, shared_journal=False,
                        log=lambda _: None)
    assert d.setup is None and "setup" not in json.loads(folder.read_text())
    [[e]] = train_seeds([tiny_arch], [0], FIDELITY, "digits", [Recipe(batch_size=16)], journal=folder,
                        shared_journal=False, log=lines.append)
    assert e == d and not lines


def test_a_finals_line_of_an_older_run_still_reads():
    old = {"arch": "i16-x", "seed": 2, "val_accuracy": 0.9, "test_accuracy": 0.88, "seconds": 3.5, "error": None}
    run = SeedRun.from_dict(old)
    assert (run.seed, run.test_accuracy, run.cpu_seconds, run.setup) == (2, 0.88, None, None)
    assert run.to_dict() == {**old, "cpu_seconds": None}


@pytest.mark.parametrize("text", ["not json\n{}\n", '{"arch": "i16-x"}\n'])
def test_a_journal_that_is_not_one_stops_with_its_name(tmp_path, tiny_arch, text):
    journal = tmp_path / "runs.jsonl"
    journal.write_text(text)
    with pytest.raises(NasError, match="runs.jsonl: not a journal of trainings"):
        train_seeds([tiny_arch], [0], FIDELITY, "digits", [RECIPE], journal=journal, log=lambda _: None)
