"""The architecture type every part of `nas` shares, and its canonical one-line string.

An ``Arch`` is a fully resolved network: absolute channel counts, one ``Layer`` per layer, the input
resolution and the head. Global multipliers live in the search space, not here, so two decisions that
produce the same network produce the same ``Arch``, the same string and the same key.

String grammar (tokens joined by ``-``; fields inside a token joined by ``_``)::

    i224                        input resolution; ``i224_bn0.001`` sets BatchNorm's eps (default 1e-5)
    conv_k3_s2_c32_r6           conv-BN-act      (op, n=repeats, k=kernel, s=stride, c=out channels)
    ds_k3_c16_se0.25_r6         depthwise-separable: dw conv-BN-act, [squeeze-excite], 1x1 conv-BN
    ir_n2_k3_s2_e6_c24_r6       MBConv / inverted residual, expansion e = mid / in channels
    bot_n3_k3_e0.25_c256_re     ResNet bottleneck, e = mid / out channels, projection shortcut if needed
    maxpool_k3_s2               max pooling (ResNet's stem)
    avg | mean                  global pooling: adaptive_avg_pool2d or Tensor.mean (fvcore counts only
                                the first, so the choice matters for exact FLOPs)
    fc_c1280_hs                 optional hidden linear layer + activation before the classifier

Activations: ``re`` relu, ``r6`` relu6, ``hs`` hardswish. ``n`` merges consecutive identical layers
(only the first may stride). ``noskip`` disables the identity residual where one is possible; it is
dropped where none is possible, so an irrelevant choice never changes the string.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from nas.errors import ArchStringError

OPS = ("conv", "ds", "ir", "bot", "maxpool")
ACTIVATIONS = {"re": "relu", "r6": "relu6", "hs": "hardswish"}
ACTIVATION_CODES = {name: code for code, name in ACTIVATIONS.items()}
POOLS = ("avg", "mean")
KERNELS = (1, 3, 5, 7)
STRIDES = (1, 2)
DEFAULT_BN_EPS = 1e-5


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going more than 10% below it.

    MobileNet's rule (torchvision's ``_make_divisible``): 5.6 -> 8 (never below the divisor),
    18 -> 24 (16 would lose 11%), 30 -> 32, 183.99999 -> 184 (float noise from 80 x 2.3).
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _fmt(x: float) -> str:
    return format(x, "g")


@dataclass(frozen=True, eq=False)
class Layer:
    """One layer as chosen, before channels are carried in from the previous layer.

    Hashed and compared through one precomputed tuple: layers are dict keys in every memo of the
    cost model and the latency table, on the hot path of a search.
    """

    op: str
    kernel: int = 3
    stride: int = 1
    out: int = 0  # output channels; 0 for maxpool (keeps its input's)
    expansion: float = 1.0  # ir: mid/in, bot: mid/out; 1.0 where irrelevant
    se: float = 0.0  # squeeze-excite ratio of the channels it acts on; 0 = none
    act: str = "relu"
    skip: bool = True  # identity residual where stride 1 and in == out

    def __post_init__(self) -> None:
        # context-free normalisation; the residual's relevance depends on neighbours (canonical_layers)
        if self.op == "ir" and self.expansion == 1.0:
            object.__setattr__(self, "op", "ds")  # an MBConv without expansion is depthwise-separable
        if self.op in ("conv", "ds", "maxpool"):
            object.__setattr__(self, "expansion", 1.0)
        if self.op == "maxpool":
            for name, value in (("out", 0), ("se", 0.0), ("act", "relu"), ("skip", True)):
                object.__setattr__(self, name, value)
        fields = (self.op, self.kernel, self.stride, self.out, self.expansion, self.se, self.act, self.skip)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash

    def replace(self, **changes: Any) -> "Layer":
        """A copy with some fields changed, interned: equal layers are usually the same object."""
        fields = dict(zip(_LAYER_FIELDS, self._fields), **changes)
        return intern_layer(*fields.values())

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Layer) and self._fields == other._fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Layer":
        return cls(**data)


@dataclass(frozen=True)
class Arch:
    """A complete network: input resolution, layers (stem, body, head conv), pooling, classifier head."""

    resolution: int
    layers: tuple[Layer, ...]
    pool: str = "avg"
    hidden: int = 0  # width of an optional hidden linear layer before the classifier (MobileNetV3)
    hidden_act: str = "hardswish"
    bn_eps: float = DEFAULT_BN_EPS

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "layers", canonical_layers(self.layers))
        if not self.hidden:
            object.__setattr__(self, "hidden_act", "hardswish")

    # --- encodings ---------------------------------------------------------------------------
    def to_string(self) -> str:
        return format_arch(self)

    def __str__(self) -> str:
        return self.to_string()

    @property
    def key(self) -> str:
        """Stable short key: a hash of the canonical string (the string itself is the identity)."""
        return hashlib.sha1(self.to_string().encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "layers": [layer.to_dict() for layer in self.layers],
            "pool": self.pool,
            "hidden": self.hidden,
            "hidden_act": self.hidden_act,
            "bn_eps": self.bn_eps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Arch":
        fields = dict(data)
        fields["layers"] = tuple(Layer.from_dict(d) for d in data["layers"])
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Arch":
        return cls.from_dict(json.loads(text))

    @classmethod
    def parse(cls, text: str) -> "Arch":
        return parse_arch(text)

    def with_resolution(self, resolution: int) -> "Arch":
        return dataclasses.replace(self, resolution=resolution)


_LAYER_FIELDS = ("op", "kernel", "stride", "out", "expansion", "se", "act", "skip")


@functools.lru_cache(maxsize=1 << 16)
def intern_layer(op: str, kernel: int = 3, stride: int = 1, out: int = 0, expansion: float = 1.0, se: float = 0.0,
                 act: str = "relu", skip: bool = True) -> Layer:
    """``Layer(...)`` shared between equal calls: decoding builds the same layers over and over."""
    return Layer(op, kernel, stride, out, expansion, se, act, skip)


def canonical_layers(layers: tuple[Layer, ...]) -> tuple[Layer, ...]:
    """Normalise choices that do not change the network, so equal networks compare equal."""
    result = []
    channels = 3
    for layer in layers:
        out = layer.out or channels
        residual_possible = layer.op in ("conv", "ds", "ir") and layer.stride == 1 and out == channels
        result.append(layer if residual_possible or layer.skip else layer.replace(skip=True))
        channels = out
    return tuple(result)


# --- string form ---------------------------------------------------------------------------------


def _layer_token(layer: Layer, repeats: int) -> str:
    parts = [layer.op]
    if repeats > 1:
        parts.append(f"n{repeats}")
    parts.append(f"k{layer.kernel}")
    if layer.stride != 1:
        parts.append(f"s{layer.stride}")
    if layer.op == "maxpool":
        return "_".join(parts)
    if layer.op in ("ir", "bot"):
        parts.append(f"e{_fmt(layer.expansion)}")
    parts.append(f"c{layer.out}")
    if layer.se:
        parts.append(f"se{_fmt(layer.se)}")
    if not layer.skip:
        parts.append("noskip")
    parts.append(ACTIVATION_CODES[layer.act])
    return "_".join(parts)


def format_arch(arch: Arch) -> str:
    head = f"i{arch.resolution}"
    if arch.bn_eps != DEFAULT_BN_EPS:
        head += f"_bn{_fmt(arch.bn_eps)}"
    tokens = [head]
    i = 0
    layers = arch.layers
    while i < len(layers):
        first = layers[i]
        follower = first.replace(stride=1)
        j = i + 1
        # later layers of a run repeat the first at stride 1; their residual is always possible
        while j < len(layers) and layers[j] == follower and first.op != "maxpool" and first.out:
            j += 1
        tokens.append(_layer_token(first, j - i))
        i = j
    tokens.append(arch.pool)
    if arch.hidden:
        tokens.append(f"fc_c{arch.hidden}_{ACTIVATION_CODES[arch.hidden_act]}")
    return "-".join(tokens)


_FIELD = re.compile(r"^(n|k|s|e|c|se|bn|i)(\d+(?:\.\d+)?(?:e-?\d+)?)$")


def _parse_fields(text: str, token: str, parts: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in parts:
        if part in ACTIVATIONS:
            fields["act"] = ACTIVATIONS[part]
            continue
        if part == "noskip":
            fields["skip"] = "0"
            continue
        m = _FIELD.match(part)
        if not m:
            raise ArchStringError(
                text, token, f"unknown field {part!r}; fields are n<repeats> k<kernel> s<stride> "
                f"e<expansion> c<channels> se<ratio> noskip and an activation ({'/'.join(ACTIVATIONS)})"
            )
        if m.group(1) in fields:
            raise ArchStringError(text, token, f"field {m.group(1)!r} given twice")
        fields[m.group(1)] = m.group(2)
    return fields


def _number(text: str, token: str, fields: dict[str, str], name: str, kind, default=None):
    if name not in fields:
        if default is None:
            raise ArchStringError(text, token, f"missing field {name!r}")
        return default
    try:
        return kind(fields[name])
    except ValueError:
        raise ArchStringError(text, token, f"field {name!r} must be {kind.__name__}, got {fields[name]!r}")


def _check_layer(text: str, token: str, layer: Layer) -> None:
    if layer.kernel not in KERNELS:
        raise ArchStringError(text, token, f"kernel should be one of {KERNELS} instead of {layer.kernel}")
    if layer.stride not in STRIDES:
        raise ArchStringError(text, token, f"stride should be 1 or 2 instead of {layer.stride}")
    if layer.op != "maxpool" and layer.out < 1:
        raise ArchStringError(text, token, f"channels must be positive, got {layer.out}")
    if layer.expansion <= 0:
        raise ArchStringError(text, token, f"expansion must be positive, got {_fmt(layer.expansion)}")
    if not 0 <= layer.se < 1:
        raise ArchStringError(text, token, f"se ratio must be in [0, 1), got {_fmt(layer.se)}")


def parse_arch(text: str) -> Arch:
    """Parse an architecture string (canonical or not) into an ``Arch``; errors name the token."""
    text = text.strip()
    tokens = text.split("-") if text else []
    if not tokens or not tokens[0].startswith("i"):
        raise ArchStringError(text, tokens[0] if tokens else "", "must start with the input resolution, e.g. 'i224'")
    first = _parse_fields(text, tokens[0], tokens[0].split("_"))
    if set(first) - {"i", "bn"}:
        raise ArchStringError(text, tokens[0], "the first token takes only i<resolution> and bn<eps>")
    resolution = _number(text, tokens[0], first, "i", int)
    bn_eps = _number(text, tokens[0], first, "bn", float, DEFAULT_BN_EPS)
    layers: list[Layer] = []
    pool = None
    hidden, hidden_act = 0, "hardswish"
    for token in tokens[1:]:
        name, *parts = token.split("_")
        if pool is not None:
            if name != "fc" or hidden:
                raise ArchStringError(text, token, "only 'fc_c<width>_<act>' may follow the pooling token")
            fields = _parse_fields(text, token, parts)
            hidden = _number(text, token, fields, "c", int)
            hidden_act = fields.get("act", "hardswish")
            continue
        if name in POOLS:
            if parts:
                raise ArchStringError(text, token, "the pooling token takes no fields")
            pool = name
            continue
        if name not in OPS:
            raise ArchStringError(
                text, token, f"unknown block type {name!r}; allowed: {', '.join(OPS)}, then {' or '.join(POOLS)}"
            )
        fields = _parse_fields(text, token, parts)
        repeats = _number(text, token, fields, "n", int, 1)
        if repeats < 1:
            raise ArchStringError(text, token, f"repeats must be at least 1, got {repeats}")
        layer = Layer(
            op=name,
            kernel=_number(text, token, fields, "k", int, 3),
            stride=_number(text, token, fields, "s", int, 1),
            out=0 if name == "maxpool" else _number(text, token, fields, "c", int),
            expansion=_number(text, token, fields, "e", float, 1.0 if name not in ("ir", "bot") else None),
            se=_number(text, token, fields, "se", float, 0.0),
            act=fields.get("act", "relu"),
            skip=fields.get("skip", "1") == "1",
        )
        _check_layer(text, token, layer)
        layers.append(layer)
        layers.extend([layer.replace(stride=1)] * (repeats - 1))
    if pool is None:
        raise ArchStringError(text, tokens[-1], f"missing the pooling token ({' or '.join(POOLS)}) after the layers")
    if not layers:
        raise ArchStringError(text, tokens[0], "an architecture needs at least one layer")
    if resolution < 1:
        raise ArchStringError(text, tokens[0], f"resolution must be positive, got {resolution}")
    return Arch(resolution, tuple(layers), pool, hidden, hidden_act, bn_eps)
