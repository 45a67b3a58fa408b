"""Supernet files: weights as plain state_dicts (loaded with ``weights_only=True``) beside JSON metadata.

A training folder holds
- ``supernet.json``: ``SupernetMeta`` (space, data, resolution, seed, recipe, epochs done, versions);
- ``checkpoint.pt``: {"model", "optimizer", "epoch"} after each finished epoch, to resume (removed
  once training is complete);
- ``supernet.pt``: the trained supernet's state_dict, written when the last epoch is done.
Every file is written to a temporary name and renamed, so a kill leaves the previous epoch's files.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nas.errors import NasError

SCHEMA = 1
META = "supernet.json"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "supernet.pt"
TRAIN_HINT = "train one with python scripts/train_supernet.py --space FILE --data SPEC --resolution R --out DIR"


def library_versions() -> dict[str, str]:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


@dataclass(frozen=True)
class SupernetMeta:
    """What a supernet folder was trained for and how far training got."""

    space: str  # the space's name
    space_file: str
    space_hash: str  # nas.supernet.model.space_fingerprint: the choices, not the path
    data: str
    num_classes: int
    resolution: int
    seed: int
    recipe: dict[str, Any]
    epochs_done: int = 0
    complete: bool = False
    train_seconds: float = 0.0
    threads: int = 1
    versions: dict[str, str] = field(default_factory=library_versions)
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SupernetMeta":
        return cls(**data)

    def check(self, path: Path, *, space_hash: str, space_file: str, data: str, resolution: int) -> None:
        """NasError (one line) when this folder holds a supernet for another space, data or resolution."""
        for key, mine, wanted in (("space", self.space_hash, space_hash), ("data", self.data, data),
                                  ("resolution", self.resolution, resolution)):
            if mine != wanted:
                shown = (self.space_file, space_file) if key == "space" else (mine, wanted)
                raise NasError(f"{path}: {key}: this supernet was trained for {shown[0]!r}, not {shown[1]!r}; "
                               f"use another folder or {TRAIN_HINT}")


def read_meta(folder: Path) -> SupernetMeta | None:
    path = folder / META
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA:
            raise NasError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA}; {TRAIN_HINT}")
        return SupernetMeta.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
        raise NasError(f"{path}: not a supernet metadata file ({type(exc).__name__}); {TRAIN_HINT}") from None


def write_meta(folder: Path, meta: SupernetMeta) -> None:
    _atomic(folder / META, lambda tmp: tmp.write_text(json.dumps(meta.to_dict(), indent=1, sort_keys=True) + "\n"))


def save_tensors(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a missing, truncated or foreign file is a one-line NasError."""
    if not path.is_file():
        raise NasError(f"{path}: missing; {TRAIN_HINT}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NasError(f"{path}: not a readable checkpoint ({first}); delete it and {TRAIN_HINT}") from None


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def load_supernet(out_dir: Path, space, data: str, resolution: int):
    """The trained supernet in ``out_dir`` for ``space``, ``data`` and ``resolution`` (in eval mode).

    A missing or unfinished training, a truncated file, or a supernet of another space, data or
    resolution is a one-line NasError.
    """
    from nas.supernet.model import Supernet, space_fingerprint

    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    if meta is None:
        raise NasError(f"{out_dir}: no supernet here (no {META}); {TRAIN_HINT}")
    meta.check(out_dir / META, space_hash=space_fingerprint(space), space_file=space.source, data=data,
               resolution=resolution)
    if not meta.complete:
        raise NasError(f"{out_dir}: training stopped after epoch {meta.epochs_done} of {meta.recipe.get('epochs')}; "
                       "run the same scripts/train_supernet.py command to finish it")
    net = Supernet(space, meta.num_classes)
    state = load_tensors(out_dir / WEIGHTS)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NasError(f"{out_dir / WEIGHTS}: does not fit the {space.name} supernet ({first}); {TRAIN_HINT}") from None
    net.meta = meta
    return net.to(memory_format=torch.channels_last).eval()  # about 20% faster convolutions on CPU
