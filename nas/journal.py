"""The run folder's append-only journal: nothing finished is ever lost, and a rerun resumes.

``journal.jsonl`` records every event in order (``ask`` with its params, ``round`` with the candidates
trained together, ``rung`` results of a candidate at one fidelity, ``tell`` with the finished trial,
``clock`` with the seconds searched so far); ``trials.jsonl`` holds one JSON object per finished trial
for people and tools. Each line is flushed and fsync'ed before the loop goes on,
so a crash, kill -9 or Ctrl-C loses at most the evaluation in progress; a torn last line is ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.trial import Trial


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record and fsync it: a crash loses at most the line being written."""
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn final line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


@dataclass
class Replay:
    """What a previous run left: its events in order, and the rung results of unfinished candidates."""

    events: list[dict[str, Any]] = field(default_factory=list)
    rungs: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # number -> rung -> result
    order: list[tuple[int, int]] = field(default_factory=list)  # (number, rung) of every rung result, as journaled


class Journal:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.events_path = self.folder / "journal.jsonl"
        self.trials_path = self.folder / "trials.jsonl"
        self._repair()

    def _repair(self) -> None:
        """Drop a torn last line so later appends start on a fresh line."""
        for path in (self.events_path, self.trials_path):
            if path.exists():
                text = path.read_text()
                if text and not text.endswith("\n"):
                    path.write_text(text[: text.rfind("\n") + 1])

    def replay(self) -> Replay:
        replay = Replay()
        for event in read_jsonl(self.events_path):
            if event["event"] == "rung":
                replay.rungs.setdefault(event["number"], {})[event["rung"]] = event["result"]
                replay.order.append((event["number"], event["rung"]))
                continue
            replay.events.append(event)
        return replay

    def ask(self, number: int, params: dict[str, Any]) -> None:
        append_jsonl(self.events_path, {"event": "ask", "number": number, "params": params})

    def round(self, numbers: list[int], start_rung: int = 0) -> None:
        """The candidates of one successive-halving round (promotions compare them with each other)."""
        append_jsonl(self.events_path, {"event": "round", "numbers": numbers, "start_rung": start_rung})

    def rung(self, number: int, rung: int, result: dict[str, Any]) -> None:
        append_jsonl(self.events_path, {"event": "rung", "number": number, "rung": rung, "result": result})

    def clock(self, elapsed: float) -> None:
        """Seconds of search so far, over every session of this run: a time budget spans resumes."""
        append_jsonl(self.events_path, {"event": "clock", "elapsed": elapsed})

    def tell(self, trial: Trial, skipped: bool = False) -> None:
        """A finished trial; ``skipped`` (not trained: a duplicate or over a limit) stays out of trials.jsonl."""
        append_jsonl(self.events_path, {"event": "tell", "trial": trial.to_dict(), "skipped": skipped})
        if not skipped:
            append_jsonl(self.trials_path, trial.to_dict())

    def trials(self) -> list[Trial]:
        return [Trial.from_dict(d) for d in read_jsonl(self.trials_path)]
