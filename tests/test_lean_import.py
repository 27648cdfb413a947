"""`import samfx` stays light: heavy optional packages load only when used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnxruntime", "openvino", "nncf", "onnx", "triton", "torch_pruning", "transformers", "segment_anything", "sam2", "skimage", "torchao")


def test_import_samfx_does_not_import_heavy_packages() -> None:
    code = f"import sys, samfx; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_explicit() -> None:
    import samfx

    assert "optimize" in samfx.__all__ and "capture" in samfx.__all__
    assert all(hasattr(samfx, name) for name in samfx.__all__)
