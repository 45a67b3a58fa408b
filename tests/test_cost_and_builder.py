"""The builder, the analytic cost model and torchvision agree exactly."""

import random

import pytest
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis

from nas.builder import build_model
from nas.cost import arch_cost
from nas.references import REFERENCES, load_torchvision_weights, reference

TORCHVISION = {  # name: (parameters, fvcore FLOPs at 224x224)
    "mobilenet_v2": (3_504_872, 314_193_216),
    "mnasnet1_0": (4_383_312, 325_329_152),
    "mobilenet_v3_large": (5_483_032, 226_033_824),
    "resnet50": (25_557_032, 4_111_512_576),
}


def fvcore_flops(model: torch.nn.Module, resolution: int) -> int:
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # tracing without autograd is faster and counts the same
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return int(analysis.total())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_matches_torchvision(name):
    params, flops = TORCHVISION[name]
    arch = reference(name)
    ours = build_model(arch, 1000).eval()
    theirs = getattr(torchvision.models, name)().eval()
    # every figure agrees: analytic, our module, torchvision's module
    assert arch_cost(arch, 1000).params == n_params(ours) == n_params(theirs) == params
    assert arch_cost(arch, 1000).flops == fvcore_flops(ours, 224) == fvcore_flops(theirs, 224) == flops
    # torchvision's weights load and give the same outputs. BN statistics are perturbed so that the
    # running stats and eps matter (eps 1e-3 vs 1e-5 moves each BN by ~1% at variance 0.1), with the
    # scale compensated so that activations stay bounded.
    gen = torch.Generator().manual_seed(0)
    for module in theirs.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            var = torch.rand(module.running_var.shape, generator=gen) * 0.1 + 0.05
            module.running_var.copy_(var)
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.weight.data.copy_(var.sqrt() * (0.8 + 0.4 * torch.rand(var.shape, generator=gen)))
    load_torchvision_weights(ours, theirs.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_weights_of_another_network_are_rejected():
    with pytest.raises(ValueError):
        load_torchvision_weights(build_model(reference("mobilenet_v2")), torchvision.models.mnasnet1_0().state_dict())


# 200 random architectures of every shipped space; the 224x224 spaces are traced at 64x64 (the
# structure, not the input size, decides whether the counts agree; the references cover 224), which
# keeps fvcore's trace at a fraction of a second per network.
CHECKS = {"mnasnet": (200, None), "tiny": (200, None), "mobilenetv2": (200, 64), "resnet": (200, 64)}


@pytest.mark.parametrize("space_name", list(CHECKS))
def test_analytic_cost_equals_fvcore_and_built_model_on_random_architectures(spaces, space_name):
    space = spaces[space_name]
    count, resolution = CHECKS[space_name]
    rng = random.Random(2024)
    torch.manual_seed(0)
    for _ in range(count):
        arch = space.decode(space.sample(rng), resolution=resolution)
        model = build_model(arch, 10)
        cost = arch_cost(arch, 10)
        assert cost.params == n_params(model), arch.to_string()
        assert cost.flops == fvcore_flops(model, arch.resolution), arch.to_string()


@pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0, 1.4])
def test_mobilenet_v2_width_family_matches_torchvision(width):
    from nas.references import mobilenet_v2_width

    arch = mobilenet_v2_width(width, resolution=224)
    theirs = torchvision.models.mobilenet_v2(width_mult=width)
    assert arch_cost(arch, 1000).params == n_params(theirs) == n_params(build_model(arch, 1000))
