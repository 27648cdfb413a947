"""Exports shared by the emitter tests: each (model, passes) pair is exported once."""

from __future__ import annotations

from pathlib import Path

import pytest

import samfx
from samfx.emit.onnx import OnnxExport, export_onnx

from ..conftest import small_model

_EXPORTS: dict[tuple[str, tuple[str, ...]], OnnxExport] = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(name, passes)``: the small model, optimized with ``passes``, exported."""

    def export(name: str, passes: tuple[str, ...] = ()) -> OnnxExport:
        key = (name, passes)
        if key not in _EXPORTS:
            model = small_model(name)
            if passes:
                model = samfx.optimize(model, list(passes), model_name=name)
            out = Path(tmp_path_factory.mktemp(f"{name}-{'-'.join(passes) or 'plain'}"))
            _EXPORTS[key] = export_onnx(model, out)
        return _EXPORTS[key]

    return export
