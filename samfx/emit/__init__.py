"""Emitters: deploy an optimized model as a torch.compile backend, ONNX or OpenVINO IR.

* ``torch.compile(model, backend="samfx")``: samfx's graph rewrites, then
  inductor (:mod:`samfx.emit.compile`, :mod:`samfx.emit.rewrites`).
* :func:`export`: the encoder and decoder in the SAM convention as ONNX
  (:mod:`samfx.emit.onnx`) or OpenVINO IR (:mod:`samfx.emit.openvino`), with a
  manifest of checksums and checks (:mod:`samfx.emit.export`);
  :func:`export_onnx` is its ONNX form.
* :mod:`samfx.emit.runtime`: runs an export with onnxruntime or OpenVINO and
  numpy only (no torch).

Submodules load on first use, so ``import samfx`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BackendOptions", "Export", "OnnxExport", "export", "export_onnx", "register_rewrite", "samfx_backend"]

_WHERE = {
    "BackendOptions": "compile",
    "samfx_backend": "compile",
    "register_rewrite": "rewrites",
    "Export": "export",
    "OnnxExport": "export",
    "export": "export",
    "export_onnx": "export",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
