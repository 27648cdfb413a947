"""Emitters: deploy an optimized model as a torch.compile backend or as ONNX.

* ``torch.compile(model, backend="samfx")``: samfx's graph rewrites, then
  inductor (:mod:`samfx.emit.compile`, :mod:`samfx.emit.rewrites`).
* :func:`export_onnx`: ``encoder.onnx`` + ``decoder.onnx`` in the SAM
  convention, checked in onnxruntime (:mod:`samfx.emit.onnx`).
* :mod:`samfx.emit.runtime`: runs an exported pair with onnxruntime and numpy
  only (no torch).

Submodules load on first use, so ``import samfx`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BackendOptions", "OnnxExport", "export_onnx", "register_rewrite", "samfx_backend"]

_WHERE = {
    "BackendOptions": "compile",
    "samfx_backend": "compile",
    "register_rewrite": "rewrites",
    "OnnxExport": "onnx",
    "export_onnx": "onnx",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
