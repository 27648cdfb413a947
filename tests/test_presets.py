"""Presets: named pass lists that build, and hold their fidelity on held-out photos."""

from __future__ import annotations

import pytest
import torch.nn as nn

import samfx
from samfx.data import DEFAULT_IMAGES
from samfx.presets import PRESETS, get_preset


def test_lite_medsam_cpu_keeps_box_masks_on_held_out_photos(lite_medsam: nn.Module, lite_medsam_reference) -> None:
    """The shipped recipe on the real weights: box IoU >= 0.98 and GT mIoU within 0.5 point on coins."""
    preset = get_preset("lite_medsam_cpu")
    assert not set(preset.calibration_images) & set(DEFAULT_IMAGES)
    fast = preset.optimize(lite_medsam)
    assert [p.name for p in fast.samfx_report.passes] == [c.name for c in preset.passes]
    report = samfx.fidelity.compare(lite_medsam_reference, fast, images=["coins"])
    assert report.box_mask_iou_mean >= 0.98, report.summary()
    assert report.gt_miou_optimized >= report.gt_miou_original - 0.005, report.summary()


def test_unknown_presets_are_named() -> None:
    with pytest.raises(KeyError, match="lite_medsam_cpu"):
        get_preset("lite_medsam_gpu")
    assert all(name == preset.name for name, preset in PRESETS.items())
