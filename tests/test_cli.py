"""The samfx command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
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
    model_dir = tmp_path / "onnx"
    assert main(["export-onnx", "--model", "sam_vit_b", "--small", "--single-mask", "--quiet",
                 "--out", str(model_dir)]) == 0
    assert "mask IoU 1.0000" in capsys.readouterr().out  # the check summary is printed
    image = package_images(["coins"])[0].image
    Image.fromarray(image).save(tmp_path / "coins.png")
    out = tmp_path / "mask.png"
    code = main(["run-onnx", str(tmp_path / "coins.png"), "--model-dir", str(model_dir),
                 "--point", "100,120", "--negative", "20,20", "--out", str(out)])
    assert code == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert "mask 0 of 1" in capsys.readouterr().out  # the single-mask decoder
