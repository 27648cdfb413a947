"""Hugging Face ``transformers.SamModel`` (SAM, SlimSAM and MedSAM checkpoints
in the Hub format) and ``SamHQModel`` (HQ-SAM), which shares its layout."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from . import register_adapter
from .base import (
    PRESENT,
    Adapter,
    AttentionSite,
    ComponentSpec,
    Predictor,
    QKVLayout,
    ShapeCondition,
    TokenStage,
    TraceRecipe,
)
from .deploy import Deployment, EncoderOutputs, Preprocessing, SamPointEmbedding, SamPromptDecoder
from .sam import defining_class, is_score_head, plain_vit_stage, projection_width, slice_parameter

__all__ = ["HFPointEmbedding", "HFSamAdapter", "HFSamHQAdapter", "HFSamHQPredictor", "HFSamPredictor"]

_PREFIX = "transformers.models.sam.modeling_sam."
_HQ_PREFIX = "transformers.models.sam_hq.modeling_sam_hq."
_SDPA = "transformers.integrations.sdpa_attention.sdpa_attention_forward"


def _always(arguments: Any) -> bool:
    return True


# The attention backend asks ``query_len > 1`` to decide causality; SAM's
# attentions are never causal and always see several tokens.
_NOT_CAUSAL = ShapeCondition(_SDPA, _always, outcomes=(True,))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _vision_body(self: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``SamVisionEncoder.forward`` without its output-recording decorators,
    which torch.fx cannot trace; the captured encoder returns the same
    ``last_hidden_state``."""
    hidden_states = self.patch_embed(pixel_values)
    if self.pos_embed is not None:
        hidden_states = hidden_states + self.pos_embed
    for layer in self.layers:
        hidden_states = layer(hidden_states)
    return self.neck(hidden_states)


def _vision_output(last_hidden_state: torch.Tensor) -> Any:
    from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

    return SamVisionEncoderOutput(last_hidden_state=last_hidden_state)


def _hq_vision_body(self: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``SamHQVisionEncoder.forward`` without its output-recording decorators: the
    neck's embedding and the outputs of the global-attention blocks, which the
    HQ decoder fuses."""
    hidden_states = self.patch_embed(pixel_values)
    if self.pos_embed is not None:
        hidden_states = hidden_states + self.pos_embed
    intermediate_embeddings = []
    for layer in self.layers:
        hidden_states = layer(hidden_states)
        if layer.window_size == 0:
            intermediate_embeddings.append(hidden_states)
    return self.neck(hidden_states), intermediate_embeddings


def _hq_vision_output(outputs: tuple[torch.Tensor, list[torch.Tensor]]) -> Any:
    from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionEncoderOutput

    return SamHQVisionEncoderOutput(last_hidden_state=outputs[0], intermediate_embeddings=list(outputs[1]))


def _hq_decoder_body(self: nn.Module, image_embeddings: torch.Tensor, image_positional_embeddings: torch.Tensor,
                     sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                     multimask_output: bool, hq_token_only: bool, intermediate_embeddings: Any = None,
                     attention_similarity: torch.Tensor | None = None,
                     target_embedding: torch.Tensor | None = None) -> Any:
    """``SamHQMaskDecoder.forward`` given a Python list holding the first
    intermediate embedding (the only one it reads), so that its ``len`` check is
    answered while tracing."""
    early = None if intermediate_embeddings is None else [intermediate_embeddings[0]]
    return super(type(self), self).forward(image_embeddings, image_positional_embeddings, sparse_prompt_embeddings,
                                           dense_prompt_embeddings, multimask_output, hq_token_only, early,
                                           attention_similarity, target_embedding)


def _single_image(arguments: Mapping[str, Any]) -> bool:
    return arguments["image_embeddings"].shape[0] == 1


class HFSamAdapter(Adapter):
    name = "hf_sam"
    #: the family's class names start with this
    prefix = _PREFIX + "Sam"
    model_classes = (_PREFIX + "SamModel", _PREFIX + "SamVisionEncoder")

    _vision_body = staticmethod(_vision_body)
    _vision_output = staticmethod(_vision_output)

    def _cls(self, name: str) -> str:
        return self.prefix + name

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        if not hasattr(model, "vision_encoder"):
            return [self._vision_spec(model, "")]
        return [
            self._vision_spec(model.vision_encoder, "vision_encoder"),
            self._prompt_spec(model.prompt_encoder),
            self._decoder_spec(model),
        ]

    def _vision_spec(self, encoder: nn.Module, path: str) -> ComponentSpec:
        size = encoder.config.image_size

        def example() -> dict[str, Any]:
            return {"pixel_values": torch.zeros(1, 3, size, size, device=_device(encoder))}

        recipe = TraceRecipe(
            trace_body=self._vision_body,
            output_wrapper=self._vision_output,
            # These methods branch on shapes (padding, rel-pos interpolation).
            opaque_methods=(
                (self._cls("VisionLayer"), "window_partition"),
                (self._cls("VisionLayer"), "window_unpartition"),
                (self._cls("VisionAttention"), "get_rel_pos"),
            ),
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

        recipe = TraceRecipe(
            leaf_modules=(self._cls("PositionalEmbedding"),),  # normalises coordinates in place
            opaque_methods=((self._cls("PromptEncoder"), "_embed_boxes"),),
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
        dim = model.config.mask_decoder_config.hidden_size
        side = model.config.prompt_encoder_config.image_embedding_size

        def example() -> dict[str, Any]:
            device = _device(decoder)
            return {
                "image_embeddings": torch.zeros(1, dim, side, side, device=device),
                "image_positional_embeddings": torch.zeros(1, dim, side, side, device=device),
                "sparse_prompt_embeddings": torch.zeros(1, 1, 3, dim, device=device),
                "dense_prompt_embeddings": torch.zeros(1, dim, side, side, device=device),
                **self._decoder_example(model),
            }

        return ComponentSpec("mask_decoder", "mask_decoder", self._decoder_recipe(decoder), example)

    def _decoder_example(self, model: nn.Module) -> dict[str, Any]:
        """Example inputs the family's decoder takes beyond SamModel's."""
        return {}

    def _decoder_recipe(self, decoder: nn.Module) -> TraceRecipe:
        return TraceRecipe(
            static_args={"multimask_output": (True, False), "attention_similarity": (None,), "target_embedding": (None,)},
            shape_conditions=(_NOT_CAUSAL,),
        )

    def _qkv_layouts(self, module: nn.Module) -> Iterator[tuple[str, QKVLayout]]:
        if defining_class(module, self._cls("VisionAttention")) and isinstance(getattr(module, "qkv", None), nn.Linear):
            width = module.qkv.out_features // 3
            yield "qkv", QKVLayout("blocked", module.num_attention_heads, (width, width, width))

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, self._cls("VisionAttention")):
            heads = module.num_attention_heads
            head_dim = projection_width(module) // heads
            tables = ("rel_pos_h", "rel_pos_w") if module.use_rel_pos else ()
            return AttentionSite(path, "hf_vit", heads, head_dim, head_dim, getattr(parent, "window_size", None),
                                 bool(module.use_rel_pos), parent_path, tables)
        if defining_class(module, self._cls("Attention")):
            head_dim = module.internal_dim // module.num_attention_heads
            return AttentionSite(path, "decoder", module.num_attention_heads, head_dim, head_dim, block=parent_path)
        return None

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        return is_score_head(path)

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        if not defining_class(component_root, self._cls("VisionEncoder")):
            return []
        return [plain_vit_stage("layers", component_root.layers)]

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        # SamVisionLayer's window methods are captured as opaque method calls.
        if node.op != "call_module":
            return None
        method = getattr(component_root.get_submodule(node.target), "method", None)
        return {"window_partition": "partition", "window_unpartition": "unpartition"}.get(method)

    def _predictor(self, model: nn.Module) -> Predictor:
        return HFSamPredictor(model)

    #: the encoder outputs a deployed decoder takes, and how to pick them
    _embedding_names: tuple[str, ...] = ("image_embeddings",)

    @staticmethod
    def _deployed_embeddings(out: Any) -> tuple[torch.Tensor, ...]:
        return (out.last_hidden_state,)

    @staticmethod
    def _decode(decoder: nn.Module, embeddings, dense_pe, sparse, dense, multimask_output: bool):
        # Hugging Face's decoder takes a point-batch dimension, and adds the dense embeddings
        # to the image's before repeating them per point batch: a batch of prompts is a batch
        # of (equal) images with one point batch each.
        image = embeddings[0].expand(sparse.shape[0], -1, -1, -1)
        low_res, iou = decoder(image_embeddings=image, image_positional_embeddings=dense_pe,
                               sparse_prompt_embeddings=sparse[:, None], dense_prompt_embeddings=dense,
                               multimask_output=multimask_output)[:2]
        return low_res[:, 0], iou[:, 0]

    def encoder_features(self, output):
        return [output.last_hidden_state]

    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        return [f"{path}.lin1" if path else "lin1" for path, module in component_root.named_modules()
                if defining_class(module, self._cls("MLPBlock"))]

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        return {"pos_embed": 3} if getattr(component_root, "pos_embed", None) is not None else {}  # (1, H, W, C)

    def resize_attention(self, module: nn.Module, kept_heads: list[int], kept_dims: list[int]) -> None:
        if not defining_class(module, self._cls("VisionAttention")):
            return super().resize_attention(module, kept_heads, kept_dims)
        module.num_attention_heads = len(kept_heads)
        if module.use_rel_pos:
            slice_parameter(module, "rel_pos_h", 1, kept_dims)
            slice_parameter(module, "rel_pos_w", 1, kept_dims)

    def deployment(self, model: nn.Module, multimask_output: bool = True) -> Deployment:
        if not hasattr(model, "mask_decoder"):
            raise ValueError("a bare SamVisionEncoder has no prompt decoder to deploy")
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        # SamImageProcessor: longest edge resized on the 8-bit image, rescaled, normalised, padded.
        preprocessing = Preprocessing(model.config.vision_config.image_size, "longest_side", resample_uint8=True,
                                      antialias=True, mean=tuple(255.0 * m for m in IMAGENET_DEFAULT_MEAN),
                                      std=tuple(255.0 * s for s in IMAGENET_DEFAULT_STD))
        names = self._embedding_names
        return Deployment(
            encoder=EncoderOutputs(model.vision_encoder, self._deployed_embeddings),
            embedding_names=names,
            decoder=SamPromptDecoder(HFPointEmbedding(model), model.mask_decoder,
                                     partial(self._decode, multimask_output=multimask_output), len(names)),
            preprocessing=preprocessing,
            mask_input_size=4 * model.config.prompt_encoder_config.image_embedding_size,
        )


class HFPointEmbedding(SamPointEmbedding):
    """SAM-convention prompt embedding with the weights of a ``SamPromptEncoder``
    (the formulas of its ``_embed_points``, ``_embed_boxes`` and mask embedding)."""

    def __init__(self, model: nn.Module) -> None:
        size = model.prompt_encoder.input_image_size
        super().__init__(model.prompt_encoder, (size, size))
        self.shared_image_embedding = model.shared_image_embedding
        self._image_wide_pe = model.get_image_wide_positional_embeddings

    def fourier(self, coords: torch.Tensor) -> torch.Tensor:
        return self.prompt_encoder.shared_embedding(coords)

    def label_embeddings(self) -> nn.ModuleList:
        return self.prompt_encoder.point_embed

    def mask_embedding(self, mask_input: torch.Tensor) -> torch.Tensor:
        return self.prompt_encoder.mask_embed(mask_input)

    def dense_pe(self) -> torch.Tensor:
        return self._image_wide_pe()


class HFSamPredictor(Predictor):
    """The ``SamProcessor`` + ``SamModel`` recipe from the transformers docs."""

    #: the family's processor class in ``transformers``
    processor_class = "SamProcessor"

    def __init__(self, model: nn.Module) -> None:
        import transformers
        from transformers import SamImageProcessor

        self.model = model
        self.size = model.config.vision_config.image_size
        processor = SamImageProcessor(
            size={"longest_edge": self.size}, pad_size={"height": self.size, "width": self.size}
        )
        self.processor = getattr(transformers, self.processor_class)(image_processor=processor)
        self._embeddings: dict[str, Any] | None = None

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"].to(_device(self.model))

    @torch.no_grad()
    def _set_image(self, image: np.ndarray) -> None:
        inputs = self.processor(images=image, return_tensors="pt")
        self._original = inputs["original_sizes"]
        self._reshaped = inputs["reshaped_input_sizes"]
        self._embeddings = self._embed(inputs["pixel_values"].to(_device(self.model)))

    def _embed(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        """What the model takes instead of ``pixel_values``, by argument name."""
        return {"image_embeddings": self.model.get_image_embeddings(pixel_values)}

    @property
    def image_embedding(self) -> torch.Tensor:
        if self._embeddings is None:
            raise RuntimeError("call set_image first")
        return self._embeddings["image_embeddings"]

    def _scale(self) -> np.ndarray:
        h, w = (int(v) for v in self._original[0])
        new_h, new_w = (int(v) for v in self._reshaped[0])
        return np.array([new_w / w, new_h / h], dtype=np.float32)

    @torch.no_grad()
    def _predict(self, point_coords, point_labels, box, multimask_output):
        device = self.image_embedding.device
        scale = self._scale()
        kwargs: dict[str, Any] = {}
        if point_coords is not None:
            coords = np.asarray(point_coords, np.float32) * scale
            kwargs["input_points"] = torch.as_tensor(coords, device=device)[None, None]
            kwargs["input_labels"] = torch.as_tensor(np.asarray(point_labels), dtype=torch.long, device=device)[None, None]
        if box is not None:
            corners = np.asarray(box, np.float32).reshape(2, 2) * scale
            kwargs["input_boxes"] = torch.as_tensor(corners.reshape(1, 1, 4), device=device)
        out = self.model(**self._embeddings, multimask_output=multimask_output, **kwargs)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), self._original, self._reshaped
        )[0]
        return masks[0].numpy().astype(bool), out.iou_scores[0, 0].cpu().numpy()

    @torch.no_grad()
    def predict_points(self, points, multimask_output=True):
        device = self.image_embedding.device
        scale = torch.as_tensor(self._scale(), device=device)
        coords = torch.as_tensor(points, dtype=torch.float32, device=device).reshape(1, -1, 1, 2) * scale
        labels = torch.ones(coords.shape[:3], dtype=torch.long, device=device)
        out = self.model(**self._embeddings, input_points=coords, input_labels=labels,
                         multimask_output=multimask_output)
        return out.pred_masks[0], out.iou_scores[0]

    @torch.no_grad()
    def logits_to_image(self, low_res_logits):
        resized = self.processor.image_processor.post_process_masks(
            [low_res_logits[:, None]], self._original, self._reshaped, binarize=False
        )
        return resized[0][:, 0]


class HFSamHQAdapter(HFSamAdapter):
    """``transformers.SamHQModel`` (HQ-SAM checkpoints in the Hub format): SamModel's
    layout, and a decoder that also reads the first global block's output."""

    name = "hf_sam_hq"
    prefix = _HQ_PREFIX + "SamHQ"
    model_classes = (_HQ_PREFIX + "SamHQModel", _HQ_PREFIX + "SamHQVisionEncoder")
    _vision_body = staticmethod(_hq_vision_body)
    _vision_output = staticmethod(_hq_vision_output)
    _embedding_names = ("image_embeddings", "early_vit_features")

    def _decoder_recipe(self, decoder: nn.Module) -> TraceRecipe:
        return TraceRecipe(
            trace_body=_hq_decoder_body,
            static_args={"multimask_output": (True, False), "hq_token_only": (False, True),
                         "intermediate_embeddings": (PRESENT,), "attention_similarity": (None,),
                         "target_embedding": (None,)},
            # One image's HQ features are repeated for every prompt; a batch of images
            # takes one prompt per image (what a deployed decoder sends).
            shape_conditions=(_NOT_CAUSAL, ShapeCondition(self._cls("MaskDecoder.forward"), _single_image)),
        )

    def _decoder_example(self, model: nn.Module) -> dict[str, Any]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return {"intermediate_embeddings": [torch.zeros(1, side, side, vision.hidden_size,
                                                        device=_device(model.mask_decoder))]}

    def _predictor(self, model: nn.Module) -> Predictor:
        return HFSamHQPredictor(model)

    @staticmethod
    def _deployed_embeddings(out: Any) -> tuple[torch.Tensor, ...]:
        return out.last_hidden_state, out.intermediate_embeddings[0]

    @staticmethod
    def _decode(decoder: nn.Module, embeddings, dense_pe, sparse, dense, multimask_output: bool):
        # As SamModel's: a batch of (equal) images with one prompt each.
        image, early = (e.expand(sparse.shape[0], -1, -1, -1) for e in embeddings)
        low_res, iou = decoder(image_embeddings=image, image_positional_embeddings=dense_pe,
                               sparse_prompt_embeddings=sparse[:, None], dense_prompt_embeddings=dense,
                               multimask_output=multimask_output, hq_token_only=False,
                               intermediate_embeddings=[early])[:2]
        return low_res[:, 0], iou[:, 0]


class HFSamHQPredictor(HFSamPredictor):
    """The ``SamHQProcessor`` + ``SamHQModel`` recipe: the image embedding and the
    intermediate embeddings kept from ``get_image_embeddings``."""

    processor_class = "SamHQProcessor"

    def _embed(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        embedding, intermediate = self.model.get_image_embeddings(pixel_values)
        return {"image_embeddings": embedding, "intermediate_embeddings": intermediate}


register_adapter(HFSamAdapter())
register_adapter(HFSamHQAdapter())
