"""A subnet of a supernet as the builder's own network, with the weights it inherits."""

from __future__ import annotations

import torch

from nas.arch import Arch
from nas.builder import Network, build_model
from nas.supernet.model import Supernet


def extract(supernet: Supernet, arch: Arch, *, stats: dict | None = None, dropout: float = 0.2) -> Network:
    """``build_model(arch)`` holding ``arch``'s slice of the supernet's weights (copies, not views).

    BatchNorm statistics are the supernet's shared running ones, or the per-subnet ones in ``stats``
    (collected by a calibration pass, see ``SupernetEvaluator.extract``). In eval mode the network's
    output equals the supernet's for the same subnet and statistics.
    """
    plan = supernet.plan(arch)
    model = build_model(arch, supernet.num_classes, dropout)
    with torch.no_grad():
        for built, (block, spec) in zip(model.features, supernet.blocks(plan)):
            built.load_state_dict({k: v.detach().clone() for k, v in block.state(spec, stats).items()})
        c = plan.head.in_ch
        model.head.classifier.weight.copy_(supernet.classifier.weight[:, :c])
        model.head.classifier.bias.copy_(supernet.classifier.bias)
    return model
