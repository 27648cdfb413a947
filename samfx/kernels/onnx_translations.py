"""ONNX translations of samfx's custom ops, for ``torch.onnx.export(dynamo=True)``.

``TRANSLATIONS`` maps each op overload to a function that builds it from
standard ONNX operators (traced with onnxscript's opset); pass it as
``custom_translation_table``. The
functions compute the op's definition (the plain reference), so ONNX runtimes
run it with their own fused kernels where they have them.

Example::

    >>> import torch, samfx
    >>> from samfx.kernels.onnx_translations import TRANSLATIONS
    >>> fast = samfx.optimize(samfx.models.build("sam_vit_b", small=True), ["fuse_attention"])
    >>> program = torch.onnx.export(fast.image_encoder, (torch.randn(1, 3, 64, 64),), dynamo=True,
    ...                             custom_translation_table=TRANSLATIONS)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from . import rel_pos  # noqa: F401  (registers torch.ops.samfx.rel_pos_attention)
from .quantized_onnx import TRANSLATIONS as _QUANTIZED

__all__ = ["TRANSLATIONS", "rel_pos_attention"]


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


TRANSLATIONS = {torch.ops.samfx.rel_pos_attention.default: rel_pos_attention, **_QUANTIZED}
