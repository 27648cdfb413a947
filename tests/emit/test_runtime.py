"""The torch-free runtime: same masks as each family's own PyTorch predictor."""

from __future__ import annotations

import json
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

# Runs the copy of the runtime that export_onnx puts next to the models, with
# torch made unimportable, and saves what it predicts.
_RUNNER = r"""
import json, sys
import numpy as np
sys.modules["torch"] = None  # any import of torch now fails
model_dir, job = sys.argv[1], sys.argv[2]
sys.path.insert(0, model_dir)
import samfx_runtime
data = np.load(job + ".npz", allow_pickle=True)
predictor = samfx_runtime.OnnxPredictor(model_dir, threads=1)
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


@pytest.mark.parametrize("name", SMALL_FAMILIES)
def test_runtime_without_torch_matches_the_family_predictor(exported, tmp_path, name: str) -> None:
    export = exported(name)
    model = small_model(name)
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    for sample in package_images(["coins", "coffee"]):  # 303 x 384 and 400 x 600
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


def test_bad_inputs_are_refused_with_the_reason(exported, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="samfx_onnx.json"):
        runtime.OnnxPredictor(tmp_path)
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
    assert cli_main(["run-onnx", "x.png", "--model-dir", str(tmp_path), "--out", str(tmp_path / "m.png")]) == 2
