"""Architecture -> torch.nn.Module.

Blocks share one constructor shape, ``Block(spec, bn_eps)``, and compute their own residual from the
``BlockSpec``; the builder carries channels and sizes between blocks (via ``resolve``). Parameters are
registered in torchvision's order, so a torchvision ``state_dict`` loads by position (see
``nas.references.load_torchvision_weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nas.arch import Arch
from nas.blocks import BlockSpec, HeadSpec, resolve

_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> optional activation, 'same' padding for odd kernels."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, eps: float, act: str | None, groups: int = 1):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if act:
            layers.append(activation(act))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, squeeze 1x1 conv + relu, excite 1x1 conv + hardsigmoid, rescale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


def _maybe_se(spec: BlockSpec) -> nn.Module:
    return SqueezeExcite(spec.mid_ch, spec.se_ch) if spec.se_ch else nn.Identity()


class ConvBlock(nn.Module):
    """Regular kxk conv-BN-act (stem, head and MnasNet's 'regular conv' op), optional SE and residual."""

    def __init__(self, spec: BlockSpec, eps: float):
        super().__init__()
        self.residual = spec.residual
        self.conv = ConvBNAct(spec.in_ch, spec.out_ch, spec.kernel, spec.stride, eps, spec.act)
        self.se = _maybe_se(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.conv(x))
        return x + y if self.residual else y


class DepthwiseSeparable(nn.Module):
    """Depthwise kxk conv-BN-act, optional SE, pointwise 1x1 conv-BN (linear)."""

    def __init__(self, spec: BlockSpec, eps: float):
        super().__init__()
        self.residual = spec.residual
        # depthwise
        self.depthwise = ConvBNAct(spec.in_ch, spec.in_ch, spec.kernel, spec.stride, eps, spec.act, groups=spec.in_ch)
        # squeeze-excite on the depthwise output
        self.se = _maybe_se(spec)
        # linear pointwise projection
        self.project = ConvBNAct(spec.in_ch, spec.out_ch, 1, 1, eps, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(x)))
        return x + y if self.residual else y


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion, depthwise kxk, optional SE, linear 1x1 projection, identity residual."""

    def __init__(self, spec: BlockSpec, eps: float):
        super().__init__()
        self.residual = spec.residual
        # expansion (absent when the block does not widen, as in MobileNetV3's first block)
        self.expand = ConvBNAct(spec.in_ch, spec.mid_ch, 1, 1, eps, spec.act) if spec.mid_ch != spec.in_ch else nn.Identity()
        # depthwise
        self.depthwise = ConvBNAct(spec.mid_ch, spec.mid_ch, spec.kernel, spec.stride, eps, spec.act, groups=spec.mid_ch)
        # squeeze-excite
        self.se = _maybe_se(spec)
        # linear projection
        self.project = ConvBNAct(spec.mid_ch, spec.out_ch, 1, 1, eps, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, kxk (strided), optional SE, 1x1 expand, shortcut, act after add."""

    def __init__(self, spec: BlockSpec, eps: float):
        super().__init__()
        self.reduce = ConvBNAct(spec.in_ch, spec.mid_ch, 1, 1, eps, spec.act)
        self.spatial = ConvBNAct(spec.mid_ch, spec.mid_ch, spec.kernel, spec.stride, eps, spec.act)
        self.se = _maybe_se(spec)
        self.expand = ConvBNAct(spec.mid_ch, spec.out_ch, 1, 1, eps, None)
        # projection shortcut when the shape changes (torchvision's `downsample`)
        self.shortcut = ConvBNAct(spec.in_ch, spec.out_ch, 1, spec.stride, eps, None) if spec.projection else nn.Identity()
        self.act = activation(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(self.se(self.spatial(self.reduce(x))))
        return self.act(y + self.shortcut(x))


class MaxPool(nn.MaxPool2d):
    def __init__(self, spec: BlockSpec, eps: float):
        super().__init__(spec.kernel, spec.stride, spec.kernel // 2)


BLOCKS: dict[str, type[nn.Module]] = {
    "conv": ConvBlock,
    "ds": DepthwiseSeparable,
    "ir": InvertedResidual,
    "bot": Bottleneck,
    "maxpool": MaxPool,
}


def build_block(spec: BlockSpec, bn_eps: float = 1e-5) -> nn.Module:
    return BLOCKS[spec.op](spec, bn_eps)


class Head(nn.Module):
    """Global pooling, optional hidden linear + activation (MobileNetV3), dropout, classifier."""

    def __init__(self, head: HeadSpec, dropout: float):
        super().__init__()
        self.pool = head.pool
        self.hidden = nn.Sequential(nn.Linear(head.in_ch, head.hidden), activation(head.hidden_act)) if head.hidden else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head.hidden or head.in_ch, head.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.pool == "avg" else x.mean([2, 3])
        return self.classifier(self.dropout(self.hidden(x)))


class Network(nn.Module):
    def __init__(self, specs: tuple[BlockSpec, ...], head: HeadSpec, bn_eps: float, dropout: float):
        super().__init__()
        self.features = nn.Sequential(*[build_block(spec, bn_eps) for spec in specs])
        self.head = Head(head, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet/ResNet initialisation: He (fan-out) convs, unit BN, small linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def build_model(arch: Arch, num_classes: int = 1000, dropout: float = 0.2) -> Network:
    specs, head = resolve(arch, num_classes)
    model = Network(specs, head, arch.bn_eps, dropout)
    _init_weights(model)
    return model
