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
    from .conftest import open_png

    code = main(["everything", "coins", "--model", "sam_vit_b", "--small", "--points-per-side", "4",
                 "--pred-iou-thresh", "0", "--stability-thresh", "0", "--out", str(tmp_path / "m.json"),
                 "--png", str(tmp_path / "m.png")])
    assert code == 0
    assert "clicks (hierarchical" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["annotations"] and set(saved["annotations"][0]["segmentation"]) == {"size", "counts"}
    open_png(tmp_path / "m.png")


def test_optimize_draws_pictures_and_compare_plots_benchmarks(tmp_path, capsys) -> None:
    from .conftest import open_png

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
    from .conftest import open_png

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


def test_passes_lists_options_defaults_and_kinds(capsys) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "mlp=0.5 (float)" in out and "roles=image_encoder+mask_decoder (str+...)" in out
    prune = next(line for line in out.splitlines() if line.startswith("prune"))
    assert "lossy, data-driven" in prune and "requires split_qkv" in prune
    assert next(line for line in out.splitlines() if line.startswith("split_qkv")).split()[1] == "exact"


@pytest.mark.parametrize("spec,message", [
    ("prune:mlpp=0.3", "prune has no option 'mlpp'; its options: mlp, heads,"),
    ("split_qkv,prune:mlp=lots", "prune: option mlp='lots' is not a float"),
    ("hyper:tensors=maybe", "hyper: option tensors='maybe' is not a bool"),
    ("prune:mlp", "prune: option 'mlp' is not KEY=VALUE"),
])
def test_bad_pass_options_exit_with_one_line(tmp_path, capsys, spec, message) -> None:
    code = main(["optimize", "--model", "sam_vit_b", "--small", "--passes", spec, "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("samfx: error: ") and message in err and err.count("\n") == 1


def _image_folder(folder, count: int = 4):
    from .test_evaluation import write_coco_folder

    folder.mkdir()
    return write_coco_folder(folder, count)


def test_optimize_splits_your_images_into_calibration_and_held_out(tmp_path, capsys) -> None:
    _image_folder(tmp_path / "imgs")
    code = main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "prune:mlp=0.3:importance=fluctuation",
                 "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "run"), "--quiet",
                 "--min-box-iou", "none"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 calibrate the passes, 2 are held out for fidelity" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    used = report["images"]
    assert len(used["calibration"]) == len(used["evaluation"]) == 2
    assert not set(used["calibration"]) & set(used["evaluation"])
    assert report["fidelity"]["images"] == used["evaluation"]
    code = main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "prune:importance=fluctuation",
                 "--images", str(tmp_path / "imgs"), "--calibration", str(tmp_path / "imgs" / "shape_1.png"),
                 "--out", str(tmp_path / "again"), "--quiet"])
    assert code == 2 and "calibration and evaluation images overlap" in capsys.readouterr().err


def test_eval_writes_json_per_object_and_in_total(tmp_path, capsys) -> None:
    coco = _image_folder(tmp_path / "imgs", count=2)
    out = tmp_path / "eval.json"
    code = main(["eval", "sam_vit_b", "--small", "--annotations", str(coco), "--against", "sam_vit_b",
                 "--out", str(out), "--quiet"])
    assert code == 0
    assert "mIoU vs GT" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["objects"] == 4 and len(report["per_object"]) == 4
    assert set(report["by_prompt"]) == {"box", "point"} and report["vs_original_miou"] is not None
    code = main(["eval", "sam_vit_b", "--small", "--images", str(tmp_path / "nothing" / "*.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("samfx: error: evaluation: the pattern") and err.count("\n") == 1


def test_optimize_checks_and_draws_a_folder_of_your_images(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    _image_folder(tmp_path / "imgs", count=2)
    code = main(["optimize", "--model", "sam_vit_b", "--small", "--passes", "split_qkv", "--images",
                 str(tmp_path / "imgs" / "*.png"), "--out", str(tmp_path / "run"), "--quiet", "--pictures"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    files = [str(tmp_path / "imgs" / f"shape_{i}.png") for i in range(2)]
    assert report["fidelity"]["images"] == files and report["images"]["evaluation"] == files
    assert report["images"]["calibration"] == [] and report["fidelity"]["mask_iou_min"] == 1.0
    assert sorted(p.name for p in (tmp_path / "run" / "pictures").iterdir()) == ["compare_shape_0.png",
                                                                                 "compare_shape_1.png"]


def test_eval_of_a_saved_run_rebuilds_its_original_and_flags_calibration_images(tmp_path, capsys) -> None:
    _image_folder(tmp_path / "imgs", count=2)
    calibration = str(tmp_path / "imgs" / "shape_0.png")
    assert main(["optimize", "--model", "lite_medsam", "--passes", "split_qkv", "--calibration", calibration,
                 "--no-fidelity", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run"), "--images", str(tmp_path / "imgs"), "--prompts", "box",
                 "--max-images", "1", "--out", str(out), "--quiet"]) == 0
    assert "evaluated images were used to calibrate the model" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["original"] == "lite_medsam" and report["calibration_overlap"] == [calibration]
    assert report["vs_original_miou"] == 1.0 and report["trained_prompts"] == ["box"]


def test_optimize_takes_a_preset_and_refuses_it_beside_passes(tmp_path, capsys) -> None:
    out = tmp_path / "p"
    argv = ["optimize", "--model", "sam_vit_b", "--small", "--quiet", "--no-fidelity", "--out", str(out)]
    assert main([*argv, "--preset", "lite_medsam_cpu", "--passes", "split_qkv"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*argv, "--preset", "no_such_preset"]) == 2
    assert "unknown preset 'no_such_preset'" in capsys.readouterr().err
    assert not out.exists()  # refused before any work


def test_optimize_with_a_preset_saves_its_passes_calibrated_on_its_photos(tmp_path) -> None:
    out = tmp_path / "p"
    assert main(["optimize", "--model", "sam_vit_b", "--small", "--quiet", "--no-fidelity", "--out", str(out),
                 "--preset", "lite_medsam_cpu", "--min-box-iou", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["share_image_side", "quantize"]
    from samfx.presets import get_preset

    assert report["images"]["calibration"] == list(get_preset("lite_medsam_cpu").calibration_images)


def test_optimize_holds_lossy_passes_to_the_floor_or_refuses_in_one_line(tmp_path, capsys) -> None:
    argv = ["optimize", "--model", "sam_vit_b", "--small", "--passes", "prune:mlp=0.1", "--no-fidelity", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "refused"), "--min-box-iou", "0.9999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samfx: error: prune keeps a box-prompt mask IoU of at most") and err.count("\n") == 1
    assert "--min-box-iou none" in err and not (tmp_path / "refused" / "model.safetensors").exists()
    assert main([*argv, "--out", str(tmp_path / "bad"), "--min-box-iou", "1.5"]) == 2
    assert "--min-box-iou is a mask IoU in (0, 1], or none" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "kept"), "--min-box-iou", "0.5"]) == 0
    assert "floor box IoU >= 0.5 on 3 held-out images (32 boxes)" in capsys.readouterr().out
    report = json.loads((tmp_path / "kept" / "report.json").read_text())
    assert report["min_box_iou"] == 0.5 and report["passes"][-1]["fidelity_floor"]["attempts"][0]["box_iou"] >= 0.5
