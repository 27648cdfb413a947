"""ONNX translations of samfx's int8 ops, as QDQ (QuantizeLinear/DequantizeLinear) graphs.

Each op becomes the standard QDQ pattern with the same calibrated grids, so
onnxruntime fuses it into its own int8 kernels: a quantized linear into
``MatMulIntegerToFloat`` (``DQ -> MatMul``), a quantized matmul likewise, a
per-token linear into ``MatMulInteger`` with its scales. Other runtimes that read
QDQ (TensorRT, OpenVINO, QNN, XNNPACK) take the same graph.

The functions are traced with onnxscript by ``torch.onnx.export(dynamo=True,
custom_translation_table=TRANSLATIONS)``; :mod:`samfx.emit.quantized_onnx`
does that.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op

from . import quantized as _ops  # noqa: F401  (registers torch.ops.samfx.quantized_*)

__all__ = ["TRANSLATIONS"]


def _quantize_dequantize(x, scale, zero_point):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _weight_columns(weight, weight_scale):
    """``(in, out)`` float weights from int8 ``(out, in)`` codes, as ``DQ(Transpose(codes))``
    (onnxruntime folds the transpose into the int8 initializer and fuses the DQ)."""
    return op.DequantizeLinear(op.Transpose(weight, perm=[1, 0]), weight_scale, axis=1)


def _add_bias(out, bias):
    # Sum, not Add: onnxruntime fuses MatMul + Add into a float Gemm before its QDQ
    # pass could turn the MatMul into MatMulIntegerToFloat.
    return out if bias is None else op.Sum(out, bias)


def quantized_linear(x, weight, weight_scale, bias, input_scale, input_zero_point):
    out = op.MatMul(_quantize_dequantize(x, input_scale, input_zero_point), _weight_columns(weight, weight_scale))
    return _add_bias(out, bias)


def dynamic_quantized_linear(x, weight, weight_scale, bias):
    scale = op.Max(op.Div(op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1),
                          op.Constant(value_float=127.0)), op.Constant(value_float=1e-8))
    codes = op.Cast(op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=-127.0), op.Constant(value_float=127.0)),
                    to=3)  # int8
    acc = op.MatMulInteger(codes, op.Transpose(weight, perm=[1, 0]))
    return _add_bias(op.Mul(op.Mul(op.Cast(acc, to=1), scale), weight_scale), bias)


def quantized_conv2d(x, weight, weight_scale, bias, input_scale, input_zero_point, stride, padding, dilation, groups):
    w = op.DequantizeLinear(weight, weight_scale, axis=0)
    xd = _quantize_dequantize(x, input_scale, input_zero_point)
    pads = list(padding) * 2
    if bias is None:
        return op.Conv(xd, w, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)
    return op.Conv(xd, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


def quantized_matmul(a, b, a_scale, a_zero_point, b_scale, b_qmax: int):
    limit = op.Mul(b_scale, op.Constant(value_float=float(b_qmax)))
    b_codes = op.QuantizeLinear(op.Clip(b, op.Neg(limit), limit), b_scale, op.Constant(value=_INT8_ZERO))
    return op.MatMul(_quantize_dequantize(a, a_scale, a_zero_point), op.DequantizeLinear(b_codes, b_scale))


_INT8_ZERO = onnx.helper.make_tensor("zero", onnx.TensorProto.INT8, [], [0])


TRANSLATIONS = {
    torch.ops.samfx.quantized_linear.default: quantized_linear,
    torch.ops.samfx.dynamic_quantized_linear.default: dynamic_quantized_linear,
    torch.ops.samfx.quantized_conv2d.default: quantized_conv2d,
    torch.ops.samfx.quantized_matmul.default: quantized_matmul,
}
