"""What a family needs to be deployed outside PyTorch: the encoder and prompt
decoder as export-friendly modules in the SAM convention, and how its predictor
prepares images and prompts.

The SAM convention (``segment_anything/utils/onnx.py``, samexporter, anylabeling)
gives the prompt decoder fixed inputs: the image embeddings, ``point_coords``
``(1, N, 2)`` in the encoder-input frame, ``point_labels`` ``(1, N)`` (1 foreground,
0 background, 2 and 3 the top-left and bottom-right corners of a box, -1 a
padding point), ``mask_input`` ``(1, 1, 4h, 4w)`` and ``has_mask_input`` ``(1,)``.
Prompts are embedded with the same weights and formulas as the family's prompt
encoder, written without in-place writes or data-dependent indexing, and the
family's own (captured, possibly optimized) mask decoder does the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Deployment", "EncoderOutputs", "Preprocessing", "SamPointEmbedding", "SamPromptDecoder",
           "VideoDeployment", "video_examples"]


@dataclass(frozen=True)
class Preprocessing:
    """How the family's predictor turns an ``H x W x 3`` uint8 image into the
    encoder input, prompts into the encoder frame, and low-res masks back.

    Attributes:
        size: side of the square encoder input.
        resize: ``longest_side`` (aspect kept, padded bottom/right with zeros
            after normalisation) or ``stretch`` (both sides to ``size``).
        resample_uint8: resampling on the 8-bit image, rounded back to 8 bits
            (PIL, torchvision on uint8), rather than on float pixels.
        antialias: downscaling widens the bilinear filter (PIL, torchvision);
            without it, plain bilinear interpolation (``F.interpolate``).
        mean, std: normalisation, in 0-255 pixel units.
        pad_point: when the predictor appends a padding point (label -1):
            ``if_no_box`` (SAM, Hugging Face) or ``always`` (SAM 2).
        upscale_masks: low-res masks are first resized to ``size`` x ``size``
            (then cropped to the resized image for ``longest_side``) before the
            resize to the image; otherwise they go to the image size directly.
    """

    size: int
    resize: str
    resample_uint8: bool
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_point: str = "if_no_box"
    upscale_masks: bool = True

    def __post_init__(self) -> None:
        if self.resize not in ("longest_side", "stretch"):
            raise ValueError(f"unknown resize {self.resize!r}")
        if self.pad_point not in ("if_no_box", "always"):
            raise ValueError(f"unknown pad_point {self.pad_point!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Deployment:
    """A family's model as the two exported graphs see it.

    Attributes:
        encoder: ``(image) -> tuple of embeddings`` (the normalised, padded
            ``(B, 3, size, size)`` image).
        embedding_names: names of the encoder outputs, which are also the first
            inputs of ``decoder``.
        decoder: ``(*embeddings, point_coords, point_labels, mask_input,
            has_mask_input) -> (low_res_logits, iou_predictions)``, and without
            the two mask inputs for prompts that have no mask.
        preprocessing: how images, prompts and masks are prepared.
        mask_input_size: side of ``mask_input``.
        low_res_clamp: the predictor clamps the low-res logits it hands back for
            the next call (SAM 2); the full-size masks are made before clamping.
        prepare: runs before tracing (e.g. fills caches upstream code fills lazily).
    """

    encoder: nn.Module
    embedding_names: tuple[str, ...]
    decoder: nn.Module
    preprocessing: Preprocessing
    mask_input_size: int
    low_res_clamp: float | None = None
    prepare: Callable[[], None] | None = None


@dataclass
class VideoDeployment:
    """A video family's per-frame steps as four modules with tensor inputs, for
    :func:`samfx.emit.video.export_video`; the tracking loop (which memories and
    pointers a frame attends to) is the runtime's.

    Attributes:
        encoder: ``(image) -> (features, position, no_memory_features, high_res_0,
            high_res_1)``: the lowest-resolution map raw and with the no-memory
            embedding (a prompted first frame), its position encoding, and the
            decoder's two high-resolution maps.
        memory_attention: ``(features, position, memories, memory_positions,
            memory_slots, pointers, pointer_distances) -> conditioned``: ``n``
            memories stacked along the first axis, each as ``memory_encoder``
            gives it (SAM 2: a ``(mem_dim, h, w)`` map; EdgeTAM: ``(latents,
            mem_dim)`` perceiver latents), with their position encodings and
            temporal slots (``num_maskmem - t_pos - 1``: the clicked frame
            ``num_maskmem - 1``, the frame ``k`` before this one ``k - 1``), ``p``
            object pointers ``(p, C)`` and their frame distances divided by the
            largest one.
        decoder: ``(features, high_res_0, high_res_1, point_coords, point_labels)
            -> (low_res_masks, pointer, object_score)``: the best of the multimask
            outputs for points in the ``S x S`` frame (a tracked frame gives the
            point ``(0, 0)`` labelled ``-1``).
        memory_encoder: ``(features, low_res_masks, object_score, from_points) ->
            (memory, memory_position)``.
        settings: what the loop needs: ``image_size``, ``num_maskmem``,
            ``max_obj_ptrs_in_encoder``, ``mean``, ``std`` (of [0, 1] pixels),
            ``resample`` (PIL's filter that stretches a frame to the square
            input) and ``memory_dtype`` (how the loop stores memories: ``bfloat16``
            or ``float32``, as the family's video API does).
        examples: example inputs per step (2 memories and 3 pointers: the dynamic
            axes are not 0 or 1; no tensor given twice, which ``torch.export``
            would take for one input).
    """

    encoder: nn.Module
    memory_attention: nn.Module
    decoder: nn.Module
    memory_encoder: nn.Module
    settings: dict[str, Any]
    examples: dict[str, tuple[torch.Tensor, ...]]


def video_examples(image_size: int, side: int, dim: int, mem_dim: int,
                   memory: tuple[int, ...] | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """:attr:`VideoDeployment.examples` for a family with an ``image_size`` input,
    ``side x side`` lowest-resolution maps ``dim`` wide, high-resolution maps
    at 4x (``dim // 8`` wide) and 2x (``dim // 4``) that side, memories of
    shape ``memory`` (default: ``mem_dim x side x side`` maps) and ``4 * side``
    low-resolution masks."""
    memory = memory or (mem_dim, side, side)

    def features() -> torch.Tensor:
        return torch.zeros(1, dim, side, side)

    return {
        "encoder": (torch.zeros(1, 3, image_size, image_size),),
        "memory_attention": (features(), features(), torch.zeros(2, *memory), torch.zeros(2, *memory),
                             torch.tensor([5, 6]), torch.zeros(3, dim),
                             torch.tensor([0.1, 0.2, 0.3])),
        "decoder": (features(), torch.zeros(1, dim // 8, 4 * side, 4 * side),
                    torch.zeros(1, dim // 4, 2 * side, 2 * side), torch.zeros(1, 2, 2), torch.tensor([[1.0, -1.0]])),
        "memory_encoder": (features(), torch.zeros(1, 1, 4 * side, 4 * side), torch.ones(1, 1), torch.ones(1)),
    }


class EncoderOutputs(nn.Module):
    """An image encoder whose output is picked apart by ``select`` into the
    tuple of embeddings the decoder takes."""

    def __init__(self, encoder: nn.Module, select: Callable[[Any], tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.encoder = encoder
        self._select = select

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._select(self.encoder(image))


class SamPointEmbedding(nn.Module):
    """SAM-convention prompt embedding with the weights of a ``segment_anything``-style
    ``PromptEncoder`` (SAM, SAM-HQ, LiteMedSAM, MobileSAM and SAM 2 share it).

    Points: the random-Fourier encoding of the pixel centre, replaced by the
    not-a-point embedding for padding points, plus the learned embedding of the
    label (box corners are points labelled 2 and 3). Mask: the embedded mask or
    the no-mask embedding. Families with other attribute names override the
    ``fourier``, ``label_embeddings``, ``mask_embedding`` and ``dense_pe`` hooks.
    """

    def __init__(self, prompt_encoder: nn.Module, frame_hw: tuple[int, int]) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.register_buffer("frame", torch.tensor([float(frame_hw[1]), float(frame_hw[0])]), persistent=False)

    def fourier(self, coords: torch.Tensor) -> torch.Tensor:
        """Positional encoding of coordinates normalised to [0, 1]."""
        return self.prompt_encoder.pe_layer._pe_encoding(coords)

    def label_embeddings(self) -> nn.ModuleList:
        return self.prompt_encoder.point_embeddings

    def mask_embedding(self, mask_input: torch.Tensor) -> torch.Tensor:
        return self.prompt_encoder.mask_downscaling(mask_input)

    def dense_pe(self) -> torch.Tensor:
        return self.prompt_encoder.get_dense_pe()

    def sparse(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        embedding = self.fourier((point_coords + 0.5) / self.frame)
        labels = point_labels.unsqueeze(-1)
        embedding = embedding * (labels != -1) + self.prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for index, learned in enumerate(self.label_embeddings()):
            embedding = embedding + learned.weight * (labels == index)
        return embedding

    def dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * self.mask_embedding(mask_input) + (1 - has_mask_input) * no_mask

    def no_mask(self, prompts: int) -> torch.Tensor:
        """The dense embedding of ``prompts`` prompts without a mask: the no-mask embedding
        broadcast along the batch (stride 0), as the prompt encoders give it, so that the
        decoder's image side stays one row per image (see ``share_image_side``)."""
        height, width = self.dense_pe().shape[-2:]
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(prompts, -1, height, width)


class SamPromptDecoder(nn.Module):
    """SAM-convention decoder: a prompt embedding module (``sparse``, ``dense``,
    ``no_mask``, ``dense_pe`` as :class:`SamPointEmbedding`) and the family's mask
    decoder, called by ``call(mask_decoder, embeddings, dense_pe, sparse, dense) ->
    (low_res_logits, iou_predictions)``.

    Inputs: the embeddings, ``point_coords``, ``point_labels`` and either
    ``mask_input, has_mask_input`` (SAM's convention) or nothing more: prompts
    without a mask, whose dense embedding is shared by the batch, so the mask
    embedding is not computed once per prompt on zeros.
    """

    def __init__(self, points: nn.Module, mask_decoder: nn.Module,
                 call: Callable[..., tuple[torch.Tensor, torch.Tensor]], embeddings: int) -> None:
        super().__init__()
        self.points = points
        self.mask_decoder = mask_decoder
        self._call = call
        self.embeddings = embeddings

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = inputs[: self.embeddings]
        point_coords, point_labels, *mask = inputs[self.embeddings:]
        sparse = self.points.sparse(point_coords, point_labels)
        dense = self.points.dense(*mask) if mask else self.points.no_mask(point_coords.shape[0])
        return self._call(self.mask_decoder, embeddings, self.points.dense_pe(), sparse, dense)
