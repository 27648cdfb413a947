"""Calibration data for data-driven passes: unlabeled images, prompted the way users prompt.

A :class:`CalibrationSet` is a list of images with prompts on each: positive
clicks at random places, and for each click a box around the object the
model itself segments there (jittered, as people draw boxes roughly). The
model is run through its family's predictor, so every family is prompted the
same way. Everything is deterministic given the seed, and the prompts are
plain numbers that a recipe can record.

By default the images are the package photos that :mod:`samfx.fidelity` does
not evaluate on (:data:`DEFAULT_CALIBRATION_IMAGES`), so that fidelity figures
are measured on held-out images.

Example::

    >>> import samfx
    >>> from samfx.calibration import CalibrationSet
    >>> model = samfx.models.build("lite_medsam")
    >>> calib = CalibrationSet.build(model, images=("chelsea",), prompts_per_image=2, seed=0)
    >>> [p.kind for p in calib.prompts[0]]
    ['point', 'box', 'point', 'box']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from torch import nn

from .adapters import Adapter, find_adapter
from .adapters.base import Predictor
from .data import Prompt, load_images

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "CalibrationSet"]

#: Package photos for calibration: those that fidelity reports do not use.
DEFAULT_CALIBRATION_IMAGES = ("chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field")

#: A box is grown or shrunk on each side by up to this fraction of its size.
_BOX_JITTER = 0.08


@dataclass
class CalibrationSet:
    """Images, their names (package names or digests), the prompts on each and
    the masks the model the set was built with predicted for them (the reference
    that quantized or pruned variants are compared with)."""

    images: list[np.ndarray]
    names: list[str]
    prompts: list[list[Prompt]] = field(default_factory=list)
    masks: list[list[np.ndarray]] = field(default_factory=list)
    seed: int = 0

    @staticmethod
    def build(
        model: nn.Module,
        images: Sequence[str | np.ndarray] = DEFAULT_CALIBRATION_IMAGES,
        *,
        prompts_per_image: int = 8,
        seed: int = 0,
        adapter: Adapter | None = None,
        predictor: Predictor | None = None,
    ) -> "CalibrationSet":
        """Sample prompts on ``images`` (package names or ``H x W x 3`` uint8 arrays).

        Each of the ``prompts_per_image`` clicks lands uniformly in the central
        80% of the image; its box surrounds the best of the model's three masks
        for that click, each side moved by up to 8% of the box size (a
        square around the click when the mask is empty).
        """
        arrays, names = load_images(images, "calibration")
        predictor = predictor or (adapter or find_adapter(model)).predictor(model)
        prompts, masks = [], []
        for index, image in enumerate(arrays):
            rng = np.random.default_rng([seed, index])
            predictor.set_image(image)
            image_prompts, image_masks = _sample_prompts(predictor, image, prompts_per_image, rng)
            prompts.append(image_prompts)
            masks.append(image_masks)
        return CalibrationSet(arrays, names, prompts, masks, seed)

    def subset(self, count: int) -> "CalibrationSet":
        """The first ``count`` images with their prompts and masks."""
        return CalibrationSet(self.images[:count], self.names[:count], self.prompts[:count], self.masks[:count],
                              self.seed)

    def agreement(self, predictor: Predictor) -> float:
        """Mean IoU of ``predictor``'s masks with the reference masks, over every
        prompt and every output mask."""
        from .fidelity import mask_iou

        ious = [mask_iou(a, b) for ref, new in zip(self.masks, self.run(predictor))
                for r, n in zip(ref, new) for a, b in zip(r, n)]
        return float(np.mean(ious))

    def run(self, predictor: Predictor, on_image: Any = None) -> list[list[np.ndarray]]:
        """Run every prompt through ``predictor``; the masks per image, in prompt order.

        ``on_image(index)``, if given, is called before each image is embedded.
        """
        masks = []
        for index, (image, prompts) in enumerate(zip(self.images, self.prompts)):
            if on_image is not None:
                on_image(index)
            predictor.set_image(image)
            masks.append([predictor.predict(**p.as_kwargs())[0] for p in prompts])
        return masks

    def recipe(self) -> dict[str, Any]:
        """What a recipe records: image names, seed and every prompt."""
        return {
            "images": list(self.names),
            "seed": self.seed,
            "prompts": [[{"kind": p.kind, "coords": list(p.coords)} for p in prompts] for prompts in self.prompts],
        }


def _sample_prompts(
    predictor: Predictor, image: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[list[Prompt], list[np.ndarray]]:
    h, w = image.shape[:2]
    prompts, outputs = [], []
    for _ in range(count):
        x, y = float(rng.uniform(0.1, 0.9) * w), float(rng.uniform(0.1, 0.9) * h)
        click = Prompt("point", (x, y), -1)
        masks, scores = predictor.predict(**click.as_kwargs())
        best = masks[int(np.argmax(scores))]
        if best.any():
            ys, xs = np.nonzero(best)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
        else:
            half = 0.1 * min(h, w)
            box = np.array([x - half, y - half, x + half, y + half])
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1.0
        box = box + rng.uniform(-_BOX_JITTER, _BOX_JITTER, size=4) * size
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
        if box[2] <= box[0] or box[3] <= box[1]:
            box = np.array([max(0.0, x - 2), max(0.0, y - 2), min(w - 1.0, x + 2), min(h - 1.0, y + 2)])
        box_prompt = Prompt("box", tuple(float(v) for v in box), -1)
        prompts += [click, box_prompt]
        outputs += [masks, predictor.predict(**box_prompt.as_kwargs())[0]]
    return prompts, outputs
