"""How closely an optimized model follows the original, on real images.

Both models run through their family's predictor (``SamPredictor``,
``SAM2ImagePredictor``, ...) on the same images and prompts; the comparison is
what a user would see:

* mask IoU between the original's and the optimized model's masks, per prompt
  and per output mask (mean and worst), led by the prompt kinds the model was
  trained with (its predictor's ``trained_prompts``: boxes only for LiteMedSAM,
  whose clicks give near-empty masks), with each prompt kind also apart;
* absolute error of the predicted IoU scores;
* cosine similarity of the image embeddings;
* where the image has ground truth (``coins``), box-prompt mIoU of each model
  against it.

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> fast = samfx.optimize(sam, ["split_qkv"])
    >>> report = samfx.fidelity.compare(sam, fast, images=["coins"], max_prompts_per_image=4)
    >>> report.mask_iou_min == 1.0
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, Predictor, find_adapter
from .data import DEFAULT_IMAGES, ImageSample, package_images

__all__ = ["CachedPredictor", "FidelityReport", "box_masks", "click_masks", "compare", "ground_truth_miou", "mask_iou", "mask_ious",
           "pixel_batches"]

#: decoder outputs at image resolution per batch: bounds memory on large images
_PIXELS_PER_BATCH = 2**25


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each pair ``a[i]``, ``b[i]`` of ``N x H x W`` masks; two empty masks agree."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = np.logical_and(a, b).sum(axis=1)
    union = np.logical_or(a, b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def pixel_batches(count: int, pixels: int) -> Iterator[slice]:
    """Slices of ``count`` prompts whose masks of ``pixels`` each fit one decoder batch."""
    step = max(1, _PIXELS_PER_BATCH // max(pixels, 1))
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def box_masks(predictor: Predictor, boxes: np.ndarray, pixels: int) -> np.ndarray:
    """One mask per box on the current image, the boxes in batches
    (:meth:`Predictor.predict_boxes`; a runtime's predictor without it runs them one by one)."""
    run = getattr(predictor, "predict_boxes", None) or (lambda b: Predictor.predict_boxes(predictor, b))
    return np.concatenate([run(boxes[part])[0] for part in pixel_batches(len(boxes), pixels)])


def click_masks(predictor: Predictor, points: np.ndarray, pixels: int) -> np.ndarray:
    """One mask per single click on the current image, the most confident of its
    candidates, the clicks in batches (:meth:`Predictor.predict_clicks`)."""
    run = getattr(predictor, "predict_clicks", None) or (lambda p: Predictor.predict_clicks(predictor, p))
    return np.concatenate([run(points[part])[0] for part in pixel_batches(len(points), pixels)])


@dataclass
class FidelityReport:
    """Agreement of an optimized model with the original (see module doc)."""

    images: list[str]
    prompts: int
    mask_iou_mean: float
    mask_iou_min: float
    iou_pred_error_mean: float
    iou_pred_error_max: float
    embedding_cosine_mean: float
    embedding_cosine_min: float
    gt_miou_original: float | None = None
    gt_miou_optimized: float | None = None
    per_image: list[dict[str, Any]] = field(default_factory=list)
    #: over box prompts only (SAM's single-mask answer to the least ambiguous prompt)
    box_mask_iou_mean: float | None = None
    box_mask_iou_min: float | None = None
    #: median seconds of one ``set_image`` (single runs per image, not a benchmark)
    set_image_s_original: float | None = None
    set_image_s_optimized: float | None = None
    #: the prompt kinds the model was trained with: ``mask_iou_mean`` and
    #: ``mask_iou_min`` (and the per-image figures) are over these
    trained_prompts: list[str] = field(default_factory=lambda: ["point", "box"])
    #: per prompt kind: ``prompts``, ``mask_iou_mean``, ``mask_iou_min``, ``trained``
    by_prompt: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: why the kinds the model was not trained with give poor figures
    untrained_prompts_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        kinds = " and ".join(f"{k} prompts" for k in self.trained_prompts)
        text = (f"mask IoU vs original {self.mask_iou_mean:.4f} (worst {self.mask_iou_min:.4f}; {kinds}), "
                f"IoU-pred error {self.iou_pred_error_mean:.4f}, embedding cosine {self.embedding_cosine_mean:.5f}")
        if self.gt_miou_original is not None:
            text += f", GT mIoU {100 * self.gt_miou_original:.1f} -> {100 * self.gt_miou_optimized:.1f}"
        return text


class CachedPredictor(Predictor):
    """A predictor that runs each image and prompt once and replays the result.

    Comparing many candidates against one original (a tuner's search) then
    runs the original only once. Images are recognised by content.

    Example::

        >>> import samfx
        >>> sam = samfx.models.build("sam_vit_b", small=True)
        >>> reference = CachedPredictor(samfx.adapters.find_adapter(sam).predictor(sam))
        >>> a = samfx.optimize(sam, ["split_qkv"])
        >>> compare(reference, a, ["coins"], max_prompts_per_image=2).mask_iou_min   # runs sam
        1.0
        >>> compare(reference, a, ["coins"], max_prompts_per_image=2).mask_iou_min   # replays sam's outputs
        1.0
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.trained_prompts = predictor.trained_prompts
        self.untrained_prompts_note = predictor.untrained_prompts_note
        self._images: dict[bytes, dict[str, Any]] = {}
        self._current: dict[str, Any] | None = None

    def set_image(self, image: np.ndarray) -> None:
        key = image.shape.__repr__().encode() + image.tobytes()
        if key not in self._images:
            start = time.perf_counter()
            self.predictor.set_image(image)
            elapsed = time.perf_counter() - start
            self._images[key] = {"embedding": self.predictor.image_embedding, "predictions": {}, "set_image_s": elapsed}
        self._current = self._images[key]

    @property
    def set_image_s(self) -> float:
        """Seconds the last image's real ``set_image`` took."""
        return self._entry()["set_image_s"]

    def _entry(self) -> dict[str, Any]:
        if self._current is None:
            raise RuntimeError("call set_image first")
        return self._current

    @property
    def image_embedding(self) -> torch.Tensor:
        return self._entry()["embedding"]

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        key = tuple(None if v is None else np.asarray(v).tobytes() for v in (point_coords, point_labels, box))
        key += (multimask_output,)
        predictions = self._entry()["predictions"]
        if key not in predictions:
            predictions[key] = self.predictor.predict(point_coords, point_labels, box, multimask_output)
        return predictions[key]

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The wrapped predictor's batched boxes (:meth:`Predictor.predict_boxes`), run once per batch."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        key = ("boxes", boxes.tobytes())
        predictions = self._entry()["predictions"]
        if key not in predictions:
            predictions[key] = self.predictor.predict_boxes(boxes)
        return predictions[key]

    def predict_clicks(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The wrapped predictor's batched clicks (:meth:`Predictor.predict_clicks`), run once per batch."""
        points = np.asarray(points, np.float32).reshape(-1, 2)
        key = ("clicks", points.tobytes())
        predictions = self._entry()["predictions"]
        if key not in predictions:
            predictions[key] = self.predictor.predict_clicks(points)
        return predictions[key]


def _timed_set_image(predictor: Predictor, image: np.ndarray) -> float:
    start = time.perf_counter()
    predictor.set_image(image)
    elapsed = time.perf_counter() - start
    return predictor.set_image_s if isinstance(predictor, CachedPredictor) else elapsed


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def compare(
    original: nn.Module,
    optimized: nn.Module,
    images: Iterable[str | ImageSample] = DEFAULT_IMAGES,
    adapter: Adapter | None = None,
    max_prompts_per_image: int | None = None,
    progress: bool = False,
) -> FidelityReport:
    """Run both models on the images' prompts and compare their outputs.

    Args:
        original: the reference model, or a predictor of it (e.g. a
            :class:`CachedPredictor` shared by several comparisons).
        optimized: the model to check (e.g. from :func:`samfx.optimize`), or a
            predictor of it (e.g. an exported model in its runtime).
        images: names from :func:`samfx.data.available_images` or samples.
        adapter: the family adapter (detected from ``original`` by default).
        max_prompts_per_image: cap on prompts per image (boxes and points alternate).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if adapter is None and not (isinstance(original, Predictor) and isinstance(optimized, Predictor)):
        adapter = find_adapter(optimized if isinstance(original, Predictor) else original)
    samples = [s if isinstance(s, ImageSample) else package_images([s])[0] for s in images]
    reference = original if isinstance(original, Predictor) else adapter.predictor(original)
    candidate = optimized if isinstance(optimized, Predictor) else adapter.predictor(optimized)
    times: tuple[list[float], list[float]] = ([], [])
    trained = tuple(candidate.trained_prompts)
    ious: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    score_errors: list[float] = []
    cosines: list[float] = []
    gt_reference: list[float] = []
    gt_candidate: list[float] = []
    per_image = []
    bar = tqdm(total=sum(len(s.prompts[:max_prompts_per_image] if max_prompts_per_image else s.prompts) for s in samples),
               desc="fidelity", unit="prompt", disable=not progress)
    with torch.no_grad(), bar:
        for sample in samples:
            times[0].append(_timed_set_image(reference, sample.image))
            times[1].append(_timed_set_image(candidate, sample.image))
            cosine = _cosine(reference.image_embedding, candidate.image_embedding)
            cosines.append(cosine)
            prompts = sample.prompts[:max_prompts_per_image] if max_prompts_per_image else sample.prompts
            image_ious = []
            for prompt in prompts:
                masks_ref, scores_ref = reference.predict(**prompt.as_kwargs())
                masks_new, scores_new = candidate.predict(**prompt.as_kwargs())
                bar.update()
                prompt_ious = [mask_iou(a, b) for a, b in zip(masks_ref, masks_new)]
                ious.setdefault(prompt.kind, []).extend(prompt_ious)
                counts[prompt.kind] = counts.get(prompt.kind, 0) + 1
                if prompt.kind in trained:
                    image_ious += prompt_ious
                score_errors += np.abs(np.asarray(scores_ref) - np.asarray(scores_new)).tolist()
                if sample.has_ground_truth and prompt.kind == "box":
                    truth = sample.objects[prompt.object_index]
                    gt_reference.append(mask_iou(masks_ref[0], truth))
                    gt_candidate.append(mask_iou(masks_new[0], truth))
            per_image.append({"image": sample.name, "prompts": len(prompts), "embedding_cosine": cosine,
                              "mask_iou_mean": float(np.mean(image_ious)) if image_ious else 1.0,
                              "mask_iou_min": float(np.min(image_ious)) if image_ious else 1.0})
    headline = [v for kind in trained for v in ious.get(kind, [])]
    by_prompt = {kind: {"prompts": counts[kind], "trained": kind in trained,
                        "mask_iou_mean": float(np.mean(values)), "mask_iou_min": float(np.min(values))}
                 for kind, values in ious.items()}
    box = by_prompt.get("box")
    return FidelityReport(
        images=[s.name for s in samples],
        prompts=sum(p["prompts"] for p in per_image),
        mask_iou_mean=float(np.mean(headline)) if headline else 1.0,
        mask_iou_min=float(np.min(headline)) if headline else 1.0,
        iou_pred_error_mean=float(np.mean(score_errors)) if score_errors else 0.0,
        iou_pred_error_max=float(np.max(score_errors)) if score_errors else 0.0,
        embedding_cosine_mean=float(np.mean(cosines)),
        embedding_cosine_min=float(np.min(cosines)),
        gt_miou_original=float(np.mean(gt_reference)) if gt_reference else None,
        gt_miou_optimized=float(np.mean(gt_candidate)) if gt_candidate else None,
        per_image=per_image,
        box_mask_iou_mean=box["mask_iou_mean"] if box else None,
        box_mask_iou_min=box["mask_iou_min"] if box else None,
        set_image_s_original=float(np.median(times[0])),
        set_image_s_optimized=float(np.median(times[1])),
        trained_prompts=list(trained),
        by_prompt=by_prompt,
        untrained_prompts_note=candidate.untrained_prompts_note,
    )


def ground_truth_miou(model: nn.Module, images: Iterable[str] = ("coins",), adapter: Adapter | None = None) -> float:
    """Box-prompt mIoU of one model against the images' ground truth."""
    adapter = adapter or find_adapter(model)
    predictor = adapter.predictor(model)
    scores = []
    with torch.no_grad():
        for sample in package_images(tuple(images)):
            if not sample.has_ground_truth:
                continue
            predictor.set_image(sample.image)
            for prompt in sample.prompts:
                if prompt.kind == "box":
                    masks, _ = predictor.predict(**prompt.as_kwargs())
                    scores.append(mask_iou(masks[0], sample.objects[prompt.object_index]))
    if not scores:
        raise ValueError(f"none of {list(images)} has ground truth")
    return float(np.mean(scores))
