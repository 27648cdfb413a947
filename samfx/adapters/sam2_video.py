"""SAM 2 / SAM 2.1 video (``sam2.sam2_video_predictor.SAM2VideoPredictor``).

Per frame the video predictor runs the image encoder, then the memory
attention (RoPE self-attention over the frame's tokens and RoPE
cross-attention to up to 7 memory frames plus object-pointer tokens), the
prompt encoder and mask decoder, and the memory encoder on the predicted mask.
This adapter captures the image model's three components and the two memory
components, so that an optimized model keeps working under
``init_state`` / ``add_new_points_or_box`` / ``propagate_in_video``.

Upstream ``RoPEAttention.forward`` cannot be traced (it reassigns its frequency
table, branches on token counts and rotates in complex numbers); it is traced
through :func:`rope_attention`, the same computation with the rotation in real
``cos``/``sin`` arithmetic (:func:`rotary_encoding`), which also exports to ONNX.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import register_adapter
from .base import AttentionSite, ComponentSpec, ShapeCondition, TraceRecipe
from .deploy import VideoDeployment, video_examples
from .sam import defining_class
from .sam2 import Sam2Adapter, _device

__all__ = ["FrameEncoder", "FrameDecoder", "MemoryAttentionStep", "MemoryEncoderStep", "Sam2VideoAdapter",
           "axial_rope_tables", "rope_attention", "rotary_encoding", "single_map", "track"]

_VIDEO_PREDICTOR = "sam2.sam2_video_predictor.SAM2VideoPredictor"
_MEMORY_ATTENTION = "sam2.modeling.memory_attention.MemoryAttention"
_MEMORY_LAYER = "sam2.modeling.memory_attention.MemoryAttentionLayer"
_ROPE_ATTENTION = "sam2.modeling.sam.transformer.RoPEAttention"
_POSITION_SINE = "sam2.modeling.position_encoding.PositionEmbeddingSine"


def axial_rope_tables(head_dim: int, end_x: int, end_y: int, theta: float,
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of SAM 2's axial rotary angles, ``(end_x * end_y, head_dim // 2)``
    each: the real and imaginary parts of ``compute_axial_cis`` (x frequencies
    first, then y; tokens row-major).

    Example::

        >>> cos, sin = axial_rope_tables(8, 2, 2, 10000.0)
        >>> tuple(cos.shape), float(cos[0, 0]), float(sin[0, 0])
        ((4, 4), 1.0, 0.0)
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32, device=device)
    t_x, t_y = t % end_x, torch.div(t, end_x, rounding_mode="floor")
    angles = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Consecutive channel pairs (a, b) are a + ib, multiplied by cos + i sin.
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


def rotary_encoding(q: torch.Tensor, k: torch.Tensor, num_k_exclude_rope: Any,
                    theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``apply_rotary_enc`` for ``(B, heads, tokens, head_dim)`` queries on a
    square map and keys that are whole copies of such maps (memory frames, the
    frequencies repeated per copy) followed by ``num_k_exclude_rope`` tokens
    left unrotated (object pointers), in real arithmetic.

    Example::

        >>> q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 9, 8)
        >>> rq, rk = rotary_encoding(q, k, 1, 10000.0)
        >>> bool(torch.equal(rk[:, :, 8:], k[:, :, 8:])), bool(torch.allclose(rq.norm(), q.norm()))
        (True, True)
    """
    tokens = q.shape[-2]
    side = math.isqrt(tokens)
    cos, sin = axial_rope_tables(q.shape[-1], side, side, theta, q.device)
    rotated = k.shape[-2] - num_k_exclude_rope
    repeats = rotated // tokens
    keys = _rotate(k[:, :, :rotated], cos.repeat(repeats, 1), sin.repeat(repeats, 1))
    return _rotate(q, cos, sin), torch.cat([keys, k[:, :, rotated:]], dim=-2)


def rope_attention(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_k_exclude_rope: Any = 0) -> torch.Tensor:
    """``RoPEAttention.forward`` as torch.fx traces it: the same projections, heads,
    rotation (:func:`rotary_encoding`) and SDPA, with no attribute writes, no
    branches on sizes and no complex tensors."""
    q = attention._separate_heads(attention.q_proj(q), attention.num_heads)
    k = attention._separate_heads(attention.k_proj(k), attention.num_heads)
    v = attention._separate_heads(attention.v_proj(v), attention.num_heads)
    q, k = rotary_encoding(q, k, num_k_exclude_rope, attention.compute_cis.keywords["theta"])
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attention.dropout_p if attention.training else 0.0)
    return attention.out_proj(attention._recombine_heads(out))


def single_map(x: Any) -> Any:
    """The feature map of a one-element list (how SAM 2 passes ``curr``), or ``x``."""
    return x[0] if isinstance(x, (list, tuple)) else x


def _memory_attention_body(self: nn.Module, curr: Any, memory: torch.Tensor, curr_pos: Any = None,
                           memory_pos: torch.Tensor | None = None, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
    # Upstream unwraps list inputs with isinstance on the traced value; unwrap in one opaque call instead.
    upstream = sys.modules["sam2.modeling.memory_attention"].MemoryAttention.forward
    return upstream(self, single_map(curr), memory, single_map(curr_pos), memory_pos, num_obj_ptr_tokens)


def memory_attention_spec(model: nn.Module) -> ComponentSpec:
    """The memory attention: ``(H*W, B, C)`` frame tokens, ``(M, B, mem_dim)`` memory
    (spatial memories, then ``num_obj_ptr_tokens`` pointer tokens); the memory
    length and the pointer count are symbolic, so one graph serves every frame."""
    side = model.image_size // model.backbone_stride
    dim, mem_dim = model.hidden_dim, model.mem_dim

    def example() -> dict[str, Any]:
        device = _device(model.memory_attention)
        tokens, pointers = side * side, 2 * dim // mem_dim
        # As SAM2Base passes them: the frame's tokens and positions in one-element lists.
        return {"curr": [torch.zeros(tokens, 1, dim, device=device)],
                "memory": torch.zeros(2 * tokens + pointers, 1, mem_dim, device=device),
                "curr_pos": [torch.zeros(tokens, 1, dim, device=device)],
                "memory_pos": torch.zeros(2 * tokens + pointers, 1, mem_dim, device=device),
                "num_obj_ptr_tokens": pointers}

    recipe = TraceRecipe(
        autowrap_functions=(single_map, rotary_encoding),
        traced_methods=((_ROPE_ATTENTION, "forward", rope_attention),),
        # ``if num_k_exclude_rope > 0`` only guards passing it on; passing 0 on is the same.
        shape_conditions=(ShapeCondition(f"{_MEMORY_LAYER}._forward_ca", lambda arguments: True, (True,)),),
        trace_body=_memory_attention_body,
    )
    return ComponentSpec("memory_attention", "memory_attention", recipe, example)


def memory_encoder_spec(model: nn.Module) -> ComponentSpec:
    """The memory encoder: the frame's ``(B, C, H, W)`` features and its ``(B, 1, S, S)``
    mask (logits, or scaled probabilities with ``skip_mask_sigmoid``)."""
    side = model.image_size // model.backbone_stride

    def example() -> dict[str, Any]:
        device = _device(model.memory_encoder)
        return {"pix_feat": torch.zeros(1, model.hidden_dim, side, side, device=device),
                "masks": torch.zeros(1, 1, model.image_size, model.image_size, device=device)}

    recipe = TraceRecipe(
        # The sine position encoding caches per size in a dict.
        leaf_modules=(_POSITION_SINE,),
        static_args={"skip_mask_sigmoid": (True, False)},
    )
    return ComponentSpec("memory_encoder", "memory_encoder", recipe, example)


class Sam2VideoAdapter(Sam2Adapter):
    """``SAM2VideoPredictor``: the image model's components plus the memory
    attention and the memory encoder."""

    name = "sam2_video"
    model_classes = (_VIDEO_PREDICTOR,)

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        return super().components(model) + [memory_attention_spec(model), memory_encoder_spec(model)]

    def _attention_site(self, path, module, parent, parent_path):
        if defining_class(module, _ROPE_ATTENTION):
            head_dim = module.internal_dim // module.num_heads
            return AttentionSite(path, "rope", module.num_heads, head_dim, head_dim, block=parent_path)
        return super()._attention_site(path, module, parent, parent_path)

    def video_deployment(self, model: nn.Module) -> VideoDeployment:
        """The four steps of a (captured or plain) ``SAM2VideoPredictor`` (written
        after ``SAM2Base``'s methods) and the loop's settings."""
        from .sam2 import _warm_position_caches

        _warm_position_caches(model.image_encoder, model.image_size)
        _warm_position_caches(model.memory_encoder, model.image_size)
        unsupported = [name for name, value in (("training", model.training),
                                                ("max_cond_frames_in_attn", model.max_cond_frames_in_attn != -1),
                                                ("memory_temporal_stride_for_eval",
                                                 model.memory_temporal_stride_for_eval != 1),
                                                ("non_overlap_masks", model.non_overlap_masks),
                                                ("fill_hole_area", model.fill_hole_area > 0),
                                                ("directly_add_no_mem_embed", not model.directly_add_no_mem_embed),
                                                ("use_obj_ptrs_in_encoder", not model.use_obj_ptrs_in_encoder),
                                                ("only_obj_ptrs_in_the_past_for_eval",
                                                 not model.only_obj_ptrs_in_the_past_for_eval),
                                                ("use_signed_tpos_enc_to_obj_ptrs",
                                                 not model.use_signed_tpos_enc_to_obj_ptrs),
                                                ("binarize_mask_from_pts_for_mem_enc",
                                                 not model.binarize_mask_from_pts_for_mem_enc)) if value]
        if unsupported:
            raise ValueError(f"the video export follows SAM 2.1's released video settings; this model differs in "
                             f"{', '.join(unsupported)}")
        settings = {"image_size": model.image_size, "num_maskmem": model.num_maskmem,
                    "max_obj_ptrs_in_encoder": model.max_obj_ptrs_in_encoder,
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                    # load_video_frames: Pillow's default filter for RGB.
                    "resample": "bicubic",
                    # SAM2VideoPredictor stores memories in bfloat16.
                    "memory_dtype": "bfloat16"}
        side = model.image_size // model.backbone_stride
        return VideoDeployment(FrameEncoder(model), MemoryAttentionStep(model), FrameDecoder(model),
                               MemoryEncoderStep(model), settings,
                               video_examples(model.image_size, side, model.hidden_dim, model.mem_dim))

    def track_video(self, model: nn.Module, frames: str | Path, points: Any, labels: Any) -> list[torch.Tensor]:
        return track(model, frames, points, labels)


# -- deployment: the per-frame parts as graphs with tensor inputs ---------------------------------
#
# The tracking loop (which memories and pointers a frame attends to) stays in
# the runtime; each graph holds the arithmetic of one step, written after
# SAM2Base's methods with the model's own (captured) components.


class FrameEncoder(nn.Module):
    """A normalised ``(1, 3, S, S)`` frame -> the lowest-resolution features (raw,
    for memories, and with the no-memory embedding, for a prompted first
    frame), their sine position encoding, and the decoder's two high-resolution
    maps (``SAM2Base.forward_image`` + ``_prepare_memory_conditioned_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        out = model.image_encoder(image)
        features = out["backbone_fpn"]
        high_res_0 = model.sam_mask_decoder.conv_s0(features[0])
        high_res_1 = model.sam_mask_decoder.conv_s1(features[1])
        top = features[-1]
        no_memory = top + model.no_mem_embed.reshape(1, -1, 1, 1)
        return top, out["vision_pos_enc"][-1], no_memory, high_res_0, high_res_1


class MemoryAttentionStep(nn.Module):
    """The frame's features conditioned on ``n`` memory frames and ``p`` object
    pointers (``SAM2Base._prepare_memory_conditioned_features`` after the
    selection): memories ``(n, mem_dim, h, w)`` with their position encodings,
    each memory's temporal slot (``num_maskmem - t_pos - 1``), the pointers
    ``(p, C)`` and their signed frame distances divided by the largest one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, position: torch.Tensor, memories: torch.Tensor,
                memory_positions: torch.Tensor, memory_slots: torch.Tensor, pointers: torch.Tensor,
                pointer_distances: torch.Tensor) -> torch.Tensor:
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        model = self.model
        batch, channels, height, width = features.shape
        mem_dim = model.mem_dim
        memory = memories.flatten(2).permute(0, 2, 1).reshape(-1, 1, mem_dim)
        temporal = model.maskmem_tpos_enc[memory_slots].reshape(-1, 1, 1, mem_dim)  # (n, 1, 1, mem_dim)
        memory_pos = (memory_positions.flatten(2).permute(0, 2, 1)[:, :, None, :] + temporal).reshape(-1, 1, mem_dim)
        pointer_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(pointer_distances, dim=channels))
        split = channels // mem_dim  # a pointer becomes this many mem_dim tokens
        pointer_tokens = pointers.reshape(-1, 1, split, mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        pointer_pos = pointer_pos[:, None, :].repeat_interleave(split, dim=0)
        out = model.memory_attention(
            curr=[features.flatten(2).permute(2, 0, 1)], curr_pos=[position.flatten(2).permute(2, 0, 1)],
            memory=torch.cat([memory, pointer_tokens], dim=0), memory_pos=torch.cat([memory_pos, pointer_pos], dim=0),
            num_obj_ptr_tokens=pointer_tokens.shape[0])
        return out.permute(1, 2, 0).reshape(batch, channels, height, width)


class FrameDecoder(nn.Module):
    """Prompts (points in the model's ``S x S`` frame; a tracked frame gives the
    padding point ``(0, 0)`` with label ``-1``) on a frame's features ->
    the best of the multimask outputs at low resolution, the object pointer
    and the object score
    (``SAM2Base._forward_sam_heads`` with ``multimask_output``, as the video
    predictor runs it for one click and for tracked frames)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, high_res_0: torch.Tensor, high_res_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor):
        outputs = self.model._forward_sam_heads(
            backbone_features=features,
            point_inputs={"point_coords": point_coords, "point_labels": point_labels.to(torch.int32)},
            mask_inputs=None, high_res_features=[high_res_0, high_res_1], multimask_output=True)
        return outputs[3], outputs[5], outputs[6]


class MemoryEncoderStep(nn.Module):
    """A frame's raw features and its low-resolution mask logits -> its memory
    and the memory's position encoding (``SAM2Base._encode_new_memory`` on the
    mask resized to the frame; ``from_points`` > 0: the mask was prompted with
    clicks and is binarised, else it goes through a sigmoid)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, low_res_masks: torch.Tensor, object_score: torch.Tensor,
                from_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        size = model.image_size
        high_res = F.interpolate(low_res_masks, (size, size), mode="bilinear", align_corners=False)
        mask = torch.where(from_points > 0, (high_res > 0).float(), torch.sigmoid(high_res))
        mask = mask * model.sigmoid_scale_for_mem_enc + model.sigmoid_bias_for_mem_enc
        out = model.memory_encoder(features, mask, skip_mask_sigmoid=True)
        memory = out["vision_features"]
        if model.no_obj_embed_spatial is not None:
            absent = 1 - (object_score > 0).float()
            memory = memory + absent[..., None, None] * model.no_obj_embed_spatial[..., None, None]
        return memory, out["vision_pos_enc"][-1]


@torch.inference_mode()
def track(model: nn.Module, video_dir: str | Path, points: Any, labels: Any, frame_idx: int = 0) -> list[torch.Tensor]:
    """Track one object through a folder of JPEG frames with the upstream API
    (``init_state``, ``add_new_points_or_box`` on ``frame_idx``,
    ``propagate_in_video``): its mask logits per frame, ``(H, W)`` at the
    video's resolution, in frame order (masks are ``logits > 0``)."""
    state = model.init_state(str(video_dir))
    model.add_new_points_or_box(state, frame_idx=frame_idx, obj_id=1, points=np.asarray(points, np.float32),
                                labels=np.asarray(labels, np.int32))
    logits = {index: masks[0, 0].clone() for index, _, masks in model.propagate_in_video(state)}
    return [logits[index] for index in sorted(logits)]


register_adapter(Sam2VideoAdapter())
