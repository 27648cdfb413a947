"""OpenVINO IR from the checked ONNX graphs, and what OpenVINO's CPU plugin runs in int8.

:func:`samfx.export` with ``format="openvino"`` writes the ONNX pair first
(:mod:`samfx.emit.onnx`), reads each graph with OpenVINO's ONNX frontend
and saves it with ``compress_to_fp16=False``: the weights stay exactly the
float32 values of the model (OpenVINO's default would round them to float16),
and constant subgraphs stay as small as in the ONNX file (``openvino.convert_model``
would fold them into the file; the CPU plugin folds them when it compiles).
The int8 layers of the ``quantize`` pass arrive as QDQ pairs; OpenVINO's low
precision transformations fuse them into integer kernels, which
:func:`int8_layers` reads back from the compiled model's execution graph.

Example (not run as a doctest: a calibration and an export with its checks take a
minute; ``tests/emit/test_export.py`` exports the same quantized small model once per session)::

    >>> import samfx, tempfile
    >>> model = samfx.optimize(samfx.models.build("sam_vit_b", small=True),
    ...                        [samfx.QuantizeConfig(images=("chelsea",), prompts_per_image=1)],
    ...                        min_box_iou=None)  # doctest: +SKIP
    >>> export = samfx.export(model, tempfile.mkdtemp(), format="openvino")  # doctest: +SKIP
    >>> export.manifest["int8"]["encoder"]["int8_layers"] > 0    # doctest: +SKIP
    True
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Sequence

__all__ = ["convert", "int8_layers"]

_INT8 = {"i8", "u8"}
_GEMMS = {"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution"}


def convert(onnx_path: Path, xml_path: Path) -> list[Path]:
    """Convert an ONNX file to OpenVINO IR at ``xml_path``; returns the ``.xml`` and ``.bin`` paths."""
    import openvino

    # Read, not openvino.convert_model: conversion folds constant subgraphs into the file (SAM's
    # dense positional encoding, 4 MB for LiteMedSAM; expanded lookup tables); the CPU plugin
    # folds them in memory when it compiles.
    model = openvino.Core().read_model(str(onnx_path))
    openvino.save_model(model, str(xml_path), compress_to_fp16=False)
    return [xml_path, xml_path.with_suffix(".bin")]


def int8_layers(compiled: Sequence[Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per compiled model: how many GEMM and convolution layers of its execution
    graph compute in int8 (int8 activations, runtime precision i8/u8), of how
    many layers, by layer type."""
    result = {}
    for name, model in zip(names, compiled):
        types: collections.Counter[str] = collections.Counter()
        layers = 0
        for op in model.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            if kind in ("Input", "Parameter", "Const", "Constant", "Output", "Result"):
                continue
            layers += 1
            # Integer GEMMs and convolutions: int8 activations in (booleans are u8 too, and
            # weights compressed to int8 are decompressed into float32 kernels).
            activation = op.input_value(0).get_element_type().get_type_name() if op.get_input_size() else ""
            if kind in _GEMMS and info["runtimePrecision"].astype(str).lower() in _INT8 and activation in _INT8:
                types[kind] += 1
        result[name] = {"int8_layers": sum(types.values()), "layers": layers, "types": dict(types)}
    return result
