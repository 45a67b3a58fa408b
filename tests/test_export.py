"""ONNX export: every reference network exports (opset >= 17, static input) and ONNX Runtime matches PyTorch."""

from __future__ import annotations

import io

import onnx
import pytest
import torch

from nas.builder import build_model
from nas.errors import NasError
from nas.export import ParityError, check_parity, export_onnx
from nas.references import REFERENCES, reference


def _input_shape(model_bytes: bytes) -> list[int]:
    graph = onnx.load_from_string(model_bytes).graph
    return [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_exports_with_parity(name):
    arch = reference(name).with_resolution(64)  # 224 makes resnet50 slow; the graph is the same
    model = build_model(arch, num_classes=1000)
    data = export_onnx(model, resolution=64)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert _input_shape(data) == [1, 3, 64, 64]
    assert check_parity(model, data) <= 1e-4


def test_mobilenet_v2_at_224_from_arch():
    arch = reference("mobilenet_v2")
    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000)
    torch.manual_seed(0)
    data = export_onnx(arch)  # an Arch is built with the same seed, so the weights are equal
    assert _input_shape(data) == [1, 3, 224, 224]
    assert check_parity(model, data) <= 1e-4


def test_writes_path_and_buffer_and_batch(tmp_path):
    model = build_model(reference("mobilenet_v2").with_resolution(32), num_classes=10)
    buffer = io.BytesIO()
    data = export_onnx(model, buffer, resolution=32, batch=2)
    assert buffer.getvalue() == data
    export_onnx(model, tmp_path / "m.onnx", resolution=32, batch=2)
    assert _input_shape((tmp_path / "m.onnx").read_bytes()) == [2, 3, 32, 32]
    assert check_parity(model, data) <= 1e-4


def test_keeps_training_mode():
    model = build_model(reference("mnasnet1_0").with_resolution(32), num_classes=10)
    model.train()
    data = export_onnx(model, resolution=32)
    check_parity(model, data)
    assert model.training


def test_parity_detects_a_different_model():
    model = build_model(reference("mobilenet_v2").with_resolution(32), num_classes=10)
    data = export_onnx(model, resolution=32)
    with torch.no_grad():
        model.head.classifier.bias += 1.0
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(model, data)


def test_rejects_old_opset_and_missing_resolution():
    model = build_model(reference("mobilenet_v2").with_resolution(32), num_classes=10)
    with pytest.raises(NasError, match="opset 16"):
        export_onnx(model, resolution=32, opset=16)
    with pytest.raises(NasError, match="resolution"):
        export_onnx(model)
