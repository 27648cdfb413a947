"""Hugging Face ``transformers`` SAM 2 image models: ``Sam2Model`` (Hiera trunk
and FPN neck), and the classes built on its prompt encoder and mask decoder.

Their prompt encoder, mask decoder and processor conventions are SAM 2's; the
vision encoders differ and are described by each adapter's
:meth:`HFSam2Adapter._vision_spec`.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import register_adapter
from .base import (PRESENT, Adapter, AttentionSite, ComponentSpec, Predictor, QKVLayout, ShapeCondition, TokenStage,
                   TraceRecipe, class_name, query_projection)
from .deploy import Deployment, Preprocessing, SamPointEmbedding, SamPromptDecoder
from .hf import _NOT_CAUSAL, _always, _device  # the same attention backend and conventions as SamModel's
from .sam import defining_class, is_score_head, projection_width

__all__ = ["HFEdgeTamAdapter", "HFSam2Adapter", "HFSam2ImageEncoder", "HFSam2PointEmbedding", "HFSam2Predictor",
           "HFSam3TrackerAdapter"]

_SAM2 = "transformers.models.sam2.modeling_sam2."
_SAM3 = "transformers.models.sam3.modeling_sam3."

def _hiera_body(self: nn.Module, pixel_values: torch.Tensor, return_dict: bool | None = None) -> tuple[Any, ...]:
    """``Sam2VisionModel.forward`` with its Hiera backbone's body inlined, without
    the output-recording decorators that torch.fx cannot trace; the captured
    encoder returns the same ``Sam2VisionEncoderOutput`` fields (``return_dict``,
    which ``Sam2Model`` passes, changes nothing)."""
    backbone = self.backbone
    hidden_states = backbone.patch_embed(pixel_values)
    hidden_states = hidden_states + backbone._get_pos_embed(hidden_states.shape[1:3])
    intermediate = ()
    for index, block in enumerate(backbone.blocks):
        hidden_states = block(hidden_states)
        if index in backbone.stage_ends:
            intermediate = intermediate + (hidden_states,)
    fpn_hidden_states, fpn_position_encoding = self.neck(intermediate)
    levels = self.num_feature_levels
    return hidden_states, fpn_hidden_states[-levels:][::-1], fpn_position_encoding[-levels:][::-1]


def _decoder_body(self: nn.Module, image_embeddings: torch.Tensor, image_positional_embeddings: torch.Tensor,
                  sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor, multimask_output: bool,
                  high_resolution_features: list[torch.Tensor], attention_similarity: torch.Tensor | None = None,
                  target_embedding: torch.Tensor | None = None) -> Any:
    """The mask decoder's ``forward`` without its ``**kwargs`` (attention backend
    options, which ``Sam2Model`` passes empty), which torch.fx cannot unpack."""
    return super(type(self), self).forward(image_embeddings, image_positional_embeddings, sparse_prompt_embeddings,
                                           dense_prompt_embeddings, multimask_output, high_resolution_features,
                                           attention_similarity, target_embedding)


def _vision_output(outputs: tuple[Any, ...], output_class: str) -> Any:
    last_hidden_state, fpn_hidden_states, fpn_position_encoding = outputs
    module, _, name = output_class.rpartition(".")
    return getattr(sys.modules[module], name)(last_hidden_state=last_hidden_state, fpn_hidden_states=fpn_hidden_states,
                        fpn_position_encoding=fpn_position_encoding)


class HFSam2Adapter(Adapter):
    """``transformers.Sam2Model`` (SAM 2 / 2.1 Hiera checkpoints in the Hub format)
    and its bare ``Sam2VisionModel``."""

    name = "hf_sam2"
    #: the ``transformers`` module that defines the family's classes
    module = "transformers.models.sam2.modeling_sam2"
    model_classes = (_SAM2 + "Sam2Model", _SAM2 + "Sam2VisionModel")
    #: what the vision encoder returns
    vision_output = _SAM2 + "Sam2VisionEncoderOutput"

    def _cls(self, name: str) -> str:
        return f"{self.module}.{name}"

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        if not hasattr(model, "vision_encoder"):
            return [self._vision_spec(model, "")]
        return [
            self._vision_spec(model.vision_encoder, "vision_encoder"),
            self._prompt_spec(model.prompt_encoder),
            self._decoder_spec(model),
        ]

    # -- components -------------------------------------------------------------
    def _vision_spec(self, encoder: nn.Module, path: str) -> ComponentSpec:
        size = encoder.config.backbone_config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        modeling = sys.modules[self.module]

        def example() -> dict[str, Any]:
            return {"pixel_values": torch.zeros(1, 3, size, size, device=_device(encoder))}

        recipe = TraceRecipe(
            trace_body=_hiera_body,
            output_wrapper=partial(_vision_output, output_class=self.vision_output),
            # Window (un)partitioning pads by shape-dependent amounts.
            autowrap_functions=(modeling.window_partition, modeling.window_unpartition),
            # The sine position encoding is cached per size; the window position
            # embedding is interpolated to a size read from the input.
            leaf_modules=(self._cls("Sam2SinePositionEmbedding"),),
            opaque_methods=((self._cls("Sam2HieraDetModel"), "_get_pos_embed"),),
            shape_conditions=(_NOT_CAUSAL,),
        )
        return ComponentSpec("image_encoder", path, recipe, example)

    def _prompt_spec(self, prompt_encoder: nn.Module) -> ComponentSpec:
        h, w = prompt_encoder.image_embedding_size

        def example() -> dict[str, Any]:
            device = _device(prompt_encoder)
            return {
                "input_points": torch.tensor([[[[10.0, 20.0], [30.0, 5.0]]]], device=device),
                "input_labels": torch.tensor([[[1, 0]]], device=device),
                "input_boxes": torch.tensor([[[5.0, 5.0, 40.0, 50.0]]], device=device),
                "input_masks": torch.zeros(1, 1, 4 * h, 4 * w, device=device),
            }

        positional = defining_class(prompt_encoder.shared_embedding, "PositionalEmbedding")
        recipe = TraceRecipe(
            leaf_modules=(positional,),  # normalises coordinates in place
            opaque_methods=((defining_class(prompt_encoder, "PromptEncoder"), "_embed_boxes"),),  # in-place writes
            static_args={
                "input_points": (None, PRESENT),
                "input_labels": (None, PRESENT),
                "input_boxes": (None, PRESENT),
                "input_masks": (None, PRESENT),
            },
        )
        return ComponentSpec("prompt_encoder", "prompt_encoder", recipe, example)

    def _decoder_spec(self, model: nn.Module) -> ComponentSpec:
        decoder = model.mask_decoder
        dim = decoder.hidden_size
        side = model.prompt_encoder.image_embedding_size[0]
        decoder_class = defining_class(decoder, "MaskDecoder")

        def example() -> dict[str, Any]:
            device = _device(decoder)
            return {
                "image_embeddings": torch.zeros(1, dim, side, side, device=device),
                "image_positional_embeddings": torch.zeros(1, dim, side, side, device=device),
                "sparse_prompt_embeddings": torch.zeros(1, 1, 3, dim, device=device),
                "dense_prompt_embeddings": torch.zeros(1, dim, side, side, device=device),
                "high_resolution_features": [torch.zeros(1, dim // 8, 4 * side, 4 * side, device=device),
                                             torch.zeros(1, dim // 4, 2 * side, 2 * side, device=device)],
            }

        recipe = TraceRecipe(
            trace_body=_decoder_body,
            static_args={"multimask_output": (True, False), "high_resolution_features": (PRESENT,),
                         "attention_similarity": (None,), "target_embedding": (None,)},
            # ``sparse_prompt_embeddings.shape[0] != 0``: Sam2Model always embeds a prompt
            # (a padding point when none is given).
            shape_conditions=(_NOT_CAUSAL, ShapeCondition(f"{decoder_class}.forward", _always, outcomes=(True,))),
        )
        return ComponentSpec("mask_decoder", "mask_decoder", recipe, example)

    # -- attention --------------------------------------------------------------
    def _qkv_layouts(self, module: nn.Module) -> Iterator[tuple[str, QKVLayout]]:
        if defining_class(module, "MultiScaleAttention") and isinstance(getattr(module, "qkv", None), nn.Linear):
            width = module.qkv.out_features // 3
            yield "qkv", QKVLayout("blocked", module.num_attention_heads, (width, width, width))

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, "MultiScaleAttention"):
            head_dim = projection_width(module) // module.num_attention_heads
            return AttentionSite(path, "hiera", module.num_attention_heads, head_dim, head_dim,
                                 getattr(parent, "window_size", None), False, parent_path)
        if defining_class(module, "Attention") and hasattr(module, "o_proj") and hasattr(module, "internal_dim"):
            heads = module.num_attention_heads
            head_dim = module.internal_dim // heads
            return AttentionSite(path, "decoder", heads, head_dim, head_dim, block=parent_path)
        return None

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        # The object-score head gates whole masks; the sine encoding needs float32 arguments;
        # the decoder's high-resolution projections are run by ``get_image_features`` on the
        # encoder's float32 maps, outside the decoder's graph.
        return (is_score_head(path) or path.rpartition(".")[2] in ("pred_obj_score_head", "conv_s0", "conv_s1")
                or defining_class(module, "SinePositionEmbedding") is not None)

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        backbone = getattr(component_root, "backbone", None)
        if backbone is None or not defining_class(backbone, "HieraDetModel"):
            return []
        stages, start = [], 0
        for end in backbone.stage_ends:
            # A stage's first block pools q (and widens) when the resolution changes.
            members = [i for i in range(start, end + 1)
                       if not backbone.blocks[i].query_stride and backbone.blocks[i].dim == backbone.blocks[i].dim_out]
            if members:
                stages.append(TokenStage(tuple(f"backbone.blocks.{i}" for i in members), tuple(members),
                                         tuple(int(backbone.blocks[i].window_size) for i in members)))
            start = end + 1
        return stages

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        if node.op != "call_function":
            return None
        modeling = sys.modules[self.module]
        return {modeling.window_partition: "partition", modeling.window_unpartition: "unpartition"}.get(node.target)

    def encoder_features(self, output):
        # Lowest resolution first: the image embedding, then the high-resolution maps.
        return list(output.fpn_hidden_states[::-1])

    # -- structural edits -------------------------------------------------------
    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        layers = []
        for path, module in component_root.named_modules():
            if defining_class(module, "MultiScaleBlock"):
                mlp = module.mlp
                layers += [f"{path}.mlp.proj_in"] + [f"{path}.mlp.layers.{i}" for i in range(len(mlp.layers))]
        return layers

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        backbone = getattr(component_root, "backbone", None)
        if backbone is None or not defining_class(backbone, "HieraDetModel"):
            return {}
        return {"backbone.pos_embed": 1, "backbone.pos_embed_window": 1}  # (1, C, h, w)

    def resize_attention(self, module: nn.Module, kept_heads: list[int], kept_dims: list[int]) -> None:
        if not defining_class(module, "MultiScaleAttention"):
            return super().resize_attention(module, kept_heads, kept_dims)
        module.num_attention_heads = len(kept_heads)

    def sync_width_attributes(self, component_root: nn.Module) -> None:
        for module in component_root.modules():
            if defining_class(module, "MultiScaleAttention"):
                module.dim, module.dim_out = query_projection(module).in_features, module.proj.out_features
            elif defining_class(module, "MultiScaleBlock"):
                module.dim, module.dim_out = module.layer_norm1.normalized_shape[0], module.mlp.proj_out.out_features

    # -- running ----------------------------------------------------------------
    def _predictor(self, model: nn.Module) -> Predictor:
        return HFSam2Predictor(model)

    def _image_size(self, model: nn.Module) -> int:
        return model.prompt_encoder.input_image_size

    def deployment(self, model: nn.Module, multimask_output: bool = True) -> Deployment:
        if not hasattr(model, "mask_decoder"):
            raise ValueError(f"a bare vision encoder ({class_name(model)}) has no prompt decoder to deploy")
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        # Sam2ImageProcessor: stretched to the square input on the 8-bit image, rescaled,
        # normalised; masks resized straight to the image. The prompt encoder adds the
        # padding point after the points, or after the box corners: always.
        preprocessing = Preprocessing(self._image_size(model), "stretch", resample_uint8=True, antialias=True,
                                      mean=tuple(255.0 * m for m in IMAGENET_DEFAULT_MEAN),
                                      std=tuple(255.0 * s for s in IMAGENET_DEFAULT_STD),
                                      pad_point="always", upscale_masks=False)
        names = ("image_embeddings", "high_res_feats_0", "high_res_feats_1")
        return Deployment(
            encoder=HFSam2ImageEncoder(model),
            embedding_names=names,
            decoder=SamPromptDecoder(HFSam2PointEmbedding(model), model.mask_decoder,
                                     partial(_hf_sam2_decode, multimask_output=multimask_output), len(names)),
            preprocessing=preprocessing,
            mask_input_size=model.prompt_encoder.mask_input_size[0],
        )


def _sam3_vision_body(self: nn.Module, pixel_values: torch.Tensor, return_dict: bool | None = None) -> tuple[Any, ...]:
    """``Sam3VisionModel.forward`` with its ViT backbone's body inlined, without the
    output-recording decorators that torch.fx cannot trace."""
    backbone = self.backbone
    patch = backbone.config.patch_size
    hidden_states = backbone.embeddings(pixel_values)
    batch, height, width = hidden_states.shape[0], pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    hidden_states = backbone.layer_norm(hidden_states.view(batch, height, width, hidden_states.shape[-1]))
    for layer in backbone.layers:
        hidden_states = layer(hidden_states)
    spatial = hidden_states.permute(0, 3, 1, 2)
    fpn_hidden_states, fpn_position_encoding = self.neck(spatial)
    return hidden_states.flatten(1, 2), fpn_hidden_states, fpn_position_encoding


class HFSam3TrackerAdapter(HFSam2Adapter):
    """``transformers.Sam3TrackerModel``: SAM 2's prompt encoder and decoder on SAM 3's
    vision backbone, a ViT with 2-D rotary position encodings (RoPE) in every
    attention, windowed except in its global blocks, and a four-level FPN."""

    name = "hf_sam3_tracker"
    module = "transformers.models.sam3_tracker.modeling_sam3_tracker"
    model_classes = (module + ".Sam3TrackerModel",)
    vision_output = _SAM3 + "Sam3VisionEncoderOutput"

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        return [self._vision_spec(model.vision_encoder, "vision_encoder"), self._prompt_spec(model.prompt_encoder),
                self._decoder_spec(model)]

    def _vision_spec(self, encoder: nn.Module, path: str) -> ComponentSpec:
        size = encoder.config.backbone_config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        modeling = sys.modules[_SAM3.rstrip(".")]

        def example() -> dict[str, Any]:
            return {"pixel_values": torch.zeros(1, 3, size, size, device=_device(encoder))}

        recipe = TraceRecipe(
            trace_body=_sam3_vision_body,
            output_wrapper=partial(_vision_output, output_class=self.vision_output),
            # Window (un)partitioning pads by shape-dependent amounts; the RoPE pair
            # rotation unpacks a shape.
            autowrap_functions=(modeling.window_partition, modeling.window_unpartition, modeling.rotate_pairwise),
            # The rotary tables are computed from each block's position buffer: kept as a
            # module call, so that they follow the buffer (and no traced constant is made).
            leaf_modules=(_SAM3 + "Sam3SinePositionEmbedding", _SAM3 + "Sam3ViTRotaryEmbedding"),
            # Tiles the pretraining position embedding to a size read from the input.
            opaque_methods=((_SAM3 + "Sam3ViTEmbeddings", "_tile_position_embeddings"),),
            shape_conditions=(_NOT_CAUSAL,),
        )
        return ComponentSpec("image_encoder", path, recipe, example)

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, "ViTRoPEAttention"):
            heads = module.num_attention_heads
            head_dim = query_projection_width(module) // heads
            return AttentionSite(path, "rope", heads, head_dim, head_dim, getattr(parent, "window_size", None),
                                 False, parent_path)
        return super()._attention_site(path, module, parent, parent_path)

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        # Each block's rotary table is fixed to its window (or the whole map): blocks
        # cannot run on a map of clusters.
        return []

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        return None

    def encoder_features(self, output):
        # get_image_embeddings keeps the first three levels (highest resolution first).
        return list(output.fpn_hidden_states[:3][::-1])

    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        return [f"{path}.fc1" for path, module in component_root.named_modules()
                if defining_class(module, _SAM3 + "Sam3MLP") and path.startswith("backbone.")]

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        return {"backbone.embeddings.position_embeddings": 2}  # (1, N, C)

    def resize_attention(self, module: nn.Module, kept_heads: list[int], kept_dims: list[int]) -> None:
        if not defining_class(module, "ViTRoPEAttention"):
            return super().resize_attention(module, kept_heads, kept_dims)
        if len(kept_dims) != module.head_dim:
            raise ValueError("RoPE rotates pairs of dims with a fixed table: per-head dims cannot be pruned")
        module.num_attention_heads = len(kept_heads)

    def sync_width_attributes(self, component_root: nn.Module) -> None:
        return None

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        # The rotary tables hold positions that bfloat16 cannot represent (upstream keeps them float32).
        return super()._precision_island(path, module) or defining_class(module, "RotaryEmbedding") is not None


def _repvit_body(self: nn.Module, pixel_values: torch.Tensor, return_dict: bool | None = None) -> tuple[Any, ...]:
    """``EdgeTamVisionModel.forward`` with its timm backbone called directly (the
    wrapper's output bookkeeping aside), without the output-recording decorators."""
    features = self.backbone.timm_model(pixel_values)
    intermediate = [feature.permute(0, 2, 3, 1) for feature in features]
    fpn_hidden_states, fpn_position_encoding = self.neck(intermediate)
    levels = self.num_feature_levels
    return intermediate[-1], fpn_hidden_states[-levels:][::-1], fpn_position_encoding[-levels:][::-1]


class HFEdgeTamAdapter(HFSam2Adapter):
    """``transformers.EdgeTamModel``: SAM 2's prompt encoder and decoder on a RepViT
    backbone (timm's ``repvit_m1``, convolutions only: no attention, no token map)
    with SAM 2's FPN neck."""

    name = "hf_edgetam"
    module = "transformers.models.edgetam.modeling_edgetam"
    model_classes = (module + ".EdgeTamModel",)
    vision_output = module + ".EdgeTamVisionEncoderOutput"

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        return [self._vision_spec(model.vision_encoder, "vision_encoder"), self._prompt_spec(model.prompt_encoder),
                self._decoder_spec(model)]

    def _vision_spec(self, encoder: nn.Module, path: str) -> ComponentSpec:
        size = 16 * encoder.config.backbone_feature_sizes[-1][0]

        def example() -> dict[str, Any]:
            return {"pixel_values": torch.zeros(1, 3, size, size, device=_device(encoder))}

        recipe = TraceRecipe(trace_body=_repvit_body,
                             output_wrapper=partial(_vision_output, output_class=self.vision_output),
                             leaf_modules=(self.module + ".EdgeTamSinePositionEmbedding",))
        return ComponentSpec("image_encoder", path, recipe, example)

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        return []

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        return None

    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        return []

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        return {}


def query_projection_width(attention: nn.Module) -> int:
    """Query width of an attention with separate ``q_proj`` (or split ``q``) projections."""
    query = query_projection(attention) or attention.q_proj
    return query.out_features


class HFSam2ImageEncoder(nn.Module):
    """What ``Sam2Model.get_image_embeddings`` returns, as ``NCHW`` maps: the
    lowest-resolution feature map plus the no-memory embedding, then the two
    high-resolution maps after the decoder's projections."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_encoder = model.vision_encoder
        self.conv_s0, self.conv_s1 = model.mask_decoder.conv_s0, model.mask_decoder.conv_s1
        self.no_memory_embedding = model.no_memory_embedding

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # As get_image_embeddings: the no-memory embedding goes to the last level, and the
        # levels are then zipped with the three backbone feature sizes (SAM 3's fourth,
        # lowest level is dropped, with it).
        features = list(self.vision_encoder(image).fpn_hidden_states)
        features[-1] = features[-1] + self.no_memory_embedding.reshape(1, -1, 1, 1)
        return features[2], self.conv_s0(features[0]), self.conv_s1(features[1])


class HFSam2PointEmbedding(SamPointEmbedding):
    """SAM-convention prompt embedding with the weights of a ``Sam2PromptEncoder``
    (its ``_embed_points`` and ``_embed_boxes`` formulas: box corners are points
    labelled 2 and 3)."""

    def __init__(self, model: nn.Module) -> None:
        size = model.prompt_encoder.input_image_size
        super().__init__(model.prompt_encoder, (size, size))
        self._image_wide_pe = model.get_image_wide_positional_embeddings

    def fourier(self, coords: torch.Tensor) -> torch.Tensor:
        return self.prompt_encoder.shared_embedding(coords)

    def label_embeddings(self) -> list[nn.Module]:
        weights = self.prompt_encoder.point_embed.weight
        return [_Row(weights, i) for i in range(weights.shape[0])]

    def mask_embedding(self, mask_input: torch.Tensor) -> torch.Tensor:
        return self.prompt_encoder.mask_embed(mask_input)

    def dense_pe(self) -> torch.Tensor:
        return self._image_wide_pe()


class _Row:
    """One row of an embedding table, seen as an ``nn.Embedding(1, C)``'s ``weight``."""

    def __init__(self, table: torch.Tensor, index: int) -> None:
        self.weight = table[index]


def _hf_sam2_decode(decoder: nn.Module, embeddings, dense_pe, sparse, dense, multimask_output: bool):
    # A batch of prompts is a batch of (equal) images with one point batch each.
    count = sparse.shape[0]
    image, *high_res = (e.expand(count, -1, -1, -1) for e in embeddings)
    low_res, iou = decoder(image_embeddings=image, image_positional_embeddings=dense_pe,
                           sparse_prompt_embeddings=sparse[:, None], dense_prompt_embeddings=dense,
                           multimask_output=multimask_output, high_resolution_features=high_res)[:2]
    return low_res[:, 0], iou[:, 0]


class HFSam2Predictor(Predictor):
    """The ``Sam2Processor`` + ``Sam2Model`` recipe from the transformers docs:
    ``get_image_embeddings`` once, then the model on the embeddings per prompt."""

    def __init__(self, model: nn.Module, size: int | None = None) -> None:
        from transformers import Sam2ImageProcessor, Sam2Processor

        self.model = model
        self.size = size or model.prompt_encoder.input_image_size
        processor = Sam2ImageProcessor(size={"height": self.size, "width": self.size},
                                       mask_size={"height": self.size // 4, "width": self.size // 4})
        self.processor = Sam2Processor(image_processor=processor, target_size=self.size)
        self._embeddings: list[torch.Tensor] | None = None

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"].to(_device(self.model))

    @torch.no_grad()
    def _set_image(self, image: np.ndarray) -> None:
        inputs = self.processor(images=image, return_tensors="pt")
        self._original = inputs["original_sizes"]
        self._embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(_device(self.model)))

    @property
    def image_embedding(self) -> torch.Tensor:
        if self._embeddings is None:
            raise RuntimeError("call set_image first")
        return self._embeddings[-1]

    @torch.no_grad()
    def _predict(self, point_coords, point_labels, box, multimask_output):
        prompts: dict[str, Any] = {}
        if point_coords is not None:
            prompts["input_points"] = [[np.asarray(point_coords, np.float32).tolist()]]
            prompts["input_labels"] = [[np.asarray(point_labels).astype(int).tolist()]]
        if box is not None:
            prompts["input_boxes"] = [[np.asarray(box, np.float32).tolist()]]
        inputs = self.processor(original_sizes=self._original, return_tensors="pt", **prompts)
        device = self.image_embedding.device
        kwargs = {k: inputs[k].to(device) for k in ("input_points", "input_labels", "input_boxes") if k in inputs}
        out = self._forward(image_embeddings=self._embeddings, multimask_output=multimask_output, **kwargs)
        masks = self.processor.post_process_masks(out.pred_masks.cpu(), self._original)[0]
        return masks[0].numpy().astype(bool), out.iou_scores[0, 0].float().cpu().numpy()

    @torch.no_grad()
    def predict_points(self, points, multimask_output=True):
        device = self.image_embedding.device
        height, width = (int(v) for v in self._original[0])
        scale = torch.tensor([self.size / width, self.size / height], device=device)
        coords = torch.as_tensor(points, dtype=torch.float32, device=device).reshape(1, -1, 1, 2) * scale
        labels = torch.ones(coords.shape[:3], dtype=torch.long, device=device)
        out = self._forward(image_embeddings=self._embeddings, input_points=coords, input_labels=labels,
                            multimask_output=multimask_output)
        return out.pred_masks[0], out.iou_scores[0]

    def _forward(self, **kwargs: Any) -> Any:
        """The model's forward on image embeddings and prompts."""
        return self.model(**kwargs)

    @torch.no_grad()
    def logits_to_image(self, low_res_logits):
        resized = self.processor.post_process_masks([low_res_logits[:, None]], self._original, binarize=False)
        return resized[0][:, 0]


register_adapter(HFSam2Adapter())
register_adapter(HFSam3TrackerAdapter())
register_adapter(HFEdgeTamAdapter())
