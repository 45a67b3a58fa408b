"""The calibration: from a network's table entries to its end-to-end latency, one linear model.

A block timed alone differs from the same block inside a network, so a prediction is not the bare
sum of entries but a linear function of named per-network terms (``TERMS``), fitted on whole networks
measured end to end:

- ``level<k>_ms``: the entries summed per resolution level (k halvings of the input size). A block
  alone pays ONNX Runtime's per-call cost and runs with its own data hot in cache; how much of its
  entry a network saves differs between the large early maps and the tiny late ones.
- ``<kind>_lookups``: blocks per kind (``KINDS``): the per-call cost an entry carries, and the layout
  conversions a depthwise-separable or inverted-residual block pays alone but not inside a chain.
- ``se_blocks``: squeeze-excite's small operators cost more inside a network than alone.
- ``weight_mb`` and ``act_mb``: the weights a network reads and the activations its plain blocks move.
- ``spilled_lookups`` and ``spilled_mb``: the blocks and megabytes of weights a network misses in a
  cache of ``cache_mb`` (fitted over ``CACHE_GRID_MB``) beyond what each block already missed alone.
- ``one``: a constant (the head is in every network, so its lookup is in it too).

Every term but the spill ones is a sum over blocks, so a table folds the coefficients into one number
per block (``block_value``) and a prediction costs one addition per layer. The fit is least squares on
relative error, judged by its leave-one-out error; a network's terms come from ``nas.latency.table``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nas.blocks import BlockSpec, HeadSpec
from nas.errors import NasError
from nas.latency.traffic import head_weight_bytes, plain_activation_bytes, weight_bytes

LEVELS = 6  # deeper levels count with the last
KINDS = ("conv", "ds", "ir", "bot", "maxpool")
LEVEL_TERMS = tuple(f"level{k}_ms" for k in range(LEVELS))
KIND_TERMS = tuple(f"{kind}_lookups" for kind in KINDS)
SUM_TERMS = (*LEVEL_TERMS, *KIND_TERMS, "se_blocks", "weight_mb", "act_mb")  # each a sum over blocks
SPILL_TERMS = ("spilled_lookups", "spilled_mb")
TERMS = (*SUM_TERMS, *SPILL_TERMS, "one")
# the cache sizes the spill terms are fitted over (None: no spill terms); a core's private L2 up to a
# shared L3 slice
CACHE_GRID_MB: tuple[float | None, ...] = (None, 1, 2, 4, 8, 12, 16, 32)


def resolution_level(resolution: int, input_resolution: int) -> int:
    """How many times the input was halved to reach ``resolution``, clipped to ``LEVELS - 1``."""
    return min(LEVELS - 1, max(0, round(math.log2(input_resolution / resolution))))


def block_terms(spec: BlockSpec | HeadSpec, ms: float, input_resolution: int) -> dict[str, float]:
    """One block's (or the head's) share of the ``SUM_TERMS``."""
    terms = {LEVEL_TERMS[resolution_level(spec.resolution, input_resolution)]: ms}
    if isinstance(spec, HeadSpec):
        terms["weight_mb"] = head_weight_bytes(spec) / 1e6
        return terms
    if spec.op in KINDS:
        terms[f"{spec.op}_lookups"] = 1.0
    terms["se_blocks"] = float(spec.se_ch > 0)
    terms["weight_mb"] = weight_bytes(spec) / 1e6
    terms["act_mb"] = plain_activation_bytes(spec) / 1e6
    return terms


def spilled_terms(lookups: int, total_bytes: int, block_bytes: Iterable[int],
                  cache_mb: float | None) -> tuple[float, float]:
    """(spilled lookups, spilled MB) of a network of ``lookups`` blocks and ``total_bytes`` of weights.

    With random replacement and weights read once per inference, a share ``1 - cache / total`` of them
    misses. Each block is charged that share beyond the share it misses alone (``1 - cache / own``), which
    its entry already paid for: a block that fits the cache is charged the whole share, a block larger
    than the cache only what the others add. ``block_bytes`` must hold every block larger than the
    cache; smaller ones may be left out.
    """
    if cache_mb is None or total_bytes <= cache_mb * 1e6:
        return 0.0, 0.0
    cache = cache_mb * 1e6
    share = 1 - cache / total_bytes
    big = big_bytes = inverse = 0.0
    for b in block_bytes:
        if b > cache:
            big += 1
            big_bytes += b
            inverse += 1 / b
    spilled_lookups = share * (lookups - big) + cache * inverse - big * cache / total_bytes
    spilled_bytes = share * (total_bytes - big_bytes) + big * cache - cache * big_bytes / total_bytes
    return spilled_lookups, spilled_bytes / 1e6


@dataclass(frozen=True)
class NetworkTerms:
    """What the calibration sees of one network: its ``SUM_TERMS`` and each lookup's weight bytes."""

    sums: tuple[float, ...]  # in SUM_TERMS order
    block_bytes: tuple[int, ...]  # blocks and head

    @property
    def raw_ms(self) -> float:
        return sum(self.sums[:LEVELS])

    def row(self, cache_mb: float | None) -> np.ndarray:
        """The values of ``TERMS`` in order."""
        spill = spilled_terms(len(self.block_bytes), sum(self.block_bytes), self.block_bytes, cache_mb)
        return np.array([*self.sums, *spill, 1.0])


def network_terms(blocks: Sequence[tuple[BlockSpec | HeadSpec, float]], input_resolution: int) -> NetworkTerms:
    """``NetworkTerms`` of a network given as (block or head, its entry's ms) pairs."""
    sums = dict.fromkeys(SUM_TERMS, 0.0)
    nbytes = []
    for spec, ms in blocks:
        for name, value in block_terms(spec, ms, input_resolution).items():
            sums[name] += value
        nbytes.append(head_weight_bytes(spec) if isinstance(spec, HeadSpec) else weight_bytes(spec))
    return NetworkTerms(tuple(sums.values()), tuple(nbytes))


@dataclass(frozen=True)
class CalibrationRow:
    """One network a calibration was fitted on."""

    arch: str  # canonical architecture string
    key: str
    measured_ms: float
    predicted_ms: float

    @property
    def error_pct(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms * 100

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "key": self.key, "measured_ms": self.measured_ms,
                "predicted_ms": self.predicted_ms, "error_pct": self.error_pct}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibrationRow":
        return cls(data["arch"], data["key"], float(data["measured_ms"]), float(data.get("predicted_ms", math.nan)))


def fit_relative(design: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Least squares on relative error (networks differ several-fold in latency; errors are judged in %)."""
    coef, *_ = np.linalg.lstsq(design / measured[:, None], np.ones_like(measured), rcond=None)
    return coef


def loo_mape(design: np.ndarray, measured: np.ndarray) -> float:
    """Mean leave-one-out |error| in % of ``fit_relative``: a left-out network's error is its residual over
    ``1 - leverage`` (hat matrix), refitted without it only where its leverage is 1."""
    scaled = design / measured[:, None]
    leverage = np.einsum("ij,ji->i", scaled, np.linalg.pinv(scaled))
    errors = np.abs(scaled @ fit_relative(design, measured) - 1) / np.maximum(1 - leverage, 1e-12)
    for i in np.flatnonzero(leverage > 1 - 1e-9):
        keep = np.arange(len(measured)) != i
        errors[i] = abs(design[i] @ fit_relative(design[keep], measured[keep]) - measured[i]) / measured[i]
    return float(np.mean(errors) * 100)


@dataclass(frozen=True)
class Calibration:
    """Predicted ms = sum over ``TERMS`` of coefficient x term; ``RAW`` is the bare sum of entries."""

    coef: tuple[float, ...]  # in TERMS order
    cache_mb: float | None = None  # the cache the spill terms count misses of (None: no spill terms)
    loo_mape: float | None = None  # leave-one-out mean |error| in % on ``rows``
    method: str = "fit"  # "fit": fitted on the rows; "correction": a source calibration corrected on them
    rows: tuple[CalibrationRow, ...] = ()

    def __post_init__(self) -> None:
        if len(self.coef) != len(TERMS):
            raise NasError(f"calibration has {len(self.coef)} coefficients, the model takes {len(TERMS)} "
                           f"({', '.join(TERMS)})")

    @property
    def by_term(self) -> dict[str, float]:
        return dict(zip(TERMS, self.coef))

    @property
    def cache_bytes(self) -> float:
        """Blocks above it are the ones ``spill_ms`` must see; inf without spill terms."""
        return math.inf if self.cache_mb is None else self.cache_mb * 1e6

    def block_value(self, spec: BlockSpec | HeadSpec, ms: float, input_resolution: int) -> float:
        """A block's (or the head's) share of a prediction, the spill terms and the constant left out."""
        c = self.by_term
        return sum(c[name] * value for name, value in block_terms(spec, ms, input_resolution).items())

    @property
    def constant(self) -> float:
        return self.coef[-1]

    def spill_ms(self, lookups: int, total_bytes: int, big_bytes: Sequence[int]) -> float:
        if total_bytes <= self.cache_bytes:
            return 0.0
        spilled_lookups, spilled_mb = spilled_terms(lookups, total_bytes, big_bytes, self.cache_mb)
        return self.coef[len(SUM_TERMS)] * spilled_lookups + self.coef[len(SUM_TERMS) + 1] * spilled_mb

    def apply(self, terms: NetworkTerms) -> float:
        return float(terms.row(self.cache_mb) @ np.asarray(self.coef))

    @classmethod
    def fit(cls, archs: Sequence[tuple[str, str]], terms: Sequence[NetworkTerms],
            measured: Sequence[float]) -> "Calibration":
        """Least squares over ``CACHE_GRID_MB``; the lowest leave-one-out error wins, ties to no spill terms.
        ``archs`` are (canonical string, key) pairs, kept as the rows."""
        m = np.asarray(measured, dtype=float)
        if len(m) < 3:
            raise NasError(f"a calibration needs at least 3 measured networks, got {len(m)}")
        best = None
        for cache in CACHE_GRID_MB:
            design = np.array([t.row(cache) for t in terms])
            if cache is not None and not design[:, len(SUM_TERMS)].any():
                continue  # no network outgrows this cache: the same fit as without spill terms
            loo = loo_mape(design, m)
            if best is None or round(loo, 6) < round(best[0], 6):
                best = (loo, cache, design)
        loo, cache, design = best
        coef = tuple(float(c) for c in fit_relative(design, m))
        return cls(coef, cache, loo, "fit").with_rows(archs, terms, m)

    def with_rows(self, archs: Sequence[tuple[str, str]], terms: Sequence[NetworkTerms],
                  measured: Iterable[float]) -> "Calibration":
        rows = tuple(CalibrationRow(a, k, float(mi), self.apply(t)) for (a, k), t, mi in zip(archs, terms, measured))
        return Calibration(self.coef, self.cache_mb, self.loo_mape, self.method, rows)

    def to_dict(self) -> dict[str, Any]:
        return {"model": "terms", "coef": self.by_term, "cache_mb": self.cache_mb, "loo_mape": self.loo_mape,
                "method": self.method, "rows": [row.to_dict() for row in self.rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<memory>") -> "Calibration":
        """Read a calibration of this model; a hand-edited one fails here, naming the key."""
        try:
            coef = data["coef"]
            if not isinstance(coef, Mapping):
                raise TypeError(f"'coef' is {type(coef).__name__}, not a mapping of term to coefficient")
            unknown = set(coef) - set(TERMS)
            if unknown:
                raise NasError(f"{source}: calibration term {sorted(unknown)[0]!r} is not one of {', '.join(TERMS)}")
            return cls(tuple(float(coef.get(name, 0.0)) for name in TERMS), data.get("cache_mb"), data.get("loo_mape"),
                       data.get("method", "fit"), tuple(CalibrationRow.from_dict(row) for row in data.get("rows", ())))
        except KeyError as exc:
            raise NasError(f"{source}: calibration lacks {exc.args[0]!r}; rebuild the table with "
                           "python scripts/build_lut.py") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise NasError(f"{source}: malformed calibration ({exc}); rebuild the table with "
                           "python scripts/build_lut.py") from None


RAW = Calibration(tuple(1.0 if name in LEVEL_TERMS else 0.0 for name in TERMS), method="raw")
