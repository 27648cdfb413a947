"""Pictures: comparison PNGs and the speed-fidelity plot open as real images."""

from __future__ import annotations


import pytest

import samfx
from samfx.pictures import compare_pictures, draw_everything, speed_fidelity_plot, speed_fidelity_points

from .conftest import open_png, small_model


def test_compare_pictures_show_both_models_and_everything(tmp_path) -> None:
    model = small_model("sam_vit_b")
    fast = samfx.optimize(model, ["split_qkv"], fidelity=["coins"])
    config = samfx.EverythingConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    paths = compare_pictures(model, fast, tmp_path, images=["coins"], fidelity=fast.samfx_report.fidelity,
                             everything=True, everything_config=config)
    assert [p.name for p in paths] == ["compare_coins.png"]
    pixels = open_png(paths[0])
    assert pixels.shape[0] > 0.55 * pixels.shape[1]  # two rows of three panels


def test_draw_everything(tmp_path) -> None:
    image = samfx.data.package_images(["coffee"])[0].image
    result = samfx.everything(small_model("sam_vit_b"), image, points_per_side=4, pred_iou_thresh=0.0,
                              stability_score_thresh=0.0)
    open_png(draw_everything(image, result, tmp_path / "masks.png"))


def test_speed_fidelity_plot_reads_both_kinds_of_rows(tmp_path) -> None:
    rows = [
        {"case": "lite_medsam/split_qkv", "encoder_speedup": 1.02, "fidelity": {"mask_iou_mean": 1.0}},
        {"case": "lite_medsam/everything", "speedup": 2.1, "fidelity": {"mask_iou_mean": 0.93}},
        {"case": "no fidelity", "encoder_speedup": 1.5, "fidelity": None},
    ]
    assert speed_fidelity_points(rows) == [("lite_medsam/split_qkv", 1.02, 1.0), ("lite_medsam/everything", 2.1, 0.93)]
    open_png(speed_fidelity_plot(rows, tmp_path / "plot.png"))
    with pytest.raises(ValueError, match="no benchmark row"):
        speed_fidelity_plot(rows[2:], tmp_path / "none.png")
