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

Users' own images are taken everywhere images are (:func:`load_images`): a
package image name, an image file, a directory of image files or a glob
pattern. :func:`split_images` keeps calibration and evaluation images apart.

Example::

    >>> from samfx.data import package_images
    >>> coins = package_images(["coins"])[0]
    >>> len(coins.objects), coins.has_ground_truth
    (24, True)
"""

from __future__ import annotations

import glob
import hashlib
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "DEFAULT_IMAGES",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageSample",
    "ImageSplit",
    "Prompt",
    "available_images",
    "calibration_sample",
    "Clip",
    "expand_images",
    "image_digest",
    "image_sample",
    "load_image",
    "load_images",
    "package_images",
    "prompts_from_masks",
    "read_image",
    "separate_images",
    "split_images",
    "synthetic_clip",
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


def prompts_from_masks(masks: Sequence[np.ndarray]) -> list[Prompt]:
    """A box and a click per object, as SAM's authors evaluate: the box is the
    mask's bounding box (inclusive pixel indices), the click the pixel farthest
    inside the mask (the maximum of its Euclidean distance transform; the first
    in row-major order on ties). Empty masks get no prompt.

    Example::

        >>> import numpy as np
        >>> mask = np.zeros((7, 9), bool)
        >>> mask[1:6, 2:7] = True
        >>> [(p.kind, p.coords) for p in prompts_from_masks([mask])]
        [('box', (2.0, 1.0, 6.0, 5.0)), ('point', (4.0, 3.0))]
    """
    from scipy import ndimage as ndi

    prompts = []
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if not len(ys):
            continue
        prompts.append(Prompt("box", (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())), index))
        # Padded as RITM's click protocol does: the image border counts as the object's edge.
        depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
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
    return ImageSample(name, image, masks, truth, prompts_from_masks(masks))


def package_images(names: list[str] | tuple[str, ...] = DEFAULT_IMAGES, objects_per_photo: int = 4) -> list[ImageSample]:
    """Load bundled images with their objects and prompts (deterministic)."""
    return [_sample(name, objects_per_photo) for name in names]


def image_digest(image: np.ndarray) -> str:
    """A short SHA-256 of an image's pixels and shape (names user images in recipes)."""
    digest = hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


class ImageError(ValueError):
    """Images that cannot be used: nothing matched, an unreadable file, a wrong shape."""


#: file suffixes a directory or glob of images is filtered on (case-insensitive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB: gray is repeated, alpha dropped,
    other bit depths scaled by their maximum (16-bit medical scans).

    Raises:
        ImageError: the file is missing or unreadable, or not a 2-D gray or
            RGB(A) image (the message names the file).
    """
    from skimage import io

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        image = np.asarray(io.imread(path))
    except Exception as err:  # imageio raises many kinds on a corrupt file
        raise ImageError(f"{path}: cannot read it as an image ({err})") from None
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"{path}: expected a gray, RGB or RGBA image, got an array of shape {image.shape}")
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-12))).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def expand_images(items: Sequence[str | Path | np.ndarray], purpose: str = "images") -> list[str | np.ndarray]:
    """Resolve directories and glob patterns into sorted image files.

    Each item is a package image name (:func:`available_images`), an image
    file, a directory (its files with an :data:`IMAGE_SUFFIXES` suffix, not
    recursive) or a glob pattern (``DIR/*.png``, ``scans/**/*.tif``); arrays
    pass through. Files come back as path strings, in sorted order per item.

    Raises:
        ImageError: an item that is none of these, or a directory or pattern
            that matches no image file.
    """
    out: list[str | np.ndarray] = []
    for item in items:
        if isinstance(item, np.ndarray):
            out.append(item)
            continue
        text = str(item)
        path = Path(text)
        if text in available_images() and not path.exists():
            out.append(text)
        elif path.is_dir():
            files = sorted(str(f) for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageError(f"{purpose}: the directory {text} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            out += files
        elif path.is_file():
            out.append(text)
        elif glob.has_magic(text):
            files = sorted(f for f in glob.glob(text, recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageError(f"{purpose}: the pattern {text} matches no image file")
            out += files
        else:
            raise ImageError(f"{purpose}: {text} is neither a package image ({', '.join(available_images())}), "
                             "an image file, a directory nor a glob pattern")
    return out


def load_image(item: str | np.ndarray, purpose: str = "images", index: int | None = None) -> tuple[np.ndarray, str]:
    """One resolved item of :func:`expand_images` as an array and its name (the
    package name, the file path, or :func:`image_digest` for an array)."""
    if isinstance(item, str):
        if item in available_images() and not Path(item).exists():
            return package_images([item])[0].image, item
        return read_image(item), item
    image = np.asarray(item)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        where = f"{purpose} image" + ("" if index is None else f" {index}")
        raise ImageError(f"{where} must be an H x W x 3 uint8 array, got {image.dtype} {image.shape}")
    return image, image_digest(image)


def load_images(items: Sequence[str | Path | np.ndarray], purpose: str) -> tuple[list[np.ndarray], list[str]]:
    """Package image names, image files, directories, glob patterns or
    ``H x W x 3`` uint8 arrays (see :func:`expand_images`), as arrays with
    their names (the package name, the file path, or :func:`image_digest` for
    an array).

    ``purpose`` names what the images are for in errors (``"calibration"``).

    Example::

        >>> import numpy as np
        >>> arrays, names = load_images(["coins", np.zeros((4, 4, 3), np.uint8)], "calibration")
        >>> names[0], names[1].startswith("sha256:")
        ('coins', True)
    """
    if not len(items):
        raise ImageError(f"{purpose} needs at least one image")
    arrays, names = [], []
    for index, item in enumerate(expand_images(items, purpose)):
        image, name = load_image(item, purpose, index)
        arrays.append(image)
        names.append(name)
    return arrays, names


@dataclass
class ImageSplit:
    """Which images calibrate data-driven passes and which are held out to
    evaluate the result; :meth:`record` is what reports keep.

    Attributes:
        calibration, evaluation: the images.
        calibration_names, evaluation_names: their names (package name, path or digest).
        seed: the seed of :func:`split_images` (``None`` when both parts were given).
        overlap: names of images in both parts (only with ``allow_overlap``).
    """

    calibration: list[np.ndarray]
    calibration_names: list[str]
    evaluation: list[np.ndarray]
    evaluation_names: list[str]
    seed: int | None = None
    overlap: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The names of the images used for what, as JSON."""
        return {"calibration": list(self.calibration_names), "evaluation": list(self.evaluation_names),
                "split_seed": self.seed, "overlap": list(self.overlap)}


def _unique(arrays: list[np.ndarray], names: list[str]) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The images without repeats of the same pixels, the names kept and their digests."""
    kept_arrays, kept_names, digests = [], [], []
    for image, name in zip(arrays, names):
        digest = image_digest(image)
        if digest not in digests:
            kept_arrays.append(image)
            kept_names.append(name)
            digests.append(digest)
    return kept_arrays, kept_names, digests


def split_images(items: Sequence[str | Path | np.ndarray], *, held_out: float = 0.5, seed: int = 0) -> ImageSplit:
    """Split one list of images into calibration and held-out evaluation parts.

    The split depends only on the images' pixels and ``seed`` (each image is
    ranked by a hash of its digest), not on their order or names; repeated
    images count once, so no image lands on both sides.

    Args:
        items: anything :func:`load_images` takes.
        held_out: the fraction kept for evaluation (at least one image each side).
        seed: another seed gives another split.

    Example::

        >>> split = split_images(["coins", "astronaut", "coffee", "chelsea"], seed=0)
        >>> len(split.calibration), len(split.evaluation)
        (2, 2)
        >>> set(split.calibration_names) & set(split.evaluation_names)
        set()
    """
    if not 0 < held_out < 1:
        raise ImageError(f"held_out is a fraction between 0 and 1, got {held_out}")
    arrays, names, digests = _unique(*load_images(items, "the images to split"))
    if len(arrays) < 2:
        raise ImageError("splitting into calibration and evaluation images needs at least two different images")
    rank = sorted(range(len(arrays)), key=lambda i: hashlib.sha256(f"{seed}:{digests[i]}".encode()).hexdigest())
    count = min(max(1, round(held_out * len(arrays))), len(arrays) - 1)
    evaluation, calibration = sorted(rank[:count]), sorted(rank[count:])
    return ImageSplit([arrays[i] for i in calibration], [names[i] for i in calibration],
                      [arrays[i] for i in evaluation], [names[i] for i in evaluation], seed)


def separate_images(
    calibration: Sequence[str | Path | np.ndarray],
    evaluation: Sequence[str | Path | np.ndarray],
    *,
    allow_overlap: bool = False,
) -> ImageSplit:
    """Calibration and evaluation images given apart, checked to share no image
    (by pixels, so a copy under another name counts).

    Raises:
        ImageError: an image is in both lists (named), unless ``allow_overlap``,
            which warns and records the overlap in :meth:`ImageSplit.record`.

    Example::

        >>> separate_images(["chelsea"], ["coins"]).record()["overlap"]
        []
        >>> separate_images(["coins"], ["coins"])
        Traceback (most recent call last):
        ...
        samfx.data.ImageError: calibration and evaluation images overlap: coins (as coins); ...
    """
    calib_arrays, calib_names = load_images(calibration, "calibration")
    eval_arrays, eval_names = load_images(evaluation, "evaluation")
    calib_digests = {image_digest(a): n for a, n in zip(calib_arrays, calib_names)}
    overlap = [f"{n} (as {calib_digests[image_digest(a)]})" for a, n in zip(eval_arrays, eval_names)
               if image_digest(a) in calib_digests]
    if overlap and not allow_overlap:
        raise ImageError(f"calibration and evaluation images overlap: {', '.join(overlap)}; fidelity measured on "
                         "calibration images overstates it. Give disjoint images, or one list to split")
    if overlap:
        warnings.warn(f"evaluating on calibration images: {', '.join(overlap)}", stacklevel=2)
    return ImageSplit(calib_arrays, calib_names, eval_arrays, eval_names, None, overlap)


def image_sample(item: str | np.ndarray, objects: int = 4) -> ImageSample:
    """A resolved item of :func:`expand_images` with prompts: a package image
    as :func:`package_images` gives it (``coins`` with ground truth), any other
    image prompted on its largest compact regions (:func:`calibration_sample`)."""
    if isinstance(item, str) and item in available_images() and not Path(item).exists():
        return package_images([item], objects)[0]
    return calibration_sample(*load_image(item, "evaluation"), objects=objects)


def calibration_sample(image: np.ndarray, name: str = "calibration", objects: int = 4) -> ImageSample:
    """Prompts for a user's own ``H x W x 3`` uint8 image, placed like those of the
    package photos (the largest compact regions; not ground truth)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"a calibration image is H x W x 3 uint8, got {image.dtype} {image.shape}")
    image = _rgb(image)
    masks = _photo_regions(image, objects)
    if not masks:
        raise ImageError(f"{name}: found no compact region to prompt in the image")
    return ImageSample(name, image, masks, False, prompts_from_masks(masks))


@dataclass(frozen=True)
class Clip:
    """A folder of numbered JPEG frames (``00000.jpg``...), as SAM 2's
    ``init_state`` reads them, with a click on the moving object in frame 0."""

    directory: Path
    frames: int
    click: tuple[float, float]
    size: tuple[int, int]


def synthetic_clip(directory: str | Path, frames: int = 6, size: tuple[int, int] = (120, 160)) -> Clip:
    """Write ``frames`` JPEG frames of a red rectangle moving right (and a still
    blue disc) over a gray gradient into ``directory``; the click is the
    rectangle's centre in frame 0, in ``(x, y)`` pixels.

    Example::

        >>> import tempfile
        >>> clip = synthetic_clip(tempfile.mkdtemp(), frames=3)
        >>> sorted(p.name for p in clip.directory.iterdir()), clip.click
        (['00000.jpg', '00001.jpg', '00002.jpg'], (40.0, 60.0))
    """
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    height, width = size
    rows, cols = np.mgrid[:height, :width]
    background = (40 + 60 * cols / width + 30 * rows / height).astype(np.uint8)
    disc = (rows - 0.7 * height) ** 2 + (cols - 0.75 * width) ** 2 < (0.12 * height) ** 2
    top, bottom = height // 3, height // 3 + height // 3
    for index in range(frames):
        frame = np.repeat(background[..., None], 3, axis=2)
        frame[disc] = (50, 70, 200)
        left = width // 8 + index * width // 16
        frame[top:bottom, left:left + width // 4] = (210, 50, 40)
        Image.fromarray(frame).save(directory / f"{index:05d}.jpg", quality=95)
    click = (float(width // 8 + width // 8), float((top + bottom) // 2))
    return Clip(directory, frames, click, size)
