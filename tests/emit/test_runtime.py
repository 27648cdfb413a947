"""The torch-free runtime: same masks as each family's own PyTorch predictor, in both formats;
batched boxes; files checked against the manifest before loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import samfx
from samfx.cli import main as cli_main
from samfx.data import package_images
from samfx.emit import runtime
from samfx.fidelity import mask_iou

from ..conftest import SMALL_FAMILIES, small_model
from .conftest import FORMATS, shared_exports

# Runs the copy of the runtime that samfx.export puts next to the models, with
# torch made unimportable, and saves what it predicts.
_RUNNER = r"""
import json, sys
import numpy as np
sys.modules["torch"] = None  # any import of torch now fails
model_dir, job = sys.argv[1], sys.argv[2]
sys.path.insert(0, model_dir)
import samfx_runtime
data = np.load(job + ".npz", allow_pickle=True)
predictor = samfx_runtime.load(model_dir, threads=1)
predictor.set_image(data["image"])
masks = [predictor.predict(**prompt)[0] for prompt in data["prompts"]]
np.savez(job + "-out.npz", *masks)
print(json.dumps(sorted({m.split(".")[0] for m, module in sys.modules.items()
                         if module is not None and m.split(".")[0] in ("torch", "samfx")})))
"""


def _prompts(sample, count: int = 2) -> list[dict]:
    points = [p for p in sample.prompts if p.kind == "point"][:count]
    boxes = [p for p in sample.prompts if p.kind == "box"][:count]
    prompts = [{"point_coords": np.array([p.coords]), "point_labels": np.array([1])} for p in points]
    prompts += [{"box": np.array(b.coords)} for b in boxes]
    prompts.append({"box": np.array(boxes[0].coords), "point_coords": np.array([points[1].coords]),
                    "point_labels": np.array([0])})
    return prompts


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("name", SMALL_FAMILIES)
def test_runtime_without_torch_matches_the_family_predictor(exported, tmp_path, name: str, format: str) -> None:
    export = exported(name, (), format)
    model = small_model(name)
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    images = ["coins", "coffee"] if format == "onnx" else ["coffee"]  # 303 x 384 and 400 x 600
    for sample in package_images(images):
        prompts = _prompts(sample)
        job = tmp_path / sample.name
        np.savez(f"{job}.npz", image=sample.image, prompts=np.array(prompts, dtype=object))
        run = subprocess.run([sys.executable, "-c", _RUNNER, str(export.directory), str(job)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[-1]) == []  # neither torch nor samfx was imported
        onnx_masks = np.load(f"{job}-out.npz")
        predictor.set_image(sample.image)
        with torch.no_grad():
            for index, prompt in enumerate(prompts):
                masks, _ = predictor.predict(**prompt, multimask_output=True)
                ious = [mask_iou(a, b) for a, b in zip(onnx_masks[f"arr_{index}"], masks)]
                assert onnx_masks[f"arr_{index}"].shape == masks.shape
                assert min(ious) >= 0.99, (sample.name, prompt, ious)


@pytest.mark.parametrize("antialias", [True, False])
def test_float_resize_matches_torch(antialias: bool) -> None:
    image = np.random.default_rng(0).uniform(0, 255, (61, 97, 3))
    for size in [(23, 40), (61, 97), (150, 77)]:
        ours = runtime.resize(image, size, antialias=antialias, uint8=False)
        theirs = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=size, mode="bilinear",
                               align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_uint8_resize_matches_pil_to_one_level() -> None:
    image = package_images(["coins"])[0].image
    for size in [(128, 162), (512, 649)]:
        ours = runtime.resize(image, size, antialias=True, uint8=True)
        theirs = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR), np.float64)
        difference = np.abs(ours - theirs)
        assert difference.max() <= 1 and difference.mean() < 0.02


@pytest.mark.parametrize("format", FORMATS)
def test_boxes_are_decoded_in_one_call(exported, format: str) -> None:
    predictor = runtime.load(exported("sam2.1_hiera_t", (), format).directory, threads=1)
    sample = package_images(["coins"])[0]
    boxes = np.array([p.coords for p in sample.prompts if p.kind == "box"][:5])
    predictor.set_image(sample.image)
    masks, scores, low_res = predictor.predict(box=boxes)
    assert masks.shape == (5, 3, *sample.image.shape[:2]) and scores.shape == (5, 3) and low_res.shape[:2] == (5, 3)
    for index in (0, 4):
        one, one_scores, _ = predictor.predict(box=boxes[index])
        assert mask_iou(one[0], masks[index, 0]) >= 0.999
        np.testing.assert_allclose(one_scores, scores[index], atol=1e-4)
    # What samfx.evaluate runs: one mask per box (the best-scored candidate of a multi-mask export).
    best, best_scores = predictor.predict_boxes(boxes)
    assert best.shape == (5, *sample.image.shape[:2]) and np.array_equal(best_scores, scores.max(axis=1))
    assert np.array_equal(best[1], masks[1, scores[1].argmax()])
    # A point shared by every box, and per-box low-res masks fed back.
    click = [p.coords for p in sample.prompts if p.kind == "point"][0]
    again, _, _ = predictor.predict(box=boxes, point_coords=[click], point_labels=[1], mask_input=low_res[:, :1])
    assert again.shape == masks.shape


@pytest.mark.parametrize("format", FORMATS)
def test_clicks_are_decoded_in_one_call_as_the_model_answers_them(exported, format: str) -> None:
    export = exported("sam_vit_b", (), format)
    model = small_model("sam_vit_b")
    sample = package_images(["coins"])[0]
    clicks = np.array([p.coords for p in sample.prompts if p.kind == "point"][:4], np.float32)
    ours = runtime.load(export.directory, threads=1)
    theirs = samfx.adapters.find_adapter(model).predictor(model)
    for predictor in (ours, theirs):
        predictor.set_image(sample.image)
    masks, scores = ours.predict_clicks(clicks)
    want, want_scores = theirs.predict_clicks(clicks)
    assert masks.shape == want.shape == (4, *sample.image.shape[:2])
    assert all(mask_iou(a, b) >= 0.99 for a, b in zip(masks, want))
    np.testing.assert_allclose(scores, want_scores, atol=1e-3)
    for click, mask in zip(clicks[:2], masks):  # each is its own prompt: the best of its candidates
        one, one_scores, _ = ours.predict(point_coords=[click], point_labels=[1])
        assert mask_iou(one[one_scores.argmax()], mask) >= 0.999


@shared_exports("onnx")
def test_an_export_is_evaluated_in_its_runtime(exported, tmp_path, capsys) -> None:
    from ..test_evaluation import write_coco_folder

    coco = write_coco_folder(tmp_path, count=1)
    directory = exported("sam_vit_b", (), "onnx").directory
    report = samfx.evaluate(runtime.load(directory, threads=1), annotations=coco, against=small_model("sam_vit_b"),
                            prompts=("point",))
    assert report.model == str(directory) and report.objects == 2 and report.trained_prompts == ["point"]
    assert report.by_prompt["point"]["vs_original_min"] >= 0.99  # a multi-mask export answers clicks as torch does
    out = tmp_path / "eval.json"
    code = cli_main(["eval", str(directory), "--annotations", str(coco), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["objects"] == 2


def _tamper(directory, tmp_path, name: str):
    """A copy of an export directory with 64 bytes zeroed inside ``name``."""
    copy = tmp_path / f"tampered-{directory.name}"
    shutil.copytree(directory, copy)
    data = bytearray((copy / name).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    (copy / name).write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("format, name", [
    pytest.param(format, name, marks=shared_exports(format))
    for format, name in [("onnx", "encoder.onnx"), ("openvino", "encoder.bin"), ("openvino", "decoder.xml")]])
def test_a_changed_file_is_refused_before_loading(exported, tmp_path, format: str, name: str) -> None:
    tampered = _tamper(exported("sam_vit_b", (), format).directory, tmp_path, name)
    with pytest.raises(runtime.IntegrityError, match=f"{name} does not match its SHA-256"):
        runtime.load(tampered)
    # The torch-free copy in the directory checks too, and so does the command line.
    script = (f"import sys; sys.path.insert(0, {str(tampered)!r}); import samfx_runtime; "
              f"samfx_runtime.load({str(tampered)!r})")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode != 0 and "IntegrityError" in run.stderr and name in run.stderr
    if format == "openvino":
        return
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    code = subprocess.run([sys.executable, "-m", "samfx.cli", "run", str(tmp_path / "x.png"), "--model-dir",
                           str(tampered), "--box", "1,1,5,5", "--out", str(tmp_path / "m.png")],
                          capture_output=True, text=True)
    assert code.returncode == 2 and code.stderr.startswith("samfx: error: ") and name in code.stderr
    assert len(code.stderr.strip().splitlines()) == 1


@shared_exports("onnx")
def test_a_missing_or_truncated_file_is_refused(exported, tmp_path) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(exported("sam_vit_b").directory, directory)
    (directory / "decoder.onnx").write_bytes((directory / "decoder.onnx").read_bytes()[:1000])
    with pytest.raises(runtime.IntegrityError, match="decoder.onnx has 1000 bytes"):
        runtime.load(directory)
    (directory / "decoder.onnx").unlink()
    with pytest.raises(runtime.IntegrityError, match="decoder.onnx is missing"):
        runtime.load(directory)
    (directory / runtime.MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        runtime.load(directory)


@shared_exports("onnx")
def test_bad_inputs_are_refused_with_the_reason(exported, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="samfx_export.json"):
        runtime.load(tmp_path)
    with pytest.raises(ValueError, match="openvino export"):
        runtime.OnnxPredictor(exported("sam_vit_b", (), "openvino").directory)
    predictor = runtime.OnnxPredictor(exported("sam_vit_b").directory)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=[0, 0, 10, 10])
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((20, 30, 3), np.float32))
    predictor.set_image(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="point or a box"):
        predictor.predict()
    with pytest.raises(ValueError, match="one label"):
        predictor.predict(point_coords=[[1, 2], [3, 4]], point_labels=[1])
    with pytest.raises(ValueError, match="multi-mask output"):
        predictor.predict(box=[0, 0, 10, 10], multimask_output=False)
    with pytest.raises(ValueError, match="prompt batches differ"):
        predictor.predict(box=np.zeros((3, 4)), point_coords=np.zeros((2, 1, 2)), point_labels=[[1], [1]])
    assert cli_main(["run-onnx", "x.png", "--model-dir", str(tmp_path), "--out", str(tmp_path / "m.png")]) == 2
