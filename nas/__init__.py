"""nas: hardware-aware neural architecture search for mobile CNNs.

The public names below are imported on first use, so ``import nas`` stays fast (torch loads only
when something needs it).
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "Arch": "arch", "load_space": "space", "SearchSpace": "space", "BlockSpec": "blocks", "resolve": "blocks",
    "arch_cost": "cost", "build_model": "builder", "reference": "references",
    "mobilenet_v2_width": "references", "load_dataset": "data", "train_candidate": "train",
    "default_recipe": "train", "Fidelity": "fidelity", "make_strategy": "strategies", "Trial": "trial",
    "SearchConfig": "config", "run_main_job": "pipeline", "export_onnx": "export", "export_checked": "export",
    "LatencyTable": "latency.table", "NasError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nas' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nas.{_EXPORTS[name]}"), name)
