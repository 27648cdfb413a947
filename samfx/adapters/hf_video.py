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
one graph serves every frame. Upstream's rotary helpers branch on key counts
(whether the keys are one memory or several): the memory attentions' RoPE
attentions are traced through :func:`rope_attention` (SAM 2, SAM 3), which
rotates with :func:`rotary_embedding`, and :func:`latent_rope_attention`
(EdgeTAM's cross-attention, whose keys are perceiver latents with their own
rotary table), which rotates with :func:`latent_rotary_embedding` (no branch,
the same numbers, in float32 as upstream), so that the video path also
exports with a dynamic memory length (:meth:`video_deployment`, four step
modules written after ``Sam2VideoModel``'s methods; EdgeTAM's memory steps
store and read the perceiver's latents).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import find_adapter, register_adapter
from .base import PRESENT, AttentionSite, ComponentSpec, TraceRecipe
from .deploy import VideoDeployment, video_examples
from .hf import _NOT_CAUSAL, _device
from .hf_sam2 import HFEdgeTamAdapter, HFSam2Adapter, HFSam2Predictor, HFSam3TrackerAdapter
from .sam import defining_class

__all__ = ["HFEdgeTamVideoAdapter", "HFFrameDecoder", "HFFrameEncoder", "HFLatentMemoryAttentionStep",
           "HFLatentMemoryEncoderStep", "HFMemoryAttentionStep", "HFMemoryEncoderStep", "HFSam2VideoAdapter",
           "HFSam2VideoPredictor", "HFSam3TrackerVideoAdapter", "latent_rope_attention", "latent_rotary_embedding",
           "read_frames", "rope_attention", "rotary_embedding", "track"]


def _memory_attention_inputs(
    current_vision_features: torch.Tensor, memory: torch.Tensor, current_vision_position_embeddings: torch.Tensor | None,
    memory_position_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frame's tokens (with a tenth of their position embedding) batch-first, and the
    memories and their position embeddings as ``(B, 1, N, C)``, as both upstream forwards begin."""
    output = current_vision_features
    if current_vision_position_embeddings is not None:
        output = output + 0.1 * current_vision_position_embeddings
    return (output.transpose(0, 1), memory.transpose(0, 1).unsqueeze(1),
            memory_position_embeddings.transpose(0, 1).unsqueeze(1))


def _memory_attention_body(self: nn.Module, current_vision_features: torch.Tensor, memory: torch.Tensor,
                           current_vision_position_embeddings: torch.Tensor | None = None,
                           memory_posision_embeddings: torch.Tensor | None = None,
                           num_object_pointer_tokens: int = 0) -> torch.Tensor:
    """``Sam2VideoMemoryAttention.forward`` (SAM 3's tracker has the same) with its
    rank test answered: the frame's tokens arrive ``(H*W, B, C)``, so every layer
    gets them as ``(B, 1, H*W, C)``."""
    output, memory, memory_position = _memory_attention_inputs(
        current_vision_features, memory, current_vision_position_embeddings, memory_posision_embeddings)
    rope = self.rotary_emb(output, self.position_ids)
    output = output.unsqueeze(1)
    for layer in self.layers:
        output = layer(queries=output, keys=memory, key_point_embedding=memory_position,
                       rope_position_embeddings=rope, num_k_exclude_rope=num_object_pointer_tokens)
    return self.layer_norm(output).transpose(0, 1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_k_exclude_rope: Any = 0, repeat_freqs_k: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``apply_rotary_pos_emb_2d`` without its branches on key counts: keys
    that are whole copies of the queries' map (memory frames) get the tables
    repeated once per copy, also when there is one copy (upstream then skips
    the repeat: the same numbers), followed by ``num_k_exclude_rope`` keys left
    unrotated (object pointers). In float32, as upstream.

    Example::

        >>> q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 9, 8)
        >>> cos, sin = torch.ones(1, 4, 8), torch.zeros(1, 4, 8)
        >>> rq, rk = rotary_embedding(q, k, cos, sin, 1, repeat_freqs_k=True)
        >>> bool(torch.equal(rq, q)), bool(torch.equal(rk, k))
        (True, True)
    """
    from transformers.models.sam2_video.modeling_sam2_video import rotate_pairwise

    rotated = k.shape[-2] - num_k_exclude_rope
    k_rot, k_pass = k[..., :rotated, :], k[..., rotated:, :]
    q_embed = q.float()
    q_embed = q_embed * cos + rotate_pairwise(q_embed) * sin
    if repeat_freqs_k:  # a setting of the attention, not a size
        repeats = rotated // q.shape[-2]
        cos, sin = cos.repeat(1, 1, repeats, 1), sin.repeat(1, 1, repeats, 1)
    k_embed = k_rot.float()
    k_embed = k_embed * cos + rotate_pairwise(k_embed) * sin
    return q_embed.type_as(q), torch.cat([k_embed.type_as(k), k_pass], dim=-2)


def rope_attention(self: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], num_k_exclude_rope: Any = 0,
                   **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``Sam2VideoRoPEAttention.forward`` (SAM 3's tracker has the same) with the
    rotation through :func:`rotary_embedding`: the same projections, heads and
    attention backend."""
    cos, sin = position_embeddings
    return _rotated_attention(
        self, query, key, value,
        lambda q, k: rotary_embedding(q, k, cos, sin, num_k_exclude_rope, self.rope_k_repeat), **kwargs)


def latent_rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            cos_k: torch.Tensor, sin_k: torch.Tensor, num_k_exclude_rope: Any = 0,
                            repeat_freqs_k: Any = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``apply_rotary_pos_emb_2d_cross_attn`` (EdgeTAM) without its branches
    on key counts: keys are ``repeat_freqs_k`` memories, each the perceiver's
    global latents (not rotated) then its 2-D latents (rotated with the latent
    grid's table ``cos_k``/``sin_k``, broadcast over the memories where upstream
    repeats it: the same numbers), followed by ``num_k_exclude_rope`` keys left
    unrotated (object pointers). In float32, as upstream.

    Example::

        >>> q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2 * 3 + 1, 8)
        >>> cos, sin = torch.ones(1, 4, 8), torch.zeros(1, 4, 8)
        >>> rq, rk = latent_rotary_embedding(q, k, cos, sin, cos[:, :2], sin[:, :2], 1, repeat_freqs_k=2)
        >>> bool(torch.equal(rq, q)), bool(torch.equal(rk, k))
        (True, True)
    """
    from transformers.models.edgetam_video.modeling_edgetam_video import rotate_pairwise

    q_embed = q.float()
    q_embed = q_embed * cos + rotate_pairwise(q_embed) * sin
    rotated = k.shape[-2] - num_k_exclude_rope
    k_memories, k_pass = k[..., :rotated, :], k[..., rotated:, :]
    batch, heads, _, channels = k_memories.shape
    k_memories = k_memories.reshape(batch, heads, repeat_freqs_k, -1, channels)  # (B, heads, memories, L, C)
    global_latents = k_memories.shape[-2] - cos_k.shape[-2]
    k_global, k_spatial = k_memories[..., :global_latents, :], k_memories[..., global_latents:, :].float()
    k_spatial = k_spatial * cos_k + rotate_pairwise(k_spatial) * sin_k
    k_embed = torch.cat([k_global, k_spatial.type_as(k)], dim=-2).flatten(2, 3)
    return q_embed.type_as(q), torch.cat([k_embed, k_pass], dim=-2)


def latent_rope_attention(self: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor],
                          position_embeddings_k: tuple[torch.Tensor, torch.Tensor], num_k_exclude_rope: Any = 0,
                          rope_k_repeat: Any = 0, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``EdgeTamVideoRoPECrossAttention.forward`` with the rotation through
    :func:`latent_rotary_embedding`: the same projections, heads and attention backend."""
    (cos, sin), (cos_k, sin_k) = position_embeddings, position_embeddings_k
    return _rotated_attention(
        self, query, key, value,
        lambda q, k: latent_rotary_embedding(q, k, cos, sin, cos_k, sin_k, num_k_exclude_rope, rope_k_repeat),
        **kwargs)


def _rotated_attention(self: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       rotate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The body the upstream RoPE attentions share: projections into heads,
    ``rotate(q, k)``, the configured attention backend, the output projection."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch_size, point_batch_size = query.shape[:2]
    new_shape = (batch_size * point_batch_size, -1, self.num_attention_heads, self.head_dim)
    query = self.q_proj(query).view(*new_shape).transpose(1, 2)
    key = self.k_proj(key).view(*new_shape).transpose(1, 2)
    value = self.v_proj(value).view(*new_shape).transpose(1, 2)
    query, key = rotate(query, key)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    attn_output, attn_weights = attention_interface(
        self, query, key, value, attention_mask=None, dropout=0.0 if not self.training else self.dropout_p,
        scaling=self.scaling, is_causal=self.is_causal, **kwargs)
    attn_output = attn_output.reshape(batch_size, point_batch_size, -1,
                                      self.num_attention_heads * self.head_dim).contiguous()
    return self.o_proj(attn_output), attn_weights


def _edgetam_memory_attention_body(self: nn.Module, current_vision_features: torch.Tensor, memory: torch.Tensor,
                                   current_vision_position_embeddings: torch.Tensor | None = None,
                                   memory_posision_embeddings: torch.Tensor | None = None,
                                   num_object_pointer_tokens: int = 0,
                                   num_spatial_memory_tokens: int = -1) -> torch.Tensor:
    """``EdgeTamVideoMemoryAttention.forward`` with its rank test answered, as
    :func:`_memory_attention_body`; keys (the resampled memories) have their own
    rotary table."""
    output, memory, memory_position = _memory_attention_inputs(
        current_vision_features, memory, current_vision_position_embeddings, memory_posision_embeddings)
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
    #: the memory attention's RoPE attention class (whose rotation branches on key counts),
    #: traced through ``rope_attention_body``, which rotates with ``rotation``
    rope_attention_class: str = ""
    rope_attention_body: Callable[..., Any] = staticmethod(rope_attention)
    rotation: Callable[..., Any] = staticmethod(rotary_embedding)
    #: upstream rotary helpers recorded as one call each
    rotary_functions: tuple[str, ...] = ()
    memory_attention_body: Callable[..., Any] = staticmethod(_memory_attention_body)
    #: how ``_encode_new_memory`` stores a frame's memory (SAM 2's: in bfloat16)
    memory_dtype: str = "bfloat16"

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
            autowrap_functions=(self.rotation,) + tuple(getattr(modeling, name) for name in self.rotary_functions),
            traced_methods=((self._video_cls(self.rope_attention_class), "forward", self.rope_attention_body),),
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

    def video_deployment(self, model: nn.Module) -> VideoDeployment:
        """The four steps of a (captured) video model, written after its
        ``get_image_features``, ``_prepare_memory_conditioned_features``,
        ``_single_frame_forward`` and ``_encode_new_memory``, and the loop's
        settings (the frames as the family's video processor prepares them)."""
        from transformers.image_utils import PILImageResampling

        config = model.config
        unsupported = [name for name, value in (("training", model.training),
                                                ("multimask_output_in_sam", not config.multimask_output_in_sam),
                                                ("multimask_output_for_tracking",
                                                 not config.multimask_output_for_tracking),
                                                ("multimask_min_pt_num", config.multimask_min_pt_num > 0)) if value]
        if unsupported:
            raise ValueError(f"the video export follows the released video settings; this model differs in "
                             f"{', '.join(unsupported)}")
        frames = self.video_processor(model).video_processor
        settings = {"image_size": model.image_size, "num_maskmem": model.num_maskmem,
                    "max_obj_ptrs_in_encoder": config.max_object_pointers_in_encoder,
                    "mean": list(frames.image_mean), "std": list(frames.image_std),
                    "resample": PILImageResampling(frames.resample).name.lower(),
                    "memory_dtype": self.memory_dtype}
        side = model.backbone_feature_sizes[-1][0]
        attention, encoder = self._memory_steps(model)
        return VideoDeployment(HFFrameEncoder(model), attention, HFFrameDecoder(model), encoder, settings,
                               video_examples(model.image_size, side, model.hidden_dim, model.mem_dim,
                                              self._stored_memory_shape(model)))

    def _memory_steps(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The memory attention and memory encoder steps of :meth:`video_deployment`."""
        return HFMemoryAttentionStep(model, sys.modules[self.video_module]), HFMemoryEncoderStep(model)

    def _stored_memory_shape(self, model: nn.Module) -> tuple[int, ...] | None:
        """One stored memory's shape without the batch (``None``: a ``mem_dim x h x w`` map)."""
        return None

    def track_video(self, model: nn.Module, frames: str | Path, points: Any, labels: Any) -> list[torch.Tensor]:
        return track(model, read_frames(frames), points, labels)


class HFSam2VideoAdapter(_VideoParts, HFSam2Adapter):
    """``transformers.Sam2VideoModel`` (SAM 2 / 2.1 Hiera video checkpoints in the Hub format)."""

    name = "hf_sam2_video"
    video_module = "transformers.models.sam2_video.modeling_sam2_video"
    model_classes = (video_module + ".Sam2VideoModel",)
    rope_attention_class = "Sam2VideoRoPEAttention"

    def image_forward(self) -> Callable[..., Any]:
        from transformers import Sam2Model

        return Sam2Model.forward


class HFSam3TrackerVideoAdapter(_VideoParts, HFSam3TrackerAdapter):
    """``transformers.Sam3TrackerVideoModel``: SAM 3's tracker (its RoPE ViT) with SAM 2's memory."""

    name = "hf_sam3_tracker_video"
    video_module = "transformers.models.sam3_tracker_video.modeling_sam3_tracker_video"
    model_classes = (video_module + ".Sam3TrackerVideoModel",)
    rope_attention_class = "Sam3TrackerVideoRoPEAttention"
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
    rope_attention_class = "EdgeTamVideoRoPECrossAttention"
    rope_attention_body = staticmethod(latent_rope_attention)
    rotation = staticmethod(latent_rotary_embedding)
    rotary_functions = ("apply_rotary_pos_emb_2d_self_attn",)  # no branch
    memory_attention_body = staticmethod(_edgetam_memory_attention_body)
    memory_dtype = "float32"  # _encode_new_memory keeps the perceiver's latents in the masks' dtype

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

    def _memory_steps(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        return (HFLatentMemoryAttentionStep(model, sys.modules[self.video_module]),
                HFLatentMemoryEncoderStep(model))

    def _stored_memory_shape(self, model: nn.Module) -> tuple[int, ...]:
        perceiver = model.spatial_perceiver
        return perceiver.num_latents_1d + perceiver.num_latents_2d, model.mem_dim

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


# -- deployment: the per-frame steps as modules with tensor inputs --------------------------------
#
# The tracking loop (which memories and pointers a frame attends to) is the
# runtime's; each step holds the arithmetic of one of Sam2VideoModel's methods,
# run by the model's own (captured) components. Maps are NCHW, as the runtime
# passes them (EdgeTAM's memories: perceiver latents, (1, L, C) each); the
# model's (H*W, B, C) token layout is made inside.


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).permute(2, 0, 1)


def _map(tokens: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return tokens.permute(1, 2, 0).reshape(tokens.shape[1], tokens.shape[2], *size)


class HFFrameEncoder(nn.Module):
    """A normalised ``(1, 3, S, S)`` frame -> ``get_image_features``' lowest level
    raw and with the no-memory embedding (a prompted first frame), its position
    encoding, and the two high-resolution maps after the decoder's projections."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        out = model.get_image_features(image, return_dict=True)
        sizes = model.backbone_feature_sizes
        high_res_0, high_res_1, top = (_map(f, s) for f, s in zip(out.fpn_hidden_states, sizes))
        no_memory = top + model.no_memory_embedding.reshape(1, -1, 1, 1)
        return top, _map(out.fpn_position_encoding[-1], sizes[-1]), no_memory, high_res_0, high_res_1


class HFMemoryAttentionStep(nn.Module):
    """The frame's features conditioned on ``n`` memory frames and ``p`` object
    pointers (``_prepare_memory_conditioned_features`` after the selection); the
    inputs of :attr:`samfx.adapters.deploy.VideoDeployment.memory_attention`."""

    def __init__(self, model: nn.Module, modeling: Any) -> None:
        super().__init__()
        self.model = model
        self._sine = modeling.get_1d_sine_pe

    def forward(self, features: torch.Tensor, position: torch.Tensor, memories: torch.Tensor,
                memory_positions: torch.Tensor, memory_slots: torch.Tensor, pointers: torch.Tensor,
                pointer_distances: torch.Tensor) -> torch.Tensor:
        model = self.model
        batch, channels, height, width = features.shape
        mem_dim = model.mem_dim
        memory = self._memory_tokens(memories).reshape(-1, 1, mem_dim)
        temporal = model.memory_temporal_positional_encoding[memory_slots]  # (n, 1, 1, mem_dim)
        memory_pos = (self._memory_tokens(memory_positions)[:, :, None, :] + temporal).reshape(-1, 1, mem_dim)
        if model.config.enable_temporal_pos_encoding_for_object_pointers:
            pointer_pos = model.temporal_positional_encoding_projection_layer(
                self._sine(pointer_distances, dim=channels))
        else:
            pointer_pos = pointers.new_zeros(pointers.shape[0], mem_dim)
        split = max(channels // mem_dim, 1)  # a pointer becomes this many mem_dim tokens
        pointer_tokens = pointers.reshape(-1, 1, split, mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        pointer_pos = pointer_pos[:, None, :].repeat_interleave(split, dim=0)
        out = self._attend(
            memories.shape[0], current_vision_features=_tokens(features),
            current_vision_position_embeddings=_tokens(position), memory=torch.cat([memory, pointer_tokens]),
            memory_posision_embeddings=torch.cat([memory_pos, pointer_pos]),
            num_object_pointer_tokens=pointer_tokens.shape[0])
        return out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)

    def _memory_tokens(self, memories: torch.Tensor) -> torch.Tensor:
        """``(n, mem_dim, h, w)`` memory maps -> ``(n, h*w, mem_dim)`` tokens per memory."""
        return memories.flatten(2).transpose(1, 2)

    def _attend(self, num_memories: Any, **inputs: torch.Tensor | int) -> torch.Tensor:
        return self.model.memory_attention(**inputs)


class HFLatentMemoryAttentionStep(HFMemoryAttentionStep):
    """:class:`HFMemoryAttentionStep` on EdgeTAM's memories: per memory, the
    perceiver's ``(latents, mem_dim)`` tokens, as ``_encode_new_memory`` stores
    them; the memory attention is told the memory count (its latent-grid
    rotary table repeats per memory)."""

    def _memory_tokens(self, memories: torch.Tensor) -> torch.Tensor:
        return memories

    def _attend(self, num_memories: Any, **inputs: torch.Tensor | int) -> torch.Tensor:
        return self.model.memory_attention(**inputs, num_spatial_memory_tokens=num_memories)


class HFFrameDecoder(nn.Module):
    """Points in the ``S x S`` frame on a frame's (conditioned) features -> the best
    of the multimask outputs at low resolution, the object pointer and the
    object score (``_single_frame_forward`` with ``multimask_output``, as the
    session runs it for one click and for tracked frames)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, high_res_0: torch.Tensor, high_res_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor):
        out = self.model._single_frame_forward(
            input_points=point_coords[:, None], input_labels=point_labels[:, None].to(torch.int32),
            image_embeddings=[high_res_0, high_res_1, features], multimask_output=True)
        # One object in a batch of one: (1, 1, h, w) logits, a (1, C) pointer, a (1, 1) score.
        return (out.pred_masks.reshape(1, 1, *out.pred_masks.shape[-2:]), out.object_pointer.reshape(1, -1),
                out.object_score_logits.reshape(1, 1))


class HFMemoryEncoderStep(nn.Module):
    """A frame's raw features and its low-resolution mask logits -> its memory and
    the memory's position encoding (``_encode_new_memory`` on the mask at the
    model's size, as ``_single_frame_forward`` makes it; ``from_points`` > 0:
    the mask was prompted with clicks and is binarised, else it goes through a
    sigmoid)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, low_res_masks: torch.Tensor, object_score: torch.Tensor,
                from_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model, config = self.model, self.model.config
        size, memory_size = model.image_size, 4 * model.prompt_encoder.mask_input_size[0]
        mask = F.interpolate(low_res_masks, (size, size), mode="bilinear", align_corners=False)
        if memory_size != size:  # the memory encoder's input size (SAM 3: 128 for a 112 px model)
            mask = F.interpolate(mask, (memory_size, memory_size), mode="bilinear", align_corners=False,
                                 antialias=True)
        mask = torch.where(from_points > 0, (mask > 0).float(), torch.sigmoid(mask))
        mask = mask * config.sigmoid_scale_for_mem_enc + config.sigmoid_bias_for_mem_enc
        memory, position = model.memory_encoder(features, mask)
        if model.occlusion_spatial_embedding_parameter is not None:
            absent = 1 - (object_score > 0).float()
            memory = memory + absent[..., None] * model.occlusion_spatial_embedding_parameter[..., None, None]
        return memory, position


class HFLatentMemoryEncoderStep(HFMemoryEncoderStep):
    """:class:`HFMemoryEncoderStep` then EdgeTAM's ``spatial_perceiver``: the
    memory as ``(1, latents, mem_dim)`` global and 2-D latents and their
    position encodings (zeros for the global ones), as ``_encode_new_memory``
    stores them."""

    def forward(self, features: torch.Tensor, low_res_masks: torch.Tensor, object_score: torch.Tensor,
                from_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, position = super().forward(features, low_res_masks, object_score, from_points)
        return self.model.spatial_perceiver(memory, position)


def read_frames(directory: str | Path) -> list[np.ndarray]:
    """The numbered JPEG frames of ``directory`` (``00000.jpg``, ...) as ``H x W x 3``
    uint8 RGB arrays, in order."""
    from PIL import Image

    paths = sorted((p for p in Path(directory).iterdir() if p.suffix.lower() in (".jpg", ".jpeg")),
                   key=lambda p: int(p.stem))
    if not paths:
        raise FileNotFoundError(f"no JPEG frames in {directory}")
    frames = []
    for path in paths:
        with Image.open(path) as image:
            frames.append(np.array(image.convert("RGB")))
    return frames


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
