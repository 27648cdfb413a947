"""Segment everything: a mask for every object in an image, from a grid of clicks.

Two strategies, with the same filters and output:

* ``"grid"``: SAM's automatic mask generator. A ``points_per_side`` square grid
  of single positive clicks goes through the decoder in batches.
* ``"hierarchical"``: TinySAM's strategy. A sparse grid (every
  ``sparse_stride``-th point of the dense grid on each axis: 8 x 8 for 32 x 32)
  runs first; the OR of its kept masks' confident pixels (logits above
  ``high_score_thresh``) is a coverage map. Each sparse point stands for a
  ``sparse_stride`` x ``sparse_stride`` block of the dense grid; the block's
  other points are run only where the coverage map is clear. Both stages'
  masks are merged and box-NMSed. Once the encoder is small, everything-mode
  is decoder-bound, so skipping covered clicks is where the time goes.

The sparse points are points of the dense grid (the second of each block of
four, as TinySAM's offsets -1, 0, +1, +2 around its sparse point imply), so the
clicks the hierarchical strategy runs are always a subset of the grid's: with
nothing covered it runs exactly the grid. TinySAM places its sparse grid half a
dense stride off the dense grid; samfx does not.

Filters, as in SAM: predicted IoU above ``pred_iou_thresh``, stability score
(IoU of the mask thresholded at +/- ``stability_score_offset``) at least
``stability_score_thresh``, masks touching a crop's inner edge dropped (with
``crop_n_layers`` > 0), box NMS at ``box_nms_thresh`` within a crop and at
``crop_nms_thresh`` between crops (preferring smaller crops). Predicted IoUs are
checked at the decoder's resolution before any mask is resized, which saves
most of the resizing.

Any model samfx handles works, optimized or not. So does any runtime that
implements the batched predictor protocol of :class:`samfx.adapters.Predictor`
(``set_image``, ``predict_points``, ``logits_to_image``): an ONNX model pair
through onnxruntime, for instance; pass it instead of the model.

Example::

    >>> import samfx
    >>> from samfx.data import package_images
    >>> sam = samfx.models.build("sam_vit_b", small=True)   # random weights: SAM's filters relaxed
    >>> coins = package_images(["coins"])[0].image
    >>> result = samfx.everything(sam, coins, strategy="hierarchical", points_per_side=8,
    ...                           pred_iou_thresh=0, stability_score_thresh=0)
    >>> result.prompts + result.prompts_skipped
    64
    >>> sorted(result.annotations()[0]["segmentation"])
    ['counts', 'size']
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, find_adapter
from .masks import mask_iou_matrix, masks_to_boxes, rle_area, rle_decode, rle_encode, rle_to_string, stability_score

__all__ = [
    "STRATEGIES",
    "EverythingConfig",
    "EverythingResult",
    "MaskGenerator",
    "MaskMatch",
    "crop_boxes",
    "everything",
    "match_masks",
    "point_grid",
    "sparse_points",
]

STRATEGIES = ("hierarchical", "grid")
_PROTOCOL = ("set_image", "predict_points", "logits_to_image")
# Masks resized to the image at once: bounds memory (16 x 1024 x 1024 floats = 64 MB).
_RESIZE_CHUNK = 16
# SAM's tolerance, in pixels, for "this box touches the crop's edge".
_EDGE_TOLERANCE = 20.0


@dataclass(frozen=True)
class EverythingConfig:
    """Settings of segment-everything; the defaults are SAM's and TinySAM's.

    Attributes:
        points_per_side: the dense grid is ``points_per_side`` squared clicks.
        points_per_batch: clicks per decoder call.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 keeps all).
        stability_score_thresh: keep masks at least this stable (0 keeps all).
        stability_score_offset: the logit offset of the stability score.
        box_nms_thresh: box IoU above which the lower-scored mask is dropped.
        high_score_thresh: hierarchical: logits above this mark covered pixels.
        sparse_stride: hierarchical: one sparse click per ``sparse_stride`` dense
            clicks on each axis.
        crop_n_layers: extra layers of overlapping crops (layer ``i`` has
            ``4**i`` crops), each embedded and segmented on its own.
        crop_overlap_ratio: overlap of first-layer crops, as a fraction of the
            image's short side.
        crop_n_points_downscale_factor: layer ``i`` uses
            ``points_per_side / factor**i`` points per side.
        crop_nms_thresh: box NMS between crops.
        mask_threshold: logit threshold of a mask pixel.
        multimask_output: three masks per click (SAM's default for one click).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    high_score_thresh: float = 8.5
    sparse_stride: int = 4
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    crop_nms_thresh: float = 0.7
    mask_threshold: float = 0.0
    multimask_output: bool = True

    def __post_init__(self) -> None:
        positive = ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EverythingConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.sparse_stride, int) or self.sparse_stride < 2:
            raise ValueError(f"EverythingConfig.sparse_stride must be an integer >= 2, got {self.sparse_stride!r}")
        if not isinstance(self.crop_n_layers, int) or self.crop_n_layers < 0:
            raise ValueError(f"EverythingConfig.crop_n_layers must be an integer >= 0, got {self.crop_n_layers!r}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                     "crop_overlap_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"EverythingConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.stability_score_offset <= 0:
            raise ValueError(f"EverythingConfig.stability_score_offset must be positive, got {self.stability_score_offset}")
        if self.crop_n_layers and self.points_per_side // self.crop_n_points_downscale_factor ** self.crop_n_layers < 1:
            raise ValueError("EverythingConfig: the last crop layer would have no points "
                             f"({self.points_per_side} per side / {self.crop_n_points_downscale_factor}"
                             f"**{self.crop_n_layers})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EverythingResult:
    """The masks of one image, best first (by predicted IoU within a crop).

    Masks are kept as COCO run lengths (:mod:`samfx.masks`); :meth:`masks`
    decodes them and :meth:`annotations` gives COCO-style records. Boxes are
    ``x0, y0, x1, y1`` with inclusive pixel indices.

    Attributes:
        image_size: ``(H, W)`` of the image.
        strategy: ``"grid"`` or ``"hierarchical"``.
        config: the settings used.
        rles: run lengths of each mask.
        boxes, predicted_iou, stability_score: per mask.
        points: the click ``(x, y)`` that produced each mask.
        crop_boxes: the crop each mask came from (``x0, y0, x1, y1``, exclusive end).
        stages: 1 for the grid's and the sparse stage's masks, 2 for the dense stage's.
        prompts: clicks run through the decoder.
        prompts_skipped: dense clicks the hierarchical strategy found covered.
        timings: seconds: ``embed_s`` (image encoder; 0 when the embedding was
            reused), ``decoder_s`` (prompt encoder + mask decoder calls) and
            ``segment_s`` (everything after the embedding: decoder, filters,
            NMS, encoding).
    """

    image_size: tuple[int, int]
    strategy: str
    config: EverythingConfig
    rles: list[np.ndarray]
    boxes: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray
    stages: np.ndarray
    prompts: int
    prompts_skipped: int
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def areas(self) -> np.ndarray:
        return np.array([rle_area(r) for r in self.rles], dtype=np.int64)

    def masks(self) -> np.ndarray:
        """``K x H x W`` boolean masks."""
        if not self.rles:
            return np.zeros((0, *self.image_size), dtype=bool)
        return np.stack([rle_decode(r, self.image_size) for r in self.rles])

    def annotations(self, image_id: int | None = None) -> list[dict[str, Any]]:
        """COCO-style records: ``segmentation`` as compressed RLE (``size``,
        ``counts``), ``area``, ``bbox`` as COCO's ``[x, y, width, height]`` of the
        covered pixels, and SAM's ``predicted_iou``, ``stability_score``,
        ``point_coords`` and ``crop_box``."""
        h, w = self.image_size
        records = []
        for index, counts in enumerate(self.rles):
            x0, y0, x1, y1 = (float(v) for v in self.boxes[index])
            cx0, cy0, cx1, cy1 = (float(v) for v in self.crop_boxes[index])
            record = {
                "segmentation": {"size": [h, w], "counts": rle_to_string(counts)},
                "area": rle_area(counts),
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "predicted_iou": float(self.predicted_iou[index]),
                "stability_score": float(self.stability_score[index]),
                "point_coords": [[float(v) for v in self.points[index]]],
                "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
                "stage": int(self.stages[index]),
            }
            if image_id is not None:
                record["image_id"] = image_id
            records.append(record)
        return records

    def summary(self) -> str:
        skipped = f", {self.prompts_skipped} skipped as covered" if self.strategy == "hierarchical" else ""
        plural = "" if len(self) == 1 else "s"
        return (f"{len(self)} mask{plural} from {self.prompts} clicks ({self.strategy}{skipped}); "
                f"embedding {self.timings.get('embed_s', 0.0):.2f} s, segmenting {self.timings.get('segment_s', 0.0):.2f} s")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "strategy": self.strategy,
            "config": self.config.to_dict(),
            "prompts": self.prompts,
            "prompts_skipped": self.prompts_skipped,
            "timings": self.timings,
            "annotations": self.annotations(),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path


def point_grid(points_per_side: int) -> np.ndarray:
    """``n*n x 2`` click positions ``(x, y)`` in ``[0, 1]``, cell centres, x fastest (SAM's grid)."""
    offsets = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(offsets, offsets)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def sparse_points(points_per_side: int, stride: int) -> np.ndarray:
    """Which points of :func:`point_grid` form the hierarchical strategy's sparse
    grid (a boolean per point): the second point of each block of ``stride`` on
    each axis (the only one of a shorter last block)."""
    index = np.arange(points_per_side)
    start = index // stride * stride
    length = np.minimum(stride, points_per_side - start)
    chosen = index == start + np.minimum(1, length - 1)
    return (chosen[:, None] & chosen[None, :]).ravel()


def crop_boxes(image_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[tuple[int, int, int, int], int]]:
    """``((x0, y0, x1, y1), layer)`` of SAM's crops: the whole image, then
    ``2**i x 2**i`` overlapping crops for each layer ``i`` up to ``n_layers``."""
    h, w = image_size
    crops = [((0, 0, w, h), 0)]
    for layer in range(1, n_layers + 1):
        per_side = 2 ** layer
        overlap = int(overlap_ratio * min(h, w) * 2 / per_side)
        crop_w = math.ceil((overlap * (per_side - 1) + w) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + h) / per_side)
        for y0 in ((crop_h - overlap) * i for i in range(per_side)):
            for x0 in ((crop_w - overlap) * i for i in range(per_side)):
                crops.append(((x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)), layer))
    return crops


@dataclass
class _Masks:
    """Masks of one crop under construction (torch tensors on the CPU)."""

    rles: list[np.ndarray] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    predicted_iou: list[torch.Tensor] = field(default_factory=list)
    stability_score: list[torch.Tensor] = field(default_factory=list)
    points: list[torch.Tensor] = field(default_factory=list)
    stages: list[torch.Tensor] = field(default_factory=list)

    def add(self, rles, boxes, iou, stability, points, stage: int) -> None:
        self.rles += rles
        self.boxes.append(boxes.float().cpu())
        self.predicted_iou.append(iou.float().cpu())
        self.stability_score.append(stability.float().cpu())
        self.points.append(points.float().cpu())
        self.stages.append(torch.full((len(rles),), stage, dtype=torch.int8))

    def tensors(self) -> dict[str, torch.Tensor]:
        widths = {"boxes": 4, "points": 2}
        out = {}
        for name in ("boxes", "predicted_iou", "stability_score", "points", "stages"):
            parts = getattr(self, name)
            empty = torch.zeros((0, widths[name]) if name in widths else (0,))
            out[name] = torch.cat(parts) if parts else empty
        return out


def _check_image(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"the image must be an H x W x 3 uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the image must be H x W x 3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"the image must be uint8 RGB (0-255), got dtype {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"the image is empty: shape {image.shape}")
    return image


class MaskGenerator:
    """Segment-everything with one model or predictor; reuses the image
    embedding when the same image (and crop) comes again, so both strategies
    can run on one embedding.

    Args:
        model: a SAM-family model (any family samfx has an adapter for,
            optimized or not), or a predictor implementing ``set_image``,
            ``predict_points`` and ``logits_to_image`` (see
            :class:`samfx.adapters.Predictor`).
        config: thresholds and grid settings.
        adapter: force a family adapter for a model.

    Example::

        >>> import samfx
        >>> from samfx.data import package_images
        >>> from samfx.segment_everything import MaskGenerator
        >>> generator = MaskGenerator(samfx.models.build("sam_vit_b", small=True),
        ...                           samfx.EverythingConfig(points_per_side=8))
        >>> image = package_images(["coins"])[0].image
        >>> grid = generator.generate(image, "grid")
        >>> fast = generator.generate(image, "hierarchical")        # same embedding
        >>> fast.timings["embed_s"] == 0.0 and fast.prompts <= grid.prompts
        True
    """

    def __init__(self, model: nn.Module | Any, config: EverythingConfig | None = None,
                 adapter: Adapter | None = None) -> None:
        self.config = config or EverythingConfig()
        if isinstance(model, nn.Module):
            self.predictor = (adapter or find_adapter(model)).predictor(model)
        else:
            missing = [name for name in _PROTOCOL if not callable(getattr(model, name, None))]
            if missing:
                raise TypeError(f"{type(model).__name__} is neither a model nor a batched predictor: it lacks "
                                f"{', '.join(missing)} (see samfx.adapters.Predictor)")
            self.predictor = model
        trained = getattr(self.predictor, "trained_prompts", ("point",))
        if "point" not in trained:
            warnings.warn(f"{type(self.predictor).__name__} serves a model trained with {', '.join(trained)} prompts "
                          "only: its single-click masks are not meaningful, so segment-everything will find few "
                          "or no masks", stacklevel=2)
        self._embedded: tuple[str, tuple[int, int, int, int]] | None = None

    @torch.inference_mode()
    def generate(self, image: np.ndarray, strategy: str = "hierarchical") -> EverythingResult:
        """Segment everything in an ``H x W x 3`` uint8 RGB image."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        image = _check_image(image)
        config = self.config
        size = image.shape[:2]
        digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest()
        timings = {"embed_s": 0.0, "decoder_s": 0.0, "segment_s": 0.0}
        per_crop = []
        prompts = skipped = 0
        for box, layer in crop_boxes(size, config.crop_n_layers, config.crop_overlap_ratio):
            start = time.perf_counter()
            if self._embedded != (digest, box):
                x0, y0, x1, y1 = box
                self._embedded = None  # a failure below leaves no stale embedding behind
                self.predictor.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
                self._embedded = (digest, box)
                timings["embed_s"] += time.perf_counter() - start
            start = time.perf_counter()
            side = config.points_per_side // config.crop_n_points_downscale_factor ** layer
            data, run, skip = self._segment_crop(box, size, side, strategy, timings)
            per_crop.append((box, data))
            prompts += run
            skipped += skip
            timings["segment_s"] += time.perf_counter() - start
        start = time.perf_counter()
        result = self._merge(per_crop, size, strategy, prompts, skipped, timings)
        timings["segment_s"] += time.perf_counter() - start
        return result

    def _segment_crop(self, box, size, side, strategy, timings) -> tuple[dict[str, Any], int, int]:
        config = self.config
        x0, y0, x1, y1 = box
        points = torch.from_numpy(point_grid(side) * np.array([x1 - x0, y1 - y0])).float()
        masks = _Masks()
        if strategy == "grid":
            self._run(points, box, size, 1, masks, None, timings)
            run, skipped = len(points), 0
        else:
            sparse = torch.from_numpy(sparse_points(side, config.sparse_stride))
            coverage = torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
            self._run(points[sparse], box, size, 1, masks, coverage, timings)
            dense = points[~sparse]
            xs = dense[:, 0].long().clamp(0, x1 - x0 - 1)
            ys = dense[:, 1].long().clamp(0, y1 - y0 - 1)
            covered = coverage[ys, xs]
            self._run(dense[~covered], box, size, 2, masks, None, timings)
            run, skipped = int(sparse.sum() + (~covered).sum()), int(covered.sum())
        data = masks.tensors()
        keep = _nms(data["boxes"], data["predicted_iou"], config.box_nms_thresh)
        data = {name: value[keep] for name, value in data.items()}
        data["rles"] = [masks.rles[i] for i in keep.tolist()]
        offset = torch.tensor([x0, y0], dtype=torch.float)
        data["boxes"] = data["boxes"] + offset.repeat(2)
        data["points"] = data["points"] + offset
        return data, run, skipped

    def _run(self, points: torch.Tensor, box, size, stage: int, masks: _Masks,
             coverage: torch.Tensor | None, timings: dict[str, float]) -> None:
        """Decode ``points`` in batches, filter, encode; OR confident pixels into ``coverage``."""
        config = self.config
        x0, y0, x1, y1 = box
        h, w = size
        whole_image = box == (0, 0, w, h)
        for start in range(0, len(points), config.points_per_batch):
            batch = points[start:start + config.points_per_batch]
            began = time.perf_counter()
            low_res, iou = self.predictor.predict_points(batch.numpy(), multimask_output=config.multimask_output)
            timings["decoder_s"] += time.perf_counter() - began
            low_res, iou = torch.as_tensor(low_res), torch.as_tensor(iou)
            per_click = iou.shape[1]
            low_res, iou = low_res.flatten(0, 1), iou.flatten()
            clicks = batch.repeat_interleave(per_click, dim=0)
            if config.pred_iou_thresh > 0:
                keep = (iou > config.pred_iou_thresh).nonzero().flatten().cpu()
            else:
                keep = torch.arange(len(iou))
            for chunk in keep.split(_RESIZE_CHUNK):
                logits = self.predictor.logits_to_image(low_res[chunk.to(low_res.device)])
                logits = torch.as_tensor(logits)
                stability = stability_score(logits, config.mask_threshold, config.stability_score_offset).cpu()
                good = stability >= config.stability_score_thresh if config.stability_score_thresh > 0 else \
                    torch.ones_like(stability, dtype=torch.bool)
                logits, chunk, stability = logits[good.to(logits.device)], chunk[good], stability[good]
                binary = logits > config.mask_threshold
                boxes = masks_to_boxes(binary).cpu()
                if not whole_image:
                    inner = ~_near_crop_edge(boxes + torch.tensor([x0, y0, x0, y0]), box, (0, 0, w, h))
                    logits, binary, boxes = logits[inner.to(logits.device)], binary[inner.to(binary.device)], boxes[inner]
                    chunk, stability = chunk[inner], stability[inner]
                if coverage is not None and len(logits):
                    coverage |= (logits > config.high_score_thresh).any(dim=0).cpu()
                if not whole_image:
                    binary = torch.nn.functional.pad(binary, (x0, w - x1, y0, h - y1))
                masks.add(rle_encode(binary.cpu()), boxes, iou[chunk.to(iou.device)], stability, clicks[chunk], stage)

    def _merge(self, per_crop, size, strategy, prompts, skipped, timings) -> EverythingResult:
        config = self.config
        names = ("boxes", "predicted_iou", "stability_score", "points", "stages")
        data = {name: torch.cat([d[name] for _, d in per_crop]) for name in names}
        rles = [r for _, d in per_crop for r in d["rles"]]
        crops = torch.cat([torch.tensor([box], dtype=torch.float).expand(len(d["rles"]), 4) for box, d in per_crop])
        if len(per_crop) > 1:
            # Between crops, masks from smaller crops win.
            areas = (crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])
            keep = _nms(data["boxes"], 1.0 / areas, config.crop_nms_thresh)
            data = {name: value[keep] for name, value in data.items()}
            crops = crops[keep]
            rles = [rles[i] for i in keep.tolist()]
        return EverythingResult(
            image_size=tuple(size), strategy=strategy, config=config, rles=rles,
            boxes=data["boxes"].numpy(), predicted_iou=data["predicted_iou"].numpy(),
            stability_score=data["stability_score"].numpy(), points=data["points"].numpy(),
            crop_boxes=crops.numpy(), stages=data["stages"].numpy().astype(np.int64),
            prompts=prompts, prompts_skipped=skipped, timings=timings,
        )


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    from torchvision.ops import nms

    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    return nms(boxes.float(), scores.float(), threshold)


def _near_crop_edge(boxes: torch.Tensor, crop: tuple[int, ...], image: tuple[int, ...]) -> torch.Tensor:
    """Boxes (image frame) within SAM's tolerance of a crop edge that is not an image edge."""
    crop_t = torch.tensor(crop, dtype=torch.float)[None]
    image_t = torch.tensor(image, dtype=torch.float)[None]
    near_crop = torch.isclose(boxes, crop_t, atol=_EDGE_TOLERANCE, rtol=0)
    near_image = torch.isclose(boxes, image_t, atol=_EDGE_TOLERANCE, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def everything(model: nn.Module | Any, image: np.ndarray, strategy: str = "hierarchical", *,
               config: EverythingConfig | None = None, adapter: Adapter | None = None,
               **options: Any) -> EverythingResult:
    """Segment everything in an image (see the module doc).

    Args:
        model: a SAM-family model (optimized or not) or a batched predictor.
        image: ``H x W x 3`` uint8 RGB.
        strategy: ``"hierarchical"`` (TinySAM) or ``"grid"`` (SAM).
        config: an :class:`EverythingConfig`; ``options`` override its fields
            (``points_per_side=16``, ``pred_iou_thresh=0.8``, ...).
        adapter: force a family adapter.

    Raises:
        ValueError: bad image, strategy or option. TypeError: ``model`` is
            neither a model nor a batched predictor.
    """
    config = config or EverythingConfig()
    if options:
        known = {f.name for f in fields(EverythingConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown everything options {unknown}; known: {', '.join(sorted(known))}")
        config = EverythingConfig(**{**config.to_dict(), **options})
    return MaskGenerator(model, config, adapter).generate(image, strategy)


@dataclass
class MaskMatch:
    """One-to-one matching of a candidate's masks to a reference's.

    Attributes:
        reference, candidate: number of masks on each side.
        matched: pairs whose IoU reaches ``iou_threshold``.
        recall: ``matched / reference`` (1 when the reference has no mask).
        precision: ``matched / candidate`` (1 when the candidate has no mask).
        mean_iou: mean mask IoU of the matched pairs (``nan`` when none).
        iou_threshold: the IoU a pair needs to count as matched.
        pairs: ``(reference index, candidate index, IoU)`` of the matched pairs.
    """

    reference: int
    candidate: int
    matched: int
    recall: float
    precision: float
    mean_iou: float
    iou_threshold: float
    pairs: list[tuple[int, int, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["pairs"]
        return out


def match_masks(reference: EverythingResult | np.ndarray, candidate: EverythingResult | np.ndarray,
                iou_threshold: float = 0.5) -> MaskMatch:
    """Match masks one to one by maximum total IoU (Hungarian assignment);
    pairs below ``iou_threshold`` do not count.

    Example::

        >>> import numpy as np
        >>> a = np.zeros((2, 4, 4), bool); a[0, :2] = True; a[1, 2:] = True
        >>> match_masks(a, a[:1]).recall
        0.5
    """
    from scipy.optimize import linear_sum_assignment

    ref = reference.masks() if isinstance(reference, EverythingResult) else np.asarray(reference, bool)
    cand = candidate.masks() if isinstance(candidate, EverythingResult) else np.asarray(candidate, bool)
    if ref.shape[1:] != cand.shape[1:]:
        raise ValueError(f"masks of different images: {ref.shape[1:]} vs {cand.shape[1:]}")
    pairs: list[tuple[int, int, float]] = []
    if len(ref) and len(cand):
        ious = mask_iou_matrix(ref, cand)
        rows, cols = linear_sum_assignment(-ious)
        pairs = [(int(r), int(c), float(ious[r, c])) for r, c in zip(rows, cols) if ious[r, c] >= iou_threshold]
    matched = len(pairs)
    return MaskMatch(
        reference=len(ref), candidate=len(cand), matched=matched,
        recall=matched / len(ref) if len(ref) else 1.0,
        precision=matched / len(cand) if len(cand) else 1.0,
        mean_iou=float(np.mean([p[2] for p in pairs])) if pairs else float("nan"),
        iou_threshold=iou_threshold, pairs=pairs,
    )
