"""The samfx command line."""

from __future__ import annotations

import hashlib
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


def test_optimize_draws_pictures_and_compare_plots_benchmarks(tmp_path, capsys) -> None:
    from .test_pictures import open_png

    run = tmp_path / "run"
    assert main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "split_qkv", "--out", str(run),
                 "--images", "coins", "--quiet", "--pictures"]) == 0
    open_png(run / "pictures" / "compare_coins.png")
    # A random-init original cannot be rebuilt from the run directory.
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(tmp_path / "p")]) == 2
    assert "random weights, which cannot be rebuilt" in capsys.readouterr().err
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


def _bad_cases(tmp_path):
    """Each bad command line a hostile user tried (issue 14), with what the message must name."""
    import os

    import torch

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello world\n")

    class Unsafe:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"weight": Unsafe()}, tmp_path / "unsafe.pth")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    (tmp_path / "broken_save").mkdir()
    (tmp_path / "broken_save" / "samfx.json").write_text('{"format": "samfx-model/2", "samfx": 3}')
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    from samfx.emit import runtime

    garbage = {"encoder.onnx": b"\x00" * 64 + b"not a protobuf", "decoder.onnx": b"\x00" * 64}
    manifest = {"schema": runtime.SCHEMA, "format": "onnx", "preprocessing": {}, "encoder": "encoder.onnx",
                "decoder": "decoder.onnx", "files": {name: {"sha256": hashlib.sha256(data).hexdigest(),
                                                            "bytes": len(data)} for name, data in garbage.items()}}
    (onnx_dir / runtime.MANIFEST).write_text(json.dumps(manifest))  # lists files that are not there
    garbage_dir = tmp_path / "garbage_onnx"
    garbage_dir.mkdir()
    (garbage_dir / runtime.MANIFEST).write_text(json.dumps(manifest))  # files as listed, but not ONNX
    for name, data in garbage.items():
        (garbage_dir / name).write_bytes(data)
    np.save(tmp_path / "image.npy", np.zeros((32, 32, 3), np.uint8))
    image, out = str(tmp_path / "image.npy"), str(tmp_path / "mask.png")
    small = ["--model", "sam_vit_b", "--small", "--quiet", "--no-fidelity"]
    return [
        (["optimize", *small, "--threads", "-3", "--out", str(tmp_path / "o")], "--threads"),
        (["optimize", *small, "--passes", "nope", "--out", str(tmp_path / "o")], "unknown pass 'nope'"),
        (["optimize", *small, "--passes", "split_qkv", "--out", str(tmp_path / "a_file")], "not a directory"),
        (["optimize", *small, "--out", str(tmp_path / "a_file" / "run")], "is a file"),
        (["optimize", *small, "--out", str(tmp_path / "theirs")], "not a samfx save"),
        (["optimize", "--model", "no_such_model", "--out", str(tmp_path / "o")], "unknown model"),
        (["optimize", "--out", str(tmp_path / "o")], "give --model"),
        (["optimize", "--model", "sam_vit_b"], "--out"),
        (["optimize", "--model", "sam_vit_b", "--checkpoint", str(tmp_path / "empty.pth"), "--out", str(tmp_path / "o")],
         "is empty"),
        (["optimize", "--model", "sam_vit_b", "--checkpoint", str(tmp_path / "text.pth"), "--out", str(tmp_path / "o")],
         "truncated or corrupt"),
        (["optimize", "--model", "sam_vit_b", "--checkpoint", str(tmp_path / "unsafe.pth"),
          "--out", str(tmp_path / "o")], "unsafe"),
        (["optimize", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")], "does not exist"),
        (["everything", "coins", "--saved", str(tmp_path / "broken_save")], "SHA-256"),
        (["everything", "coins", "--saved", str(tmp_path / "nowhere")], "not a saved samfx model"),
        (["everything", "coins", "--model", "sam_vit_b", "--small", "--out", str(tmp_path / "no" / "m.json")],
         "does not exist"),
        (["everything", "coins", "--model", "sam_vit_b", "--small", "--threads", "-3"], "--threads"),
        (["run-onnx", image, "--model-dir", str(onnx_dir), "--point", "nan,nan", "--out", out], "finite"),
        (["run-onnx", image, "--model-dir", str(onnx_dir), "--point", "1,2", "--out", out, "--threads", "-3"],
         "--threads"),
        (["run-onnx", image, "--model-dir", str(tmp_path / "nowhere"), "--point", "1,2", "--out", out],
         "samfx_export.json"),
        (["run-onnx", image, "--model-dir", str(onnx_dir), "--point", "1,2", "--out", out], "encoder.onnx"),
        (["run-onnx", image, "--model-dir", str(garbage_dir), "--point", "1,2", "--out", out], "encoder.onnx"),
        (["run-onnx", image, "--model-dir", str(onnx_dir), "--point", "1,2", "--out", str(tmp_path / "no" / "m.png")],
         "does not exist"),
        (["export-onnx", "--model", "sam_vit_b", "--small", "--out", str(tmp_path / "a_file")], "not a directory"),
        (["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "pics")], "not a saved samfx model"),
    ]


def test_user_errors_end_in_one_line_and_exit_code_2(tmp_path, capsys) -> None:
    for argv, named in _bad_cases(tmp_path):
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (argv, captured.err)
        assert "Traceback" not in captured.err + captured.out, argv
        assert len(lines) == 1 and lines[0].startswith("samfx: error: "), (argv, captured.err)
        assert named in lines[0], (argv, lines[0])
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()
