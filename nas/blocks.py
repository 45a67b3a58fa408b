"""Resolved blocks: the single description that the cost model, the latency table and the builder share.

``resolve(arch)`` carries channels and spatial size from one layer to the next, so every ``BlockSpec``
knows everything that changes its cost or latency: op, in/out/mid channels, kernel, stride,
squeeze-excite width, activation, residual and input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

from nas.arch import ACTIVATION_CODES, Arch, Layer, make_divisible


def conv_out_size(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded conv or pool (padding k//2, odd k): ceil(size / stride)."""
    return (size - 1) // stride + 1


@dataclass(frozen=True)
class BlockSpec:
    op: str  # conv | ds | ir | bot | maxpool
    in_ch: int
    out_ch: int
    mid_ch: int  # ir: expanded width; bot: bottleneck width; otherwise == the channels the kernel sees
    kernel: int
    stride: int
    se_ch: int  # squeeze width of the squeeze-excite module, 0 = none
    act: str
    residual: bool  # identity residual (ir/ds/conv) or shortcut (bot, always)
    resolution: int  # input height = width

    @property
    def out_resolution(self) -> int:
        return conv_out_size(self.resolution, self.stride)

    @property
    def projection(self) -> bool:
        """A bottleneck whose shortcut needs a strided 1x1 conv (torchvision's ``downsample``)."""
        return self.op == "bot" and (self.stride != 1 or self.in_ch != self.out_ch)

    @property
    def key(self) -> str:
        """Readable latency-table key: every field that can change the block's latency."""
        if self.op == "maxpool":
            return f"maxpool_i{self.in_ch}_k{self.kernel}_s{self.stride}_h{self.resolution}"
        return (
            f"{self.op}_i{self.in_ch}_o{self.out_ch}_m{self.mid_ch}_k{self.kernel}_s{self.stride}"
            f"_se{self.se_ch}_{ACTIVATION_CODES[self.act]}_{'res' if self.residual else 'nores'}_h{self.resolution}"
        )


@dataclass(frozen=True)
class HeadSpec:
    """Global pooling, optional hidden linear layer and classifier: the part after the last conv."""

    pool: str
    in_ch: int
    hidden: int
    hidden_act: str
    num_classes: int
    resolution: int  # spatial size of the feature map being pooled

    @property
    def key(self) -> str:
        hidden = f"_fc{self.hidden}{ACTIVATION_CODES[self.hidden_act]}" if self.hidden else ""
        return f"head_{self.pool}_i{self.in_ch}{hidden}_cls{self.num_classes}_h{self.resolution}"


def resolve_layer(layer: Layer, in_ch: int, size: int) -> BlockSpec:
    """The resolved block of one layer, given the channels and spatial size flowing into it."""
    out = layer.out or in_ch
    if layer.op == "ir":
        mid = make_divisible(in_ch * layer.expansion)
    elif layer.op == "bot":
        mid = make_divisible(out * layer.expansion)
    elif layer.op == "ds":
        mid = in_ch
    else:
        mid = out
    se = make_divisible(mid * layer.se) if layer.se else 0
    if layer.op == "bot":
        residual = True
    else:
        residual = layer.op != "maxpool" and layer.skip and layer.stride == 1 and in_ch == out
    return BlockSpec(layer.op, in_ch, out, mid, layer.kernel, layer.stride, se, layer.act, residual, size)


def resolve(arch: Arch, num_classes: int = 1000) -> tuple[tuple[BlockSpec, ...], HeadSpec]:
    """Turn an architecture into resolved blocks and its head, carrying channels and sizes along."""
    specs = []
    channels, size = 3, arch.resolution
    for layer in arch.layers:
        spec = resolve_layer(layer, channels, size)
        specs.append(spec)
        channels, size = spec.out_ch, spec.out_resolution
    head = HeadSpec(arch.pool, channels, arch.hidden, arch.hidden_act, num_classes, size)
    return tuple(specs), head
