"""Mask utilities: COCO run lengths (checked against pycocotools' output), boxes,
stability score, IoU matrices."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from samfx.fidelity import mask_iou
from samfx.masks import (
    mask_iou_matrix,
    masks_to_boxes,
    rle_area,
    rle_decode,
    rle_encode,
    rle_from_string,
    rle_to_string,
    stability_score,
)


def _runs(mask: np.ndarray) -> list[int]:
    """Oracle: run lengths by walking the column-major pixels one by one."""
    counts, current, length = [], False, 0
    for value in mask.T.ravel():
        if bool(value) != current:
            counts.append(length)
            current, length = bool(value), 0
        length += 1
    counts.append(length)
    return counts


def _shapes() -> np.ndarray:
    mask = np.zeros((300, 200), bool)
    mask[10:250, 30:190] = True
    mask[100:120, 50:60] = False
    mask[0:5, :] = True
    return mask


def test_run_lengths_match_a_pixel_walk() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((6, 13, 9)) > 0.6
    masks[0] = True
    masks[1] = False
    masks[2, 0, 0] = True
    for mask, counts in zip(masks, rle_encode(masks)):
        assert counts.tolist() == _runs(mask)
        assert (rle_decode(counts, mask.shape) == mask).all()
        assert rle_area(counts) == mask.sum()


def test_compressed_strings_are_pycocotools_strings() -> None:
    # Reference strings written by pycocotools 2.0 (mask.encode) for the same masks.
    small = np.zeros((6, 5), bool)
    small[1:4, 1:3] = True
    small[5, 4] = True
    small[0, 0] = True
    assert rle_to_string(rle_encode(small[None])[0]) == "0162M0:N"
    text = rle_to_string(rle_encode(_shapes()[None])[0])
    assert len(text) == 1393 and text.startswith("05W9000")
    assert hashlib.sha1(text.encode()).hexdigest() == "26b0982f3efd13d1db8b17cbc5a689fab8f4fcdc"


def test_compressed_strings_round_trip() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((5, 40, 31)) > rng.random((5, 1, 1))
    for mask, counts in zip(masks, rle_encode(masks)):
        assert (rle_from_string(rle_to_string(counts)) == counts).all()
    assert rle_to_string([5, 2, 3, 1]) == "523O"  # negative difference to the count two back


def test_bad_run_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="sum to 5"):
        rle_decode([2, 3], (2, 3))
    with pytest.raises(ValueError, match="cannot occur"):
        rle_from_string("0 1")
    with pytest.raises(ValueError, match="truncated"):
        rle_from_string("0" + chr(48 + 0x20))
    with pytest.raises(ValueError, match="K x H x W"):
        rle_encode(np.zeros((3, 3), bool))


def test_boxes_are_inclusive_and_empty_masks_get_zeros() -> None:
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert masks_to_boxes(masks).tolist() == [[3.0, 2.0, 8.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


def test_stability_score_is_the_iou_of_shifted_thresholds() -> None:
    logits = torch.tensor([[[-2.0, -0.5, 0.5, 2.0]], [[-3.0, -3.0, -3.0, -3.0]]])
    # Above +1: one pixel; above -1: three pixels.
    assert stability_score(logits, 0.0, 1.0).tolist() == [pytest.approx(1 / 3), 0.0]


def test_iou_matrix_agrees_with_pairwise_iou() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((5, 20, 20)) > 0.5
    b = rng.random((3, 20, 20)) > 0.7
    b[0] = a[1]
    b[2] = False
    matrix = mask_iou_matrix(a, b, chunk=2)
    expected = np.array([[mask_iou(x, y) for y in b] for x in a])
    assert np.allclose(matrix, expected) and matrix[1, 0] == 1.0
    assert mask_iou_matrix(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool))[0, 0] == 1.0
