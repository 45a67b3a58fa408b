"""Analytic FLOPs and parameters from the architecture alone, in fvcore's convention.

fvcore counts one multiply-add as one flop for convolutions and linear layers (bias ignored), two
flops per element for an eval-mode affine BatchNorm, one per input element for
``adaptive_avg_pool2d``, and nothing for activations, additions, ``mean`` or max pooling. Tests hold
these totals equal to ``FlopCountAnalysis`` on the built model (in eval mode) and to its parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from nas.arch import Arch, Layer
from nas.blocks import BlockSpec, HeadSpec, resolve_layer


@dataclass(frozen=True)
class Cost:
    flops: int
    params: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.params + other.params)


ZERO = Cost(0, 0)


def _conv_bn(cin: int, cout: int, kernel: int, out_size: int, groups: int = 1) -> Cost:
    weights = cout * (cin // groups) * kernel * kernel
    return Cost(weights * out_size * out_size + 2 * cout * out_size * out_size, weights + 2 * cout)


def _squeeze_excite(channels: int, squeeze: int, size: int) -> Cost:
    # global average pool, then two 1x1 convs with bias on a 1x1 map
    return Cost(channels * size * size + 2 * channels * squeeze, 2 * channels * squeeze + squeeze + channels)


@lru_cache(maxsize=65536)
def block_cost(spec: BlockSpec) -> Cost:
    h, h2 = spec.resolution, spec.out_resolution
    se = _squeeze_excite(spec.mid_ch, spec.se_ch, h2) if spec.se_ch else ZERO
    if spec.op == "maxpool":
        return ZERO
    if spec.op == "conv":
        return _conv_bn(spec.in_ch, spec.out_ch, spec.kernel, h2) + se
    if spec.op == "ds":
        depthwise = _conv_bn(spec.in_ch, spec.in_ch, spec.kernel, h2, groups=spec.in_ch)
        return depthwise + se + _conv_bn(spec.in_ch, spec.out_ch, 1, h2)
    if spec.op == "ir":
        expand = _conv_bn(spec.in_ch, spec.mid_ch, 1, h) if spec.mid_ch != spec.in_ch else ZERO
        depthwise = _conv_bn(spec.mid_ch, spec.mid_ch, spec.kernel, h2, groups=spec.mid_ch)
        return expand + depthwise + se + _conv_bn(spec.mid_ch, spec.out_ch, 1, h2)
    if spec.op == "bot":
        cost = _conv_bn(spec.in_ch, spec.mid_ch, 1, h) + _conv_bn(spec.mid_ch, spec.mid_ch, spec.kernel, h2)
        cost = cost + se + _conv_bn(spec.mid_ch, spec.out_ch, 1, h2)
        return cost + (_conv_bn(spec.in_ch, spec.out_ch, 1, h2) if spec.projection else ZERO)
    raise ValueError(f"unknown block op {spec.op!r}")


@lru_cache(maxsize=4096)
def head_cost(head: HeadSpec) -> Cost:
    pool = head.in_ch * head.resolution * head.resolution if head.pool == "avg" else 0
    features = head.hidden or head.in_ch
    hidden = Cost(head.in_ch * head.hidden, head.in_ch * head.hidden + head.hidden) if head.hidden else ZERO
    return Cost(pool, 0) + hidden + Cost(features * head.num_classes, features * head.num_classes + head.num_classes)


@lru_cache(maxsize=262144)
def _layer_cost(layer: Layer, in_ch: int, size: int) -> tuple[int, int, int, int]:
    """(flops, params, out channels, out size) of one layer in context; memoised for search loops."""
    spec = resolve_layer(layer, in_ch, size)
    cost = block_cost(spec)
    return cost.flops, cost.params, spec.out_ch, spec.out_resolution


def arch_cost(arch: Arch, num_classes: int = 1000) -> Cost:
    """FLOPs (fvcore convention) and parameter count of ``arch`` with a ``num_classes`` classifier.

    Walks the layers like ``resolve`` does, with each layer's cost memoised by its context.
    """
    flops = params = 0
    channels, size = 3, arch.resolution
    for layer in arch.layers:
        f, p, channels, size = _layer_cost(layer, channels, size)
        flops += f
        params += p
    head = head_cost(HeadSpec(arch.pool, channels, arch.hidden, arch.hidden_act, num_classes, size))
    return Cost(flops + head.flops, params + head.params)


def clear_cost_caches() -> None:
    """Forget memoised costs (benchmarks time the cold path with this)."""
    for cached in (_layer_cost, block_cost, head_cost):
        cached.cache_clear()
