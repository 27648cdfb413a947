"""SAM 2 / SAM 2.1 (``sam2``): Hiera trunk + FPN neck, prompt encoder, mask decoder."""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import register_adapter
from .base import (PRESENT, Adapter, AttentionSite, ComponentSpec, Predictor, QKVLayout, TokenStage, TraceRecipe,
                   class_name, query_projection)
from .deploy import Deployment, Preprocessing, SamPointEmbedding, SamPromptDecoder
from .sam import (
    UpstreamPredictor,
    decoder_attention_site,
    defining_class,
    is_score_head,
    projection_width,
    prompt_encoder_spec,
)

__all__ = ["Sam2Adapter", "Sam2ImageEncoder", "Sam2Predictor"]

_HIERA = "sam2.modeling.backbones.hieradet.Hiera"
_ATTENTION = "sam2.modeling.backbones.hieradet.MultiScaleAttention"
_BLOCK = "sam2.modeling.backbones.hieradet.MultiScaleBlock"
_MLP = "sam2.modeling.sam2_utils.MLP"
_POSITION_SINE = "sam2.modeling.position_encoding.PositionEmbeddingSine"
_DECODER_ATTENTION = "sam2.modeling.sam.transformer.Attention"


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def image_encoder_spec(encoder: nn.Module, path: str, image_size: int) -> ComponentSpec:
    hieradet = sys.modules["sam2.modeling.backbones.hieradet"]

    def example() -> dict[str, Any]:
        return {"sample": torch.zeros(1, 3, image_size, image_size, device=_device(encoder))}

    recipe = TraceRecipe(
        # Window (un)partitioning pads by shape-dependent amounts.
        autowrap_functions=(hieradet.window_partition, hieradet.window_unpartition),
        # The sine position encoding caches per size in a dict.
        leaf_modules=(_POSITION_SINE,),
        # Interpolates the position embedding to a size read from the input.
        opaque_methods=((_HIERA, "_get_pos_embed"),),
    )
    return ComponentSpec("image_encoder", path, recipe, example)


def mask_decoder_spec(decoder: nn.Module, path: str, image_size: int, stride: int) -> ComponentSpec:
    dim = decoder.transformer_dim
    side = image_size // stride

    def example() -> dict[str, Any]:
        device = _device(decoder)
        inputs: dict[str, Any] = {
            "image_embeddings": torch.zeros(1, dim, side, side, device=device),
            "image_pe": torch.zeros(1, dim, side, side, device=device),
            "sparse_prompt_embeddings": torch.zeros(1, 3, dim, device=device),
            "dense_prompt_embeddings": torch.zeros(1, dim, side, side, device=device),
        }
        if decoder.use_high_res_features:
            inputs["high_res_features"] = [
                torch.zeros(1, dim // 8, 4 * side, 4 * side, device=device),
                torch.zeros(1, dim // 4, 2 * side, 2 * side, device=device),
            ]
        return inputs

    high_res = (PRESENT,) if decoder.use_high_res_features else (None,)
    recipe = TraceRecipe(
        static_args={"multimask_output": (True, False), "repeat_image": (True, False), "high_res_features": high_res}
    )
    return ComponentSpec("mask_decoder", path, recipe, example)


class Sam2Adapter(Adapter):
    """``sam2.modeling.sam2_base.SAM2Base`` (SAM 2 and 2.1, Hiera T/S/B+/L) and
    bare SAM 2 image encoders."""

    name = "sam2"
    model_classes = (
        "sam2.modeling.sam2_base.SAM2Base",
        "sam2.modeling.backbones.image_encoder.ImageEncoder",
    )

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        if not hasattr(model, "image_encoder"):
            return [image_encoder_spec(model, "", 1024)]
        return [
            image_encoder_spec(model.image_encoder, "image_encoder", model.image_size),
            prompt_encoder_spec(model.sam_prompt_encoder, "sam_prompt_encoder"),
            mask_decoder_spec(model.sam_mask_decoder, "sam_mask_decoder", model.image_size, model.backbone_stride),
        ]

    def _qkv_layouts(self, module: nn.Module) -> Iterator[tuple[str, QKVLayout]]:
        if defining_class(module, _ATTENTION) and isinstance(getattr(module, "qkv", None), nn.Linear):
            width = module.qkv.out_features // 3
            yield "qkv", QKVLayout("blocked", module.num_heads, (width, width, width))

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, _ATTENTION):
            head_dim = projection_width(module) // module.num_heads
            return AttentionSite(path, "hiera", module.num_heads, head_dim, head_dim,
                                 getattr(parent, "window_size", None), False, parent_path)
        if defining_class(module, _DECODER_ATTENTION):
            return decoder_attention_site(path, module, parent_path)
        return None

    def encoder_features(self, output):
        # The decoder reads every FPN level the encoder keeps: the lowest-resolution
        # one is the image embedding, the others are its high-resolution features.
        return list(output["backbone_fpn"][::-1])

    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        layers = []
        for path, module in component_root.named_modules():
            if defining_class(module, _MLP) and defining_class(modules_parent(component_root, path), _BLOCK):
                layers += [f"{path}.layers.{i}" for i in range(len(module.layers) - 1)]
        return layers

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        dims = {}
        for path, module in component_root.named_modules():
            if defining_class(module, _HIERA):
                prefix = f"{path}." if path else ""
                dims.update({prefix + "pos_embed": 1, prefix + "pos_embed_window": 1})  # (1, C, h, w)
        return dims

    def resize_attention(self, module: nn.Module, kept_heads: list[int], kept_dims: list[int]) -> None:
        if not defining_class(module, _ATTENTION):
            return super().resize_attention(module, kept_heads, kept_dims)
        module.num_heads = len(kept_heads)

    def sync_width_attributes(self, component_root: nn.Module) -> None:
        for module in component_root.modules():
            if defining_class(module, _ATTENTION):
                module.dim, module.dim_out = query_projection(module).in_features, module.proj.out_features
            elif defining_class(module, _BLOCK):
                module.dim, module.dim_out = module.norm1.normalized_shape[0], module.mlp.layers[-1].out_features
            elif defining_class(module, _HIERA):
                ends = [module.blocks[i].dim_out for i in module.stage_ends]
                module.channel_list = ends[::-1]

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        # The object-score head gates whole masks; the sine encoding needs float32 arguments;
        # the decoder's high-resolution projections run outside its graph, in SAM2Base.forward_image,
        # on the encoder's float32 features.
        return (is_score_head(path) or path.rpartition(".")[2] in ("pred_obj_score_head", "conv_s0", "conv_s1")
                or defining_class(module, _POSITION_SINE) is not None)

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        trunk = getattr(component_root, "trunk", None)
        if trunk is None or not defining_class(trunk, _HIERA):
            return []
        stages, start = [], 0
        for end in trunk.stage_ends:
            # A stage's first block pools q (and widens) when the resolution changes.
            members = [i for i in range(start, end + 1)
                       if not trunk.blocks[i].q_stride and trunk.blocks[i].dim == trunk.blocks[i].dim_out]
            if members:
                stages.append(TokenStage(tuple(f"trunk.blocks.{i}" for i in members), tuple(members),
                                         tuple(int(trunk.blocks[i].window_size) for i in members)))
            start = end + 1
        return stages

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        if node.op != "call_function":
            return None
        hieradet = sys.modules["sam2.modeling.backbones.hieradet"]
        return {hieradet.window_partition: "partition", hieradet.window_unpartition: "unpartition"}.get(node.target)

    def _predictor(self, model: nn.Module) -> Predictor:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(model)
        # The upstream predictor assumes 1024-px inputs; follow the model's size.
        size = model.image_size
        predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        return Sam2Predictor(predictor)

    def deployment(self, model: nn.Module, multimask_output: bool = True) -> Deployment:
        if not hasattr(model, "sam_mask_decoder"):
            raise ValueError(f"a bare image encoder ({class_name(model)}) has no prompt decoder to deploy")
        names = ("image_embeddings",)
        if model.use_high_res_features_in_sam:
            names += ("high_res_feats_0", "high_res_feats_1")
        # SAM2Transforms: stretched to the square input, ImageNet normalisation on [0, 1] pixels.
        preprocessing = Preprocessing(model.image_size, "stretch", resample_uint8=False, antialias=True,
                                      mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                                      pad_point="always", upscale_masks=False)
        points = SamPointEmbedding(model.sam_prompt_encoder, model.sam_prompt_encoder.input_image_size)
        return Deployment(
            encoder=Sam2ImageEncoder(model),
            embedding_names=names,
            decoder=SamPromptDecoder(points, model.sam_mask_decoder,
                                     partial(_sam2_decode, multimask_output=multimask_output), len(names)),
            preprocessing=preprocessing,
            mask_input_size=4 * model.sam_prompt_encoder.image_embedding_size[0],
            low_res_clamp=32.0,
            prepare=partial(_warm_position_caches, model.image_encoder, model.image_size),
        )


class Sam2ImageEncoder(nn.Module):
    """What ``SAM2ImagePredictor.set_image`` keeps of an image: the lowest-resolution
    feature map (plus the no-memory embedding) and, when the decoder uses them,
    the two high-resolution maps after the decoder's projections."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.high_res = model.use_high_res_features_in_sam
        if self.high_res:
            self.conv_s0, self.conv_s1 = model.sam_mask_decoder.conv_s0, model.sam_mask_decoder.conv_s1
        self.no_mem_embed = model.no_mem_embed if model.directly_add_no_mem_embed else None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.image_encoder(image)["backbone_fpn"]
        embedding = features[-1]
        if self.no_mem_embed is not None:
            embedding = embedding + self.no_mem_embed.reshape(1, -1, 1, 1)
        if not self.high_res:
            return (embedding,)
        return embedding, self.conv_s0(features[0]), self.conv_s1(features[1])


def _sam2_decode(decoder: nn.Module, embeddings, dense_pe, sparse, dense, multimask_output: bool):
    high_res = list(embeddings[1:]) if decoder.use_high_res_features else None
    # repeat_image: one image's embeddings for a batch of prompts.
    low_res, iou, _, _ = decoder(image_embeddings=embeddings[0], image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=multimask_output,
                                 repeat_image=True, high_res_features=high_res)
    return low_res, iou


def _warm_position_caches(encoder: nn.Module, image_size: int) -> None:
    """Fill the sine position encoding's per-size cache for every feature level,
    which upstream fills on first use (on the GPU only, at construction): a cache
    filled while tracing would hold tracer values."""
    for module in encoder.modules():
        if any(class_name(c) == _POSITION_SINE for c in type(module).__mro__):
            for stride in (4, 8, 16, 32):
                module._pe(1, torch.device("cpu"), image_size // stride, image_size // stride)


def modules_parent(root: nn.Module, path: str) -> nn.Module | None:
    """The module that holds the submodule at ``path`` (``None`` for the root)."""
    if not path:
        return None
    parent = path.rpartition(".")[0]
    return root.get_submodule(parent) if parent else root


class Sam2Predictor(UpstreamPredictor):
    # SamPredictor's batched boxes do not apply to SAM2ImagePredictor: one by one.
    predict_boxes = Predictor.predict_boxes

    @property
    def image_embedding(self) -> torch.Tensor:
        return self._predictor._features["image_embed"]

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        return self._predictor._transforms(image)[None].to(self._predictor.device)

    def _predict(self, point_coords, point_labels, box, multimask_output):
        masks, scores, _ = self._predictor.predict(
            point_coords=point_coords, point_labels=point_labels, box=box, multimask_output=multimask_output
        )
        return masks.astype(bool), scores

    @torch.no_grad()
    def predict_points(self, points, multimask_output=True):
        # SAM2ImagePredictor._predict without its upscaling of every mask to the image.
        predictor = self._predictor
        if not predictor._is_image_set:
            raise RuntimeError("call set_image first")
        points = torch.as_tensor(points, dtype=torch.float).reshape(-1, 1, 2)
        labels = torch.ones(points.shape[:2], dtype=torch.int)
        _, coords, labels, _ = predictor._prep_prompts(points, labels, None, None, normalize_coords=True)
        model = predictor.model
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, scores, _, _ = model.sam_mask_decoder(
            image_embeddings=predictor._features["image_embed"][-1].unsqueeze(0),
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=coords.shape[0] > 1,
            high_res_features=[level[-1].unsqueeze(0) for level in predictor._features["high_res_feats"]],
        )
        return low_res, scores

    @torch.no_grad()
    def logits_to_image(self, low_res_logits):
        predictor = self._predictor
        return predictor._transforms.postprocess_masks(low_res_logits[:, None], predictor._orig_hw[-1])[:, 0]


register_adapter(Sam2Adapter())
