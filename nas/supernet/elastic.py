"""Elastic operations: one module holds the largest weights of a layer and runs any smaller setting.

Every module is told its active setting by the caller (a ``BlockSpec`` and a ``Pass``), never by state
set beforehand, so two subnets can run through the same supernet in any order or interleaved.

- Width and expansion: the leading channels of the largest weight (``weight[:out, :in]``); training
  keeps the most useful channels in front (``sort_channels`` re-sorts them by importance).
- Kernel: the centre of the largest kernel, passed through a learned linear transformation per
  kernel size (Once-for-All's kernel transformation matrices, initialised to the identity), so that a
  small kernel need not be exactly the centre the large kernel uses.
- BatchNorm: the leading entries of the largest statistics. A ``Pass`` with ``calibrate=n`` normalises
  the whole batch with the statistics of its first ``n`` images (the calibration images), which in one
  forward pass equals "recalibrate BatchNorm on those images, then evaluate the rest" (see evaluate.py).

``state(spec, stats)`` returns a subnet block's weights under the names of the builder's own block
(nas.builder), which is how extraction loads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nas.blocks import BlockSpec

# relu and relu6 in place: they follow a BatchNorm, whose backward does not need its output, and their
# own backward needs only their result (hardswish's needs its input)
_ACTIVATIONS = {"relu": F.relu_, "relu6": lambda x: F.hardtanh_(x, 0.0, 6.0), "hardswish": F.hardswish}


@dataclass
class Pass:
    """How one forward pass runs: ``calibrate`` > 0 normalises with the statistics of the first
    ``calibrate`` images of the batch; ``stats`` (when a dict) collects them per BatchNorm module."""

    calibrate: int = 0
    stats: dict | None = field(default=None)


TRAIN_PASS = Pass()


def act(name: str | None, x: torch.Tensor) -> torch.Tensor:
    return _ACTIVATIONS[name](x) if name else x


class ElasticBatchNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor, ctx: Pass) -> torch.Tensor:
        c = x.shape[1]
        weight, bias = self.weight[:c], self.bias[:c]
        if ctx.calibrate:
            head = x[: ctx.calibrate]
            # torch's recalibration keeps the unbiased variance as the running estimate
            var, mean = torch.var_mean(head, dim=(0, 2, 3), correction=1)
            if ctx.stats is not None:
                ctx.stats[self] = (mean, var)
            # the very op an extracted network runs in eval mode: outputs match it bit for bit
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        if self.training:
            self.num_batches_tracked += 1
        # leading slices of 1-D buffers are views: training updates the shared statistics in place
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], weight, bias, self.training,
                            self.momentum, self.eps)

    def state(self, c: int, stats: dict | None) -> dict[str, torch.Tensor]:
        mean, var = stats[self] if stats and self in stats else (self.running_mean[:c], self.running_var[:c])
        return {"weight": self.weight[:c], "bias": self.bias[:c], "running_mean": mean, "running_var": var,
                "num_batches_tracked": self.num_batches_tracked}


class ElasticConv(nn.Module):
    """A conv whose output/input channels and (odd) kernel size are chosen per call.

    ``kernels`` are the sizes the space may ask for; a smaller one is the centre of the next larger
    one's effective kernel times a learned (k*k x k*k) matrix shared by all channels of the layer.
    """

    def __init__(self, cin: int, cout: int, kernels: tuple[int, ...], stride: int, depthwise: bool = False):
        super().__init__()
        self.stride, self.depthwise = stride, depthwise
        self.kernels = tuple(sorted(set(kernels), reverse=True))
        k = self.kernels[0]
        self.weight = nn.Parameter(torch.empty(cout, 1 if depthwise else cin, k, k))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.transforms = nn.ParameterDict({str(s): nn.Parameter(torch.eye(s * s)) for s in self.kernels[1:]})

    def kernel(self, cout: int, cin: int, k: int) -> torch.Tensor:
        w = self.weight[:cout] if self.depthwise else self.weight[:cout, :cin]
        for size in self.kernels[1:]:
            if size < k:
                break
            start = (w.shape[-1] - size) // 2
            w = w[..., start:start + size, start:start + size]
            w = (w.reshape(-1, size * size) @ self.transforms[str(size)]).reshape(w.shape[0], w.shape[1], size, size)
        return w

    def forward(self, x: torch.Tensor, cout: int, k: int) -> torch.Tensor:
        cin, height, width = x.shape[1:]
        groups = cin if self.depthwise else 1
        weight = self.kernel(cout, cin, k)
        # Taps more than (size - 1) away from the centre only ever read the zero padding: drop them. Same
        # output, and a 5x5 kernel on the 1x1 maps of a 32-px network's last stages trains ~40x faster.
        rows, cols = min(k // 2, height - 1), min(k // 2, width - 1)
        if (rows, cols) != (k // 2, k // 2):
            weight = weight[..., k // 2 - rows:k // 2 + rows + 1, k // 2 - cols:k // 2 + cols + 1]
        return F.conv2d(x, weight, None, self.stride, (rows, cols), 1, groups)


class ElasticConvBN(nn.Module):
    """conv -> BatchNorm -> optional activation; ``state`` under ConvBNAct's names ('0.weight', '1.*')."""

    def __init__(self, cin: int, cout: int, kernels: tuple[int, ...], stride: int, depthwise: bool = False):
        super().__init__()
        self.conv = ElasticConv(cin, cout, kernels, stride, depthwise)
        self.bn = ElasticBatchNorm(cout)

    def forward(self, x: torch.Tensor, cout: int, k: int, activation: str | None, ctx: Pass) -> torch.Tensor:
        return act(activation, self.bn(self.conv(x, cout, k), ctx))

    def state(self, prefix: str, cout: int, cin: int, k: int, stats: dict | None) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.0.weight": self.conv.kernel(cout, cin, k)}
        out.update({f"{prefix}.1.{name}": t for name, t in self.bn.state(cout, stats).items()})
        return out


class ElasticSqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor, squeeze: int) -> torch.Tensor:
        c = x.shape[1]
        scale = x.mean((2, 3), keepdim=True)
        scale = F.relu(F.conv2d(scale, self.fc1.weight[:squeeze, :c], self.fc1.bias[:squeeze]))
        return x * F.hardsigmoid(F.conv2d(scale, self.fc2.weight[:c, :squeeze], self.fc2.bias[:c]))

    def state(self, prefix: str, c: int, squeeze: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.fc1.weight": self.fc1.weight[:squeeze, :c], f"{prefix}.fc1.bias": self.fc1.bias[:squeeze],
                f"{prefix}.fc2.weight": self.fc2.weight[:c, :squeeze], f"{prefix}.fc2.bias": self.fc2.bias[:c]}


@dataclass(frozen=True)
class Bounds:
    """The largest setting one layer position may take (over every choice of the space)."""

    in_ch: int
    out_ch: int
    mid_ch: int
    se_ch: int
    kernels: tuple[int, ...]
    stride: int
    projection: bool = False  # a bottleneck position that may need a projection shortcut


def _reorder(optimizer: torch.optim.Optimizer | None, importance: torch.Tensor,
             targets: list[tuple[torch.Tensor, int]]) -> None:
    """Put the channels of one channel space in order of decreasing ``importance``: each target tensor
    (a parameter or buffer) along its dim, and the optimizer's state of each parameter alike."""
    order = torch.argsort(importance, descending=True, stable=True)
    with torch.no_grad():
        for tensor, dim in targets:
            tensor.copy_(tensor.index_select(dim, order))
            state = optimizer.state.get(tensor, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    value.copy_(value.index_select(dim, order))


def _channel_targets(conv_bn: "ElasticConvBN", dim: int = 0) -> list[tuple[torch.Tensor, int]]:
    """The output channels of a conv-BN pair (``dim`` 0) or the input channels of its conv (``dim`` 1)."""
    if dim == 1:
        return [(conv_bn.conv.weight, 1)]
    bn = conv_bn.bn
    return [(conv_bn.conv.weight, 0), (bn.weight, 0), (bn.bias, 0), (bn.running_mean, 0), (bn.running_var, 0)]


def _importance(conv_bn: "ElasticConvBN") -> torch.Tensor:
    """L1 norm of the weights that read each input channel of a conv (Once-for-All's criterion)."""
    return conv_bn.conv.weight.detach().abs().sum(dim=(0, 2, 3))


class ElasticBlock(nn.Module):
    """Shared pieces: the optional squeeze-excite and the residual."""

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-sort the block's inner channels by importance (no-op where it has none)."""

    def _se_targets(self) -> list[tuple[torch.Tensor, int]]:
        if self.se is None:
            return []
        return [(self.se.fc1.weight, 1), (self.se.fc2.weight, 0), (self.se.fc2.bias, 0)]

    def _se(self, bounds: Bounds, channels: int) -> None:
        self.se = ElasticSqueezeExcite(channels, bounds.se_ch) if bounds.se_ch else None

    def _apply_se(self, x: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
        return self.se(x, spec.se_ch) if spec.se_ch else x

    def _se_state(self, spec: BlockSpec) -> dict[str, torch.Tensor]:
        return self.se.state("se", spec.mid_ch, spec.se_ch) if spec.se_ch else {}


class ElasticConvBlock(ElasticBlock):
    """Regular kxk conv (nas.builder.ConvBlock)."""

    def __init__(self, bounds: Bounds):
        super().__init__()
        self.conv = ElasticConvBN(bounds.in_ch, bounds.out_ch, bounds.kernels, bounds.stride)
        self._se(bounds, bounds.out_ch)

    def forward(self, x: torch.Tensor, spec: BlockSpec, ctx: Pass) -> torch.Tensor:
        y = self._apply_se(self.conv(x, spec.out_ch, spec.kernel, spec.act, ctx), spec)
        return x + y if spec.residual else y

    def state(self, spec: BlockSpec, stats: dict | None) -> dict[str, torch.Tensor]:
        return self.conv.state("conv", spec.out_ch, spec.in_ch, spec.kernel, stats) | self._se_state(spec)


class ElasticDepthwiseSeparable(ElasticBlock):
    """Depthwise kxk, optional SE, linear 1x1 projection (nas.builder.DepthwiseSeparable)."""

    def __init__(self, bounds: Bounds):
        super().__init__()
        self.depthwise = ElasticConvBN(bounds.in_ch, bounds.in_ch, bounds.kernels, bounds.stride, depthwise=True)
        self._se(bounds, bounds.in_ch)
        self.project = ElasticConvBN(bounds.in_ch, bounds.out_ch, (1,), 1)

    def forward(self, x: torch.Tensor, spec: BlockSpec, ctx: Pass) -> torch.Tensor:
        y = self._apply_se(self.depthwise(x, spec.in_ch, spec.kernel, spec.act, ctx), spec)
        y = self.project(y, spec.out_ch, 1, None, ctx)
        return x + y if spec.residual else y

    def state(self, spec: BlockSpec, stats: dict | None) -> dict[str, torch.Tensor]:
        return (self.depthwise.state("depthwise", spec.in_ch, spec.in_ch, spec.kernel, stats) | self._se_state(spec)
                | self.project.state("project", spec.out_ch, spec.in_ch, 1, stats))


class ElasticInvertedResidual(ElasticBlock):
    """MBConv: 1x1 expansion, depthwise kxk, optional SE, linear 1x1 projection (nas.builder.InvertedResidual)."""

    def __init__(self, bounds: Bounds):
        super().__init__()
        self.expand = ElasticConvBN(bounds.in_ch, bounds.mid_ch, (1,), 1)
        self.depthwise = ElasticConvBN(bounds.mid_ch, bounds.mid_ch, bounds.kernels, bounds.stride, depthwise=True)
        self._se(bounds, bounds.mid_ch)
        self.project = ElasticConvBN(bounds.mid_ch, bounds.out_ch, (1,), 1)

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        _reorder(optimizer, _importance(self.project), _channel_targets(self.expand) + _channel_targets(self.depthwise)
                 + self._se_targets() + _channel_targets(self.project, 1))

    def forward(self, x: torch.Tensor, spec: BlockSpec, ctx: Pass) -> torch.Tensor:
        y = self.expand(x, spec.mid_ch, 1, spec.act, ctx) if spec.mid_ch != spec.in_ch else x
        y = self._apply_se(self.depthwise(y, spec.mid_ch, spec.kernel, spec.act, ctx), spec)
        y = self.project(y, spec.out_ch, 1, None, ctx)
        return x + y if spec.residual else y

    def state(self, spec: BlockSpec, stats: dict | None) -> dict[str, torch.Tensor]:
        out = self.expand.state("expand", spec.mid_ch, spec.in_ch, 1, stats) if spec.mid_ch != spec.in_ch else {}
        return (out | self.depthwise.state("depthwise", spec.mid_ch, spec.mid_ch, spec.kernel, stats)
                | self._se_state(spec) | self.project.state("project", spec.out_ch, spec.mid_ch, 1, stats))


class ElasticBottleneck(ElasticBlock):
    """ResNet bottleneck with an optional projection shortcut (nas.builder.Bottleneck)."""

    def __init__(self, bounds: Bounds):
        super().__init__()
        self.reduce = ElasticConvBN(bounds.in_ch, bounds.mid_ch, (1,), 1)
        self.spatial = ElasticConvBN(bounds.mid_ch, bounds.mid_ch, bounds.kernels, bounds.stride)
        self._se(bounds, bounds.mid_ch)
        self.expand = ElasticConvBN(bounds.mid_ch, bounds.out_ch, (1,), 1)
        self.shortcut = ElasticConvBN(bounds.in_ch, bounds.out_ch, (1,), bounds.stride) if bounds.projection else None

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        # two inner channel spaces: after the spatial conv (read by expand), after reduce (read by spatial)
        _reorder(optimizer, _importance(self.expand), _channel_targets(self.spatial) + self._se_targets()
                 + _channel_targets(self.expand, 1))
        _reorder(optimizer, _importance(self.spatial),
                 _channel_targets(self.reduce) + _channel_targets(self.spatial, 1))

    def forward(self, x: torch.Tensor, spec: BlockSpec, ctx: Pass) -> torch.Tensor:
        y = self.spatial(self.reduce(x, spec.mid_ch, 1, spec.act, ctx), spec.mid_ch, spec.kernel, spec.act, ctx)
        y = self.expand(self._apply_se(y, spec), spec.out_ch, 1, None, ctx)
        return act(spec.act, y + (self.shortcut(x, spec.out_ch, 1, None, ctx) if spec.projection else x))

    def state(self, spec: BlockSpec, stats: dict | None) -> dict[str, torch.Tensor]:
        out = (self.reduce.state("reduce", spec.mid_ch, spec.in_ch, 1, stats)
               | self.spatial.state("spatial", spec.mid_ch, spec.mid_ch, spec.kernel, stats) | self._se_state(spec)
               | self.expand.state("expand", spec.out_ch, spec.mid_ch, 1, stats))
        if spec.projection:
            out |= self.shortcut.state("shortcut", spec.out_ch, spec.in_ch, 1, stats)
        return out


class ElasticMaxPool(ElasticBlock):
    def forward(self, x: torch.Tensor, spec: BlockSpec, ctx: Pass) -> torch.Tensor:
        return F.max_pool2d(x, spec.kernel, spec.stride, spec.kernel // 2)

    def state(self, spec: BlockSpec, stats: dict | None) -> dict[str, torch.Tensor]:
        return {}


ELASTIC_BLOCKS: dict[str, type[nn.Module]] = {
    "conv": ElasticConvBlock,
    "ds": ElasticDepthwiseSeparable,
    "ir": ElasticInvertedResidual,
    "bot": ElasticBottleneck,
}
