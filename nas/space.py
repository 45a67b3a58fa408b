"""Search spaces: YAML files validated on load, named decisions, decoding to ``Arch``.

A space is a skeleton of stages (base channels, stride) with choice lists. ``choice_per: block`` is
MnasNet's factorised hierarchical space (one op/kernel/expansion/SE/skip decision per stage, shared by
all its layers); ``choice_per: layer`` is ProxylessNAS/Once-for-All style (one decision per layer).
Every space also has a global width multiplier and training hyperparameters, searched jointly.

A point of the space is ``params: dict[str, value]``, one value per ``Decision``; ``decode`` turns it
into an ``Arch``, ``hyperparameters`` into the training settings. The schema is in search_spaces/README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nas.arch import ACTIVATIONS, KERNELS, POOLS, STRIDES, Arch, Layer, intern_layer, make_divisible
from nas.blocks import BlockSpec, HeadSpec, conv_out_size, resolve_layer
from nas.errors import SpaceError

STAGE_OPS = ("conv", "ds", "ir", "bot")
STEM_OPS = ("conv", "maxpool")
ACT_NAMES = tuple(ACTIVATIONS.values())
CHOICE_KEYS = ("layers", "width", "op", "kernel", "expansion", "se", "skip", "act")
TOP_KEYS = {"name", "description", "resolution", "width_mult", "choice_per", "stem", "head", "stages", "defaults", "hyperparameters"}
REQUIRED_TOP = ("name", "resolution", "width_mult", "stem", "head", "stages", "hyperparameters")
HP_TYPES = ("categorical", "int", "log_float")


@dataclass(frozen=True)
class Decision:
    """One named choice: categorical (``choices``), ``int`` in [low, high] by ``step``, or ``log_float``."""

    name: str
    kind: str
    choices: tuple = ()
    low: float = 0
    high: float = 0
    step: int = 1

    @property
    def is_hyperparameter(self) -> bool:
        return self.name.startswith("hp.")

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if self.kind == "int":
            return isinstance(value, int) and self.low <= value <= self.high and (value - self.low) % self.step == 0
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "categorical":
            return self.choices[rng.randrange(len(self.choices))]
        if self.kind == "int":
            return rng.randrange(int(self.low), int(self.high) + 1, self.step)
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))

    def neighbour(self, value: Any, rng: random.Random) -> Any:
        """A different nearby value: another choice, one step away, or a log-normal jitter."""
        if self.kind == "categorical":
            others = [c for c in self.choices if c != value]
            return others[rng.randrange(len(others))] if others else value
        if self.kind == "int":
            moves = [v for v in (value - self.step, value + self.step) if self.low <= v <= self.high]
            return moves[rng.randrange(len(moves))] if moves else value
        return min(self.high, max(self.low, value * math.exp(rng.gauss(0.0, 0.5))))


@dataclass(frozen=True)
class Stage:
    channels: int
    stride: int
    choices: dict[str, tuple]  # CHOICE_KEYS -> allowed values


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str
    resolution: int
    width_mult: tuple[float, ...]
    choice_per: str
    stem: tuple[dict, ...]
    head: dict
    stages: tuple[Stage, ...]
    hyperparameters: tuple[Decision, ...]
    description: str = ""

    # --- decisions -----------------------------------------------------------------------------
    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Every decision with more than one option, architecture first, in a fixed order."""
        out = []
        if len(self.width_mult) > 1:
            out.append(Decision("width_mult", "categorical", self.width_mult))
        for i, stage in enumerate(self.stages):
            for key in ("layers", "width"):
                if len(stage.choices[key]) > 1:
                    out.append(Decision(f"s{i}.{key}", "categorical", stage.choices[key]))
            prefixes = [f"s{i}"] if self.choice_per == "block" else [f"s{i}.l{j}" for j in range(max(stage.choices["layers"]))]
            for prefix in prefixes:
                for key in CHOICE_KEYS[2:]:
                    if len(stage.choices[key]) > 1:
                        out.append(Decision(f"{prefix}.{key}", "categorical", stage.choices[key]))
        return tuple(out) + self.hyperparameters

    def _value(self, params: dict[str, Any], name: str, options: tuple) -> Any:
        if len(options) == 1:
            return options[0]
        try:
            value = params[name]
        except KeyError:
            raise SpaceError(self.source, name, "missing from the parameters") from None
        if value not in options:
            raise SpaceError(self.source, name, f"{value!r} is not one of {list(options)}")
        return value

    @functools.cached_property
    def _plan(self) -> tuple:
        """Decision names per stage and layer, built once: decoding runs thousands of times a second."""
        plan = []
        for i, stage in enumerate(self.stages):
            prefixes = [f"s{i}"] if self.choice_per == "block" else [f"s{i}.l{j}" for j in range(max(stage.choices["layers"]))]
            names = tuple(tuple((f"{p}.{key}", stage.choices[key]) for key in CHOICE_KEYS[2:]) for p in prefixes)
            plan.append((stage, (f"s{i}.layers", stage.choices["layers"]), (f"s{i}.width", stage.choices["width"]), names))
        return tuple(plan)

    # --- decoding ------------------------------------------------------------------------------
    def decode(self, params: dict[str, Any], resolution: int | None = None) -> Arch:
        """The network a point of the space describes (hyperparameters ignored)."""
        value = self._value
        wm = value(params, "width_mult", self.width_mult)
        layers = []
        for item in self.stem:
            out = make_divisible(item["channels"] * wm) if item["op"] != "maxpool" else 0
            layers.append(intern_layer(item["op"], item["kernel"], item["stride"], out, act=item["act"]))
        for stage, depth_decision, width_decision, names in self._plan:
            depth = value(params, *depth_decision)
            out = make_divisible(stage.channels * value(params, *width_decision) * wm)
            if self.choice_per == "block":
                first = self._layer(params, names[0], out, stage.stride)
                layers.append(first)
                if depth > 1:
                    layers.extend([first.replace(stride=1)] * (depth - 1))
            else:
                layers.extend(self._layer(params, names[j], out, stage.stride if j == 0 else 1) for j in range(depth))
        head = self.head
        if head.get("channels"):
            layers.append(intern_layer("conv", 1, 1, make_divisible(head["channels"] * max(1.0, wm)), act=head["act"]))
        return Arch(resolution or self.resolution, tuple(layers), pool=head["pool"])

    def _layer(self, params: dict[str, Any], names: tuple, out: int, stride: int) -> Layer:
        op, kernel, expansion, se, skip, act = (self._value(params, name, options) for name, options in names)
        return intern_layer(op, kernel, stride, out, float(expansion) if op in ("ir", "bot") else 1.0, float(se), act,
                            bool(skip))

    def hyperparameters_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """Training hyperparameters of a point: {'optimizer': 'adam', 'lr': 0.01, 'batch_size': 64}."""
        return {d.name[3:]: params[d.name] for d in self.hyperparameters}

    def candidate_key(self, params: dict[str, Any]) -> str:
        """Dedup key of a point: the architecture's canonical string plus its hyperparameters."""
        hp = ",".join(f"{k}={_fmt_hp(v)}" for k, v in sorted(self.hyperparameters_of(params).items()))
        return f"{self.decode(params).to_string()}|{hp}"

    # --- sampling and variation (seeded through the caller's rng) -------------------------------
    def sample(self, rng: random.Random) -> dict[str, Any]:
        return {d.name: d.sample(rng) for d in self.decisions}

    def contains(self, params: dict[str, Any]) -> bool:
        return all(d.name in params and d.contains(params[d.name]) for d in self.decisions)

    def mutate(self, params: dict[str, Any], rng: random.Random, max_tries: int = 50) -> dict[str, Any]:
        """Change one decision so that the candidate actually changes (irrelevant choices are retried)."""
        decisions = self.decisions
        before = self.candidate_key(params)
        child = dict(params)
        for _ in range(max_tries):
            d = decisions[rng.randrange(len(decisions))]
            child = dict(params)
            child[d.name] = d.neighbour(params[d.name], rng)
            if self.candidate_key(child) != before:
                return child
        return child

    def crossover(self, a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Uniform crossover: each decision from either parent with equal probability."""
        return {d.name: (a if rng.random() < 0.5 else b)[d.name] for d in self.decisions}

    def size(self) -> int:
        """Number of distinct architectures the decisions can describe, irrelevant choices collapsed.

        Counts decisions, not rounded channel counts: two width choices that round to the same number
        of channels count twice.
        """
        total = len(self.width_mult)
        for i, stage in enumerate(self.stages):
            c = stage.choices
            per_layer = 0
            for op in c["op"]:
                options = len(c["kernel"]) * len(c["se"]) * len(c["act"])
                options *= len(c["expansion"]) if op in ("ir", "bot") else 1
                options *= len(c["skip"]) if op != "bot" else 1
                per_layer += options
            if self.choice_per == "block":
                stage_total = len(c["layers"]) * per_layer
            else:
                stage_total = sum(per_layer**d for d in c["layers"])
            total *= stage_total * len(c["width"])
        return total


def _fmt_hp(value: Any) -> str:
    return format(value, ".6g") if isinstance(value, float) else str(value)


# --- loading and validation ------------------------------------------------------------------


class _Loader:
    """Validates one file's data; every error names the file, the key path and what is allowed."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> None:
        raise SpaceError(self.source, key, message)

    def choice_list(self, key: str, value: Any, allowed: tuple | None = None, kind: type | None = None) -> tuple:
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(key, "the choice list is empty; give at least one value")
        for v in values:
            if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
                continue
            if kind is not None and kind is not float and not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                self.fail(key, f"{v!r} is not a{'n' if kind is int else ''} {kind.__name__}")
            if allowed is not None and v not in allowed:
                self.fail(key, f"{v!r} is not allowed; choose from {list(allowed)}")
            if kind is float and not isinstance(v, (int, float)):
                self.fail(key, f"{v!r} is not a number")
        if len(set(values)) != len(values):
            self.fail(key, f"duplicate values in {values}")
        return tuple(float(v) for v in values) if kind is float else tuple(values)

    def mapping(self, key: str, value: Any, allowed: set[str], required: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping with keys {sorted(allowed)}, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                self.fail(f"{key}.{k}" if key else k, f"unknown key; allowed keys: {sorted(allowed)}")
        for k in required:
            if k not in value:
                self.fail(f"{key}.{k}" if key else k, "missing required key")
        return value

    def positive_int(self, key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(key, f"must be a positive integer, got {value!r}")
        return value

    def one(self, key: str, value: Any, allowed: tuple) -> Any:
        if value not in allowed:
            self.fail(key, f"{value!r} is not allowed; choose from {list(allowed)}")
        return value

    def stage(self, i: int, data: Any, defaults: dict) -> Stage:
        key = f"stages[{i}]"
        data = self.mapping(key, data, {"channels", "stride", *CHOICE_KEYS}, ("channels", "stride"))
        merged = {**defaults, **data}
        channels = self.positive_int(f"{key}.channels", data["channels"])
        stride = self.one(f"{key}.stride", data["stride"], STRIDES)
        for k in CHOICE_KEYS:
            if k not in merged:
                self.fail(f"{key}.{k}", "missing: give it here or under 'defaults'")
        specs = {
            "layers": (None, int), "width": (None, float), "op": (STAGE_OPS, str), "kernel": (KERNELS, int),
            "expansion": (None, float), "se": (None, float), "skip": ((False, True), bool), "act": (ACT_NAMES, str),
        }
        choices = {k: self.choice_list(f"{key}.{k}", merged[k], *specs[k]) for k in CHOICE_KEYS}
        for k, bad in (("layers", lambda v: v < 1), ("width", lambda v: v <= 0), ("expansion", lambda v: v <= 0),
                       ("se", lambda v: not 0 <= v < 1)):
            for v in choices[k]:
                if bad(v):
                    self.fail(f"{key}.{k}", f"{v!r} is out of range")
        return Stage(channels, stride, choices)

    def stem_layer(self, i: int, data: Any, act: str) -> dict:
        key = f"stem[{i}]"
        data = self.mapping(key, data, {"op", "kernel", "stride", "channels", "act"}, ("op",))
        op = self.one(f"{key}.op", data["op"], STEM_OPS)
        item = {
            "op": op,
            "kernel": self.one(f"{key}.kernel", data.get("kernel", 3), KERNELS),
            "stride": self.one(f"{key}.stride", data.get("stride", 1), STRIDES),
            "act": self.one(f"{key}.act", data.get("act", act), ACT_NAMES),
            "channels": 0,
        }
        if op != "maxpool":
            if "channels" not in data:
                self.fail(f"{key}.channels", "missing required key")
            item["channels"] = self.positive_int(f"{key}.channels", data["channels"])
        return item

    def hyperparameter(self, name: str, data: Any) -> Decision:
        key = f"hyperparameters.{name}"
        data = self.mapping(key, data, {"type", "choices", "low", "high", "step"}, ("type",))
        kind = self.one(f"{key}.type", data["type"], HP_TYPES)
        if kind == "categorical":
            if "choices" not in data:
                self.fail(f"{key}.choices", "missing required key")
            return Decision(f"hp.{name}", kind, self.choice_list(f"{key}.choices", data["choices"]))
        for k in ("low", "high"):
            if k not in data:
                self.fail(f"{key}.{k}", "missing required key")
            if not isinstance(data[k], (int, float)) or isinstance(data[k], bool):
                self.fail(f"{key}.{k}", f"must be a number, got {data[k]!r}")
        low, high = data["low"], data["high"]
        if not low < high:
            self.fail(key, f"low ({low}) must be below high ({high})")
        if kind == "log_float":
            if low <= 0:
                self.fail(f"{key}.low", f"a log-scale range must be positive, got {low}")
            return Decision(f"hp.{name}", kind, low=float(low), high=float(high))
        step = self.positive_int(f"{key}.step", data.get("step", 1))
        if not isinstance(low, int) or not isinstance(high, int):
            self.fail(key, "an int range needs integer low and high")
        return Decision(f"hp.{name}", kind, low=low, high=high, step=step)

    def space(self, data: Any) -> SearchSpace:
        data = self.mapping("", data, TOP_KEYS, REQUIRED_TOP)
        defaults = data.get("defaults") or {}
        self.mapping("defaults", defaults, set(CHOICE_KEYS), ())
        default_act = defaults.get("act", "relu")
        if isinstance(default_act, list):
            default_act = default_act[0] if default_act else "relu"
        stem = data["stem"]
        if not isinstance(stem, list) or not stem:
            self.fail("stem", "must be a non-empty list of layers ({op: conv, kernel: 3, stride: 2, channels: 32})")
        stages = data["stages"]
        if not isinstance(stages, list) or not stages:
            self.fail("stages", "must be a non-empty list of stages")
        head = self.mapping("head", data["head"], {"channels", "pool", "act"}, ("pool",))
        if head.get("channels") is not None:
            self.positive_int("head.channels", head["channels"])
        hps = self.mapping("hyperparameters", data["hyperparameters"], {"optimizer", "lr", "batch_size", "weight_decay", "momentum"}, ("optimizer", "lr", "batch_size"))
        return SearchSpace(
            name=str(data["name"]),
            source=self.source,
            resolution=self.positive_int("resolution", data["resolution"]),
            width_mult=self.choice_list("width_mult", data["width_mult"], kind=float),
            choice_per=self.one("choice_per", data.get("choice_per", "block"), ("block", "layer")),
            stem=tuple(self.stem_layer(i, s, default_act) for i, s in enumerate(stem)),
            head={"channels": head.get("channels"), "pool": self.one("head.pool", head["pool"], POOLS),
                  "act": self.one("head.act", head.get("act", default_act), ACT_NAMES)},
            stages=tuple(self.stage(i, s, defaults) for i, s in enumerate(stages)),
            hyperparameters=tuple(self.hyperparameter(k, v) for k, v in hps.items()),
            description=str(data.get("description", "")),
        )


def load_space(path: str | Path) -> SearchSpace:
    """Load and validate a search-space YAML file; any problem raises ``SpaceError`` naming the key."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpaceError(source, "(file)", "no such file; shipped spaces are in search_spaces/")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpaceError(source, "(file)", f"not a text file (byte {exc.start} is not UTF-8); a space file is "
                                           "YAML text such as search_spaces/mnasnet.yaml") from None
    if "\x00" in text:  # valid UTF-8 can still be binary; YAML would report a confusing character error
        raise SpaceError(source, "(file)", "not a text file (it holds NUL bytes); a space file is YAML text such "
                                           "as search_spaces/mnasnet.yaml")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise SpaceError(source, where, f"YAML syntax error: {getattr(exc, 'problem', exc)}") from None
    space = _Loader(source).space(data)
    _check_decodes(space)
    return space


def _check_decodes(space: SearchSpace) -> None:
    """Spaces whose smallest setting rounds away a whole stage are rejected up front."""
    params = {d.name: (d.choices[0] if d.kind == "categorical" else d.sample(random.Random(0))) for d in space.decisions}
    arch = space.decode(params)
    if arch.resolution < 2 ** sum(1 for layer in arch.layers if layer.stride == 2):
        raise SpaceError(space.source, "resolution", f"{arch.resolution} is smaller than the network's total stride")


def with_resolution(space: SearchSpace, resolution: int) -> SearchSpace:
    return dataclasses.replace(space, resolution=resolution)


def block_contexts(space: SearchSpace, num_classes: int) -> tuple[list[BlockSpec], list[HeadSpec]]:
    """Every distinct resolved block and head reachable in ``space``: what a latency table must hold."""
    blocks: dict[str, BlockSpec] = {}
    heads: dict[str, HeadSpec] = {}
    for wm in space.width_mult:
        arch = space.decode({d.name: (d.choices[0] if d.kind == "categorical" else 0) for d in space.decisions}
                            | {"width_mult": wm})
        size, channels = space.resolution, {3}
        for layer in arch.layers[: len(space.stem)]:
            spec = resolve_layer(layer, next(iter(channels)), size)
            blocks[spec.key] = spec
            channels, size = {spec.out_ch}, spec.out_resolution
        for stage in space.stages:
            c = stage.choices
            outs = {make_divisible(stage.channels * w * wm) for w in c["width"]}
            after = conv_out_size(size, stage.stride)
            options = [
                (op, k, float(e) if op in ("ir", "bot") else 1.0, float(se), act, bool(skip))
                for op in c["op"] for k in c["kernel"] for e in c["expansion"] for se in c["se"]
                for act in c["act"] for skip in c["skip"]
            ]
            for out in outs:
                for op, k, e, se, act, skip in options:
                    for cin in channels:
                        spec = resolve_layer(Layer(op, k, stage.stride, out, e, se, act, skip), cin, size)
                        blocks[spec.key] = spec
                    if max(c["layers"]) > 1:
                        spec = resolve_layer(Layer(op, k, 1, out, e, se, act, skip), out, after)
                        blocks[spec.key] = spec
            channels, size = outs, after
        if space.head.get("channels"):
            out = make_divisible(space.head["channels"] * max(1.0, wm))
            for cin in channels:
                spec = resolve_layer(Layer("conv", 1, 1, out, act=space.head["act"]), cin, size)
                blocks[spec.key] = spec
            channels = {out}
        for cin in channels:
            head = HeadSpec(space.head["pool"], cin, 0, "hardswish", num_classes, size)
            heads[head.key] = head
    return list(blocks.values()), list(heads.values())
