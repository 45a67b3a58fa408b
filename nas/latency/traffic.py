"""Weight bytes one inference reads, per block: what a network streams from memory when its weights
do not stay in cache between inferences.

A table entry is timed with the block alone, its weights hot in cache run after run. In a whole
network every block's weights are evicted by the others' when they add up to more than the cache
holds, and the wide low-resolution blocks, which do little arithmetic per weight, then wait for
memory. ``nas.latency.table`` turns these byte counts into that extra time.

Only the taps that can overlap the input are counted: ONNX Runtime's convolution skips the others,
so a 5x5 convolution on a 1x1 map reads one weight in 25 (measured: 5 MB of weights in 5 us).
Depthwise weights and batch-norm parameters (folded into the convolutions) are too small to matter.
"""

from __future__ import annotations

from functools import lru_cache

from nas.blocks import BlockSpec, HeadSpec

FLOAT_BYTES = 4


@lru_cache(maxsize=1024)
def taps_used(size: int, kernel: int, stride: int) -> int:
    """Kernel positions along one axis that touch the input for some output (padding kernel // 2)."""
    pad = kernel // 2
    outputs = (size + 2 * pad - kernel) // stride + 1
    return sum(1 for tap in range(kernel) if any(0 <= o * stride + tap - pad < size for o in range(outputs)))


@lru_cache(maxsize=65536)
def weight_bytes(spec: BlockSpec) -> int:
    """Float32 bytes of weights the block reads per inference (convolutions and squeeze-excite)."""
    if spec.op == "maxpool":
        return 0
    squeeze = 2 * spec.mid_ch * spec.se_ch
    full = taps_used(spec.resolution, spec.kernel, spec.stride) ** 2  # of a dense k x k convolution
    if spec.op == "conv":
        weights = spec.in_ch * spec.out_ch * full
    elif spec.op == "ds":
        weights = spec.in_ch * spec.out_ch
    elif spec.op == "ir":
        weights = (spec.in_ch * spec.mid_ch if spec.mid_ch != spec.in_ch else 0) + spec.mid_ch * spec.out_ch
    elif spec.op == "bot":
        weights = spec.in_ch * spec.mid_ch + spec.mid_ch * spec.mid_ch * full + spec.mid_ch * spec.out_ch
        weights += spec.in_ch * spec.out_ch if spec.projection else 0
    else:
        raise ValueError(f"unknown block op {spec.op!r}")
    return (weights + squeeze) * FLOAT_BYTES


@lru_cache(maxsize=65536)
def plain_activation_bytes(spec: BlockSpec) -> int:
    """Float32 bytes of input plus output activation of a block without squeeze-excite (0 with it).

    Timed alone, a block converts its input to ONNX Runtime's blocked NCHWc layout and its output
    back (``ReorderInput`` / ``ReorderOutput``, ~2 us each here), and returns a fresh output array;
    inside a network consecutive blocks without SE stay blocked, so their entries overstate the
    network by a cost that grows with these bytes. An SE block reorders around its pooling either way.
    """
    if spec.se_ch:
        return 0
    return (spec.in_ch * spec.resolution ** 2 + spec.out_ch * spec.out_resolution ** 2) * FLOAT_BYTES


@lru_cache(maxsize=4096)
def head_weight_bytes(head: HeadSpec) -> int:
    """Float32 bytes of the classifier's (and optional hidden layer's) weights."""
    features = head.hidden or head.in_ch
    return (head.in_ch * head.hidden + features * head.num_classes) * FLOAT_BYTES
