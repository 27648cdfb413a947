"""QDQ export of int8 layers: onnxruntime computes what the PyTorch ops compute, on its int8 kernels."""

from __future__ import annotations

import pytest
import torch

import samfx
from samfx.kernels.onnx_translations import TRANSLATIONS
from samfx.passes.quantize import QuantizeConfig

from ..conftest import image_input, small_model

pytest.importorskip("onnxruntime")


def test_every_int8_op_has_a_translation() -> None:
    ops = [getattr(torch.ops.samfx, n).default for n in
           ("quantized_linear", "dynamic_quantized_linear", "quantized_conv2d", "quantized_matmul")]
    assert all(op in TRANSLATIONS for op in ops)


def test_quantized_encoder_runs_in_onnxruntime_on_int8_kernels(tmp_path) -> None:
    from samfx.emit.quantized_onnx import export, fused_ops, session

    model = small_model("sam_vit_b")
    quantized = samfx.optimize(model, [QuantizeConfig(images=("chelsea",), prompts_per_image=1,
                                                      attention_matmuls=True)], min_box_iou=None)
    x = image_input(model)
    path = export(quantized.image_encoder, (x,), tmp_path / "encoder.onnx")
    run = session(path, threads=1)
    out = torch.from_numpy(run.run(None, {run.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = quantized.image_encoder(x)
    # Same grids and integer products; float rounding of a rescale differs, which can put
    # an activation on the neighbouring int8 step (a state torch.compile leaves behind in
    # the process is enough); later layers and the neck's convolutions spread such a step.
    # Well under the int8 error itself (several percent against float), far from a wrong grid.
    diff, scale = (out - expected).abs(), expected.abs().max()
    assert diff.max() <= 0.02 * scale
    assert (out - expected).norm() <= 5e-3 * expected.norm()
    ops = fused_ops(path)
    linears = sum(1 for m in quantized.image_encoder.modules() if type(m).__name__ == "QuantizedLinear")
    products = sum(1 for m in quantized.image_encoder.modules() if type(m).__name__ == "QuantizedMatMul")
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) >= linears + products
    assert "MatMul" not in ops  # no product left in float
