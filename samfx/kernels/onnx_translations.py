"""How samfx's custom ops reach ONNX.

The ONNX emitter (:func:`samfx.export_onnx`) exports through ``torch.export``
and ``torch.onnx.export(dynamo=True)``. Every op under ``torch.ops.samfx``
takes one of three routes there:

* registered ``CompositeImplicitAutograd``: ``torch.export`` already sees the
  standard ops inside;
* a translation in :data:`TRANSLATIONS` (``{op overload: onnxscript function}``),
  handed to ``torch.onnx.export(custom_translation_table=...)``: the op built
  from standard ONNX operators (its reference), so ONNX runtimes run it with
  their own fused kernels; also the route for ops that need a particular ONNX
  form (``QuantizeLinear``/``DequantizeLinear`` pairs, a decode kept in the graph);
* a decomposition in :data:`DECOMPOSITIONS` (``{op overload: plain PyTorch
  function}``): called instead of the op while the emitter traces the model,
  for ops whose reference is easier written in PyTorch than in onnxscript.

A new op adds its entry here, next to the others. The tests check that every
op registered under ``torch.ops.samfx`` has a route.

Example::

    >>> import torch
    >>> from samfx.kernels.onnx_translations import TRANSLATIONS
    >>> torch.ops.samfx.rel_pos_attention.default in TRANSLATIONS
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from ..codecs.lattice import decode_rows
from . import hyper  # noqa: F401  (registers torch.ops.samfx.hyper_decode and hyper_linear)
from . import rel_pos  # noqa: F401  (registers torch.ops.samfx.rel_pos_attention)
from .quantized_onnx import TRANSLATIONS as _QUANTIZED

__all__ = ["DECOMPOSITIONS", "TRANSLATIONS", "hyper_linear", "rel_pos_attention"]


def rel_pos_attention(q, k, v, rel_h, rel_w, scale: float):
    """``samfx::rel_pos_attention`` with the bias built explicitly (its reference)."""
    flat = op.Constant(value_ints=[-1])
    q3 = op.Reshape(q, op.Concat(flat, op.Shape(q, start=-2), axis=0))
    k3 = op.Reshape(k, op.Concat(flat, op.Shape(k, start=-2), axis=0))
    v3 = op.Reshape(v, op.Concat(flat, op.Shape(v, start=-2), axis=0))
    rh = op.Reshape(rel_h, op.Concat(flat, op.Shape(rel_h, start=-2), axis=0))
    rw = op.Reshape(rel_w, op.Concat(flat, op.Shape(rel_w, start=-2), axis=0))
    bias = op.Add(op.Unsqueeze(rh, op.Constant(value_ints=[3])), op.Unsqueeze(rw, op.Constant(value_ints=[2])))
    scores = op.MatMul(op.Mul(q3, op.CastLike(op.Constant(value_float=scale), q3)), op.Transpose(k3, perm=[0, 2, 1]))
    scores = op.Add(scores, op.Reshape(bias, op.Shape(scores)))
    out = op.MatMul(op.Softmax(scores, axis=-1), v3)
    return op.Reshape(out, op.Concat(op.Shape(q, end=-1), op.Shape(v, start=-1), axis=0))


TRANSLATIONS: dict[Any, Callable[..., Any]] = {torch.ops.samfx.rel_pos_attention.default: rel_pos_attention, **_QUANTIZED}


def hyper_linear(x: torch.Tensor, codes: torch.Tensor, row_params: torch.Tensor, bias: torch.Tensor | None,
                 cols: int, bits: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """``samfx::hyper_linear`` as its reference: the lattice decode written in the
    graph over the codes (the file keeps the codes, not the dense weight), then a
    linear layer."""
    weight = decode_rows(codes, row_params, cols, bits, nx, i0, j0).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.samfx.hyper_decode.default: decode_rows,
    torch.ops.samfx.hyper_linear.default: hyper_linear,
}
