"""Models and exports shared by the emitter tests: each (model, passes) pair is exported once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import samfx
from samfx.data import package_images
from samfx.emit.onnx import OnnxExport, export_onnx

from ..conftest import SMALL_FAMILIES, small_model

# Every family plain, and each registered pass alone (covered as soon as it exists) on SAM's
# small ViT, whose attention every pass rewrites: a pass on every family, or on LiteMedSAM's
# full-size encoder, would make the suite grow by minutes per pass. benchmarks/emit.py
# measures the passes on LiteMedSAM's real weights.
MODEL_CASES = [(name, ()) for name in SMALL_FAMILIES] + [
    ("sam_vit_b", (info.name,)) for info in samfx.passes.list_passes()
]
# ONNX has no bfloat16 Conv: export_onnx refuses bf16 models (test_onnx checks the message).
ONNX_CASES = [case for case in MODEL_CASES if "bf16" not in case[1]]

_EXPORTS: dict[tuple[str, tuple[str, ...]], OnnxExport] = {}


def case_id(case: tuple[str, tuple[str, ...]]) -> str:
    name, passes = case
    return f"{name}-{'+'.join(passes) or 'plain'}"


def optimized_small(name: str, passes: tuple[str, ...]) -> torch.nn.Module:
    """The small model of ``name`` after ``passes`` (calibrated on a package image if they need data)."""
    model = small_model(name)
    if not passes:
        return model
    return samfx.optimize(model, list(passes), calibration_images=[package_images(["coins"])[0].image],
                          model_name=name)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(name, passes)``: the small model, optimized with ``passes``, exported."""

    def export(name: str, passes: tuple[str, ...] = ()) -> OnnxExport:
        key = (name, passes)
        if key not in _EXPORTS:
            out = Path(tmp_path_factory.mktemp(case_id(key)))
            _EXPORTS[key] = export_onnx(optimized_small(name, passes), out)
        return _EXPORTS[key]

    return export
