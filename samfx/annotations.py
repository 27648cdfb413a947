"""Ground-truth masks from the annotation files people have: COCO instance
JSON, SA-1B per-image JSON and MedSAM's npz layout (numpy only; no ``pycocotools``).

Every reader returns :class:`Annotations`, a sequence of
:class:`AnnotatedImage` (the ``H x W x 3`` uint8 image, its instance masks as
``H x W`` booleans and their ids), read lazily, one image at a time.

* **COCO** (``{"images": [...], "annotations": [...]}``): each annotation's
  ``segmentation`` is a list of polygons, an uncompressed RLE (``counts`` a
  list) or a compressed RLE (``counts`` a string). Polygons are rasterised as
  ``pycocotools`` does (``frPyObjects`` then ``merge``): each polygon is filled
  by the even-odd rule on its boundary, drawn on a 5x finer grid and sampled
  at pixel columns, so a self-overlapping polygon's doubly covered part is
  empty, and the polygons of one object are united (their areas add up where
  they do not overlap). Crowd annotations (``iscrowd: 1``) and images without
  annotations are left out. Image files are looked up under ``images`` (the
  JSON's folder by default) by their ``file_name``.
* **SA-1B** (``{"image": {...}, "annotations": [...]}``, one file per image,
  compressed RLE): a file, a directory of them or a glob pattern; the image is
  ``file_name`` next to its JSON (or under ``images``).
* **MedSAM npz** (``imgs``, ``gts``, optional ``boxes``): a 2-D image
  (``H x W`` or ``H x W x 3``) with an ``H x W`` label map, or a 3-D volume
  (``D x H x W``) with a ``D x H x W`` label map, one image per slice that has
  labels. Each label above 0 is one object, its id the label. ``boxes``, when
  present, must hold one box per label (checked, not used: prompts are
  derived from the masks, by :func:`samfx.data.prompts_from_masks`).

Objects whose mask is empty are left out. Run lengths use
:mod:`samfx.masks`.

Example::

    >>> import json, numpy as np, pathlib, tempfile
    >>> from PIL import Image
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    >>> coco = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
    ...         "annotations": [{"id": 7, "image_id": 1, "iscrowd": 0,
    ...                          "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}]}
    >>> _ = (folder / "coco.json").write_text(json.dumps(coco))
    >>> item = read_annotations(folder / "coco.json")[0]
    >>> item.name, item.ids, int(item.masks[0].sum())
    ('a.png', [7], 12)
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .data import ImageError, ImageSample, prompts_from_masks, read_image
from .masks import rle_decode, rle_from_string

__all__ = [
    "AnnotatedImage",
    "AnnotationError",
    "Annotations",
    "polygon_mask",
    "read_annotations",
    "read_coco",
    "read_medsam",
    "read_sa1b",
    "segmentation_mask",
]


class AnnotationError(ValueError):
    """An annotation file that cannot be read: missing, malformed, or naming
    images that are missing or of another size."""


@dataclass
class AnnotatedImage:
    """One image with its ground-truth objects."""

    name: str
    image: np.ndarray
    masks: list[np.ndarray]
    ids: list[Any]

    def sample(self) -> ImageSample:
        """The image as a :class:`samfx.data.ImageSample` with ground truth and
        SAM's prompts (a box and a click per object)."""
        return ImageSample(self.name, self.image, self.masks, True, prompts_from_masks(self.masks))


class Annotations(Sequence[AnnotatedImage]):
    """Annotated images of one file (or set of SA-1B files), loaded on access.

    Attributes:
        format: ``"coco"``, ``"sa1b"`` or ``"medsam"``.
        source: the path read.
        names: the images' names, in order.
    """

    def __init__(self, format: str, source: str, names: list[str], load: Callable[[int], AnnotatedImage]) -> None:
        self.format, self.source, self.names, self._load = format, source, names, load

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> AnnotatedImage:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.source} has {len(self)} annotated images")
        return self._load(index % len(self))

    def __iter__(self) -> Iterator[AnnotatedImage]:
        return (self._load(index) for index in range(len(self)))

    def __repr__(self) -> str:
        return f"Annotations({self.format!r}, {self.source!r}, {len(self)} images)"


# -- rasterising COCO polygons ---------------------------------------------------------

def _polygon_counts(xy: np.ndarray, h: int, w: int) -> np.ndarray:
    """COCO run lengths of one polygon, as ``pycocotools``' ``rleFrPoly`` computes them."""
    scale = 5.0
    # C's (int) cast truncates towards zero.
    x = np.trunc(scale * xy[0::2] + 0.5).astype(np.int64)
    y = np.trunc(scale * xy[1::2] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    # Every edge, densely sampled on the fine grid along its longer axis.
    for j in range(len(x) - 1):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            t = np.arange(dx + 1)[::-1] if flip else np.arange(dx + 1)
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            t = np.arange(dy + 1)[::-1] if flip else np.arange(dy + 1)
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # Where the boundary crosses a pixel column, the first pixel below it toggles.
    moved = np.nonzero(u[1:] != u[:-1])[0] + 1
    xd = np.where(u[moved] < u[moved - 1], u[moved], u[moved] - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.minimum(v[moved], v[moved - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, h))
    starts = np.sort(np.append(xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), h * w))
    gaps = np.diff(starts, prepend=0)
    # Two toggles at one pixel cancel: a zero gap merges the next run into the previous one.
    counts = [int(gaps[0])]
    index = 1
    while index < len(gaps):
        if gaps[index] > 0:
            counts.append(int(gaps[index]))
            index += 1
        else:
            index += 1
            if index < len(gaps):
                counts[-1] += int(gaps[index])
                index += 1
    return np.asarray(counts, dtype=np.int64)


def polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """The ``height x width`` mask of one COCO polygon ``[x1, y1, x2, y2, ...]``,
    pixel for pixel as ``pycocotools`` rasterises it (see the module doc).

    Example::

        >>> polygon_mask([1, 1, 5, 1, 5, 4, 1, 4], 6, 7).astype(int)
        array([[0, 0, 0, 0, 0, 0, 0],
               [0, 1, 1, 1, 1, 0, 0],
               [0, 1, 1, 1, 1, 0, 0],
               [0, 1, 1, 1, 1, 0, 0],
               [0, 0, 0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0, 0, 0]])
    """
    xy = np.asarray(polygon, dtype=np.float64)
    # Two points make a degenerate polygon that pycocotools still rasterises (some COCO files have them).
    if xy.ndim != 1 or len(xy) < 4 or len(xy) % 2:
        raise AnnotationError(f"a polygon is a flat list of at least two x, y pairs, got {len(xy)} numbers")
    if not np.isfinite(xy).all():
        raise AnnotationError("a polygon has a coordinate that is not a finite number")
    return rle_decode(_polygon_counts(xy, height, width), (height, width))


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The mask of a COCO ``segmentation``: polygons (united), an uncompressed
    RLE (``counts`` a list) or a compressed one (``counts`` a string)."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise AnnotationError("an empty list of polygons")
        mask = np.zeros((height, width), bool)
        for polygon in segmentation:
            if not isinstance(polygon, list):
                raise AnnotationError(f"a polygon is a list of numbers, got {type(polygon).__name__}")
            mask |= polygon_mask(polygon, height, width)
        return mask
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = tuple(segmentation["size"])
        if size != (height, width):
            raise AnnotationError(f"an RLE of size {list(size)} on an image of {height} x {width}")
        counts = segmentation["counts"]
        try:
            runs = rle_from_string(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
            return rle_decode(runs, (height, width))
        except (ValueError, TypeError) as err:
            raise AnnotationError(f"a malformed RLE: {err}") from None
    raise AnnotationError("a segmentation is a list of polygons or an RLE dict with 'size' and 'counts', "
                          f"got {type(segmentation).__name__}")


# -- readers ----------------------------------------------------------------------------

def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise AnnotationError(f"{path}: not JSON ({err})") from None


def _image(path: Path, height: int | None, width: int | None, where: str) -> np.ndarray:
    try:
        image = read_image(path)
    except ImageError as err:
        raise AnnotationError(f"{where}: {err}") from None
    if height is not None and image.shape[:2] != (height, width):
        raise AnnotationError(f"{where}: {path} is {image.shape[0]} x {image.shape[1]}, "
                              f"the annotations say {height} x {width}")
    return image


def _field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise AnnotationError(f"{where}: missing {key!r}")
    return record[key]


def _objects(annotations: list[dict], height: int, width: int, where: str) -> tuple[list[np.ndarray], list[Any]]:
    masks, ids = [], []
    for index, annotation in enumerate(annotations):
        label = annotation.get("id", index)
        try:
            mask = segmentation_mask(_field(annotation, "segmentation", where), height, width)
        except AnnotationError as err:
            raise AnnotationError(f"{where}, annotation {label}: {err}") from None
        if mask.any():
            masks.append(mask)
            ids.append(label)
    return masks, ids


def read_coco(path: str | Path, images: str | Path | None = None) -> Annotations:
    """COCO instance annotations; image files under ``images`` (default: the JSON's folder)."""
    path = Path(path)
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"{path}: a COCO file has lists 'images' and 'annotations'")
    folder = Path(images) if images is not None else path.parent
    entries: dict[Any, dict] = {}
    for record in data["images"]:
        for key in ("id", "file_name", "height", "width"):
            _field(record, key, f"{path}: image {record.get('id', '?') if isinstance(record, dict) else record!r}")
        entries[record["id"]] = record
    by_image: dict[Any, list[dict]] = {}
    for annotation in data["annotations"]:
        image_id = _field(annotation, "image_id", f"{path}: annotation {annotation.get('id', '?')}")
        if image_id not in entries:
            raise AnnotationError(f"{path}: annotation {annotation.get('id', '?')} is on image {image_id}, "
                                  "which 'images' does not list")
        if not annotation.get("iscrowd", 0):
            by_image.setdefault(image_id, []).append(annotation)
    order = [i for i in entries if i in by_image]

    def load(index: int) -> AnnotatedImage:
        record = entries[order[index]]
        where = f"{path}: image {record['id']} ({record['file_name']})"
        height, width = int(record["height"]), int(record["width"])
        image = _image(folder / record["file_name"], height, width, where)
        masks, ids = _objects(by_image[record["id"]], height, width, where)
        return AnnotatedImage(record["file_name"], image, masks, ids)

    return Annotations("coco", str(path), [entries[i]["file_name"] for i in order], load)


def _sa1b_files(source: str | Path) -> list[Path]:
    text = str(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.json"))
    else:
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if f.endswith(".json"))
    if not files:
        raise AnnotationError(f"{text}: no SA-1B JSON file there")
    return files


def read_sa1b(source: str | Path, images: str | Path | None = None) -> Annotations:
    """SA-1B per-image JSON files (a file, a directory or a glob); each image is
    its ``file_name`` next to the JSON, or under ``images``."""
    files = _sa1b_files(source)

    def header(file: Path) -> tuple[dict, dict]:
        data = _json(file)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise AnnotationError(f"{file}: an SA-1B file has an 'image' record and a list 'annotations'")
        record = _field(data, "image", str(file))
        for key in ("file_name", "height", "width"):
            _field(record, key, f"{file}: 'image'")
        return data, record

    names = [header(file)[1]["file_name"] for file in files]

    def load(index: int) -> AnnotatedImage:
        file = files[index]
        data, record = header(file)
        height, width = int(record["height"]), int(record["width"])
        folder = Path(images) if images is not None else file.parent
        where = f"{file}"
        image = _image(folder / record["file_name"], height, width, where)
        masks, ids = _objects(data["annotations"], height, width, where)
        return AnnotatedImage(record["file_name"], image, masks, ids)

    return Annotations("sa1b", str(source), names, load)


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-12))).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image)


def read_medsam(path: str | Path) -> Annotations:
    """MedSAM's npz layout: ``imgs``, ``gts`` label maps and optional ``boxes`` (see the module doc)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise AnnotationError(f"{path}: not a readable npz file ({err})") from None
    missing = [key for key in ("imgs", "gts") if key not in arrays]
    if missing:
        raise AnnotationError(f"{path}: a MedSAM npz holds 'imgs' and 'gts'; missing {missing} "
                              f"(has {sorted(arrays)})")
    imgs, gts = arrays["imgs"], arrays["gts"]
    volume = imgs.ndim == 3 and imgs.shape[2] != 3
    spatial = imgs.shape if volume else imgs.shape[:2]
    if imgs.ndim not in (2, 3) or gts.shape != spatial:
        raise AnnotationError(f"{path}: 'imgs' of shape {imgs.shape} and 'gts' of shape {gts.shape} do not match "
                              "(2-D: H x W or H x W x 3 with H x W labels; 3-D: D x H x W with D x H x W labels)")
    if not np.issubdtype(gts.dtype, np.integer):
        raise AnnotationError(f"{path}: 'gts' is a label map of integers, got {gts.dtype}")
    labels = [int(label) for label in np.unique(gts) if label > 0]
    if "boxes" in arrays:
        boxes = arrays["boxes"]
        width = 6 if volume else 4
        if boxes.ndim != 2 or boxes.shape != (len(labels), width):
            raise AnnotationError(f"{path}: 'boxes' of shape {boxes.shape}; expected one box of {width} numbers "
                                  f"per label ({len(labels)} labels)")
    slices = [z for z in range(gts.shape[0]) if gts[z].any()] if volume else [None]
    names = [f"{path.name}[{z}]" if volume else path.name for z in slices]

    def load(index: int) -> AnnotatedImage:
        z = slices[index]
        image, label_map = (imgs[z], gts[z]) if volume else (imgs, gts)
        present = [label for label in labels if (label_map == label).any()]
        return AnnotatedImage(names[index], _gray_to_rgb(image), [label_map == label for label in present], present)

    return Annotations("medsam", str(path), names, load)


def read_annotations(source: str | Path, images: str | Path | None = None) -> Annotations:
    """Read annotations, recognising the format: ``.npz`` is MedSAM's layout, a
    JSON with ``images`` is COCO, one with ``image`` (or a directory or glob
    of them) is SA-1B.

    Args:
        source: the annotation file (or SA-1B files).
        images: where image files are (default: next to the annotations).

    Raises:
        AnnotationError: a missing or malformed file (the message says what is wrong where).
    """
    text = str(source)
    path = Path(text)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise AnnotationError(f"{text}: no such file")
        return read_medsam(path)
    if path.is_file():
        data = _json(path)
        if isinstance(data, dict) and "images" in data:
            return read_coco(path, images)
        if isinstance(data, dict) and "image" in data:
            return read_sa1b(path, images)
        raise AnnotationError(f"{text}: neither COCO instance JSON ('images', 'annotations') nor SA-1B "
                              "('image', 'annotations')")
    if path.is_dir() or glob.has_magic(text):
        return read_sa1b(text, images)
    raise AnnotationError(f"{text}: no such annotation file")
