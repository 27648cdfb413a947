"""SAM 2 / SAM 2.1 (``sam2``): Hiera trunk + FPN neck, prompt encoder, mask decoder."""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch
from torch import nn

from . import register_adapter
from .base import PRESENT, Adapter, AttentionSite, ComponentSpec, Predictor, QKVLayout, TokenStage, TraceRecipe
from .sam import (
    UpstreamPredictor,
    decoder_attention_site,
    defining_class,
    is_score_head,
    projection_width,
    prompt_encoder_spec,
)

__all__ = ["Sam2Adapter", "Sam2Predictor"]

_HIERA = "sam2.modeling.backbones.hieradet.Hiera"
_ATTENTION = "sam2.modeling.backbones.hieradet.MultiScaleAttention"
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

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        # The object-score head gates whole masks; the sine encoding needs float32 arguments.
        return (is_score_head(path) or path.rpartition(".")[2] == "pred_obj_score_head"
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

    def predictor(self, model: nn.Module) -> Predictor:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(model)
        # The upstream predictor assumes 1024-px inputs; follow the model's size.
        size = model.image_size
        predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        return Sam2Predictor(predictor)


class Sam2Predictor(UpstreamPredictor):
    @property
    def image_embedding(self) -> torch.Tensor:
        return self._predictor._features["image_embed"]

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
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
