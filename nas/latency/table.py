"""Latency lookup tables: per-block measured latency, summed and calibrated to predict a network.

A table is versioned data (JSON, ``SCHEMA``): metadata saying where and how it was measured, one
entry per ``BlockSpec.key`` / ``HeadSpec.key`` (median, p10, p90, run count, session spread) and a
calibration fitted on whole networks measured end to end. Keys are readable shapes, so a missing one
says exactly which block the table lacks (``MissingEntryError``), never a silent default.

Prediction is a calibration of the sum of entries, fitted on whole networks measured end to end,
because a block timed alone differs from the same block inside a network in three ways:

- it pays ONNX Runtime's per-call overhead (~2 us here), once per lookup: a ``lookups`` term;
- a squeeze-excite block's small operators cost about 1 us more in a network than alone: a
  ``se_blocks`` term (on mnasnet.yaml at 32 px it cut the networks off by more than 5% from 28% to 16%);
- its weights stay hot in cache, while a network whose weights outgrow the cache streams them from
  memory on every inference: the ``streaming`` term (``NetworkTerms.block_sum``, bytes from
  ``nas.latency.traffic``) raises each block to the time its share of missed weights takes to read.

On some CPUs (a 2-core Xeon VM with a 2 MB L2 per core) a streamed block does not overlap its reads
with its arithmetic: each block of a network whose weights outgrow the cache costs a fixed amount
more, plus a little per byte. The ``spill`` model adds those as terms of their own, the spilled
share of lookups and of megabytes, with the cache size fitted over a grid. A block is charged only
the share it misses in the network beyond the share it already missed alone (``spilled_terms``): a
block whose own weights outgrow the cache paid for them in its entry. ``spill2`` adds the share of
lookups beyond a second, smaller cache: networks under ~1 MB of weights ran faster still, and the
one-cache model over-predicted them by 16%.

Two more terms may join spill2: the network's weight megabytes (``_weights``; the residuals still
fell with them) and the megabytes of input and output activations of its blocks without SE
(``_acts``; ``traffic.plain_activation_bytes``): alone, such a block converts its input to ONNX
Runtime's blocked layout and its output back, which a network of such blocks does only at its ends.
The ``_levels_ops`` model adds a per-lookup term per block kind (``OP_TERMS``) and a factor per
resolution level on the entries' sum (``LEVELS``): on mnasnet.yaml at 32 px, networks rich in
depthwise-separable blocks ran faster than their entries said, and the blocks at 32 px and 16 px
differ from those at 1-2 px in how much of their entry a network saves. It has 18 coefficients and
needs the 120 calibration networks a build measures.

The candidates (raw sum, ``a*sum + b``, ``+ c*lookups``, ``+ d*se_blocks``, each with and without
streaming over a grid of cache sizes and bandwidths, and the spill models over their cache grid) are
compared by leave-one-out error on the calibration networks; the lowest wins, ties going to the simpler.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import onnxruntime as ort

from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec, resolve, resolve_layer
from nas.errors import NasError, NasWarning
from nas.latency.targets import Target, cpu_model
from nas.latency.traffic import head_weight_bytes, plain_activation_bytes, weight_bytes

# 2: entries predict from 'ms', the protocol's aggregate (the fastest run by default), not 'median_ms'
SCHEMA = 2
TABLES_DIR = Path("latency_tables")
# a table's machine is gauged by its own calibration networks timed again, not by the reference block:
# on the development VM that block read 1.43x the table's time at the start of a search whose networks
# then ran within 2% of the table, and the same within 0.3% while whole networks drifted by 3-5%;
# and they are timed as a validation times them. 12 of them, ordered by latency, in one pass read
# x0.925-x0.989 of the build just before four validations (2026-12-04) whose 150 re-timed calibration
# networks then read x1.001-x1.016; 60 of them shuffled, in two passes (~45 s at 32 px), read 0.8-1.5%
# below those, and the same 12 alone scattered by 3% back to back
SPEED_NETWORKS = 60
SPEED_PASSES = 2
SPEED_TOLERANCE = 0.1  # beyond it, predictions here miss by more than the +-10% a table is built for
# beyond it, ``relevel`` scales predictions by the check's ratio. Within it the check cannot tell the
# machine's level from its own scatter: ten checks within ten minutes (2026-12-04) read x0.982-x1.032,
# and it read 1.4-3.2% below the 150 calibration networks timed again in each of the
# four validations that followed it; scaled by it, those scored 87%, 82%, 77% and 85% within +-5%,
# as built 89%, 87%, 72% and 87%
RELEVEL_BEYOND = 0.05


class MissingEntryError(NasError):
    """The table has no entry for a block: names the key and the table file."""

    def __init__(self, key: str, source: str, metadata: dict[str, Any]):
        self.key, self.source = key, source
        super().__init__(
            f"{source}: no latency entry for {key!r} (the table covers space {metadata.get('space')!r} at "
            f"resolution {metadata.get('resolution')} with {metadata.get('num_classes')} classes); rebuild the "
            f"table for this space: python scripts/build_lut.py --target {metadata.get('target', 'cpu')} "
            f"--space <space.yaml> --resolution <R> --num-classes <N>"
        )


class TableMismatchWarning(NasWarning):
    """The table was measured under other conditions than this machine or run: predictions may be off."""


def default_table_path(space_name: str, resolution: int, target: Target) -> Path:
    """``latency_tables/<space>-r<resolution>-<target>-t<threads>-b<batch>.json`` (relative to the cwd)."""
    return TABLES_DIR / f"{space_name}-r{resolution}-{target.name}-t{target.threads}-b{target.batch}.json"


# --- calibration --------------------------------------------------------------------------------

# block kinds with a per-lookup term of their own in the ``_levels_ops`` model (conv and the rest: none)
OP_TERMS = ("ds", "ir", "bot")
# resolution levels (halvings of the table's input size) whose blocks' entries get a factor of their
# own in that model; deeper blocks count with the last
LEVELS = 6
LEVEL_OP_TERMS = tuple(f"{op}_lookups" for op in OP_TERMS) + tuple(f"level{k}_ms" for k in range(LEVELS))

# model name -> the terms besides the sum of entries it fits a coefficient to ("raw" fits nothing)
CALIBRATION_MODELS: dict[str, tuple[str, ...]] = {
    "raw": (), "linear": ("one",), "linear_blocks": ("lookups", "one"),
    "linear_blocks_se": ("lookups", "se_blocks", "one"),
    "linear_blocks_se_spill": ("lookups", "se_blocks", "spilled_lookups", "spilled_mb", "one"),
    "linear_blocks_se_spill2": ("lookups", "se_blocks", "near_spilled_lookups", "spilled_lookups", "spilled_mb", "one"),
    "linear_blocks_se_spill2_weights": ("lookups", "se_blocks", "near_spilled_lookups", "spilled_lookups", "spilled_mb",
                                        "weight_mb", "one"),
    "linear_blocks_se_spill2_acts": ("lookups", "se_blocks", "near_spilled_lookups", "spilled_lookups", "spilled_mb",
                                     "plain_act_mb", "one"),
    "linear_blocks_se_spill2_weights_acts": ("lookups", "se_blocks", "near_spilled_lookups", "spilled_lookups",
                                             "spilled_mb", "weight_mb", "plain_act_mb", "one"),
    "linear_blocks_se_spill2_weights_acts_levels_ops": ("lookups", "se_blocks", *LEVEL_OP_TERMS, "near_spilled_lookups",
                                                        "spilled_lookups", "spilled_mb", "weight_mb", "plain_act_mb",
                                                        "one"),
}
# models whose spilled_* terms need a cache size (fitted over SPILL_GRID_MB, no bandwidth)
SPILL_MODELS = frozenset(m for m, names in CALIBRATION_MODELS.items() if "spilled_mb" in names)
LEVEL_OP_MODELS = frozenset(m for m, names in CALIBRATION_MODELS.items() if "level0_ms" in names)
# spill models with a second, smaller cache (``near_cache_mb``): networks that fit it run faster still
NEAR_SPILL_MODELS = frozenset(m for m, names in CALIBRATION_MODELS.items() if "near_spilled_lookups" in names)
# the weight cache and memory bandwidth that the streaming term is fitted over (None: no term)
CACHE_GRID_MB: tuple[float | None, ...] = (None, 4, 8, 12, 16, 24, 32)
BANDWIDTH_GRID_GBS = (10, 15, 20, 30, 40, 60)
# the cache the spill terms are fitted over: a private L2 (1-2 MB) is what a core keeps hot
SPILL_GRID_MB = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def candidate_name(model: str, streaming: bool) -> str:
    """How ``loo_mape``, ``Calibration.name`` and ``Calibration.fit(only=...)`` name a candidate."""
    return model + ("+streaming" if streaming else "")


def candidate_names() -> list[str]:
    """Every calibration candidate ``Calibration.fit`` compares."""
    return ["raw"] + [candidate_name(model, streaming) for streaming in (False, True)
                      for model in CALIBRATION_MODELS if model != "raw" and not (streaming and model in SPILL_MODELS)]


class Summary(NamedTuple):
    """A network's calibration inputs besides its block sum: what ``term_values`` reads."""

    lookups: int
    se_blocks: int
    total_bytes: int  # weight bytes of the whole network
    block_bytes: Sequence[int]  # per lookup, as ``spilled_terms`` takes them
    plain_act_bytes: int
    level_ms: Sequence[float]  # the blocks' entries summed per resolution level
    op_lookups: Sequence[int]  # lookups per ``OP_TERMS`` kind


def resolution_level(resolution: int, input_resolution: int) -> int:
    """How many times the input was halved to reach ``resolution``, clipped to ``LEVELS - 1``."""
    return min(LEVELS - 1, max(0, round(math.log2(input_resolution / resolution))))


@dataclass(frozen=True)
class NetworkTerms:
    """What the calibration sees of one network: each lookup's entry and weight bytes, its SE blocks,
    the activation bytes of its blocks without SE (``traffic.plain_activation_bytes``), and its
    blocks' entries per resolution level and lookups per kind (``OP_TERMS``)."""

    ms: tuple[float, ...]
    weight_bytes: tuple[int, ...]
    se_blocks: int
    plain_act_bytes: int = 0
    level_ms: tuple[float, ...] = (0.0,) * LEVELS
    op_lookups: tuple[int, ...] = (0,) * len(OP_TERMS)

    def summary(self) -> Summary:
        return Summary(self.lookups, self.se_blocks, sum(self.weight_bytes), self.weight_bytes, self.plain_act_bytes,
                       self.level_ms, self.op_lookups)

    @property
    def lookups(self) -> int:
        return len(self.ms)

    @property
    def raw_ms(self) -> float:
        return sum(self.ms)

    def block_sum(self, cache_mb: float | None, bandwidth_gbs: float | None) -> float:
        """The sum of entries, each raised to the time its weights take to stream from memory.

        Weights cycle through the cache once per inference, so with random replacement a share
        ``1 - cache / total`` of them misses; a block cannot run faster than it can read those.
        """
        ms_per_byte = streaming_ms_per_byte(sum(self.weight_bytes), cache_mb, bandwidth_gbs)
        if not ms_per_byte:
            return self.raw_ms
        return sum(max(ms, nbytes * ms_per_byte) for ms, nbytes in zip(self.ms, self.weight_bytes))


def streaming_ms_per_byte(weight_bytes: int, cache_mb: float | None, bandwidth_gbs: float | None) -> float:
    """Milliseconds per weight byte a network of ``weight_bytes`` streams; 0 while its weights fit
    (or when no bandwidth is set: the spill model adds its cost instead of raising blocks to it)."""
    if bandwidth_gbs is None:
        return 0.0
    return spilled_share(weight_bytes, cache_mb) / (bandwidth_gbs * 1e6)


def spilled_share(weight_bytes: int, cache_mb: float | None) -> float:
    """The share of a network's weights that misses a cache of ``cache_mb`` each inference (random
    replacement, weights read once per inference); 0 while they fit."""
    if cache_mb is None or weight_bytes <= cache_mb * 1e6:
        return 0.0
    return 1 - cache_mb * 1e6 / weight_bytes


def spilled_terms(lookups: int, total_bytes: int, block_bytes: Iterable[int],
                  cache_mb: float | None) -> tuple[float, float]:
    """(spilled lookups, spilled MB) of a network of ``lookups`` blocks and ``total_bytes`` of weights.

    Each block is charged the share of its weights it misses in the network, ``spilled_share(total)``,
    beyond the share it misses alone, ``spilled_share(its own bytes)``, which its entry already paid
    for: a block that fits the cache is charged the network's whole share, a block of more than the
    cache only what the others' weights add (on mnasnet.yaml, networks with one 2.5-7 MB block were
    over-predicted by 13-23% when every block was charged the whole share). ``block_bytes`` must
    hold every block larger than the cache; smaller ones may be left out.
    """
    if cache_mb is None or total_bytes <= cache_mb * 1e6:
        return 0.0, 0.0
    cache = cache_mb * 1e6
    share = 1 - cache / total_bytes
    big = big_bytes = inverse = 0.0
    for b in block_bytes:
        if b > cache:  # charged share - (1 - cache / b) per lookup, times b per byte
            big += 1
            big_bytes += b
            inverse += 1 / b
    spilled_lookups = share * (lookups - big) + cache * inverse - big * cache / total_bytes
    spilled_bytes = share * (total_bytes - big_bytes) + big * cache - cache * big_bytes / total_bytes
    return spilled_lookups, spilled_bytes / 1e6


def term_values(model: str, s: Summary, spill_mb: float | None, near_spill_mb: float | None = None) -> list[float]:
    """The terms ``model`` fits (``CALIBRATION_MODELS[model]``, in order) of one network."""
    names = CALIBRATION_MODELS[model]
    values = {"lookups": s.lookups, "se_blocks": s.se_blocks, "one": 1.0, "weight_mb": s.total_bytes / 1e6,
              "plain_act_mb": s.plain_act_bytes / 1e6}
    if "spilled_mb" in names:
        values["spilled_lookups"], values["spilled_mb"] = spilled_terms(s.lookups, s.total_bytes, s.block_bytes,
                                                                        spill_mb)
        if "near_spilled_lookups" in names:
            values["near_spilled_lookups"] = spilled_terms(s.lookups, s.total_bytes, s.block_bytes, near_spill_mb)[0]
    if model in LEVEL_OP_MODELS:
        values.update(zip(LEVEL_OP_TERMS, (*s.op_lookups, *s.level_ms)))
    return [values[name] for name in names]


def _design(model: str, sums: np.ndarray, terms: list[NetworkTerms], spill_mb: float | None = None,
            near_spill_mb: float | None = None) -> np.ndarray:
    rows = [term_values(model, t.summary(), spill_mb, near_spill_mb) for t in terms]
    return np.column_stack([sums, np.array(rows).reshape(len(terms), -1)])


def _fit(design: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Least squares on relative error (networks differ several-fold in latency; errors are judged in %)."""
    coef, *_ = np.linalg.lstsq(design / measured[:, None], np.ones_like(measured), rcond=None)
    return coef


def _loo_mape(design: np.ndarray, measured: np.ndarray) -> float:
    """Mean leave-one-out |error| in % of ``_fit``: from the hat matrix (a left-out network's error is its
    residual over ``1 - leverage``), refitting without it only where its leverage is 1."""
    scaled = design / measured[:, None]
    hat = scaled @ np.linalg.pinv(scaled)
    residual = scaled @ _fit(design, measured) - 1
    leverage = np.diag(hat)
    errors = np.abs(residual) / np.maximum(1 - leverage, 1e-12)
    for i in np.flatnonzero(leverage > 1 - 1e-9):
        keep = np.arange(len(measured)) != i
        errors[i] = abs(design[i] @ _fit(design[keep], measured[keep]) - measured[i]) / measured[i]
    return float(np.mean(errors) * 100)


@dataclass(frozen=True)
class Calibration:
    """Maps a network's terms to predicted ms; keeps the networks and residuals it was fitted on.

    ``coef`` multiplies (block sum, then the model's terms in ``CALIBRATION_MODELS`` order). With
    ``bandwidth_gbs`` the block sum streams weights beyond ``cache_mb`` at that bandwidth; a spill
    model instead adds the cost of the weights (and lookups) beyond ``cache_mb`` as terms of their own.
    """

    model: str  # a key of CALIBRATION_MODELS
    coef: tuple[float, ...]
    seed: int  # the random.Random seed that sampled the calibration networks
    loo_mape: dict[str, float]  # leave-one-out mean |error| in % of each candidate (best cache setting)
    rows: tuple[dict[str, Any], ...]  # per network: arch, key, raw_ms, lookups, measured_ms, predicted_ms, error_pct
    cache_mb: float | None = None
    bandwidth_gbs: float | None = None
    near_cache_mb: float | None = None  # spill2: the smaller cache, below ``cache_mb``

    @functools.cached_property
    def smallest_cache_bytes(self) -> float:
        """Blocks above it are the ones ``spilled_terms`` must see; inf without spill terms."""
        caches = [c for c in (self.cache_mb, self.near_cache_mb) if c is not None] if self.model in SPILL_MODELS else []
        return min(caches) * 1e6 if caches else math.inf

    @functools.cached_property
    def row_weights(self) -> tuple[tuple[float, ...], float, float] | None:
        """The calibration's terms but the spill ones folded per block: (weights of a layer's memo row in
        ``LatencyTable``, the weight of one lookup, the constant). A network's prediction is then the sum
        over its layers of row . weights + lookup weight, the head's likewise, the constant and
        ``spill_ms``: every other term is a sum over blocks. None where the block sum is not (streaming)."""
        if self.model == "raw" or self.bandwidth_gbs is not None:
            return None
        c = self._coef_by_term
        weights = (self.coef[0], c.get("weight_mb", 0.0) / 1e6, c.get("se_blocks", 0.0), c.get("plain_act_mb", 0.0) / 1e6,
                   *(c.get(f"level{k}_ms", 0.0) for k in range(LEVELS)), *(c.get(f"{op}_lookups", 0.0) for op in OP_TERMS))
        return weights, c.get("lookups", 0.0), c.get("one", 0.0)

    def spill_ms(self, lookups: int, total_bytes: int, big_bytes: Sequence[int]) -> float:
        """The spill terms' share of a prediction (0 without them): what ``row_weights`` leaves out."""
        if self.model not in SPILL_MODELS or total_bytes <= self.smallest_cache_bytes:
            return 0.0
        per_lookup, per_mb, near_per_lookup = self._spill_coef
        spilled_lookups, spilled_mb = spilled_terms(lookups, total_bytes, big_bytes, self.cache_mb)
        ms = per_lookup * spilled_lookups + per_mb * spilled_mb
        if near_per_lookup:
            ms += near_per_lookup * spilled_terms(lookups, total_bytes, big_bytes, self.near_cache_mb)[0]
        return ms

    @functools.cached_property
    def _coef_by_term(self) -> dict[str, float]:
        return dict(zip(CALIBRATION_MODELS[self.model], self.coef[1:]))

    @functools.cached_property
    def _spill_coef(self) -> tuple[float, float, float]:
        c = self._coef_by_term
        return c["spilled_lookups"], c["spilled_mb"], c.get("near_spilled_lookups", 0.0)

    @property
    def name(self) -> str:
        """The chosen candidate, as ``loo_mape`` names it."""
        return candidate_name(self.model, self.bandwidth_gbs is not None)

    def combine(self, block_sum: float, summary: Summary) -> float:
        """Predicted ms from a network's block sum and the rest of its terms."""
        if self.model == "raw":
            return block_sum
        values = term_values(self.model, summary, self.cache_mb, self.near_cache_mb)
        return self.coef[0] * block_sum + sum(map(operator.mul, self.coef[1:], values))

    def apply(self, terms: NetworkTerms) -> float:
        return self.combine(terms.block_sum(self.cache_mb, self.bandwidth_gbs), terms.summary())

    @property
    def arch_keys(self) -> frozenset[str]:
        return frozenset(row["key"] for row in self.rows)

    @classmethod
    def fit(cls, archs: list[Arch], terms: list[NetworkTerms], measured: list[float], seed: int,
            only: str | None = None) -> "Calibration":
        """Each candidate model with and without the streaming term (over its grid), and the spill
        models over their cache grid; the lowest leave-one-out error wins, ties going to fewer
        coefficients and then to no streaming.

        ``only`` fits just that candidate (a ``name`` such as ``linear_blocks+streaming``): validation
        uses it to show what each term is worth on held-out networks.
        """
        m = np.asarray(measured, dtype=float)
        settings = [(None, None, None)] + [(c, b, None) for c in CACHE_GRID_MB if c is not None for b in BANDWIDTH_GRID_GBS]
        settings += [(c, None, None) for c in SPILL_GRID_MB]
        settings += [(c, None, near) for c in SPILL_GRID_MB for near in SPILL_GRID_MB if near < c]
        candidates = []  # (loo, coefficients, streaming, model, cache, bandwidth, near cache)
        for cache, bandwidth, near in settings:
            streaming, spill = bandwidth is not None, cache is not None and bandwidth is None
            models = [model for model in CALIBRATION_MODELS if (model in SPILL_MODELS) == spill
                      and (model in NEAR_SPILL_MODELS) == (near is not None)
                      and (only is None or only == candidate_name(model, streaming))]
            if not models:
                continue  # none of this setting's candidates is wanted: skip its block sums
            sums = np.array([t.block_sum(cache, bandwidth) for t in terms])
            for model in models:
                if model == "raw":
                    if not streaming:
                        candidates.append((float(np.mean(np.abs(sums - m) / m) * 100), 0, 0, model, None, None, None))
                    continue
                names = CALIBRATION_MODELS[model]
                if len(m) < len(names) + 3:  # leave-one-out needs a point beyond a determined fit
                    continue
                loo = _loo_mape(_design(model, sums, terms, cache, near), m)
                candidates.append((loo, len(names) + 1, streaming, model, cache, bandwidth, near))
        if not candidates:
            raise NasError(f"no calibration candidate {only!r} can be fitted to {len(m)} networks")
        loo_mape: dict[str, float] = {}
        for loo, _, streaming, model, *_ in candidates:
            name = candidate_name(model, streaming)
            loo_mape[name] = min(loo_mape.get(name, math.inf), loo)
        _, _, _, model, cache, bandwidth, near = min(candidates, key=lambda c: (round(c[0], 6), c[1], c[2]))
        sums = np.array([t.block_sum(cache, bandwidth) for t in terms])
        coef = tuple(float(c) for c in _fit(_design(model, sums, terms, cache, near), m)) if model != "raw" else ()
        fitted = cls(model, coef, seed, loo_mape, (), cache, bandwidth, near)
        rows = []
        for arch, t, mi in zip(archs, terms, m):
            predicted = fitted.apply(t)
            rows.append({"arch": arch.to_string(), "key": arch.key, "raw_ms": t.raw_ms, "lookups": t.lookups,
                         "se_blocks": t.se_blocks, "weight_mb": sum(t.weight_bytes) / 1e6,
                         "plain_act_mb": t.plain_act_bytes / 1e6, "measured_ms": float(mi),
                         "predicted_ms": predicted, "error_pct": (predicted - mi) / mi * 100})
        return dataclasses.replace(fitted, rows=tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "coef": list(self.coef), "cache_mb": self.cache_mb,
                "bandwidth_gbs": self.bandwidth_gbs, "near_cache_mb": self.near_cache_mb, "seed": self.seed,
                "loo_mape": self.loo_mape, "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<memory>") -> "Calibration":
        """Read a table's calibration; a hand-edited or foreign one fails here, naming the key, not at predict time."""
        try:
            model, coef = data["model"], tuple(float(c) for c in data["coef"])
            calibration = cls(model, coef, int(data["seed"]), dict(data["loo_mape"]), tuple(data["rows"]),
                              data.get("cache_mb"), data.get("bandwidth_gbs"), data.get("near_cache_mb"))
        except KeyError as exc:
            raise NasError(f"{source}: calibration lacks {exc.args[0]!r}; rebuild the table with "
                           "python scripts/build_lut.py") from None
        except (TypeError, ValueError) as exc:
            raise NasError(f"{source}: malformed calibration ({exc}); rebuild the table with "
                           "python scripts/build_lut.py") from None
        if model not in CALIBRATION_MODELS:
            raise NasError(f"{source}: calibration model {model!r} is not one of {', '.join(CALIBRATION_MODELS)}; "
                           "the table comes from another nas version: rebuild it with python scripts/build_lut.py")
        wanted = len(CALIBRATION_MODELS[model]) + 1 if model != "raw" else 0
        if len(coef) != wanted:
            raise NasError(f"{source}: calibration 'coef' has {len(coef)} values, model {model!r} takes {wanted}")
        if (calibration.cache_mb is None) != (calibration.bandwidth_gbs is None and model not in SPILL_MODELS):
            raise NasError(f"{source}: calibration model {model!r} with 'cache_mb' {calibration.cache_mb} and "
                           f"'bandwidth_gbs' {calibration.bandwidth_gbs}: a spill model sets only 'cache_mb', "
                           "streaming sets both, the others neither; rebuild the table with python scripts/build_lut.py")
        near = calibration.near_cache_mb
        if (near is not None) != (model in NEAR_SPILL_MODELS) or (near is not None and not near < calibration.cache_mb):
            raise NasError(f"{source}: calibration model {model!r} with 'near_cache_mb' {near} and 'cache_mb' "
                           f"{calibration.cache_mb}: only a spill2 model sets 'near_cache_mb', below 'cache_mb'; "
                           "rebuild the table with python scripts/build_lut.py")
        return calibration


# --- the table ----------------------------------------------------------------------------------


def _op_index(op: str) -> int:
    """A block kind's place in ``OP_TERMS``; -1 for kinds without a term (the last counter)."""
    return OP_TERMS.index(op) if op in OP_TERMS else -1


class LatencyTable:
    """Measured per-block latencies of one space on one target; ``predict(arch)`` gives ms."""

    def __init__(self, metadata: dict[str, Any], entries: dict[str, dict[str, Any]],
                 calibration: Calibration | None = None, source: str = "<memory>"):
        self.metadata = metadata
        self.entries = entries
        self.calibration = calibration
        self.source = source
        # every prediction is multiplied by it: 1.0 predicts at the machine's speed during the build;
        # ``relevel`` sets it to predict on a machine that runs the table's networks faster or slower (a VM
        # reporting the same CPU model may run on another host)
        self.speed_ratio = 1.0
        self._ms = {key: entry["ms"] for key, entry in entries.items()}
        # (layer, (in_ch, size)) -> (its row, (out_ch, out_size)): resolving a layer costs far more than
        # this lookup, and a space has few distinct layer contexts; likewise heads. A row is (ms, weight
        # bytes, has SE, plain activation bytes, its ms in its resolution level's slot of LEVELS, 1 in
        # its kind's slot of OP_TERMS): a network's terms are then its rows' column sums, which
        # ``_summary`` takes in C (``zip``/``sum``) instead of adding up field by field per layer
        self._layers: dict[tuple, tuple[tuple[float, ...], tuple[int, int]]] = {}
        # the same keys -> (row . calibration.row_weights + lookup weight, weight bytes, (out_ch, out_size)):
        # predict() then adds one number per layer; emptied when the calibration is replaced
        self._folded: dict[tuple, tuple[float, int, tuple[int, int]]] = {}
        self._folded_for: Calibration | None = None
        self._heads: dict[tuple, float] = {}

    @property
    def num_classes(self) -> int:
        return self.metadata["num_classes"]

    # --- files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, expect_target: str | None = None, expect_threads: int | None = None,
             expect_batch: int | None = None) -> "LatencyTable":
        """Read a table; warn (one line per field) where it was made under other conditions.

        Compared: onnxruntime version and CPU model with this machine, and target, threads and batch
        with the ``expect_*`` values the caller is about to use.
        """
        path = Path(path)
        if not path.is_file():
            raise NasError(f"{path}: no such latency table; build one with python scripts/build_lut.py")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NasError(f"{path}: not a latency table (invalid JSON: {exc})") from None
        table = cls.from_dict(data, str(path))
        meta = table.metadata
        checks = [("onnxruntime", ort.__version__, "this machine"), ("cpu", cpu_model(), "this machine"),
                  ("target", expect_target, "this run"), ("threads", expect_threads, "this run"),
                  ("batch", expect_batch, "this run")]
        for field, here, whose in checks:
            if here is not None and meta.get(field) != here:
                warnings.warn(f"{path}: table {field} is {meta.get(field)!r}, {whose} {here!r}; its predictions "
                              f"may be off (rebuild with scripts/build_lut.py)", TableMismatchWarning, stacklevel=2)
        return table

    def check_machine_speed(self, target: Target, tolerance: float = SPEED_TOLERANCE,
                            networks: int = SPEED_NETWORKS, passes: int = SPEED_PASSES) -> float | None:
        """This machine's time now over the table's, read from ``networks`` of the table's own
        calibration networks timed again, as a validation times them: a seeded random sample, shuffled
        anew in each of ``passes`` passes, each network the geometric mean of its passes. Returns the
        median ratio (``relevel`` takes it) and warns when it lies beyond ``tolerance``.

        Virtual machines often report one CPU model ("AMD EPYC") for hosts of different speeds, and one
        host slows down when its neighbours get busy, so the CPU model alone cannot tell. None for a table
        without calibration networks or of another target, thread count or batch. Call it only when
        nothing else runs (it measures).
        """
        meta = self.metadata
        rows = list(self.calibration.rows) if self.calibration else []
        if not rows or (meta.get("target"), meta.get("threads"), meta.get("batch")) != \
                (target.name, target.threads, target.batch):
            return None
        from nas.latency.build import combined_network  # torch only when checking
        from nas.latency.measure import BusyMonitor, Protocol, measure_archs

        rng = random.Random(0)
        picked = rng.sample(rows, min(networks, len(rows)))
        archs = [Arch.parse(row["arch"]) for row in picked]
        protocol = Protocol.from_dict(meta.get("protocol", {}))
        monitor = BusyMonitor(target, protocol, meta.get("reference_ms")) if protocol.reference else None
        timed: list[list[Any]] = [[] for _ in picked]
        for _ in range(passes):
            order = rng.sample(range(len(picked)), len(picked))
            for i, m in zip(order, measure_archs([archs[i] for i in order], target, protocol, self.num_classes,
                                                 monitor=monitor)):
                timed[i].append(m)
        ratio = float(np.median([combined_network(t).ms / row["measured_ms"] for t, row in zip(timed, picked)]))
        if not 1 / (1 + tolerance) <= ratio <= 1 + tolerance:
            warnings.warn(
                f"{self.source}: {len(picked)} of its calibration networks run at {ratio:.2f}x their time in the "
                f"table on this machine, so its predictions are off by about as much here: it was measured on "
                f"another or differently loaded machine; rebuild it here with python scripts/build_lut.py "
                f"--target {target.name} --threads {target.threads} --space {meta.get('space_file', '<space.yaml>')} "
                "--fresh", TableMismatchWarning, stacklevel=2)
        return ratio

    def relevel(self, ratio: float | None) -> None:
        """Predict at this machine's speed: ``speed_ratio`` becomes ``check_machine_speed``'s ratio where
        it lies beyond ``RELEVEL_BEYOND``, else 1 (within it the ratio is the check's own scatter)."""
        beyond = ratio is not None and abs(math.log(ratio)) > math.log1p(RELEVEL_BEYOND)
        self.speed_ratio = ratio if beyond else 1.0

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> "LatencyTable":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise NasError(f"{source}: not a latency table of schema {SCHEMA} (found schema {found!r}); "
                           "rebuild it with python scripts/build_lut.py --fresh")
        for field in ("metadata", "entries"):
            if not isinstance(data.get(field), dict):
                raise NasError(f"{source}: latency table lacks its {field!r} mapping")
        for field in ("num_classes", "resolution", "target", "threads", "batch"):
            if field not in data["metadata"]:
                raise NasError(f"{source}: latency table metadata lacks {field!r}")
        for key, entry in data["entries"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("ms"), (int, float)):
                raise NasError(f"{source}: entry {key!r} lacks a numeric 'ms'")
        calibration = Calibration.from_dict(data["calibration"], source) if data.get("calibration") else None
        return cls(data["metadata"], data["entries"], calibration, source)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "metadata": self.metadata,
                "calibration": self.calibration.to_dict() if self.calibration else None, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename): an interrupted save never leaves half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        entries = data.pop("entries")
        head = json.dumps(data, indent=1)[:-2]  # drop the closing "\n}" to append the entries
        lines = [f" {json.dumps(key)}: {json.dumps(entry)}" for key, entry in entries.items()]
        text = head + ',\n "entries": {\n' + ",\n".join(lines) + "\n }\n}\n"
        tmp = path.with_name(path.name + ".tmp")  # plain open(): the file gets the umask's permissions
        tmp.write_text(text)
        os.replace(tmp, path)

    # --- prediction ---------------------------------------------------------------------------
    def entry_ms(self, key: str) -> float:
        try:
            return self._ms[key]
        except KeyError:
            raise MissingEntryError(key, self.source, self.metadata) from None

    def _learn(self, arch: Arch, num_classes: int) -> None:
        """Resolve the arch's layers once, memoising each layer context's entry, bytes and output shape."""
        state = (3, arch.resolution)
        for layer in arch.layers:
            spec = resolve_layer(layer, *state)
            ms = self.entry_ms(spec.key)
            levels, ops = [0.0] * LEVELS, [0] * (len(OP_TERMS) + 1)  # the last slot: kinds without a term
            levels[self._level(spec.resolution)] = ms
            ops[_op_index(spec.op)] = 1
            row = (ms, weight_bytes(spec), int(spec.se_ch > 0), plain_activation_bytes(spec), *levels, *ops[:-1])
            self._layers[layer, state] = row, (spec.out_ch, spec.out_resolution)
            state = (spec.out_ch, spec.out_resolution)
        head = HeadSpec(arch.pool, state[0], arch.hidden, arch.hidden_act, num_classes, state[1])
        self._heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state] = (self.entry_ms(head.key),
                                                                                     head_weight_bytes(head))

    def _level(self, resolution: int) -> int:
        return resolution_level(resolution, self.metadata.get("resolution") or resolution)

    def _summary(self, arch: Arch, num_classes: int, big_above: float) -> tuple[float, Summary]:
        """(sum of entries, the rest of the terms, with only the blocks over ``big_above`` bytes in
        ``block_bytes``) from the memo alone; a KeyError means a context not seen yet."""
        layers = self._layers
        rows = []
        state = (3, arch.resolution)
        for layer in arch.layers:
            row, state = layers[layer, state]
            rows.append(row)
        head_ms, head_bytes = self._heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state]
        columns = tuple(zip(*rows)) if rows else ((),) * (4 + LEVELS + len(OP_TERMS))
        total, nbytes, se, acts, *rest = map(sum, columns)
        big = [b for b in (*columns[1], head_bytes) if b > big_above] if big_above < math.inf else []
        return total + head_ms, Summary(len(rows) + 1, se, nbytes + head_bytes, big, acts, rest[:LEVELS], rest[LEVELS:])

    def _memo_streamed_sum(self, arch: Arch, num_classes: int, ms_per_byte: float) -> float:
        """``NetworkTerms.block_sum`` from the memo (filled by ``_memo_summary``), without resolving layers."""
        layers = self._layers
        total = 0.0
        state = (3, arch.resolution)
        for layer in arch.layers:
            (ms, nbytes, *_), state = layers[layer, state]
            streamed = nbytes * ms_per_byte
            total += ms if ms > streamed else streamed
        head_ms, head_bytes = self._heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state]
        return total + max(head_ms, head_bytes * ms_per_byte)

    def _memo_summary(self, arch: Arch, num_classes: int, big_above: float = math.inf) -> tuple[float, Summary]:
        try:
            return self._summary(arch, num_classes, big_above)
        except KeyError:
            self._learn(arch, num_classes)
            return self._summary(arch, num_classes, big_above)

    def terms(self, arch: Arch, num_classes: int | None = None) -> NetworkTerms:
        """``arch`` as the calibration sees it (``NetworkTerms``)."""
        specs, head = resolve(arch, num_classes or self.num_classes)
        return self.terms_of(specs, head)

    def terms_of(self, specs: Iterable[BlockSpec], head: HeadSpec) -> NetworkTerms:
        specs = tuple(specs)
        ms = tuple(self.entry_ms(spec.key) for spec in specs)
        levels = [0.0] * LEVELS
        ops = [0] * (len(OP_TERMS) + 1)
        for spec, entry in zip(specs, ms):
            levels[self._level(spec.resolution)] += entry
            ops[_op_index(spec.op)] += 1
        return NetworkTerms(ms + (self.entry_ms(head.key),),
                            tuple(weight_bytes(spec) for spec in specs) + (head_weight_bytes(head),),
                            sum(spec.se_ch > 0 for spec in specs), sum(plain_activation_bytes(spec) for spec in specs),
                            tuple(levels), tuple(ops[:-1]))

    def predict_raw(self, arch: Arch, num_classes: int | None = None) -> tuple[float, int]:
        """Sum of the entries of the arch's blocks and head, and the number of entries summed."""
        return self._memo_summary(arch, num_classes or self.num_classes)[0], len(arch.layers) + 1

    def _fold(self, arch: Arch, num_classes: int, folding: tuple[tuple[float, ...], float, float]) -> None:
        """Fill ``_folded`` (and the plain memo) for the arch's layers."""
        self._memo_summary(arch, num_classes)
        weights, per_lookup, _ = folding
        state = (3, arch.resolution)
        for layer in arch.layers:
            row, out = self._layers[layer, state]
            self._folded[layer, state] = sum(map(operator.mul, row, weights)) + per_lookup, row[1], out
            state = out

    def _predict_folded(self, arch: Arch, num_classes: int, calibration: Calibration,
                        folding: tuple[tuple[float, ...], float, float]) -> float:
        """``predict`` for calibrations that ``row_weights`` folds: one addition per layer."""
        folded, big_above = self._folded, calibration.smallest_cache_bytes
        try:
            total, nbytes, big = 0.0, 0, []
            state = (3, arch.resolution)
            for layer in arch.layers:
                value, b, state = folded[layer, state]
                total += value
                nbytes += b
                if b > big_above:
                    big.append(b)
            head_ms, head_bytes = self._heads[arch.pool, arch.hidden, arch.hidden_act, num_classes, state]
        except KeyError:
            self._fold(arch, num_classes, folding)
            return self._predict_folded(arch, num_classes, calibration, folding)
        weights, per_lookup, constant = folding
        if head_bytes > big_above:
            big.append(head_bytes)
        total += weights[0] * head_ms + weights[1] * head_bytes + per_lookup + constant
        return total + calibration.spill_ms(len(arch.layers) + 1, nbytes + head_bytes, big)

    def predict(self, arch: Arch, num_classes: int | None = None) -> float:
        """Predicted end-to-end latency in ms, times ``speed_ratio`` (``num_classes`` defaults to the table's)."""
        num_classes = num_classes or self.num_classes
        calibration = self.calibration
        if calibration is not None and (folding := calibration.row_weights) is not None:
            if calibration is not self._folded_for:
                self._folded, self._folded_for = {}, calibration
            return self.speed_ratio * self._predict_folded(arch, num_classes, calibration, folding)
        raw, summary = self._memo_summary(arch, num_classes, calibration.smallest_cache_bytes
                                          if calibration else math.inf)
        if calibration is None:
            return self.speed_ratio * raw
        ms_per_byte = streaming_ms_per_byte(summary.total_bytes, calibration.cache_mb, calibration.bandwidth_gbs)
        if ms_per_byte:  # per block, only for networks whose weights exceed the cache
            raw = self._memo_streamed_sum(arch, num_classes, ms_per_byte)
        return self.speed_ratio * calibration.combine(raw, summary)

    def predict_many(self, archs: Iterable[Arch], num_classes: int | None = None) -> list[float]:
        return [self.predict(arch, num_classes) for arch in archs]

    def predict_specs(self, specs: Iterable[BlockSpec], head: HeadSpec) -> float:
        """Predicted ms from already resolved blocks (as ``nas.blocks.resolve`` returns them)."""
        terms = self.terms_of(specs, head)
        return self.speed_ratio * (self.calibration.apply(terms) if self.calibration else terms.raw_ms)
