"""Segment everything: the grid and TinySAM's hierarchical strategy, filters,
crops, output, on a predictor with known answers, small configs and LiteMedSAM."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import samfx
from samfx.adapters import Predictor
from samfx.data import package_images
from samfx.masks import rle_decode, rle_from_string
from samfx.segment_everything import (
    EverythingConfig,
    MaskGenerator,
    crop_boxes,
    match_masks,
    point_grid,
    sparse_points,
)

from .conftest import small_model

RELAXED = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)  # random weights have uncalibrated scores


class BlobPredictor(Predictor):
    """A predictor with known answers, through the batched protocol only: a click
    on a bright connected region gives that region (logits +12 inside, -12
    outside, predicted IoU 0.95); a click on the background gives nothing
    usable (all -12, IoU 0.1). Its "low-resolution" logits are at image size."""

    def __init__(self) -> None:
        self.clicks = 0

    def set_image(self, image: np.ndarray) -> None:
        from scipy import ndimage

        self.labels, _ = ndimage.label(image[:, :, 0] > 128)

    def predict_points(self, points, multimask_output=True):
        points = np.asarray(points)
        self.clicks += len(points)
        h, w = self.labels.shape
        logits = torch.full((len(points), 1, h, w), -12.0)
        iou = torch.full((len(points), 1), 0.1)
        for index, (x, y) in enumerate(points):
            label = self.labels[min(int(y), h - 1), min(int(x), w - 1)]
            if label:
                logits[index, 0][torch.from_numpy(self.labels == label)] = 12.0
                iou[index] = 0.95
        return logits, iou

    def logits_to_image(self, low_res_logits):
        return low_res_logits


def _blob_image() -> tuple[np.ndarray, list[np.ndarray]]:
    """Disks of several sizes on a dark background; returns the image and the disks."""
    h, w = 240, 320
    yy, xx = np.mgrid[:h, :w]
    disks = [(60, 50, 40), (200, 70, 25), (270, 180, 45), (110, 170, 18), (30, 200, 12), (300, 20, 14)]
    masks = [(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r for cx, cy, r in disks]
    image = np.zeros((h, w, 3), np.uint8)
    for mask in masks:
        image[mask] = 220
    return image, masks


def _found(result, truth: list[np.ndarray]) -> list[int]:
    """Index of the true disk each result mask equals (-1 when none)."""
    return [next((i for i, t in enumerate(truth) if (m == t).all()), -1) for m in result.masks()]


def test_grids() -> None:
    grid = point_grid(4)
    assert grid.shape == (16, 2) and grid[:2].tolist() == [[0.125, 0.125], [0.375, 0.125]]  # x runs fastest
    sparse = sparse_points(32, 4).reshape(32, 32)
    assert sparse.sum() == 64 and np.nonzero(sparse[1])[0].tolist() == list(range(1, 32, 4))
    assert np.nonzero(sparse_points(6, 4).reshape(6, 6)[1])[0].tolist() == [1, 5]  # a short last block
    assert [layer for _, layer in crop_boxes((100, 200), 2, 0.3)] == [0] + [1] * 4 + [2] * 16
    (whole, _), *firsts = crop_boxes((100, 200), 1, 0.3)[:5]
    assert whole == (0, 0, 200, 100)
    assert all(x1 <= 200 and y1 <= 100 for (x0, y0, x1, y1), _ in firsts)


def test_hierarchical_skips_exactly_the_covered_clicks() -> None:
    image, disks = _blob_image()
    predictor = BlobPredictor()
    generator = MaskGenerator(predictor)
    grid = generator.generate(image, "grid")
    grid_clicks, predictor.clicks = predictor.clicks, 0
    fast = generator.generate(image, "hierarchical")
    assert grid_clicks == grid.prompts == 1024

    # Independently: dense clicks inside a disk that a sparse click hit are covered.
    points = point_grid(32) * [image.shape[1], image.shape[0]]
    inside = np.array([[d[int(y), int(x)] for d in disks] for x, y in points])
    sparse = sparse_points(32, 4)
    hit = inside[sparse].any(axis=0)
    covered = (inside[~sparse] & hit).any(axis=1)
    assert fast.prompts_skipped == covered.sum() > 100
    assert fast.prompts == predictor.clicks == 1024 - covered.sum()

    # The same objects come out, each exactly once, best first.
    assert sorted(_found(grid, disks)) == sorted(_found(fast, disks)) == list(range(len(disks)))
    match = match_masks(grid, fast)
    assert match.recall == match.precision == 1.0 and match.mean_iou == 1.0
    assert set(fast.stages.tolist()) == {1, 2}  # the small disks are found by the dense stage
    assert fast.timings["embed_s"] == 0.0 and fast.timings["segment_s"] > 0


def test_crop_layers_drop_masks_cut_by_a_crop_and_keep_each_object_once() -> None:
    image, disks = _blob_image()
    result = MaskGenerator(BlobPredictor(), EverythingConfig(points_per_side=16, crop_n_layers=1)).generate(image, "grid")
    assert sorted(_found(result, disks)) == list(range(len(disks)))
    h, w = image.shape[:2]
    for (x0, y0, x1, y1), (bx0, by0, bx1, by1) in zip(result.crop_boxes, result.boxes):
        # A mask from a crop never touches that crop's inner edges.
        for edge, value, border in ((x0, bx0, 0), (y0, by0, 0), (x1, bx1, w), (y1, by1, h)):
            assert edge == border or abs(edge - value) > 20
    assert any(tuple(c) != (0, 0, w, h) for c in result.crop_boxes)  # smaller crops win ties


def test_filters_nms_and_output_on_a_small_model() -> None:
    from torchvision.ops import box_iou

    image = package_images(["coffee"])[0].image
    config = EverythingConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              box_nms_thresh=0.9)
    result = MaskGenerator(small_model("sam2.1_hiera_t"), config).generate(image, "grid")
    assert len(result) > 0
    boxes = torch.as_tensor(result.boxes)
    overlap = box_iou(boxes, boxes) - torch.eye(len(boxes))
    assert overlap.max() <= 0.9
    assert np.all(np.diff(result.predicted_iou) <= 0)  # NMS keeps the best first
    masks = result.masks()
    assert masks.shape == (len(result), *image.shape[:2])
    for mask, box, area, record in zip(masks, result.boxes, result.areas, result.annotations(image_id=7)):
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max(), ys.max()] == box.tolist() and area == mask.sum()
        assert (rle_decode(rle_from_string(record["segmentation"]["counts"]), record["segmentation"]["size"]) == mask).all()
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert record["image_id"] == 7


def test_thresholds_are_applied(tmp_path) -> None:
    image = package_images(["coins"])[0].image
    model = small_model("sam_vit_b")
    loose = samfx.everything(model, image, "grid", points_per_side=6, **RELAXED)
    cut = float(np.median(loose.predicted_iou)) if len(loose) > 1 else 0.0
    strict = samfx.everything(model, image, "grid", points_per_side=6, pred_iou_thresh=cut, stability_score_thresh=0.0)
    assert np.all(strict.predicted_iou > cut)
    stable = samfx.everything(model, image, "grid", points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.5,
                              stability_score_offset=0.01)
    assert np.all(stable.stability_score >= 0.5)
    saved = json.loads(loose.save(tmp_path / "m.json").read_text())
    assert saved["strategy"] == "grid" and len(saved["annotations"]) == len(loose)


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_hq_vit_b", "sam2.1_hiera_t", "hf_sam_vit_b"])
def test_hierarchical_equals_the_grid_when_nothing_is_covered(name: str) -> None:
    image = package_images(["astronaut"])[0].image
    generator = MaskGenerator(small_model(name), EverythingConfig(points_per_side=8, high_score_thresh=float("inf"),
                                                                  **RELAXED))
    grid = generator.generate(image, "grid")
    fast = generator.generate(image, "hierarchical")
    assert fast.prompts == grid.prompts == 64 and fast.prompts_skipped == 0
    assert len(fast) == len(grid) > 0
    match = match_masks(grid, fast)
    assert match.recall == 1.0 and match.mean_iou > 0.999


def test_an_optimized_model_segments_like_the_original() -> None:
    model = small_model("sam_vit_b")
    fast = samfx.optimize(model, ["split_qkv"])
    image = package_images(["coins"])[0].image
    options = dict(points_per_side=8, high_score_thresh=0.0, **RELAXED)
    a = samfx.everything(model, image, **options)
    b = samfx.everything(fast, image, **options)
    assert a.prompts == b.prompts and match_masks(a, b).mean_iou > 0.999


def test_lite_medsam_both_strategies(lite_medsam) -> None:
    image = package_images(["coins"])[0].image
    with pytest.warns(UserWarning, match="trained with box prompts only"):
        generator = MaskGenerator(lite_medsam, EverythingConfig(points_per_side=4))
    grid = generator.generate(image, "grid")
    fast = generator.generate(image, "hierarchical")
    # Box-only weights: no click gives a confident mask, so nothing is covered and
    # the hierarchical strategy runs the grid's clicks and finds the same (none).
    assert len(grid) == len(fast) == 0 and fast.prompts == grid.prompts == 16
    assert fast.timings["embed_s"] == 0.0 < grid.timings["embed_s"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        specks = MaskGenerator(generator.predictor, EverythingConfig(points_per_side=4, **RELAXED))
    relaxed_grid, relaxed_fast = specks.generate(image, "grid"), specks.generate(image, "hierarchical")
    assert len(relaxed_grid) > 0 and match_masks(relaxed_grid, relaxed_fast).recall == 1.0


def test_bad_input_is_refused_with_the_reason() -> None:
    model = small_model("sam_vit_b")
    image = package_images(["coins"])[0].image
    with pytest.raises(ValueError, match="unknown strategy 'dense'"):
        samfx.everything(model, image, "dense")
    with pytest.raises(ValueError, match="H x W x 3"):
        samfx.everything(model, image[:, :, 0])
    with pytest.raises(ValueError, match="uint8"):
        samfx.everything(model, image.astype(np.float32))
    with pytest.raises(ValueError, match="unknown everything options \\['points'\\]"):
        samfx.everything(model, image, points=4)
    with pytest.raises(ValueError, match="pred_iou_thresh must lie in"):
        EverythingConfig(pred_iou_thresh=1.5)
    with pytest.raises(ValueError, match="points_per_side must be a positive integer"):
        EverythingConfig(points_per_side=0)
    with pytest.raises(TypeError, match="lacks predict_points, logits_to_image"):
        MaskGenerator(object.__new__(type("Half", (), {"set_image": lambda self, image: None})))
