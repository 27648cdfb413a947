"""Binary-mask utilities for segment-everything: run-length encoding in COCO's
format, boxes, SAM's stability score and IoU between sets of masks.

Run lengths follow COCO: the mask is read in column-major (Fortran) order and
the counts alternate background and foreground, starting with background (a
mask whose first pixel is set starts with a count of 0). The compressed string
form is the one ``pycocotools`` reads and writes (``{"size": [h, w],
"counts": "..."}``), implemented here so samfx needs no ``pycocotools``.

Example::

    >>> import numpy as np
    >>> from samfx.masks import rle_encode, rle_decode, rle_to_string
    >>> mask = np.array([[0, 1], [1, 1]], bool)
    >>> counts = rle_encode(mask[None])[0]
    >>> counts.tolist(), rle_to_string(counts)
    ([1, 3], '13')
    >>> bool((rle_decode(counts, (2, 2)) == mask).all())
    True
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "masks_to_boxes",
    "mask_iou_matrix",
    "rle_area",
    "rle_decode",
    "rle_encode",
    "rle_from_string",
    "rle_to_string",
    "stability_score",
]


def rle_encode(masks: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """COCO run lengths of each mask in a ``K x H x W`` boolean stack."""
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected K x H x W masks, got shape {tuple(masks.shape)}")
    count, h, w = masks.shape
    if count == 0:
        return []
    flat = masks.permute(0, 2, 1).reshape(count, h * w).bool()
    # Indices where a run ends, per mask: the positions where the value changes, and the end.
    change = (flat[:, 1:] != flat[:, :-1]).nonzero()
    rows, positions = change[:, 0].numpy(), change[:, 1].numpy() + 1
    splits = np.searchsorted(rows, np.arange(count + 1))
    starts_set = flat[:, 0].numpy()
    out = []
    for index in range(count):
        ends = np.concatenate([positions[splits[index]:splits[index + 1]], [h * w]])
        counts = np.diff(ends, prepend=0)
        if starts_set[index]:
            counts = np.concatenate([[0], counts])
        out.append(counts.astype(np.int64))
    return out


def rle_decode(counts: Sequence[int] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The ``H x W`` boolean mask of COCO run lengths ``counts``."""
    h, w = size
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"run lengths sum to {int(counts.sum())}, not {h} x {w} = {h * w} pixels")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(w, h).T


def rle_area(counts: Sequence[int] | np.ndarray) -> int:
    """Foreground pixels of COCO run lengths."""
    return int(np.asarray(counts)[1::2].sum())


def rle_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """COCO's compressed form of run lengths, as ``pycocotools`` writes it.

    Each count (after the second, as the difference to the count two places
    back) is written in 5-bit groups, least significant first, as characters
    from 48 on; bit 0x20 says another group follows, bit 0x10 of the last
    group carries the sign.
    """
    chars = []
    counts = [int(c) for c in counts]
    for index, count in enumerate(counts):
        value = count - counts[index - 2] if index > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr(48 + (group | 0x20 if more else group)))
    return "".join(chars)


def rle_from_string(text: str) -> np.ndarray:
    """Run lengths of COCO's compressed string (the inverse of :func:`rle_to_string`)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError(f"truncated COCO RLE string {text!r}")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"character {text[position]!r} cannot occur in a COCO RLE string")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return np.asarray(counts, dtype=np.int64)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``K x 4`` XYXY boxes (inclusive pixel indices) of ``K x H x W`` masks; empty masks get zeros."""
    count, h, w = masks.shape
    if count == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    big = max(h, w)
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes).float()


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """SAM's stability score: IoU of the masks thresholded at ``threshold +/- offset``.

    The mask at the higher cutoff lies inside the one at the lower cutoff, so
    the IoU is the ratio of their areas.
    """
    inner = (logits > threshold + offset).flatten(1).sum(dim=1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(1).sum(dim=1, dtype=torch.int64)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner, dtype=torch.float))


def mask_iou_matrix(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, chunk: int = 64) -> np.ndarray:
    """IoU of every mask in ``a`` (``K x H x W``) with every mask in ``b`` (``L x H x W``).

    Two empty masks have IoU 1, as in :func:`samfx.fidelity.mask_iou`.
    """
    a = torch.as_tensor(a).flatten(1)
    b = torch.as_tensor(b).flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"masks of {a.shape[1]} and {b.shape[1]} pixels cannot be compared")
    area_a = a.sum(dim=1, dtype=torch.float64)
    area_b = b.sum(dim=1, dtype=torch.float64)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    # Dot products of 0/1 vectors are exact in float32 while they stay below 2**24.
    dtype = torch.float32 if a.shape[1] < 2**24 else torch.float64
    b_float = b.to(dtype)
    for start in range(0, a.shape[0], chunk):
        inter = (a[start:start + chunk].to(dtype) @ b_float.T).double()
        union = area_a[start:start + chunk, None] + area_b[None, :] - inter
        out[start:start + chunk] = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    return out.numpy()
