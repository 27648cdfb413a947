"""How samfx's custom ops reach ONNX.

The ONNX emitter (:func:`samfx.export_onnx`) exports through ``torch.export``.
Every op under ``torch.ops.samfx`` takes one of three routes there:

* registered ``CompositeImplicitAutograd``: ``torch.export`` already sees the
  standard ops inside (``samfx::token_cluster`` and ``token_reconstruct`` do this);
* a decomposition in :data:`DECOMPOSITIONS` (``{op: plain PyTorch function}``):
  called instead of the op while the emitter traces the model, for ops whose
  fast kernel is not traceable but whose reference is;
* a translation in :data:`TRANSLATIONS` (``{op: onnxscript function}``): handed
  to ``torch.onnx.export(custom_translation_table=...)``, for ops that need a
  particular ONNX form (``QuantizeLinear``/``DequantizeLinear`` pairs, a
  decode kept in the graph).

A new op adds its entry here, next to the others. The tests check that every
op registered under ``torch.ops.samfx`` has a route.

Example::

    >>> import torch
    >>> from samfx.kernels.onnx_translations import DECOMPOSITIONS
    >>> torch.ops.samfx.sdpa_rel_pos.default in DECOMPOSITIONS
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .sdpa_rel_pos import reference_sdpa_rel_pos

__all__ = ["DECOMPOSITIONS", "TRANSLATIONS"]

DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.samfx.sdpa_rel_pos.default: reference_sdpa_rel_pos,
}

TRANSLATIONS: dict[Any, Callable[..., Any]] = {}
