"""ONNX translations of samfx's custom ops, for ``torch.onnx.export(dynamo=True)``.

``TRANSLATIONS`` maps each op overload to an onnxscript function; pass it as
``custom_translation_table``. Importing this module imports onnxscript.
"""

from __future__ import annotations

from .quantized_onnx import TRANSLATIONS as _QUANTIZED

__all__ = ["TRANSLATIONS"]

TRANSLATIONS = {**_QUANTIZED}
