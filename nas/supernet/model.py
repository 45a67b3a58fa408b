"""The supernet of a search space: every subnet of the space is a path through its elastic blocks.

Layout, by position: the stem layers; for each stage, one slot per layer up to the stage's largest
depth, each slot holding one elastic block per op type the stage may choose (single-path one-shot: a
conv, a depthwise-separable and an MBConv at the same slot keep their own weights); the head conv; the
classifier. A stage of depth N uses its first N slots (elastic depth); widths, expansions and kernel
sizes take the leading channels and the kernel centre of each slot's largest weights.

A subnet is one of the space's own ``Arch``es. ``Supernet.plan(arch)`` finds which slot each of its
layers runs on (``SubnetPlan``); the forward pass and extraction follow the plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nas.arch import DEFAULT_BN_EPS, Arch, Layer, make_divisible
from nas.blocks import BlockSpec, HeadSpec, resolve
from nas.errors import NasError
from nas.space import SearchSpace
from nas.supernet.elastic import ELASTIC_BLOCKS, TRAIN_PASS, Bounds, ElasticConvBlock, ElasticMaxPool, Pass


def check_supported(space: SearchSpace) -> None:
    """Raise a one-line NasError naming the first decision whose options cannot share weights."""
    for i, stage in enumerate(space.stages):
        kernels = stage.choices["kernel"]
        if len(kernels) > 1 and any(k % 2 == 0 for k in kernels):
            raise NasError(f"{space.source}: stages[{i}].kernel: even kernel sizes {list(kernels)} cannot share "
                           "one centred kernel; use odd sizes")
    for i, item in enumerate(space.stem):
        if item["op"] == "maxpool" and i == 0:
            raise NasError(f"{space.source}: stem[0].op: a supernet needs a conv first, not maxpool")


@dataclass(frozen=True)
class SubnetPlan:
    """Which slot each layer of ``arch`` runs on, with its resolved block."""

    arch: Arch
    steps: tuple[tuple[str, BlockSpec], ...]  # (slot name, block) in network order
    head: HeadSpec

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Step indices where a stage (or the stem) ends and the next begins."""
        stages = [slot.split("_")[0] for slot, _ in self.steps]
        return tuple(i for i in range(1, len(stages)) if stages[i] != stages[i - 1])


def _stage_slot(i: int, j: int) -> str:
    return f"s{i}_l{j}"


class Supernet(nn.Module):
    """All subnets of ``space`` for ``num_classes`` classes; see the module notes."""

    def __init__(self, space: SearchSpace, num_classes: int):
        super().__init__()
        check_supported(space)
        self.space, self.num_classes = space, num_classes
        self.slots = nn.ModuleDict()  # slot name -> ModuleDict(op -> elastic block)
        self._stage_outs: list[set[int]] = []
        self._stem_outs: list[set[int]] = []
        wms = space.width_mult
        channels: set[int] = {3}
        for i, item in enumerate(space.stem):
            if item["op"] == "maxpool":
                self.slots[f"stem{i}"] = nn.ModuleDict({"maxpool": ElasticMaxPool()})
                self._stem_outs.append(set(channels))
                continue
            outs = {make_divisible(item["channels"] * wm) for wm in wms}
            bounds = Bounds(max(channels), max(outs), max(outs), 0, (item["kernel"],), item["stride"])
            self.slots[f"stem{i}"] = nn.ModuleDict({"conv": ElasticConvBlock(bounds)})
            self._stem_outs.append(outs)
            channels = outs
        for i, stage in enumerate(space.stages):
            c = stage.choices
            outs = {make_divisible(stage.channels * w * wm) for w in c["width"] for wm in wms}
            self._stage_outs.append(outs)
            for j in range(max(c["layers"])):
                ins = channels if j == 0 else outs
                stride = stage.stride if j == 0 else 1
                blocks = nn.ModuleDict()
                for op in self._ops(stage):
                    blocks[op] = ELASTIC_BLOCKS[op](self._bounds(op, stage, ins, outs, stride))
                self.slots[_stage_slot(i, j)] = blocks
            channels = outs
        if space.head.get("channels"):
            outs = {make_divisible(space.head["channels"] * max(1.0, wm)) for wm in wms}
            bounds = Bounds(max(channels), max(outs), max(outs), 0, (1,), 1)
            self.slots["head"] = nn.ModuleDict({"conv": ElasticConvBlock(bounds)})
            channels = outs
        self.classifier = nn.Linear(max(channels), num_classes)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)
        self._plans: dict[str, SubnetPlan] = {}

    @staticmethod
    def _ops(stage) -> tuple[str, ...]:
        ops = list(stage.choices["op"])
        if "ir" in ops and 1.0 in stage.choices["expansion"] and "ds" not in ops:
            ops.append("ds")  # an MBConv of expansion 1 is a depthwise-separable layer (nas.arch.Layer)
        return tuple(ops)

    @staticmethod
    def _bounds(op: str, stage, ins: set[int], outs: set[int], stride: int) -> Bounds:
        c = stage.choices
        if op == "ir":
            mids = {make_divisible(cin * e) for cin in ins for e in c["expansion"]}
        elif op == "bot":
            mids = {make_divisible(cout * e) for cout in outs for e in c["expansion"]}
        elif op == "ds":
            mids = ins
        else:
            mids = outs
        se = max((make_divisible(m * r) for m in mids for r in c["se"] if r), default=0)
        projection = op == "bot" and (stride != 1 or any(a != b for a in ins for b in outs))
        return Bounds(max(ins), max(outs), max(mids), se, tuple(c["kernel"]), stride, projection)

    # --- subnets ----------------------------------------------------------------------------------
    def plan(self, arch: Arch) -> SubnetPlan:
        """The slots of ``arch``'s layers; NasError when ``arch`` is not a subnet of the space."""
        key = arch.to_string()
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(arch)
            if len(self._plans) < 100_000:
                self._plans[key] = plan
        return plan

    def _plan(self, arch: Arch) -> SubnetPlan:
        space = self.space
        if arch.bn_eps != DEFAULT_BN_EPS or arch.hidden or arch.pool != space.head["pool"]:
            raise self._not_a_subnet(arch, "its BatchNorm eps, hidden layer or pooling differ from the space's")
        specs, head = resolve(arch, self.num_classes)
        layers = arch.layers
        n_stem = len(space.stem)
        n_head = 1 if space.head.get("channels") else 0
        if len(layers) < n_stem + n_head:
            raise self._not_a_subnet(arch, "too few layers")
        steps = []
        for i, item in enumerate(space.stem):
            layer = layers[i]
            ok = (layer.op == item["op"] and layer.kernel == item["kernel"] and layer.stride == item["stride"]
                  and (layer.op == "maxpool" or layer.out in self._stem_outs[i] and layer.act == item["act"]))
            if not ok:
                raise self._not_a_subnet(arch, f"layer {i} does not match stem[{i}] of the space")
            steps.append((f"stem{i}", specs[i]))
        body = layers[n_stem:len(layers) - n_head]
        stage_depths = self._split(body, 0, arch)
        if stage_depths is None:
            raise self._not_a_subnet(arch, "its layers do not split into the space's stages (ops, kernels, "
                                           "channels, depths or strides outside the choices)")
        pos = n_stem
        for i, depth in enumerate(stage_depths):
            for j in range(depth):
                steps.append((_stage_slot(i, j), specs[pos]))
                pos += 1
        if n_head:
            layer = layers[-1]
            outs = {make_divisible(space.head["channels"] * max(1.0, wm)) for wm in space.width_mult}
            if not (layer.op == "conv" and layer.kernel == 1 and layer.stride == 1 and layer.out in outs
                    and not layer.se and layer.act == space.head["act"]):
                raise self._not_a_subnet(arch, "the last layer is not the space's head conv")
            steps.append(("head", specs[-1]))
        return SubnetPlan(arch, tuple(steps), head)

    def _split(self, body: tuple[Layer, ...], i: int, arch: Arch) -> tuple[int, ...] | None:
        """Depths per stage from stage ``i`` on (the first that fits, shallowest first), or None."""
        if i == len(self.space.stages):
            return () if not body else None
        stage = self.space.stages[i]
        for depth in sorted(stage.choices["layers"]):
            if depth <= len(body) and self._fits(body[:depth], i):
                rest = self._split(body[depth:], i + 1, arch)
                if rest is not None:
                    return (depth, *rest)
        return None

    def _fits(self, layers: tuple[Layer, ...], i: int) -> bool:
        stage = self.space.stages[i]
        c = stage.choices
        ops = self._ops(stage)
        first = layers[0]
        if first.out not in self._stage_outs[i]:
            return False
        for j, layer in enumerate(layers):
            stride = stage.stride if j == 0 else 1
            if layer.op not in ops or layer.stride != stride or layer.out != first.out:
                return False
            if layer.kernel not in c["kernel"] or layer.se not in c["se"] or layer.act not in c["act"]:
                return False
            if layer.op in ("ir", "bot") and layer.expansion not in c["expansion"]:
                return False
            if not layer.skip and False not in c["skip"]:
                return False
            # a stage's first layer may have lost an impossible residual's "noskip" (nas.arch.canonical_layers)
            same = layer.replace(skip=True) == first.replace(stride=1, skip=True)
            if self.space.choice_per == "block" and j and not same:
                return False
        return True

    def _not_a_subnet(self, arch: Arch, why: str) -> NasError:
        return NasError(f"architecture {arch.to_string()!r} is not a subnet of {self.space.source}: {why}")

    # --- running ------------------------------------------------------------------------------------
    def blocks(self, plan: SubnetPlan) -> Iterator[tuple[nn.Module, BlockSpec]]:
        for slot, spec in plan.steps:
            yield self.slots[slot][spec.op], spec

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-sort every block's expanded channels by importance (between training phases)."""
        for blocks in self.slots.values():
            for block in blocks.values():
                block.sort_channels(optimizer)

    def features(self, x: torch.Tensor, plan: SubnetPlan, ctx: Pass, start: int = 0,
                 stop: int | None = None) -> torch.Tensor:
        """Run steps ``start`` to ``stop`` of the plan (all by default) on ``x``."""
        for slot, spec in plan.steps[start:stop]:
            x = self.slots[slot][spec.op](x, spec, ctx)
        return x

    def classify(self, x: torch.Tensor, plan: SubnetPlan) -> torch.Tensor:
        """Global pooling and the classifier on the last feature map."""
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) if plan.head.pool == "avg" else x.mean([2, 3])
        return F.linear(x, self.classifier.weight[:, : x.shape[1]], self.classifier.bias)

    def forward(self, x: torch.Tensor, plan: SubnetPlan, ctx: Pass = TRAIN_PASS) -> torch.Tensor:
        return self.classify(self.features(x, plan, ctx), plan)


def space_fingerprint(space: SearchSpace) -> str:
    """Hash of the space's content (not its path): a supernet fits any file with the same choices."""
    fields = (space.width_mult, space.choice_per, space.stem, sorted(space.head.items()),
              [(s.channels, s.stride, sorted(s.choices.items())) for s in space.stages])
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]
