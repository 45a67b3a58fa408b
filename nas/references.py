"""Reference architectures written in the canonical encoding, and torchvision weight loading.

Each string builds the same network as torchvision's model of that name: the same parameter count,
fvcore FLOPs and (after ``load_torchvision_weights``) the same outputs. Tests hold all three.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nas.arch import Arch, make_divisible
from nas.errors import NasError

REFERENCES: dict[str, str] = {
    "mobilenet_v2": (
        "i224-conv_k3_s2_c32_r6-ds_k3_c16_r6-ir_n2_k3_s2_e6_c24_r6-ir_n3_k3_s2_e6_c32_r6"
        "-ir_n4_k3_s2_e6_c64_r6-ir_n3_k3_e6_c96_r6-ir_n3_k3_s2_e6_c160_r6-ir_k3_e6_c320_r6"
        "-conv_k1_c1280_r6-avg"
    ),
    "mnasnet1_0": (
        "i224-conv_k3_s2_c32_re-ds_k3_c16_re-ir_n3_k3_s2_e3_c24_re-ir_n3_k5_s2_e3_c40_re"
        "-ir_n3_k5_s2_e6_c80_re-ir_n2_k3_e6_c96_re-ir_n4_k5_s2_e6_c192_re-ir_k3_e6_c320_re"
        "-conv_k1_c1280_re-mean"
    ),
    "mobilenet_v3_large": (
        "i224_bn0.001-conv_k3_s2_c16_hs-ds_k3_c16_re-ir_k3_s2_e4_c24_re-ir_k3_e3_c24_re"
        "-ir_n3_k5_s2_e3_c40_se0.25_re-ir_k3_s2_e6_c80_hs-ir_k3_e2.5_c80_hs"
        "-ir_n2_k3_e2.3_c80_hs-ir_n2_k3_e6_c112_se0.25_hs-ir_n3_k5_s2_e6_c160_se0.25_hs"
        "-conv_k1_c960_hs-avg-fc_c1280_hs"
    ),
    "resnet50": (
        "i224-conv_k7_s2_c64_re-maxpool_k3_s2-bot_n3_k3_e0.25_c256_re-bot_n4_k3_s2_e0.25_c512_re"
        "-bot_n6_k3_s2_e0.25_c1024_re-bot_n3_k3_s2_e0.25_c2048_re-avg"
    ),
}


def reference(name: str) -> Arch:
    if name not in REFERENCES:
        raise NasError(f"unknown reference architecture {name!r}; known: {', '.join(REFERENCES)}")
    return Arch.parse(REFERENCES[name])


def load_torchvision_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a torchvision state_dict by position: both register parameters in the same order."""
    ours = model.state_dict()
    if len(ours) != len(state_dict):
        raise ValueError(f"state_dict has {len(state_dict)} entries, the model {len(ours)}")
    mapped = {}
    for (name, tensor), (their_name, theirs) in zip(ours.items(), state_dict.items()):
        if tensor.shape != theirs.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} does not match {their_name} {tuple(theirs.shape)}")
        mapped[name] = theirs
    model.load_state_dict(mapped)


def mobilenet_v2_width(width: float, resolution: int = 224) -> Arch:
    """torchvision's ``mobilenet_v2(width_mult=width)``: every layer's channels x width rounded to 8,
    the last conv kept at 1280 unless width > 1 (the baselines a search must beat)."""
    base = reference("mobilenet_v2")
    head = len(base.layers) - 1
    layers = tuple(
        dataclasses.replace(layer, out=make_divisible(layer.out * (max(1.0, width) if i == head else width)))
        for i, layer in enumerate(base.layers)
    )
    return dataclasses.replace(base, layers=layers, resolution=resolution)
