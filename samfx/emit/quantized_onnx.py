"""ONNX export of samfx models whose layers are int8 (the ``quantize`` pass), for onnxruntime.

The int8 ops are written as QDQ graphs with the same calibrated grids
(:mod:`samfx.kernels.quantized_onnx`), so onnxruntime fuses them into its own
int8 kernels (``MatMulIntegerToFloat`` for linear layers and attention
products) and the exported model computes what the PyTorch one does.

Example::

    >>> import torch, samfx
    >>> from samfx.emit.quantized_onnx import export, session
    >>> model = samfx.optimize(samfx.models.build("sam_vit_b", small=True),
    ...                        [samfx.QuantizeConfig(images=("chelsea",), prompts_per_image=1)], min_box_iou=None)
    >>> x = torch.randn(1, 3, 128, 128)
    >>> path = export(model.image_encoder, (x,), "encoder_int8.onnx")  # doctest: +SKIP
    >>> session(path).run(None, {"x": x.numpy()})[0].shape  # doctest: +SKIP
    (1, 256, 8, 8)
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export", "fused_ops", "session"]

#: The lowest opset with per-axis DequantizeLinear and the dynamo exporter's default.
OPSET = 18


def export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: str | Path,
    *,
    dynamic_shapes: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int = OPSET,
) -> Path:
    """Export ``module`` (any samfx component or model) called on ``args`` to ``path``.

    samfx's int8 ops become QDQ patterns; everything else is the exporter's
    usual translation. The file is checked with ``onnx.checker``.
    """
    import onnx

    from ..kernels.onnx_translations import TRANSLATIONS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, custom_translation_table=TRANSLATIONS, opset_version=opset,
            dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return path


def session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads;
    ``optimized_path`` saves the graph onnxruntime runs, after its fusions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fused_ops(path: str | Path) -> dict[str, int]:
    """Node counts by op type of the graph onnxruntime runs for ``path``: shows
    which int8 kernels (``MatMulIntegerToFloat``, ``QLinearConv``, ...) it chose."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, threads=1, optimized_path=optimized)
        graph = onnx.load(str(optimized)).graph
    return dict(collections.Counter(node.op_type for node in graph.node))
