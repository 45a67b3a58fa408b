"""Named measurement targets: an ONNX Runtime execution provider plus the settings that change latency.

``cpu`` is the CPU execution provider with 1 intra-op thread (like a phone's single big core),
1 inter-op thread, sequential execution and all graph optimisations, i.e. the Python API's default
level (``onnxruntime_perf_test`` defaults to basic; table entries and end-to-end measurements must
use the same level). Other providers are named too; asking for one this onnxruntime build lacks is
a user error that names what is available.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from typing import Any

import onnxruntime as ort

from nas.errors import NasError

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"
EXECUTION_MODE = "ORT_SEQUENTIAL"


@dataclass(frozen=True)
class Target:
    """Where and how a model runs: provider name, intra-op threads and batch size."""

    name: str = "cpu"
    threads: int = 1
    batch: int = 1

    @property
    def provider(self) -> str:
        return PROVIDERS[self.name]

    @property
    def providers(self) -> list[str]:
        # the CPU provider runs whatever an accelerator's provider does not take, as in deployment
        return [self.provider] if self.name == "cpu" else [self.provider, PROVIDERS["cpu"]]

    def session(self, onnx_bytes: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(onnx_bytes, _session_options(self.threads), providers=self.providers)

    def settings(self) -> dict[str, Any]:
        """Everything about the target that changes a latency figure, for table metadata."""
        return {
            "target": self.name, "provider": self.provider, "threads": self.threads, "inter_op_threads": 1,
            "batch": self.batch, "graph_optimization": GRAPH_OPTIMIZATION, "execution_mode": EXECUTION_MODE,
            "onnxruntime": ort.__version__,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Target":
        return cls(**data)


@functools.cache
def _session_options(threads: int) -> ort.SessionOptions:
    """One SessionOptions per thread count, reused by every session (creating them is not free)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION)
    options.execution_mode = getattr(ort.ExecutionMode, EXECUTION_MODE)
    options.log_severity_level = 3  # errors only: per-session info lines would flood a table build
    return options


def get_target(name: str, threads: int = 1, batch: int = 1) -> Target:
    """Validate a target name and settings and check its provider exists in this onnxruntime."""
    if name not in PROVIDERS:
        raise NasError(f"unknown target {name!r}; known targets: {', '.join(PROVIDERS)}")
    if not isinstance(threads, int) or threads < 1:
        raise NasError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(batch, int) or batch < 1:
        raise NasError(f"batch must be a positive integer, got {batch!r}")
    available = ort.get_available_providers()
    provider = PROVIDERS[name]
    if provider not in available:
        raise NasError(
            f"target {name!r} needs ONNX Runtime's {provider}, which this onnxruntime {ort.__version__} "
            f"lacks (available: {', '.join(available)}); install the onnxruntime build for that device"
        )
    return Target(name, threads, batch)


# what tells cores of one brand apart in /proc/cpuinfo: x86's family/model/stepping, Arm's core design
REVISION_FIELDS = (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"),
                   ("CPU implementer", "implementer"), ("CPU part", "part"))


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name with its family, model and stepping (``/proc/cpuinfo`` on Linux), recorded so
    tables say where they were made. Virtual machines often give only a brand ("AMD EPYC"): this VM's
    Zen 3 and Zen 4 hosts both did, and ran mnasnet.yaml's networks 25% apart, so the name alone cannot
    tell one host from the other."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = (fields.get("model name") or fields.get("Hardware") or fields.get("Processor")
            or platform.processor() or platform.machine() or "unknown")
    revision = [f"{label} {fields[key]}" for key, label in REVISION_FIELDS if fields.get(key)]
    return f"{name} ({', '.join(revision)})" if revision else name
