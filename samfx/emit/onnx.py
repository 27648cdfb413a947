"""``samfx.export_onnx``: an encoder.onnx + decoder.onnx pair in the SAM convention.

The pair is what edge tools (samexporter, anylabeling, transformers.js-style
apps) expect: ``encoder.onnx`` maps the normalised, padded image to the image
embeddings; ``decoder.onnx`` takes

    image_embeddings (plus ``interm_embeddings`` for SAM-HQ, ``high_res_feats_0/1``
    for SAM 2), point_coords (1, N, 2), point_labels (1, N), mask_input
    (1, 1, 4h, 4w), has_mask_input (1,), orig_im_size (2,) as float32

and returns ``masks`` (1, M, H, W) at ``orig_im_size``, ``iou_predictions``
(1, M) and ``low_res_masks`` (1, M, 4h, 4w). The number of points is dynamic,
and the full-size masks are computed in the graph from ``orig_im_size`` (the
resize, the crop of the padding, the resize to the image), so they are right
for any image size: exporters that trace the postprocessing with a dummy image
bake its size into the graph.

How it is done: each family's adapter describes its deployment
(:meth:`samfx.adapters.Adapter.deployment`); both graphs are captured with
``torch.export`` (non-strict, so samfx's captured components and their passes
run as they do in PyTorch), samfx ops are lowered through
:mod:`samfx.kernels.onnx_translations`, and ``torch.onnx`` translates the
program (opset >= 17; weights above 2 GB go to an external data file). Every
export is then checked: ``onnx.checker`` on both files, and onnxruntime against
eager PyTorch on a package image, for several prompts (point counts, a box, a
mask input) and several image sizes; the differences are in the returned
:class:`OnnxExport` and in ``samfx_onnx.json``.

Example (not run as a doctest: an export with its checks takes a minute;
``tests/emit/test_onnx.py`` exports the same small model once per session)::

    >>> import samfx, tempfile
    >>> fast = samfx.optimize(samfx.models.build("sam_vit_b", small=True), ["split_qkv"])
    >>> export = samfx.export_onnx(fast, tempfile.mkdtemp())  # doctest: +SKIP
    >>> export.worst_mask_iou >= 0.999                # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..adapters import Adapter, find_adapter
from ..adapters.deploy import Deployment
from ..data import package_images
from ..fidelity import mask_iou
from . import runtime

__all__ = ["DECODER_INPUTS", "DECODER_OUTPUTS", "OnnxExport", "export_onnx"]

DECODER_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
_MAX_SIDE = 1 << 15  # largest image side the decoder graph is declared for
_MAX_POINTS = 1 << 10


class FullSizeDecoder(nn.Module):
    """A deployment's decoder with the family's mask postprocessing in the graph:
    low-res logits to ``orig_im_size`` through the encoder-input frame."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__()
        self.decoder = deployment.decoder
        self.size = deployment.preprocessing.size
        self.longest_side = deployment.preprocessing.resize == "longest_side"
        self.upscale = deployment.preprocessing.upscale_masks
        self.clamp = deployment.low_res_clamp

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        orig_im_size = inputs[-1]
        low_res, iou_predictions = self.decoder(*inputs[:-1])
        masks = low_res
        if self.upscale:
            masks = F.interpolate(masks, (self.size, self.size), mode="bilinear", align_corners=False)
        if self.longest_side:
            # The resized image's size, as the predictor computes it (int(side * scale + 0.5)), in float64.
            orig = orig_im_size.to(torch.float64)
            resized = torch.floor(orig * (self.size / orig.max()) + 0.5).to(torch.int64)
            resized_h, resized_w = _size(resized[0], self.size), _size(resized[1], self.size)
            masks = masks[..., :resized_h, :resized_w]
        height = _size(orig_im_size[0].to(torch.int64), _MAX_SIDE)
        width = _size(orig_im_size[1].to(torch.int64), _MAX_SIDE)
        masks = F.interpolate(masks, (height, width), mode="bilinear", align_corners=False)
        if self.clamp is not None:
            low_res = low_res.clamp(-self.clamp, self.clamp)
        return masks, iou_predictions, low_res


def _size(value: torch.Tensor, largest: int) -> int:
    """A size read from the graph's inputs (a symbol for torch.export)."""
    size = value.item()
    torch._check(size >= 1)
    torch._check(size <= largest)
    return size


def _sdpa_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """Inference SDPA as matmuls and a softmax.

    Exported this way because torch.onnx's decomposition pass keeps the fused
    op's output strides for the views that follow (Hugging Face's vision
    attention), which then fail when it lowers the op.
    """
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("export supports inference attention only (no dropout, causal mask or GQA)")
    factor = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * factor) @ key.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    return scores.softmax(dim=-1) @ value


class _Decompose(TorchFunctionMode):
    """While tracing for ONNX, calls of SDPA and of samfx ops with a registered
    decomposition run their decomposition instead, so the exported program holds
    only ops that torch.onnx translates (no second decomposition pass over it)."""

    def __init__(self) -> None:
        super().__init__()
        from ..kernels.onnx_translations import DECOMPOSITIONS

        self.table = {F.scaled_dot_product_attention: _sdpa_math, torch._C._nn.scaled_dot_product_attention: _sdpa_math,
                      **DECOMPOSITIONS}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Ops called as torch.ops.samfx.name arrive as their overload packet.
        decomposition = self.table.get(func) or self.table.get(getattr(func, "default", None))
        return (decomposition or func)(*args, **(kwargs or {}))


def _to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
             dynamic_shapes: Any, path: Path, opset: int, external_data: bool | None) -> None:
    from ..kernels.onnx_translations import TRANSLATIONS
    from .few_tokens import reassociate_few_token_attention

    with _Decompose():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    # Decoders: project the few prompt tokens, not the many image tokens.
    reassociate_few_token_attention(program.graph_module)
    onnx_program = torch.onnx.export(
        program, args, dynamo=True, input_names=input_names, output_names=output_names, opset_version=opset,
        custom_translation_table=dict(TRANSLATIONS), optimize=True, verbose=False,
    )
    onnx_program.save(str(path), external_data=external_data)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export, the user's flags restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how the exported graphs compare with eager.

    Attributes:
        directory: the export directory.
        encoder, decoder: the ONNX files.
        metadata: the content of ``samfx_onnx.json``.
        checks: ``encoder``: max and relative difference of the embeddings;
            ``decoder``: per case (prompt, image size), the mask IoU between
            onnxruntime's and eager masks and the largest differences.
        sizes: bytes of each file (external data included).
        export_s: seconds spent exporting, check_s: checking.
    """

    directory: Path
    encoder: Path
    decoder: Path
    metadata: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    export_s: float = 0.0
    check_s: float = 0.0

    @property
    def worst_mask_iou(self) -> float:
        return min(case["mask_iou"] for case in self.checks["decoder"])

    def summary(self) -> str:
        enc = self.checks["encoder"]
        lines = [f"encoder.onnx {self.sizes['encoder'] / 1e6:.1f} MB, decoder.onnx {self.sizes['decoder'] / 1e6:.1f} MB"
                 f" (exported in {self.export_s:.0f} s)",
                 f"encoder: onnxruntime vs eager max |diff| {enc['max_abs_diff']:.2e} "
                 f"(relative {enc['relative_diff']:.2e})"]
        for case in self.checks["decoder"]:
            lines.append(f"decoder {case['prompt']:<22} image {case['image_hw'][0]}x{case['image_hw'][1]}: "
                         f"mask IoU {case['mask_iou']:.4f}, max |diff| masks {case['masks_max_abs_diff']:.2e}, "
                         f"iou_predictions {case['iou_max_abs_diff']:.2e}")
        return "\n".join(lines)


def _file_bytes(path: Path) -> int:
    """Size of an ONNX file and of the external data files next to it that it names."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return total + sum((path.parent / name).stat().st_size for name in locations)


def export_onnx(
    model: nn.Module,
    out_dir: str | Path,
    *,
    multimask_output: bool = True,
    opset: int = 18,
    external_data: bool | None = None,
    adapter: Adapter | None = None,
    check_image: str = "coins",
    verbose: bool = False,
) -> OnnxExport:
    """Export a SAM-family model (plain or from :func:`samfx.optimize`) as ONNX.

    Writes ``encoder.onnx``, ``decoder.onnx`` (see the module documentation for
    their inputs and outputs), ``samfx_onnx.json`` (preprocessing, names, checks)
    and ``samfx_runtime.py`` (the torch-free runtime, :mod:`samfx.emit.runtime`).

    Args:
        model: a model of a supported family; it is not modified.
        out_dir: directory to write (created if needed).
        multimask_output: the decoder returns the three candidate masks (True,
            the predictors' default) or the single-mask output.
        opset: ONNX opset, at least 17.
        external_data: weights in a separate ``.data`` file; ``None``: only above
            the 2 GB protobuf limit.
        adapter: force a family adapter.
        check_image: package image the exported graphs are checked on.
        verbose: print the check summary.

    Raises:
        ValueError: a bad opset, bfloat16 weights (the bf16 pass), or a model that has
            no prompt decoder (a bare encoder).
    """
    if opset < 17:
        raise ValueError(f"samfx exports with opset 17 or newer (LayerNormalization, Resize with sizes), not {opset}")
    # Parameters only: hyper's lattice codes keep bfloat16 row parameters in buffers, cast in the graph.
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ValueError("the model has bfloat16 weights (the bf16 pass), which ONNX cannot carry: its Conv and most "
                         "other operators have no bfloat16 type, and onnxruntime's CPU provider no bfloat16 kernels; "
                         "export the model before the bf16 pass")
    adapter = adapter or find_adapter(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder_path, decoder_path = out / "encoder.onnx", out / "decoder.onnx"
    with _eval_mode(model), torch.no_grad():
        deployment = adapter.deployment(model, multimask_output=multimask_output)
        if deployment.prepare is not None:
            deployment.prepare()
        size = deployment.preprocessing.size
        image = torch.zeros(1, 3, size, size)
        start = time.perf_counter()
        names = list(deployment.embedding_names)
        _to_onnx(deployment.encoder, (image,), ["image"], names, None, encoder_path, opset, external_data)
        decoder = FullSizeDecoder(deployment)
        embeddings = tuple(deployment.encoder(image))
        points = torch.export.Dim("num_points", min=1, max=_MAX_POINTS)
        example = embeddings + _decoder_example(deployment, 3, (size, size))
        dynamic = {"inputs": tuple([None] * len(embeddings) + [{1: points}, {1: points}, None, None, None])}
        _to_onnx(decoder, example, names + list(DECODER_INPUTS), list(DECODER_OUTPUTS), dynamic, decoder_path, opset,
                 external_data)
        export_s = time.perf_counter() - start
        metadata = _metadata(model, adapter, deployment, multimask_output, opset)
        result = OnnxExport(out, encoder_path, decoder_path, metadata, export_s=export_s)
        start = time.perf_counter()
        result.checks = _check(deployment, decoder, result, check_image)
        result.check_s = time.perf_counter() - start
    result.sizes = {"encoder": _file_bytes(encoder_path), "decoder": _file_bytes(decoder_path)}
    metadata["checks"] = result.checks
    metadata["sizes"] = result.sizes
    (out / runtime.METADATA).write_text(json.dumps(metadata, indent=2))
    shutil.copyfile(runtime.__file__, out / "samfx_runtime.py")
    if verbose:
        print(result.summary())
    return result


def _decoder_example(deployment: Deployment, points: int, image_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    side = deployment.mask_input_size
    coords = torch.linspace(1.0, deployment.preprocessing.size - 1.0, 2 * points).reshape(1, points, 2)
    labels = torch.tensor([[1.0] * (points - 1) + [-1.0]])
    return coords, labels, torch.zeros(1, 1, side, side), torch.zeros(1), torch.tensor(image_hw, dtype=torch.float32)


def _metadata(model: nn.Module, adapter: Adapter, deployment: Deployment, multimask_output: bool,
              opset: int) -> dict[str, Any]:
    from .._version import __version__

    report = getattr(model, "samfx_report", None)
    return {
        "format": runtime.FORMAT,
        "samfx": __version__,
        "family": adapter.name,
        "model": getattr(model, "samfx_zoo", {}).get("name") if report is None else report.model,
        "passes": [p.config for p in report.passes] if report is not None else [],
        "encoder": "encoder.onnx",
        "decoder": "decoder.onnx",
        "embeddings": list(deployment.embedding_names),
        "decoder_inputs": list(deployment.embedding_names) + list(DECODER_INPUTS),
        "decoder_outputs": list(DECODER_OUTPUTS),
        "preprocessing": deployment.preprocessing.to_dict(),
        "mask_input_size": deployment.mask_input_size,
        "multimask_output": multimask_output,
        "opset": opset,
    }


def _check(deployment: Deployment, decoder: FullSizeDecoder, export: OnnxExport, image_name: str) -> dict[str, Any]:
    """onnx.checker on both files; onnxruntime against eager on a package image."""
    import onnx
    import onnxruntime

    for path in (export.encoder, export.decoder):
        onnx.checker.check_model(str(path), full_check=True)
    options = onnxruntime.SessionOptions()
    sessions = [onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (export.encoder, export.decoder)]
    sample = package_images([image_name])[0]
    preprocessing = export.metadata["preprocessing"]
    pixels = runtime.prepare_image(sample.image, preprocessing)
    eager = [t.numpy() for t in deployment.encoder(torch.from_numpy(pixels))]
    onnx_embeddings = sessions[0].run(None, {"image": pixels})
    scale = max(float(np.abs(e).max()) for e in eager) or 1.0
    encoder_diff = max(float(np.abs(a - b).max()) for a, b in zip(onnx_embeddings, eager))
    checks: dict[str, Any] = {"encoder": {"max_abs_diff": encoder_diff, "relative_diff": encoder_diff / scale},
                              "decoder": []}
    # Prompts of the package image, moved to three image sizes; the decoder runs on the
    # eager embeddings so that its own difference is measured. The last prompt feeds
    # back the low-res mask of the previous one, as interactive tools do.
    box = np.array(next(p.coords for p in sample.prompts if p.kind == "box"))
    clicks = np.array([p.coords for p in sample.prompts if p.kind == "point"][:3])
    cases = [
        ("1 point", {"point_coords": clicks[:1], "point_labels": [1]}),
        ("3 points", {"point_coords": clicks, "point_labels": [1, 0, 1]}),
        ("box", {"box": box}),
        ("box + point + mask", {"box": box, "point_coords": clicks[:1], "point_labels": [1]}),
    ]
    height, width = sample.image.shape[:2]
    sizes = [(height, width), (width + 37, height // 2 + 1), (3 * height, 2 * width + 5)]
    low_res = None
    for (label, prompt), image_hw in zip(cases + cases[:2], sizes * 2):
        factor = np.array([image_hw[1] / width, image_hw[0] / height])
        moved = {k: np.asarray(v, np.float64).reshape(-1, 2) * factor if k in ("point_coords", "box") else v
                 for k, v in prompt.items()}
        if label.endswith("mask"):
            moved["mask_input"] = low_res[0, :1]
        feeds = runtime.prompt_inputs(export.metadata, image_hw, **moved)
        inputs = dict(zip(deployment.embedding_names, eager)) | feeds
        ordered = [torch.from_numpy(inputs[n]) for n in export.metadata["decoder_inputs"]]
        masks, iou, low_res = (t.numpy() for t in decoder(*ordered))
        onnx_masks, onnx_iou, onnx_low_res = sessions[1].run(None, inputs)
        checks["decoder"].append({
            "prompt": label,
            "points": int(feeds["point_coords"].shape[1]),
            "image_hw": list(image_hw),
            "mask_iou": min(mask_iou(a > 0, b > 0) for a, b in zip(onnx_masks[0], masks[0])),
            "masks_max_abs_diff": float(np.abs(onnx_masks - masks).max()),
            "low_res_max_abs_diff": float(np.abs(onnx_low_res - low_res).max()),
            "iou_max_abs_diff": float(np.abs(onnx_iou - iou).max()),
        })
    return checks

