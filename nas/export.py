"""Any architecture or module -> ONNX, and a parity check of ONNX Runtime against PyTorch.

The legacy TorchScript exporter (``dynamo=False``) is used on purpose: it exports these static
convolutional networks correctly in about 20 ms per block, far faster than the torch.export-based one
(which also needs ``onnxscript``), and a latency table exports thousands of blocks. Shapes are static (batch and resolution
are fixed), which is what ONNX Runtime optimises best and what a latency figure refers to.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from nas.arch import Arch
from nas.builder import build_model
from nas.errors import NasError

MIN_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ParityError(Exception):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance: an exporter bug."""


@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread for a single forward pass (tracing, parity), then restore the setting.

    One batch-1 pass gains nothing from more threads, and on a busy machine OpenMP workers waiting at
    barriers made a traced MobileNetV2 pass 25x slower; idle workers would also spin on the core a
    following latency measurement runs on.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def export_onnx(
    model_or_arch: nn.Module | Arch,
    path_or_buffer: str | Path | BinaryIO | None = None,
    resolution: int | None = None,
    batch: int = 1,
    opset: int = MIN_OPSET,
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
) -> bytes:
    """Export to ONNX with a static ``(batch, in_channels, resolution, resolution)`` input.

    An ``Arch`` is built first (``num_classes`` outputs) and defaults to its own resolution; a module
    needs ``resolution``. The model bytes are returned and, when given, written to the path or buffer.
    The module's train/eval mode is left as it was.
    """
    if opset < MIN_OPSET:
        raise NasError(f"ONNX opset {opset} is too old; use {MIN_OPSET} or newer")
    if batch < 1:
        raise NasError(f"batch must be at least 1, got {batch}")
    if isinstance(model_or_arch, Arch):
        resolution = resolution or model_or_arch.resolution
        model = build_model(model_or_arch, num_classes)
    else:
        model = model_or_arch
        if resolution is None:
            raise NasError("export_onnx of a module needs the input resolution")
    example = torch.randn(batch, in_channels, resolution, resolution)
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch_single_thread(), warnings.catch_warnings():
            # the legacy exporter announces its own deprecation and traces with TracerWarnings
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            )
    finally:
        model.train(was_training)
    data = buffer.getvalue()
    if isinstance(path_or_buffer, (str, Path)):
        Path(path_or_buffer).write_bytes(data)
    elif path_or_buffer is not None:
        path_or_buffer.write(data)
    return data


def check_parity(model: nn.Module, onnx_bytes: bytes, tol: float = 1e-4, seed: int = 0) -> float:
    """Run both on one random input; return max|ort - torch| / max|torch|, or raise ``ParityError``.

    The input shape is read from the ONNX model, so it needs no resolution argument. ONNX Runtime runs
    with all graph optimisations (BatchNorm folded into convolutions), as it does when measured.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch_single_thread():
            expected = model(x).numpy()
    finally:
        model.train(was_training)
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if actual.shape != expected.shape:
        raise ParityError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
    scale = float(np.abs(expected).max())
    relative = float(np.abs(actual - expected).max()) / (scale if scale > 0 else 1.0)
    if not relative <= tol:  # also catches NaN
        raise ParityError(f"ONNX Runtime differs from PyTorch by {relative:.3g} (relative max-abs), tolerance {tol:g}")
    return relative


@dataclass(frozen=True)
class ExportCheck:
    """An exported model's parity with PyTorch and its own accuracy under ONNX Runtime."""

    path: str
    parity_rel_max_abs: float
    onnx_accuracy: float
    split: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_checked(model: nn.Module, path: str | Path, data: Any, resolution: int, *, split: str = "test",
                   opset: int = MIN_OPSET) -> ExportCheck:
    """Export ``model`` to ``path``, check ONNX Runtime against PyTorch on a random input, then score the
    ONNX model itself on ``split`` of ``data`` (a ``nas.data.Dataset``): what a deployment would get."""
    from nas.train import evaluate  # training imports the data stack, which exporting alone does not need

    onnx_bytes = export_onnx(model, path, resolution=resolution, opset=opset)
    parity = check_parity(model, onnx_bytes)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    accuracy = evaluate(lambda x: [session.run(None, {name: x[i:i + 1]})[0][0] for i in range(len(x))], data,
                        resolution, split=split)
    return ExportCheck(str(path), parity, accuracy, split)
