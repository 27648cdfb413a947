"""The samfx command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from samfx.cli import main
from samfx.data import package_images


def test_models_lists_the_zoo(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lite_medsam" in out and "real" in out and "sam2.1_hiera_b+" in out


def test_passes_lists_split_qkv(capsys) -> None:
    assert main(["passes"]) == 0
    assert "split_qkv" in capsys.readouterr().out


def test_optimize_writes_model_and_report(tmp_path, capsys) -> None:
    code = main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "split_qkv", "--out", str(tmp_path),
                 "--images", "coins", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mask IoU vs original" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fidelity"]["mask_iou_min"] == 1.0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "samfx.json").is_file()


def test_bad_pass_exits_with_a_message(tmp_path, capsys) -> None:
    code = main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "nope", "--out", str(tmp_path),
                 "--no-fidelity", "--quiet"])
    assert code == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_bad_checkpoint_exits_with_a_message(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code = main(["optimize", "--model", "sam_vit_b", "--checkpoint", str(bad), "--out", str(tmp_path / "o"),
                 "--quiet"])
    assert code == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run([sys.executable, "-m", "samfx.cli", "passes"], capture_output=True, text=True, check=True)
    assert "split_qkv" in result.stdout


def test_export_and_run_commands(tmp_path, capsys) -> None:
    from samfx.cli import build_parser

    # export-onnx is export with ONNX as the default format (one export here: each takes seconds).
    assert build_parser().parse_args(["export-onnx", "--model", "m", "--out", "o"]).command == "export-onnx"
    format = "openvino"
    model_dir = tmp_path / format
    assert main(["export", "--model", "sam_vit_b", "--small", "--single-mask", "--quiet",
                 "--out", str(model_dir)]) == 0
    printed = capsys.readouterr().out
    assert "mask IoU 1.0000" in printed and f"{format}: encoder" in printed  # the check summary is printed
    image = package_images(["coins"])[0].image
    Image.fromarray(image).save(tmp_path / "coins.png")
    out = tmp_path / "mask.png"
    code = main(["run", str(tmp_path / "coins.png"), "--model-dir", str(model_dir),
                 "--point", "100,120", "--negative", "20,20", "--out", str(out)])
    assert code == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert f"1 mask from {format}" in capsys.readouterr().out
    # Three boxes in one decoder call: a label image, 1..3.
    code = main(["run", str(tmp_path / "coins.png"), "--model-dir", str(model_dir), "--box", "10,10,100,100",
                 "--box", "120,30,200,120", "--box", "200,150,300,290", "--out", str(out)])
    assert code == 0 and "3 masks" in capsys.readouterr().out
    assert set(np.unique(np.asarray(Image.open(out)))) <= {0, 1, 2, 3}


def test_run_refuses_what_it_cannot_run_in_one_line(tmp_path, capsys) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    for model_dir, expected in [(tmp_path, "no samfx_export.json"), (tmp_path / "absent", "no samfx_export.json")]:
        code = main(["run", str(tmp_path / "x.png"), "--model-dir", str(model_dir), "--box", "1,1,5,5",
                     "--out", str(tmp_path / "m.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("samfx: error: ") and expected in err and len(err.splitlines()) == 1
    assert main(["run", str(tmp_path / "x.png"), "--model-dir", str(tmp_path), "--out", "m.png"]) == 2
    assert "give at least one --point" in capsys.readouterr().err


def test_everything_writes_coco_json_and_a_picture(tmp_path, capsys) -> None:
    from .test_pictures import open_png

    code = main(["everything", "coins", "--model", "sam_vit_b", "--small", "--points-per-side", "4",
                 "--pred-iou-thresh", "0", "--stability-thresh", "0", "--out", str(tmp_path / "m.json"),
                 "--png", str(tmp_path / "m.png")])
    assert code == 0
    assert "clicks (hierarchical" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["annotations"] and set(saved["annotations"][0]["segmentation"]) == {"size", "counts"}
    open_png(tmp_path / "m.png")


def test_optimize_draws_pictures_and_compare_plots_benchmarks(tmp_path) -> None:
    from .test_pictures import open_png

    run = tmp_path / "run"
    assert main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "split_qkv", "--out", str(run),
                 "--images", "coins", "--quiet", "--pictures"]) == 0
    open_png(run / "pictures" / "compare_coins.png")
    # A random-init original cannot be rebuilt from the run directory.
    with pytest.raises(SystemExit, match="random weights, which cannot be rebuilt"):
        main(["compare", str(run), "--out", str(tmp_path / "p")])
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [{"case": "a", "encoder_speedup": 1.3, "fidelity": {"mask_iou_mean": 0.97}}]}))
    assert main(["compare", "--bench", str(bench), "--out", str(tmp_path / "plots")]) == 0
    open_png(tmp_path / "plots" / "speed_fidelity.png")


def test_compare_rebuilds_lite_medsam_and_draws_it(tmp_path, capsys) -> None:
    from .test_pictures import open_png

    run = tmp_path / "run"
    assert main(["optimize", "--model", "lite_medsam", "--passes", "split_qkv", "--out", str(run),
                 "--images", "coins", "--quiet"]) == 0
    assert main(["compare", str(run), "--out", str(tmp_path / "pictures")]) == 0
    assert "compare_coins.png" in capsys.readouterr().out
    open_png(tmp_path / "pictures" / "compare_coins.png")
