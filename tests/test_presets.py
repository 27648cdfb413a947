"""Presets: named pass lists that build, and hold their fidelity on held-out photos."""

from __future__ import annotations

import pytest
import torch.nn as nn

from samfx.data import DEFAULT_IMAGES
from samfx.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(name for name in PRESETS if name.startswith("lite_medsam")))
def test_lite_medsam_presets_keep_box_masks_on_held_out_photos(lite_medsam: nn.Module, name: str) -> None:
    """The shipped recipes on the real weights: box IoU >= 0.98 and GT mIoU within 0.5 point on coins."""
    preset = get_preset(name)
    assert not set(preset.calibration_images) & set(DEFAULT_IMAGES)
    # Measured by the pipeline's fidelity floor, as shipped (no back-off).
    fast = preset.optimize(lite_medsam, min_box_iou=0.98, held_out_images=["coins"])
    assert [p.name for p in fast.samfx_report.passes] == [c.name for c in preset.passes]
    record = fast.samfx_report.passes[-1].fidelity_floor
    assert not record["backed_off"] and record["boxes"] == 24, record
    measured = record["attempts"][0]
    assert measured["box_iou"] >= 0.98 and measured["gt_miou"] >= measured["gt_miou_original"] - 0.005, measured


def test_unknown_presets_are_named() -> None:
    with pytest.raises(KeyError, match="lite_medsam_cpu"):
        get_preset("lite_medsam_gpu")
    assert all(name == preset.name for name, preset in PRESETS.items())
