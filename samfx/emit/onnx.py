"""The ONNX graphs of an export: an encoder.onnx + decoder.onnx pair in the SAM convention.

The pair is what edge tools (samexporter, anylabeling, transformers.js-style
apps) expect: ``encoder.onnx`` maps the normalised, padded image to the image
embeddings; ``decoder.onnx`` takes

    image_embeddings (plus ``interm_embeddings`` for SAM-HQ, ``high_res_feats_0/1``
    for SAM 2), point_coords (B, N, 2), point_labels (B, N), mask_input
    (B, 1, 4h, 4w), has_mask_input (1,), orig_im_size (2,) as float32

and returns ``masks`` (B, M, H, W) at ``orig_im_size``, ``iou_predictions``
(B, M) and ``low_res_masks`` (B, M, 4h, 4w). ``B`` prompts (the boxes of an
image, say) are decoded in one call against one image's embeddings; the number
of points is dynamic, and the full-size masks are computed in the graph from
``orig_im_size`` (the resize, the crop of the padding, the resize to the
image), so they are right for any image size: exporters that trace the
postprocessing with a dummy image bake its size into the graph.

How it is done: each family's adapter describes its deployment
(:meth:`samfx.adapters.Adapter.deployment`); both graphs are captured with
``torch.export`` (non-strict, so samfx's captured components and their passes
run as they do in PyTorch), samfx ops are lowered through
:mod:`samfx.kernels.onnx_translations`, and ``torch.onnx`` translates the
program (opset >= 17; weights above 2 GB go to an external data file).
:func:`samfx.export` (:mod:`samfx.emit.export`) checks, converts and
describes the files; :func:`export_onnx` is its ONNX form.

Example (not run as a doctest: an export with its checks takes a minute;
``tests/emit/test_onnx.py`` exports the same small model once per session)::

    >>> import samfx, tempfile
    >>> fast = samfx.optimize(samfx.models.build("sam_vit_b", small=True), ["split_qkv"])
    >>> export = samfx.export_onnx(fast, tempfile.mkdtemp())  # doctest: +SKIP
    >>> export.worst_mask_iou >= 0.999                # doctest: +SKIP
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..adapters.deploy import Deployment

__all__ = ["DECODER_INPUTS", "DECODER_OUTPUTS", "GRAPHS", "NO_MASK_DECODER_INPUTS", "FullSizeDecoder",
           "external_files", "graph_signature", "write_pair"]

#: The graphs of an export, each written as ``NAME.onnx``.
GRAPHS = ("encoder", "decoder", "decoder_no_mask")

DECODER_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
#: The inputs of ``decoder_no_mask``: prompts without a mask input.
NO_MASK_DECODER_INPUTS = ("point_coords", "point_labels", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
_MAX_SIDE = 1 << 15  # largest image side the decoder graph is declared for
_MAX_POINTS = 1 << 10
_MAX_PROMPTS = 1 << 12


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
        if self.upscale and tuple(masks.shape[-2:]) != (self.size, self.size):  # to its own size is the identity
            masks = _resize_planes(masks, (self.size, self.size))
        # Sizes in integer arithmetic only: a runtime computing in bfloat16 (OpenVINO's hint on
        # CPUs with native bf16) rounds floats such as 303 to 304, but never integers.
        orig = orig_im_size.to(torch.int64)
        if self.longest_side:
            # The resized image's size as the predictor computes it, int(side * size / longest + 0.5),
            # as the exact rational floor((2 * side * size + longest) / (2 * longest)).
            longest = orig.max()
            resized = torch.div(2 * self.size * orig + longest, 2 * longest, rounding_mode="floor")
            resized_h, resized_w = _size(resized[0], self.size), _size(resized[1], self.size)
            masks = masks[..., :resized_h, :resized_w]
        height = _size(orig[0], _MAX_SIDE)
        width = _size(orig[1], _MAX_SIDE)
        masks = _resize_planes(masks, (height, width))
        if self.clamp is not None:
            low_res = low_res.clamp(-self.clamp, self.clamp)
        return masks, iou_predictions, low_res


def _resize_planes(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, M, h, w)`` masks, the ``B x M`` planes as the channels of one
    image: the same values, but OpenVINO vectorises its resize over channels (one channel
    of 24 boxes' masks ran at a third of the speed)."""
    batch, masks_per_prompt = masks.shape[:2]
    planes = F.interpolate(masks.reshape(1, -1, *masks.shape[2:]), size, mode="bilinear", align_corners=False)
    return planes.reshape(batch, masks_per_prompt, *size)


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
    only ops that torch.onnx translates (no second decomposition pass over it).
    Casts to bfloat16 or float16 (the ``bf16`` pass's) become float32: the graphs
    keep float32 weights, and the runtime's precision setting decides."""

    def __init__(self) -> None:
        super().__init__()
        from ..kernels.onnx_translations import DECOMPOSITIONS

        self.table = {F.scaled_dot_product_attention: _sdpa_math, torch._C._nn.scaled_dot_product_attention: _sdpa_math,
                      **DECOMPOSITIONS}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Ops called as torch.ops.samfx.name arrive as their overload packet.
        decomposition = self.table.get(func) or self.table.get(getattr(func, "default", None))
        if func is torch.Tensor.to:
            args = tuple(_float32(a) for a in args)
            kwargs = {k: _float32(v) for k, v in (kwargs or {}).items()}
        return (decomposition or func)(*args, **(kwargs or {}))


def _float32(value: Any) -> Any:
    return torch.float32 if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16) else value


def _to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
             dynamic_shapes: Any, path: Path, opset: int, external_data: bool | None) -> None:
    from ..kernels.onnx_translations import TRANSLATIONS
    from .expanded_tables import factor_expanded_tables
    from .few_tokens import reassociate_few_token_attention
    from .selected_masks import compute_selected_masks_only
    from .token_maps import reshape_then_permute

    with _Decompose():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    # Decoders: project the few prompt tokens, not the many image tokens.
    reassociate_few_token_attention(program.graph_module)
    reshape_then_permute(program.graph_module)
    compute_selected_masks_only(program.graph_module)
    onnx_program = torch.onnx.export(
        program, args, dynamo=True, input_names=input_names, output_names=output_names, opset_version=opset,
        custom_translation_table=dict(TRANSLATIONS), optimize=True, verbose=False,
    )
    _drop_debug_info(onnx_program.model)
    factor_expanded_tables(onnx_program.model)
    onnx_program.save(str(path), external_data=external_data)


def _drop_debug_info(model: Any) -> None:
    """Remove the exporter's per-node stack traces and module paths: about 1 kB a
    node, which is most of the file for graphs of many small ops (hyper's decode)."""
    import onnx_ir

    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None


def write_pair(deployment: Deployment, out: Path, opset: int = 18, external_data: bool | None = None,
               embeddings: tuple[torch.Tensor, ...] | None = None, size_dtype: torch.dtype = torch.float32) -> None:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``decoder_no_mask.onnx`` of a deployment to ``out``.

    The decoder takes a batch of prompts (leading axis of ``point_coords``,
    ``point_labels`` and ``mask_input``) against one image's embeddings, and any
    number of points per prompt. ``decoder_no_mask`` is the same decoder for
    prompts without a mask input (no ``mask_input``, ``has_mask_input``): the
    dense embedding is then one for the whole batch, so neither the mask
    embedding nor, after ``share_image_side``, the first layer's image side is
    computed once per prompt. ``embeddings``: example encoder outputs to trace
    the decoder with (default: the deployment's encoder run on a blank image).
    ``size_dtype``: the element type of ``orig_im_size`` (float32 by SAM's
    convention; int64 for runtimes that may compute in bfloat16).
    """
    if opset < 17:
        raise ValueError(f"samfx exports with opset 17 or newer (LayerNormalization, Resize with sizes), not {opset}")
    size = deployment.preprocessing.size
    image = torch.zeros(1, 3, size, size)
    names = list(deployment.embedding_names)
    _to_onnx(deployment.encoder, (image,), ["image"], names, None, out / "encoder.onnx", opset, external_data)
    embeddings = tuple(deployment.encoder(image)) if embeddings is None else embeddings
    prompts = torch.export.Dim("prompts", min=1, max=_MAX_PROMPTS)
    points = torch.export.Dim("points", min=1, max=_MAX_POINTS)
    example = embeddings + _decoder_example(deployment, 2, 3, (size, size), size_dtype)
    dynamic = {"inputs": tuple([None] * len(embeddings)
                               + [{0: prompts, 1: points}, {0: prompts, 1: points}, {0: prompts}, None, None])}
    _to_onnx(FullSizeDecoder(deployment), example, names + list(DECODER_INPUTS), list(DECODER_OUTPUTS), dynamic,
             out / "decoder.onnx", opset, external_data)
    no_mask = {"inputs": tuple([None] * len(embeddings) + [{0: prompts, 1: points}, {0: prompts, 1: points}, None])}
    _to_onnx(FullSizeDecoder(deployment), example[:-3] + example[-1:], names + list(NO_MASK_DECODER_INPUTS),
             list(DECODER_OUTPUTS), no_mask, out / "decoder_no_mask.onnx", opset, external_data)


def external_files(path: Path) -> list[Path]:
    """The external data files an ONNX file names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return sorted(path.parent / name for name in locations)


def graph_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (symbolic axes by name) of an ONNX file's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": shape}

    return {"inputs": [describe(v) for v in graph.input], "outputs": [describe(v) for v in graph.output]}


def _decoder_example(deployment: Deployment, prompts: int, points: int, image_hw: tuple[int, int],
                     size_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    side = deployment.mask_input_size
    coords = torch.linspace(1.0, deployment.preprocessing.size - 1.0, 2 * prompts * points).reshape(prompts, points, 2)
    labels = torch.tensor([[1.0] * (points - 1) + [-1.0]] * prompts)
    return (coords, labels, torch.zeros(prompts, 1, side, side), torch.zeros(1),
            torch.tensor(image_hw, dtype=size_dtype))
