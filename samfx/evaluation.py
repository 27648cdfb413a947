"""``samfx.evaluate``: how well a model segments the user's own objects, and how
closely it follows the original.

For each annotated object, prompts are derived from its mask as SAM's authors
evaluate (:func:`samfx.data.prompts_from_masks`): the mask's box, and one
click at the point farthest inside it. Each model's image encoder runs once
per image; all the boxes of an image go through the decoder as one batch, and
so do the clicks (each click's most confident of its three masks is kept, as
SAM's single-click protocol does). Per object and in total:

* IoU against the ground-truth mask (mIoU), per prompt kind;
* with an original model: IoU of the two models' masks, and the original's mIoU.

The totals lead with the prompt kinds the model was trained with (LiteMedSAM:
boxes); the others are reported apart, with the reason.

Without annotations, package photos with ground truth (``coins``) count as
annotated; other images are prompted on their largest compact regions (no
ground truth: only the agreement with the original is measured).

Example::

    >>> import samfx
    >>> sam = samfx.models.build("lite_medsam")
    >>> report = samfx.evaluate(sam, images=["coins"])
    >>> report.objects, report.trained_prompts, round(report.gt_miou, 2)
    (24, ['box'], 0.97)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, Predictor, find_adapter
from .data import ImageSample, expand_images, image_sample
from .fidelity import box_masks, click_masks, mask_ious
from .report import write_json

__all__ = ["EvalError", "EvalReport", "evaluate", "saved_model_and_original"]

PROMPT_KINDS = ("box", "point")


class EvalError(ValueError):
    """An evaluation that cannot run: nothing to measure, or a model that cannot be rebuilt."""


@dataclass
class EvalReport:
    """What :func:`evaluate` measured (see the module doc).

    Attributes:
        model, original: names of the evaluated model and of the original (``None``: none given).
        source: where the images and annotations came from.
        images: the images' names, in order.
        objects: objects evaluated.
        trained_prompts: the kinds evaluated that the model was trained with
            (all kinds evaluated, if none was); ``gt_miou`` and
            ``vs_original_miou`` are means over objects and these kinds.
        untrained_prompts_note: why the other kinds' figures mean little.
        by_prompt: per kind: ``trained``, ``objects``, ``gt_miou`` (the
            model's), ``gt_miou_original``, ``vs_original_miou`` and
            ``vs_original_min`` (``None`` where not measured).
        per_object: per object: ``image``, ``id``, ``area`` and, per kind,
            ``gt_iou``, ``gt_iou_original``, ``vs_original``.
        per_image: per image: ``image``, ``objects`` and ``seconds``.
        calibration_overlap: evaluated images the saved model was calibrated on.
        time_s: wall time.
    """

    model: str
    original: str | None
    source: str
    images: list[str]
    objects: int
    trained_prompts: list[str]
    untrained_prompts_note: str
    by_prompt: dict[str, dict[str, Any]]
    gt_miou: float | None
    gt_miou_original: float | None
    vs_original_miou: float | None
    per_object: list[dict[str, Any]] = field(default_factory=list)
    per_image: list[dict[str, Any]] = field(default_factory=list)
    calibration_overlap: list[str] = field(default_factory=list)
    time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def table(self) -> str:
        """The totals as a text table."""
        lead = " and ".join(self.trained_prompts)
        lines = [f"samfx eval: {self.model} on {len(self.images)} images, {self.objects} objects ({self.source}); "
                 f"{self.time_s:.1f} s",
                 f"totals over {lead} prompts, the kinds the model was trained with"]
        if self.original:
            lines[-1] += f"; original: {self.original}"
        lines += ["", f"{'prompts':<18}{'objects':>8}{'mIoU vs GT':>12}{'original':>10}{'IoU vs original':>17}"
                      f"{'worst':>8}"]

        def cell(value: float | None, width: int, percent: bool = False) -> str:
            if value is None:
                return f"{'-':>{width}}"
            return f"{100 * value:>{width}.1f}" if percent else f"{value:>{width}.4f}"

        rows = [("headline", len(self.per_object), self.gt_miou, self.gt_miou_original, self.vs_original_miou, None)]
        rows += [(f"{kind}{'' if row['trained'] else ' (apart)'}", row["objects"], row["gt_miou"],
                  row["gt_miou_original"], row["vs_original_miou"], row["vs_original_min"])
                 for kind, row in self.by_prompt.items()]
        for label, objects, gt, gt_original, vs, worst in rows:
            lines.append(f"{label:<18}{objects:>8}{cell(gt, 12, True)}{cell(gt_original, 10, True)}"
                         f"{cell(vs, 17)}{cell(worst, 8)}")
        untrained = [k for k, row in self.by_prompt.items() if not row["trained"]]
        if untrained and self.untrained_prompts_note:
            lines.append(f"\n{', '.join(untrained)} prompts apart: {self.untrained_prompts_note}")
        if self.calibration_overlap:
            lines.append(f"\nwarning: {len(self.calibration_overlap)} evaluated images were used to calibrate the "
                         f"model: {', '.join(self.calibration_overlap[:5])}")
        return "\n".join(lines)


def saved_model_and_original(run_dir: str | Path, checkpoint: str | None = None) -> tuple[nn.Module, nn.Module]:
    """A directory written by ``samfx optimize`` as ``(optimized, original)``:
    the original rebuilt from the recipe's zoo model (``checkpoint``: the
    weights it was optimized from, for zoo models with random weights).

    Raises:
        EvalError: the recipe's base model cannot be rebuilt.
    """
    from . import models
    from .serialization import load, read_recipe

    base = read_recipe(run_dir).get("base")
    if not base:
        raise EvalError(f"{run_dir} was optimized from a model outside the zoo; evaluate it from Python with "
                        "samfx.evaluate(samfx.load(DIR, base=original), against=original)")
    if not checkpoint and not models.spec(base["name"]).pretrained:
        raise EvalError(f"{run_dir} was optimized from {base['name']} with random weights, which cannot be "
                        "rebuilt; give the checkpoint it was optimized from")
    original = models.build(base["name"], small=base["small"], checkpoint=checkpoint)
    return load(run_dir, base=original), original  # load optimizes a copy: the original stays as it is


def _samples(images: Sequence[Any] | None, annotations: str | Path | None) -> tuple[Sequence[Any], str]:
    """The images to evaluate, each an ``AnnotatedImage`` or an
    image source (loaded lazily), and a description of where they came from."""
    if annotations is not None:
        from .annotations import read_annotations

        folder = None
        if images:
            if len(images) != 1 or not Path(str(images[0])).is_dir():
                raise EvalError("with annotations, images is the one folder that holds the annotated image files")
            folder = images[0]
        found = read_annotations(annotations, folder)
        return found, f"{found.format} annotations {found.source}"
    if not images:
        raise EvalError("give images (package names, files, a directory or a glob) or annotations")
    from .annotations import AnnotatedImage

    if all(isinstance(item, (ImageSample, AnnotatedImage)) for item in images):
        return list(images), "prepared samples"  # a tuner's held-out part, prompted once for every candidate
    return expand_images(images, "evaluation"), "images without annotations"


def _sample(item: Any) -> ImageSample:
    from .annotations import AnnotatedImage

    if isinstance(item, AnnotatedImage):
        return item.sample()
    return item if isinstance(item, ImageSample) else image_sample(item)


def _ids(item: Any, sample: ImageSample) -> list[Any]:
    ids = getattr(item, "ids", None)
    return list(ids) if ids is not None else list(range(len(sample.objects)))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate(
    model: nn.Module | Predictor | str | Path,
    images: Sequence[str | Path | np.ndarray] | None = None,
    *,
    annotations: str | Path | None = None,
    against: nn.Module | Predictor | None = None,
    adapter: Adapter | None = None,
    prompts: Sequence[str] = PROMPT_KINDS,
    checkpoint: str | None = None,
    max_images: int | None = None,
    progress: bool = False,
) -> EvalReport:
    """Segment every annotated object with box and click prompts derived from
    its mask, and measure the masks against ground truth and the original.

    Args:
        model: the model to evaluate, a predictor of it (anything with
            :class:`samfx.adapters.Predictor`'s ``set_image`` and ``predict``:
            a runtime's, say), or a directory written by
            ``samfx optimize`` (its original is then rebuilt to compare against).
        images: package names, image files, directories or glob patterns
            (:func:`samfx.data.load_images`); with ``annotations``, at most one
            folder that holds the annotated image files. Or prepared
            :class:`~samfx.data.ImageSample` / ``AnnotatedImage`` items (a
            held-out part, prompted once for many evaluations).
        annotations: COCO instance JSON, SA-1B JSON(s) or a MedSAM npz
            (:func:`samfx.annotations.read_annotations`).
        against: the original model (or a predictor of it), to measure how
            closely ``model`` follows it.
        adapter: the family adapter (detected by default).
        prompts: the prompt kinds to evaluate (``("box",)`` halves the decoder work).
        checkpoint: for a saved directory of a zoo model with random weights,
            the weights it was optimized from (to rebuild the original).
        max_images: evaluate only the first images.
        progress: show a progress bar.

    Raises:
        EvalError: nothing to measure (no ground truth and no original), or
            images and annotations that do not go together.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    kinds = tuple(kind for kind in PROMPT_KINDS if kind in prompts)
    if not kinds or set(prompts) - set(PROMPT_KINDS):
        raise EvalError(f"prompts are some of {', '.join(PROMPT_KINDS)}; got {', '.join(prompts) or 'none'}")
    name = (getattr(model, "samfx_zoo", {}).get("name") if isinstance(model, nn.Module)
            else getattr(model, "model_dir", None))  # a runtime's predictor: its export
    calibrated: list[str] = []
    if isinstance(model, (str, Path)):
        name = str(model)
        run_dir = Path(model)
        model, original = saved_model_and_original(run_dir, checkpoint)
        against = against if against is not None else original
        report_file = run_dir / "report.json"
        if report_file.is_file():
            calibrated = (json.loads(report_file.read_text()).get("images") or {}).get("calibration") or []

    def as_predictor(model: Any) -> Any:
        if model is None or not isinstance(model, nn.Module):
            return model  # a predictor already (a runtime's, say)
        return (adapter or find_adapter(model)).predictor(model)

    predictor, reference = as_predictor(model), as_predictor(against)
    trained = [kind for kind in kinds if kind in getattr(predictor, "trained_prompts", PROMPT_KINDS)] or list(kinds)
    items, source = _samples(images, annotations)
    count = min(len(items), max_images) if max_images is not None else len(items)
    per_object: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    names: list[str] = []
    with torch.no_grad(), tqdm(total=count, desc="eval", unit="image", disable=not progress) as bar:
        for index in range(count):
            image_start = time.perf_counter()
            item = items[index]
            sample = _sample(item)
            names.append(sample.name)
            ids = _ids(item, sample)
            boxes = {p.object_index: p.coords for p in sample.prompts if p.kind == "box"}
            points = {p.object_index: p.coords for p in sample.prompts if p.kind == "point"}
            objects = sorted(boxes)
            if not objects:
                per_image.append({"image": sample.name, "objects": 0, "seconds": time.perf_counter() - image_start})
                bar.update()
                continue
            truth = np.stack([sample.objects[i] for i in objects])
            pixels = truth[0].size
            coords = {"box": np.array([boxes[i] for i in objects], np.float32),
                      "point": np.array([points[i] for i in objects], np.float32)}
            masks: dict[str, dict[str, np.ndarray]] = {}
            for role, runner in (("model", predictor), ("original", reference)):
                if runner is None:
                    continue
                runner.set_image(sample.image)
                masks[role] = {kind: (box_masks if kind == "box" else click_masks)(runner, coords[kind], pixels)
                               for kind in kinds}
            rows = [{"image": sample.name, "id": ids[i], "area": int(sample.objects[i].sum())} for i in objects]
            for kind in kinds:
                measures = {"vs_original": mask_ious(masks["model"][kind], masks["original"][kind])
                            if reference is not None else None}
                if sample.has_ground_truth:
                    measures["gt_iou"] = mask_ious(masks["model"][kind], truth)
                    measures["gt_iou_original"] = (mask_ious(masks["original"][kind], truth)
                                                   if reference is not None else None)
                for position, row in enumerate(rows):
                    row[kind] = {key: None if values is None else float(values[position])
                                 for key, values in measures.items()}
            per_object += rows
            per_image.append({"image": sample.name, "objects": len(rows),
                              "seconds": time.perf_counter() - image_start})
            running = {key: [row[kind][key] for row in per_object for kind in trained
                             if row[kind].get(key) is not None] for key in ("gt_iou", "vs_original")}
            bar.set_postfix({label: f"{np.mean(running[key]):.3f}" for key, label in
                             (("gt_iou", "mIoU"), ("vs_original", "vs orig")) if running[key]}, refresh=False)
            bar.update()
    if reference is None and not any("gt_iou" in row[kinds[0]] for row in per_object):
        raise EvalError("nothing to measure: the images have no ground truth and no original model was given "
                        "(give annotations, or an original to compare against)")

    def values(kind: str, key: str) -> list[float]:
        return [row[kind][key] for row in per_object if row[kind].get(key) is not None]

    by_prompt = {kind: {"trained": kind in trained, "objects": len(per_object),
                        "gt_miou": _mean(values(kind, "gt_iou")),
                        "gt_miou_original": _mean(values(kind, "gt_iou_original")),
                        "vs_original_miou": _mean(values(kind, "vs_original")),
                        "vs_original_min": float(np.min(values(kind, "vs_original")))
                        if values(kind, "vs_original") else None}
                 for kind in kinds}
    return EvalReport(
        model=str(name or type(model).__name__),
        original=None if against is None else (getattr(against, "samfx_zoo", {}).get("name")
                                              or type(against).__name__),
        source=source,
        images=names,
        objects=len(per_object),
        trained_prompts=trained,
        untrained_prompts_note=getattr(predictor, "untrained_prompts_note", ""),
        by_prompt=by_prompt,
        gt_miou=_mean([v for kind in trained for v in values(kind, "gt_iou")]),
        gt_miou_original=_mean([v for kind in trained for v in values(kind, "gt_iou_original")]),
        vs_original_miou=_mean([v for kind in trained for v in values(kind, "vs_original")]),
        per_object=per_object,
        per_image=per_image,
        calibration_overlap=sorted(set(calibrated) & set(names)),
        time_s=time.perf_counter() - start,
    )
