"""samfx.evaluate: ground-truth mIoU and agreement with the original on the user's annotated images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import samfx
from samfx.evaluation import EvalError, evaluate
from samfx.masks import rle_encode, rle_to_string

from .conftest import small_model


def write_coco_folder(folder, count: int = 2, size: int = 64) -> tuple:
    """``count`` images of bright shapes on a dark ground, as COCO polygons and RLE."""
    rng = np.random.default_rng(1)
    images, annotations = [], []
    yy, xx = np.mgrid[:size, :size]
    for index in range(count):
        image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        disc = (yy - 40) ** 2 + (xx - 20 - 4 * index) ** 2 < 100
        image[disc] = (220, 120, 60)
        image[8:24, 30:56] = (60, 200, 240)
        Image.fromarray(image).save(folder / f"shape_{index}.png")
        images.append({"id": index, "file_name": f"shape_{index}.png", "height": size, "width": size})
        annotations.append({"id": 2 * index, "image_id": index, "iscrowd": 0,
                            "segmentation": [[29.5, 7.5, 55.5, 7.5, 55.5, 23.5, 29.5, 23.5]]})
        annotations.append({"id": 2 * index + 1, "image_id": index, "iscrowd": 0,
                            "segmentation": {"size": [size, size],
                                             "counts": rle_to_string(rle_encode(disc[None])[0])}})
    path = folder / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_evaluate_against_ground_truth_and_the_original(tmp_path) -> None:
    coco = write_coco_folder(tmp_path)
    model, original = small_model("sam_vit_b"), small_model("sam_vit_b")
    with torch.no_grad():
        for p in model.image_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    report = evaluate(model, annotations=coco, against=original)
    assert report.images == ["shape_0.png", "shape_1.png"] and report.objects == 4
    assert [row["id"] for row in report.per_object] == [0, 1, 2, 3]
    assert report.trained_prompts == ["box", "point"]
    for kind in ("box", "point"):
        row = report.by_prompt[kind]
        assert row["trained"] and row["objects"] == 4
        assert 0 <= row["gt_miou"] <= 1 and 0 <= row["gt_miou_original"] <= 1
        assert 0 <= row["vs_original_min"] <= row["vs_original_miou"] <= 1
    expected = np.mean([row[k]["gt_iou"] for row in report.per_object for k in ("box", "point")])
    assert report.gt_miou == pytest.approx(expected)
    assert json.loads(json.dumps(report.to_dict()))["objects"] == 4
    assert "mIoU vs GT" in report.table()
    same = evaluate(original, annotations=coco, against=small_model("sam_vit_b"))
    assert same.vs_original_miou == 1.0 and same.gt_miou == same.gt_miou_original
    # A predictor (a runtime's, say) is evaluated the same way.
    through = evaluate(samfx.adapters.find_adapter(model).predictor(model), annotations=coco, against=original)
    assert through.per_object == report.per_object


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_hq_vit_b", "lite_medsam"])
def test_batched_boxes_match_one_by_one(name: str) -> None:
    from samfx.data import package_images

    model = small_model(name)
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    sample = package_images(["coins"])[0]
    predictor.set_image(sample.image)
    boxes = np.array([p.coords for p in sample.prompts if p.kind == "box"][:4], np.float32)
    masks, scores = predictor.predict_boxes(boxes)
    for box, mask, score in zip(boxes, masks, scores):
        single, single_score = predictor.predict(box=box, multimask_output=False)
        assert (single[0] == mask).mean() > 0.999 and abs(float(single_score[0]) - float(score)) < 1e-4


def test_images_without_annotations_need_an_original(tmp_path) -> None:
    write_coco_folder(tmp_path, count=1)
    model = small_model("sam_vit_b")
    with pytest.raises(EvalError, match="nothing to measure"):
        evaluate(model, [str(tmp_path / "*.png")])
    report = evaluate(model, [str(tmp_path)], against=small_model("sam_vit_b"))
    assert report.images == [str(tmp_path / "shape_0.png")] and report.gt_miou is None
    assert report.vs_original_miou == 1.0
    boxes = evaluate(model, [str(tmp_path)], against=small_model("sam_vit_b"), prompts=("box",))
    assert set(boxes.by_prompt) == {"box"} and set(boxes.per_object[0]) == {"image", "id", "area", "box"}
    with pytest.raises(EvalError, match="prompts are some of box, point; got box, clicks"):
        evaluate(model, [str(tmp_path)], prompts=("box", "clicks"))
    with pytest.raises(EvalError, match="one folder that holds the annotated image files"):
        evaluate(model, ["coins", "astronaut"], annotations=tmp_path / "coco.json")


@pytest.mark.parametrize("name", ["sam_hq_vit_b", "sam2.1_hiera_t", "hf_sam_vit_b"])
def test_every_family_is_evaluated_batched_or_one_by_one(tmp_path, name: str) -> None:
    coco = write_coco_folder(tmp_path, count=1)
    report = evaluate(small_model(name), annotations=coco, against=small_model(name))
    assert report.objects == 2 and report.vs_original_miou == 1.0
    assert all(0 <= row[kind]["gt_iou"] <= 1 for row in report.per_object for kind in ("box", "point"))
