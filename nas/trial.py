"""Immutable trial records: what crosses from the search loop to strategies, workers and the journal."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

COMPLETE, PRUNED, FAIL, RUNNING = "COMPLETE", "PRUNED", "FAIL", "RUNNING"
STATES = (COMPLETE, PRUNED, FAIL, RUNNING)


@dataclass(frozen=True)
class Trial:
    """One evaluated candidate.

    ``values`` are the objective values, every one oriented so that larger is better (a latency to
    minimise appears negated); ``None`` when the trial failed. ``metrics`` holds the raw measurements
    (accuracy, latency_ms, flops, params, ...). PRUNED trials were stopped early by the multi-fidelity
    scheduler: their values are real but measured at a lower fidelity.
    """

    number: int
    params: dict[str, Any]
    arch: str  # canonical architecture string
    state: str
    values: tuple[float, ...] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state in (COMPLETE, PRUNED) and self.values is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["values"] = list(self.values) if self.values is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trial":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if kwargs.get("values") is not None:
            kwargs["values"] = tuple(kwargs["values"])
        return cls(**kwargs)
