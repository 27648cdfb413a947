"""Annotation readers: COCO (polygons, RLE), SA-1B and MedSAM npz, from files the tests write."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from samfx.annotations import AnnotationError, polygon_mask, read_annotations, read_medsam, segmentation_mask
from samfx.masks import rle_decode, rle_encode, rle_from_string, rle_to_string

# Polygons and the compressed RLE pycocotools 2.0.11 makes of them (frPyObjects), with their areas.
PYCOCOTOOLS_POLYGONS = [
    ([2.5, 3.1, 17.8, 1.2, 20.4, 14.9, 9.3, 18.6, 1.1, 11.0], 20, 24, "m02=6N2O1O1O1O1N2O1OO10000O10O10O104L5JW2", 243),
    ([0, 0, 10, 10, 10, 0, 0, 10], 12, 12, "094N2N2N2N10O2N2N2N2g0", 50),  # a bow tie: crosses itself
    ([-3.2, 4.0, 30.5, 2.2, 14.0, 25.7], 16, 18, "44<2N1O1O2N1N2O000000000000000000000", 202),  # beyond the image
    ([4, 2, 14, 2, 14, 12, 4, 12, 4, 2, 8, 6, 10, 6, 10, 8, 8, 8, 8, 6], 16, 16, "R2:6000000JL040L046000000n0", 96),
    ([2.5, 3.0, 10.2, 8.1], 12, 12, "`4", 0),  # two points, as some COCO files have: a line, empty
]


@pytest.mark.parametrize("polygon,h,w,counts,area", PYCOCOTOOLS_POLYGONS)
def test_polygons_are_rasterised_as_pycocotools_does(polygon, h, w, counts, area) -> None:
    mask = polygon_mask(polygon, h, w)
    assert rle_to_string(rle_encode(mask[None])[0]) == counts
    assert int(mask.sum()) == area


def test_polygons_of_one_object_are_united() -> None:
    a, b = [1, 1, 9, 1, 9, 9, 1, 9], [5, 5, 15, 5, 15, 15, 5, 15]
    mask = segmentation_mask([a, b], 20, 20)
    assert (mask == (polygon_mask(a, 20, 20) | polygon_mask(b, 20, 20))).all()
    assert int(mask.sum()) == 148  # pycocotools' area of the merged RLE


def test_bad_segmentations_are_named() -> None:
    with pytest.raises(AnnotationError, match="at least two x, y pairs"):
        segmentation_mask([[1, 2, 3]], 8, 8)
    with pytest.raises(AnnotationError, match=r"RLE of size \[4, 4\] on an image of 8 x 8"):
        segmentation_mask({"size": [4, 4], "counts": [16]}, 8, 8)
    with pytest.raises(AnnotationError, match="malformed RLE"):
        segmentation_mask({"size": [8, 8], "counts": [3, 4]}, 8, 8)
    with pytest.raises(AnnotationError, match="list of polygons or an RLE dict"):
        segmentation_mask("nope", 8, 8)


def _shapes(h: int = 32, w: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    first = np.zeros((h, w), bool)
    first[4:12, 5:20] = True
    second = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    second[(yy - 22) ** 2 + (xx - 28) ** 2 < 30] = True
    return image, first, second


def _write_coco(tmp_path, image, first, second, **overrides):
    h, w = first.shape
    Image.fromarray(image).save(tmp_path / "one.png")
    Image.fromarray(image[::-1].copy()).save(tmp_path / "two.png")
    coco = {
        "images": [{"id": 1, "file_name": "one.png", "height": h, "width": w},
                   {"id": 2, "file_name": "two.png", "height": h, "width": w},
                   {"id": 3, "file_name": "unannotated.png", "height": h, "width": w}],
        "annotations": [
            {"id": 10, "image_id": 1, "iscrowd": 0, "segmentation": [[5, 4, 20, 4, 20, 12, 5, 12]]},
            {"id": 11, "image_id": 1, "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": rle_encode(second[None])[0].tolist()}},
            {"id": 12, "image_id": 2, "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": rle_to_string(rle_encode(first[None])[0])}},
            {"id": 13, "image_id": 2, "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": rle_encode(second[None])[0].tolist()}},
        ],
    }
    coco.update(overrides)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_polygons_and_both_rles(tmp_path) -> None:
    image, first, second = _shapes()
    annotations = read_annotations(_write_coco(tmp_path, image, first, second))
    assert annotations.format == "coco" and len(annotations) == 2  # the unannotated image is left out
    one, two = annotations
    assert one.name == "one.png" and (one.image == image).all() and one.ids == [10, 11]
    assert (one.masks[0] == polygon_mask([5, 4, 20, 4, 20, 12, 5, 12], *first.shape)).all()
    assert (one.masks[1] == second).all()
    assert two.ids == [12] and (two.masks[0] == first).all()  # the crowd annotation is left out
    sample = one.sample()
    assert sample.has_ground_truth and [p.kind for p in sample.prompts] == ["box", "point"] * 2


def test_coco_images_are_found_under_another_folder(tmp_path) -> None:
    image, first, second = _shapes()
    path = _write_coco(tmp_path, image, first, second)
    moved = tmp_path / "pictures"
    moved.mkdir()
    for name in ("one.png", "two.png"):
        (tmp_path / name).rename(moved / name)
    with pytest.raises(AnnotationError, match="one.png: no such image file"):
        read_annotations(path)[0]
    assert read_annotations(path, images=moved)[1].ids == [12]


def test_malformed_coco_files(tmp_path) -> None:
    image, first, second = _shapes()
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(AnnotationError, match="broken.json: not JSON"):
        read_annotations(tmp_path / "broken.json")
    path = _write_coco(tmp_path, image, first, second,
                       annotations=[{"id": 5, "image_id": 9, "segmentation": [[0, 0, 1, 0, 1, 1]]}])
    with pytest.raises(AnnotationError, match="annotation 5 is on image 9, which 'images' does not list"):
        read_annotations(path)
    path = _write_coco(tmp_path, image, first, second,
                       images=[{"id": 1, "file_name": "one.png", "height": 10, "width": 40}],
                       annotations=[{"id": 5, "image_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}])
    with pytest.raises(AnnotationError, match="one.png is 32 x 40, the annotations say 10 x 40"):
        read_annotations(path)[0]
    path = _write_coco(tmp_path, image, first, second,
                       annotations=[{"id": 5, "image_id": 1, "segmentation": [[0, 0, 1]]}])
    with pytest.raises(AnnotationError, match=r"image 1 \(one.png\), annotation 5: a polygon"):
        read_annotations(path)[0]
    with pytest.raises(AnnotationError, match="no such annotation file"):
        read_annotations(tmp_path / "missing.json")


def test_sa1b_files_one_or_a_folder(tmp_path) -> None:
    image, first, second = _shapes()
    h, w = first.shape
    for index, masks in enumerate(([first, second], [second])):
        Image.fromarray(image).save(tmp_path / f"sa_{index}.jpg", quality=95)
        annotations = [{"id": 100 + k, "segmentation": {"size": [h, w], "counts": rle_to_string(rle_encode(m[None])[0])},
                        "bbox": [0, 0, 1, 1], "area": int(m.sum())} for k, m in enumerate(masks)]
        record = {"image_id": index, "file_name": f"sa_{index}.jpg", "height": h, "width": w}
        (tmp_path / f"sa_{index}.json").write_text(json.dumps({"image": record, "annotations": annotations}))
    single = read_annotations(tmp_path / "sa_0.json")
    assert single.format == "sa1b" and single[0].ids == [100, 101] and (single[0].masks[1] == second).all()
    folder = read_annotations(tmp_path)
    assert folder.names == ["sa_0.jpg", "sa_1.jpg"] and folder[1].ids == [100]
    assert read_annotations(str(tmp_path / "sa_1*.json")).names == ["sa_1.jpg"]
    (tmp_path / "sa_0.json").write_text(json.dumps({"image": {"file_name": "sa_0.jpg"}, "annotations": []}))
    with pytest.raises(AnnotationError, match="sa_0.json: 'image': missing 'height'"):
        read_annotations(tmp_path / "sa_0.json")


def test_medsam_npz_2d_and_3d(tmp_path) -> None:
    image, first, second = _shapes()
    labels = first.astype(np.uint8) + 3 * second.astype(np.uint8)
    boxes = np.array([[5, 4, 19, 11], [23, 17, 33, 27]])
    np.savez(tmp_path / "case.npz", imgs=image, gts=labels, boxes=boxes)
    (item,) = read_annotations(tmp_path / "case.npz")
    assert item.ids == [1, 3] and (item.masks[0] == first).all() and (item.masks[1] == second).all()
    assert (item.image == image).all()
    volume = np.stack([image[:, :, 0]] * 3)
    gts = np.stack([np.zeros_like(labels), labels, (labels == 3).astype(np.uint8) * 3])
    np.savez(tmp_path / "ct.npz", imgs=volume.astype(np.int16), gts=gts)
    annotations = read_medsam(tmp_path / "ct.npz")
    assert annotations.names == ["ct.npz[1]", "ct.npz[2]"]  # the slice without labels is left out
    assert annotations[1].ids == [3] and annotations[1].image.shape == (32, 40, 3)
    assert annotations[1].image.dtype == np.uint8


def test_malformed_medsam_npz(tmp_path) -> None:
    image, first, _ = _shapes()
    np.savez(tmp_path / "a.npz", imgs=image)
    with pytest.raises(AnnotationError, match=r"missing \['gts'\]"):
        read_annotations(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", imgs=image, gts=first[:10].astype(np.uint8))
    with pytest.raises(AnnotationError, match="do not match"):
        read_annotations(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", imgs=image, gts=first.astype(np.uint8), boxes=np.zeros((2, 4)))
    with pytest.raises(AnnotationError, match=r"one box of 4 numbers per label \(1 labels\)"):
        read_annotations(tmp_path / "c.npz")


def test_rle_round_trip_is_the_masks_module() -> None:
    _, first, _ = _shapes()
    text = rle_to_string(rle_encode(first[None])[0])
    assert (rle_decode(rle_from_string(text), first.shape) == first).all()
