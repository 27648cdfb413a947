"""Real images that ship inside packages, with prompts and honest ground truth.

Images come from scikit-image's bundled photos, so nothing is downloaded.
Prompts are placed the way people prompt SAM: a box around an object and a
click near its middle. Objects come from classic segmentation:

* ``coins``: the coins of scikit-image's coin photo, segmented by the classic
  edge-based watershed (Sobel elevation map, markers from the dark background
  and the bright coins). It separates all 24 coins cleanly, so those masks are
  used as ground truth.
* other photos: the largest regions of a Felzenszwalb over-segmentation. They
  are plausible objects to prompt, not ground truth.

Example::

    >>> from samfx.data import package_images
    >>> coins = package_images(["coins"])[0]
    >>> len(coins.objects), coins.has_ground_truth
    (24, True)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_IMAGES",
    "ImageSample",
    "Prompt",
    "available_images",
    "calibration_sample",
    "image_digest",
    "load_images",
    "package_images",
]

DEFAULT_IMAGES = ("coins", "astronaut", "coffee")
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field")


@dataclass(frozen=True)
class Prompt:
    """A point (``kind == "point"``, one positive click) or a box, in image pixels."""

    kind: str
    coords: tuple[float, ...]
    object_index: int

    def as_kwargs(self) -> dict[str, np.ndarray | bool | None]:
        """Keyword arguments for :meth:`samfx.adapters.Predictor.predict`.

        Points ask for three masks, as SAM's authors recommend for one click;
        boxes ask for one.
        """
        if self.kind == "point":
            return {"point_coords": np.array([self.coords], np.float32), "point_labels": np.array([1]),
                    "box": None, "multimask_output": True}
        return {"point_coords": None, "point_labels": None, "box": np.array(self.coords, np.float32),
                "multimask_output": False}


@dataclass
class ImageSample:
    """An RGB image, the objects found in it and one box and one point per object.

    ``objects`` are boolean masks; they are ground truth when ``has_ground_truth``.
    """

    name: str
    image: np.ndarray
    objects: list[np.ndarray]
    has_ground_truth: bool
    prompts: list[Prompt] = field(default_factory=list)


def available_images() -> tuple[str, ...]:
    return ("coins",) + _PHOTOS


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def _coin_masks(gray: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology, segmentation

    markers = np.zeros_like(gray, dtype=np.int32)
    markers[gray < 30] = 1
    markers[gray > 150] = 2
    foreground = segmentation.watershed(filters.sobel(gray), markers) == 2
    foreground = morphology.remove_small_objects(ndi.binary_fill_holes(foreground), max_size=99)
    labels = measure.label(foreground)
    return [labels == r.label for r in measure.regionprops(labels)]


def _photo_regions(image: np.ndarray, count: int) -> list[np.ndarray]:
    from skimage import measure, segmentation

    segments = segmentation.felzenszwalb(image, scale=400, sigma=0.8, min_size=200)
    h, w = segments.shape
    regions = []
    for region in measure.regionprops(segments + 1):
        y0, x0, y1, x1 = region.bbox
        touches_border = y0 == 0 or x0 == 0 or y1 == h or x1 == w
        # Compact regions away from the border look like objects; skip background.
        if not touches_border and region.area >= 0.005 * h * w and region.solidity > 0.6:
            regions.append(region)
    regions.sort(key=lambda r: (-r.area, r.label))
    return [segments + 1 == r.label for r in regions[:count]]


def _prompts(masks: list[np.ndarray]) -> list[Prompt]:
    from scipy import ndimage as ndi

    prompts = []
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        prompts.append(Prompt("box", (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())), index))
        # The click goes to the pixel deepest inside the object.
        depth = ndi.distance_transform_edt(mask)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        prompts.append(Prompt("point", (float(x), float(y)), index))
    return prompts


@lru_cache(maxsize=16)
def _sample(name: str, objects_per_photo: int) -> ImageSample:
    from skimage import data

    if name == "coins":
        gray = data.coins()
        masks, truth, image = _coin_masks(gray), True, _rgb(gray)
    elif name in _PHOTOS:
        image = _rgb(getattr(data, name)())
        masks, truth = _photo_regions(image, objects_per_photo), False
    else:
        raise KeyError(f"unknown image {name!r}; available: {', '.join(available_images())}")
    return ImageSample(name, image, masks, truth, _prompts(masks))


def package_images(names: list[str] | tuple[str, ...] = DEFAULT_IMAGES, objects_per_photo: int = 4) -> list[ImageSample]:
    """Load bundled images with their objects and prompts (deterministic)."""
    return [_sample(name, objects_per_photo) for name in names]


def image_digest(image: np.ndarray) -> str:
    """A short SHA-256 of an image's pixels and shape (names user images in recipes)."""
    digest = hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def load_images(items: Sequence[str | np.ndarray], purpose: str) -> tuple[list[np.ndarray], list[str]]:
    """Package image names or ``H x W x 3`` uint8 arrays, as arrays with their
    names (the package name, or :func:`image_digest` for an array).

    ``purpose`` names what the images are for in errors (``"calibration"``).
    """
    if not len(items):
        raise ValueError(f"{purpose} needs at least one image")
    arrays, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            arrays.append(package_images([item])[0].image)
            names.append(item)
            continue
        image = np.asarray(item)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{purpose} image {i} must be an H x W x 3 uint8 array, got {image.dtype} {image.shape}")
        arrays.append(image)
        names.append(image_digest(image))
    return arrays, names


def calibration_sample(image: np.ndarray, name: str = "calibration", objects: int = 4) -> ImageSample:
    """Prompts for a user's own ``H x W x 3`` uint8 image, placed like those of the
    package photos (the largest compact regions; not ground truth)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a calibration image is H x W x 3 uint8, got {image.dtype} {image.shape}")
    image = _rgb(image)
    masks = _photo_regions(image, objects)
    if not masks:
        raise ValueError(f"{name}: found no compact region to prompt in the image")
    return ImageSample(name, image, masks, False, _prompts(masks))
