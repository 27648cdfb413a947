"""Hugging Face ``transformers`` video classes: ``Sam2VideoModel``,
``Sam3TrackerVideoModel`` and ``EdgeTamVideoModel``.

Each is its image class's vision encoder, prompt encoder and mask decoder plus
SAM 2's memory: per frame, the memory attention (RoPE self-attention over the
frame's tokens, RoPE cross-attention to the memories of up to 7 frames and to
object-pointer tokens) and, after the masks, the memory encoder (EdgeTAM then
resamples each memory with a perceiver, the ``spatial_perceiver``). The
adapters capture these components, so that the processor's inference session
(``init_video_session``, ``add_inputs_to_inference_session``,
``model(inference_session=..., frame_idx=...)``,
``propagate_in_video_iterator``) runs unchanged on an optimized model: it calls
the same submodules with the same arguments.

The memory length and the pointer count are graph inputs (symbolic sizes), so
one graph serves every frame. Upstream's rotary helpers branch on key counts;
each is recorded as one call, computed in float32 as upstream does.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import find_adapter, register_adapter
from .base import PRESENT, AttentionSite, ComponentSpec, TraceRecipe
from .hf import _NOT_CAUSAL, _device
from .hf_sam2 import HFEdgeTamAdapter, HFSam2Adapter, HFSam2Predictor, HFSam3TrackerAdapter
from .sam import defining_class

__all__ = ["HFEdgeTamVideoAdapter", "HFSam2VideoAdapter", "HFSam2VideoPredictor", "HFSam3TrackerVideoAdapter",
           "track"]


def _memory_attention_body(self: nn.Module, current_vision_features: torch.Tensor, memory: torch.Tensor,
                           current_vision_position_embeddings: torch.Tensor | None = None,
                           memory_posision_embeddings: torch.Tensor | None = None,
                           num_object_pointer_tokens: int = 0) -> torch.Tensor:
    """``Sam2VideoMemoryAttention.forward`` (SAM 3's tracker has the same) with its
    rank test answered: the frame's tokens arrive ``(H*W, B, C)``, so every layer
    gets them as ``(B, 1, H*W, C)``."""
    output = current_vision_features
    if current_vision_position_embeddings is not None:
        output = output + 0.1 * current_vision_position_embeddings
    output = output.transpose(0, 1)
    memory = memory.transpose(0, 1).unsqueeze(1)
    memory_position = memory_posision_embeddings.transpose(0, 1).unsqueeze(1)
    rope = self.rotary_emb(output, self.position_ids)
    output = output.unsqueeze(1)
    for layer in self.layers:
        output = layer(queries=output, keys=memory, key_point_embedding=memory_position,
                       rope_position_embeddings=rope, num_k_exclude_rope=num_object_pointer_tokens)
    return self.layer_norm(output).transpose(0, 1)


def _edgetam_memory_attention_body(self: nn.Module, current_vision_features: torch.Tensor, memory: torch.Tensor,
                                   current_vision_position_embeddings: torch.Tensor | None = None,
                                   memory_posision_embeddings: torch.Tensor | None = None,
                                   num_object_pointer_tokens: int = 0,
                                   num_spatial_memory_tokens: int = -1) -> torch.Tensor:
    """``EdgeTamVideoMemoryAttention.forward`` with its rank test answered, as
    :func:`_memory_attention_body`; keys (the resampled memories) have their own
    rotary table."""
    output = current_vision_features
    if current_vision_position_embeddings is not None:
        output = output + 0.1 * current_vision_position_embeddings
    output = output.transpose(0, 1)
    memory = memory.transpose(0, 1).unsqueeze(1)
    memory_position = memory_posision_embeddings.transpose(0, 1).unsqueeze(1)
    rope = self.rotary_emb(output, self.position_ids)
    rope_k = self.rotary_emb(output, self.position_ids_k)
    output = output.unsqueeze(1)
    for layer in self.layers:
        output = layer(queries=output, keys=memory, key_point_embedding=memory_position,
                       rope_position_embeddings=rope, rope_position_embeddings_k=rope_k,
                       num_k_exclude_rope=num_object_pointer_tokens, rope_k_repeat=num_spatial_memory_tokens)
    return self.layer_norm(output).transpose(0, 1)


class _VideoParts:
    """The memory components of a Hugging Face video class, mixed into its image
    class's adapter (which describes the vision encoder, prompt encoder and decoder)."""

    #: the ``transformers`` module that defines the video classes
    video_module: str = ""
    #: the rotary helpers that branch on key counts, recorded as one call each
    rotary_functions: tuple[str, ...] = ("apply_rotary_pos_emb_2d",)
    memory_attention_body: Callable[..., Any] = staticmethod(_memory_attention_body)

    def _video_cls(self, name: str) -> str:
        return f"{self.video_module}.{name}"

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        return super().components(model) + [self._memory_attention_spec(model), self._memory_encoder_spec(model)]

    def _memory_sizes(self, model: nn.Module) -> tuple[int, int, int]:
        """Tokens per side of the frame's lowest-resolution map, model width, memory width."""
        return model.backbone_feature_sizes[-1][0], model.hidden_dim, model.mem_dim

    def _memory_example(self, model: nn.Module) -> dict[str, Any]:
        side, dim, mem_dim = self._memory_sizes(model)
        device = _device(model.memory_attention)
        tokens, pointers = side * side, 2 * dim // mem_dim
        # Two memory frames and two pointers (each split into dim // mem_dim tokens).
        memory = torch.zeros(2 * tokens + pointers, 1, mem_dim, device=device)
        return {"current_vision_features": torch.zeros(tokens, 1, dim, device=device), "memory": memory,
                "current_vision_position_embeddings": torch.zeros(tokens, 1, dim, device=device),
                "memory_posision_embeddings": torch.zeros_like(memory), "num_object_pointer_tokens": pointers}

    def _memory_attention_spec(self, model: nn.Module) -> ComponentSpec:
        modeling = sys.modules[self.video_module]
        recipe = TraceRecipe(
            trace_body=self.memory_attention_body,
            autowrap_functions=tuple(getattr(modeling, name) for name in self.rotary_functions),
            # The rotary tables are computed from the position buffers: kept as a module
            # call, so that they follow the buffers (and no traced constant is made).
            leaf_modules=(defining_class(model.memory_attention.rotary_emb, "RotaryEmbedding"),),
            shape_conditions=(_NOT_CAUSAL,),
        )
        return ComponentSpec("memory_attention", "memory_attention", recipe, lambda: self._memory_example(model))

    def _memory_encoder_spec(self, model: nn.Module) -> ComponentSpec:
        side, dim, _ = self._memory_sizes(model)

        def example() -> dict[str, Any]:
            device = _device(model.memory_encoder)
            mask_side = 4 * model.prompt_encoder.mask_input_size[0]
            return {"vision_features": torch.zeros(1, dim, side, side, device=device),
                    "masks": torch.zeros(1, 1, mask_side, mask_side, device=device)}

        # The sine position encoding is cached per size.
        recipe = TraceRecipe(leaf_modules=(defining_class(model.memory_encoder.position_encoding,
                                                          "PositionEmbeddingSine"),))
        return ComponentSpec("memory_encoder", "memory_encoder", recipe, example)

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, "VideoRoPEAttention") or defining_class(module, "VideoRoPESelfAttention") \
                or defining_class(module, "VideoRoPECrossAttention"):
            heads = module.num_attention_heads
            return AttentionSite(path, "rope", heads, module.head_dim, module.head_dim, block=parent_path)
        return super()._attention_site(path, module, parent, parent_path)

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        # The rotary tables hold positions that bfloat16 cannot represent (upstream keeps them float32).
        return (super()._precision_island(path, module) or defining_class(module, "RotaryEmbedding") is not None
                or defining_class(module, "PositionEmbeddingSine") is not None)

    def _predictor(self, model: nn.Module) -> HFSam2Predictor:
        return HFSam2VideoPredictor(model, self.image_forward())

    #: the family's video processor class in ``transformers``
    processor_class = "Sam2VideoProcessor"

    def video_processor(self, model: nn.Module) -> Any:
        """The family's video processor for ``model``'s input size (the Hub's
        processors differ only in the size)."""
        import transformers
        from transformers import Sam2ImageProcessor, Sam2VideoVideoProcessor

        size = {"height": model.config.image_size, "width": model.config.image_size}
        return getattr(transformers, self.processor_class)(
            image_processor=Sam2ImageProcessor(size=size), video_processor=Sam2VideoVideoProcessor(size=size),
            target_size=model.config.image_size)

    def image_forward(self) -> Callable[..., Any]:
        """The image class's ``forward``: a video model's prompt path on one image
        (the video class keeps every module it calls)."""
        raise NotImplementedError


class HFSam2VideoAdapter(_VideoParts, HFSam2Adapter):
    """``transformers.Sam2VideoModel`` (SAM 2 / 2.1 Hiera video checkpoints in the Hub format)."""

    name = "hf_sam2_video"
    video_module = "transformers.models.sam2_video.modeling_sam2_video"
    model_classes = (video_module + ".Sam2VideoModel",)

    def image_forward(self) -> Callable[..., Any]:
        from transformers import Sam2Model

        return Sam2Model.forward


class HFSam3TrackerVideoAdapter(_VideoParts, HFSam3TrackerAdapter):
    """``transformers.Sam3TrackerVideoModel``: SAM 3's tracker (its RoPE ViT) with SAM 2's memory."""

    name = "hf_sam3_tracker_video"
    video_module = "transformers.models.sam3_tracker_video.modeling_sam3_tracker_video"
    model_classes = (video_module + ".Sam3TrackerVideoModel",)
    processor_class = "Sam3TrackerVideoProcessor"

    def image_forward(self) -> Callable[..., Any]:
        from transformers import Sam3TrackerModel

        return Sam3TrackerModel.forward


class HFEdgeTamVideoAdapter(_VideoParts, HFEdgeTamAdapter):
    """``transformers.EdgeTamVideoModel``: EdgeTAM's tracker. Its memory attention's
    cross-attention rotates the resampled memories with their own (latent-grid)
    rotary table, and its memories pass through a perceiver, captured as the
    ``spatial_perceiver`` component."""

    name = "hf_edgetam_video"
    video_module = "transformers.models.edgetam_video.modeling_edgetam_video"
    model_classes = (video_module + ".EdgeTamVideoModel",)
    rotary_functions = ("apply_rotary_pos_emb_2d_self_attn", "apply_rotary_pos_emb_2d_cross_attn")
    memory_attention_body = staticmethod(_edgetam_memory_attention_body)

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        return super().components(model) + [self._perceiver_spec(model)]

    def _memory_example(self, model: nn.Module) -> dict[str, Any]:
        example = super()._memory_example(model)
        # Two memories of the perceiver's global and spatial latents, then the pointers.
        perceiver = model.spatial_perceiver
        latents = perceiver.num_latents_1d + perceiver.num_latents_2d
        pointers = example["num_object_pointer_tokens"]
        memory = torch.zeros(2 * latents + pointers, *example["memory"].shape[1:], device=example["memory"].device)
        return {**example, "memory": memory, "memory_posision_embeddings": torch.zeros_like(memory),
                "num_spatial_memory_tokens": 2}

    def _perceiver_spec(self, model: nn.Module) -> ComponentSpec:
        side, _, mem_dim = self._memory_sizes(model)

        def example() -> dict[str, Any]:
            device = _device(model.spatial_perceiver)
            return {"hidden_states": torch.zeros(1, mem_dim, side, side, device=device),
                    "positional_encoding": torch.zeros(1, mem_dim, side, side, device=device)}

        recipe = TraceRecipe(
            # Window partitioning pads by shape-dependent amounts; the sine encoding is cached per size.
            autowrap_functions=(sys.modules[self.video_module].window_partition,),
            leaf_modules=(self._video_cls("EdgeTamVideoPositionEmbeddingSine"),),
            static_args={"positional_encoding": (PRESENT,)},  # the model always gives the memory's
            shape_conditions=(_NOT_CAUSAL,),
        )
        return ComponentSpec("spatial_perceiver", "spatial_perceiver", recipe, example)

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, "PerceiverAttention"):
            # Plain q/k/v/o projections, as the two-way transformer's.
            return AttentionSite(path, "decoder", module.num_attention_heads, module.head_dim, module.head_dim,
                                 block=parent_path)
        return super()._attention_site(path, module, parent, parent_path)

    def image_forward(self) -> Callable[..., Any]:
        from transformers import EdgeTamModel

        return EdgeTamModel.forward


class HFSam2VideoPredictor(HFSam2Predictor):
    """:class:`HFSam2Predictor` on a video model's first frame: the image class's
    prompt recipe (``get_image_embeddings``, then the forward on the embeddings
    per prompt), which the video class runs on a prompted frame (it then keeps
    the best of the masks)."""

    def __init__(self, model: nn.Module, image_forward: Callable[..., Any]) -> None:
        super().__init__(model)
        self._image_forward = image_forward

    def _forward(self, **kwargs: Any) -> Any:
        return self._image_forward(self.model, **kwargs)


@torch.inference_mode()
def track(model: nn.Module, frames: Sequence[np.ndarray], points: Any = None, labels: Any = None, box: Any = None,
          frame_idx: int = 0) -> list[torch.Tensor]:
    """Track one object through ``frames`` (``H x W x 3`` uint8 RGB arrays) with the
    transformers recipe: ``init_video_session``, ``add_inputs_to_inference_session``
    (clicks ``points`` with ``labels``, and/or a ``box``, in pixels) on ``frame_idx``,
    the model on that frame, then ``propagate_in_video_iterator``. Returns the mask
    logits per frame, ``(H, W)`` at the video's resolution, in frame order (masks
    are ``logits > 0``)."""
    processor = find_adapter(model).video_processor(model)
    session = processor.init_video_session(video=list(frames), inference_device=_device(model))
    prompts: dict[str, Any] = {}
    if points is not None:
        prompts["input_points"] = [[np.asarray(points, np.float32).tolist()]]
        prompts["input_labels"] = [[np.asarray(labels).astype(int).tolist()]]
    if box is not None:
        prompts["input_boxes"] = [[np.asarray(box, np.float32).tolist()]]
    processor.add_inputs_to_inference_session(session, frame_idx=frame_idx, obj_ids=1, **prompts)
    model(inference_session=session, frame_idx=frame_idx)
    size = [[session.video_height, session.video_width]]
    logits = {output.frame_idx: processor.post_process_masks([output.pred_masks], size, binarize=False)[0][0, 0]
              for output in model.propagate_in_video_iterator(session)}
    return [logits[index].cpu() for index in sorted(logits)]


register_adapter(HFSam2VideoAdapter())
register_adapter(HFSam3TrackerVideoAdapter())
register_adapter(HFEdgeTamVideoAdapter())
