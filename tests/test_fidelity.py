"""Fidelity metrics: identical models agree, a perturbed one does not."""

from __future__ import annotations

import numpy as np
import torch

import samfx
from samfx.fidelity import compare, mask_iou

from .conftest import small_model


def test_mask_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert mask_iou(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == 4 / 12


def test_identical_models_agree_exactly() -> None:
    model = small_model("sam_vit_b")
    report = compare(model, small_model("sam_vit_b"), images=["astronaut"])
    assert report.mask_iou_min == 1.0 and report.iou_pred_error_max == 0.0
    assert report.box_mask_iou_mean == 1.0
    assert abs(report.embedding_cosine_min - 1.0) < 1e-9
    assert report.gt_miou_original is None  # the astronaut has no ground truth


def test_perturbed_model_is_measured_as_different() -> None:
    model = small_model("sam_vit_b")
    noisy = small_model("sam_vit_b")
    with torch.no_grad():
        for p in noisy.image_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    report = compare(model, noisy, images=["coffee"])
    assert report.embedding_cosine_mean < 0.9999
    assert report.iou_pred_error_mean > 0


def test_ground_truth_miou_of_lite_medsam_on_coins(lite_medsam) -> None:
    # Box prompts on the 24 watershed-segmented coins.
    assert 0.9 < samfx.fidelity.ground_truth_miou(lite_medsam, ["coins"]) < 1.0


def test_lite_medsam_fidelity_leads_with_box_prompts(lite_medsam_reference) -> None:
    noisy = small_model("lite_medsam")
    with torch.no_grad():
        for p in noisy.image_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    report = compare(lite_medsam_reference, noisy, images=["coins"], max_prompts_per_image=6)
    assert report.trained_prompts == ["box"]
    assert report.by_prompt["box"]["trained"] and not report.by_prompt["point"]["trained"]
    assert report.by_prompt["box"]["prompts"] == report.by_prompt["point"]["prompts"] == 3
    # The headline is the box prompts' figure; clicks are reported apart, with the reason.
    assert report.mask_iou_mean == report.box_mask_iou_mean == report.by_prompt["box"]["mask_iou_mean"]
    assert report.mask_iou_min == report.by_prompt["box"]["mask_iou_min"]
    assert "trained with box prompts only" in report.untrained_prompts_note
    optimized = samfx.report_of(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]))
    optimized.fidelity = report  # the table as it reads for LiteMedSAM
    table = optimized.table()
    assert "mask IoU over box prompts" in table
    assert "point prompts (apart)" in table and "LiteMedSAM was trained with box prompts only" in table


def test_sam_fidelity_leads_with_points_and_boxes() -> None:
    report = compare(small_model("sam_vit_b"), small_model("sam_vit_b"), images=["coins"], max_prompts_per_image=4)
    assert report.trained_prompts == ["point", "box"] and report.untrained_prompts_note == ""
    assert all(row["trained"] for row in report.by_prompt.values())
