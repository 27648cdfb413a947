"""Package images: ground truth and prompts placed the way people prompt."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from samfx.data import (ImageError, available_images, image_digest, load_images, package_images, prompts_from_masks,
                        read_image, separate_images, split_images)


def test_coins_have_24_clean_ground_truth_objects() -> None:
    coins = package_images(["coins"])[0]
    assert coins.has_ground_truth
    assert len(coins.objects) == 24
    areas = sorted(int(m.sum()) for m in coins.objects)
    assert 1000 < areas[0] and areas[-1] < 3500  # coins, no background blob
    total = sum(m.astype(int) for m in coins.objects)
    assert total.max() == 1  # disjoint


@pytest.mark.parametrize("name", ["coins", "astronaut", "coffee"])
def test_each_object_gets_a_box_around_it_and_a_click_inside(name: str) -> None:
    sample = package_images([name])[0]
    assert sample.image.ndim == 3 and sample.image.shape[2] == 3 and sample.image.dtype.name == "uint8"
    assert len(sample.prompts) == 2 * len(sample.objects) > 0
    for prompt in sample.prompts:
        mask = sample.objects[prompt.object_index]
        if prompt.kind == "point":
            x, y = (int(v) for v in prompt.coords)
            assert mask[y, x]
        else:
            x0, y0, x1, y1 = (int(v) for v in prompt.coords)
            assert mask[y0:y1 + 1, x0:x1 + 1].sum() == mask.sum()


def test_photos_are_not_claimed_as_ground_truth() -> None:
    assert not package_images(["astronaut"])[0].has_ground_truth


def test_unknown_image() -> None:
    with pytest.raises(KeyError, match="coins"):
        package_images(["nope"])
    assert "coins" in available_images()


def test_load_images_names_package_images_and_digests_arrays() -> None:
    photo = np.zeros((8, 6, 3), np.uint8)
    arrays, names = load_images(["coins", photo], "calibration")
    assert names == ["coins", image_digest(photo)] and names[1].startswith("sha256:")
    assert arrays[0].shape == package_images(["coins"])[0].image.shape
    assert image_digest(photo) != image_digest(np.zeros((6, 8, 3), np.uint8))  # the shape counts
    with pytest.raises(ValueError, match="calibration image 0 must be an H x W x 3 uint8"):
        load_images([np.zeros((8, 6), np.uint8)], "calibration")
    with pytest.raises(ValueError, match="distillation needs at least one image"):
        load_images([], "distillation")


def _folder(tmp_path, count: int = 4):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (12, 10, 3), dtype=np.uint8) for _ in range(count)]
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img_{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return images


def test_images_from_a_directory_or_a_glob_sorted(tmp_path) -> None:
    images = _folder(tmp_path)
    arrays, names = load_images([str(tmp_path)], "calibration")
    assert names == [str(tmp_path / f"img_{i}.png") for i in range(4)]  # the text file is skipped
    assert all((a == b).all() for a, b in zip(arrays, images))
    arrays, names = load_images([str(tmp_path / "img_[12].png"), "coins"], "calibration")
    assert names == [str(tmp_path / "img_1.png"), str(tmp_path / "img_2.png"), "coins"]
    gray = np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000  # a 16-bit scan
    Image.fromarray(gray.astype(np.int32)).save(tmp_path / "scan.tif")
    scan = read_image(tmp_path / "scan.tif")
    assert scan.shape == (6, 8, 3) and scan.dtype == np.uint8 and scan.max() == 255


def test_images_that_cannot_be_used_are_named(tmp_path) -> None:
    _folder(tmp_path, 1)
    with pytest.raises(ImageError, match=r"calibration: the pattern .*\*.jpg matches no image file"):
        load_images([str(tmp_path / "*.jpg")], "calibration")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="the directory .*empty holds no image file"):
        load_images([str(tmp_path / "empty")], "evaluation")
    with pytest.raises(ImageError, match="nope is neither a package image"):
        load_images(["nope"], "evaluation")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="bad.png: cannot read it as an image"):
        load_images([str(tmp_path)], "evaluation")
    (tmp_path / "bad.png").unlink()
    Image.fromarray(np.zeros((5, 6, 2), np.uint8), mode="LA").save(tmp_path / "gray_alpha.png")
    with pytest.raises(ImageError, match=r"gray_alpha.png: expected a gray, RGB or RGBA image, .* \(5, 6, 2\)"):
        load_images([str(tmp_path / "*.png")], "evaluation")
    with pytest.raises(ImageError, match="no such image file"):
        read_image(tmp_path / "missing.png")


def test_split_is_deterministic_disjoint_and_ignores_order(tmp_path) -> None:
    _folder(tmp_path, 6)
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    split = split_images(files + files[:2], seed=3)  # repeats count once
    assert len(split.calibration) == 3 and len(split.evaluation) == 3
    assert not set(split.calibration_names) & set(split.evaluation_names)
    again = split_images(files[::-1], seed=3)
    assert sorted(again.evaluation_names) == sorted(split.evaluation_names)
    other = [sorted(split_images(files, seed=s).evaluation_names) for s in range(6)]
    assert len({tuple(o) for o in other}) > 1  # the seed matters
    assert split.record() == {"calibration": split.calibration_names, "evaluation": split.evaluation_names,
                              "split_seed": 3, "overlap": []}
    assert len(split_images(files, held_out=0.2).evaluation) == 1
    with pytest.raises(ImageError, match="at least two different images"):
        split_images([files[0], files[0]])


def test_explicit_calibration_and_evaluation_images_may_not_overlap(tmp_path) -> None:
    images = _folder(tmp_path, 3)
    with pytest.raises(ImageError, match=r"overlap: .*img_1.png \(as sha256:"):
        separate_images([images[0], images[1]], [str(tmp_path / "img_1.png"), str(tmp_path / "img_2.png")])
    with pytest.warns(UserWarning, match="evaluating on calibration images"):
        split = separate_images([images[1]], [str(tmp_path / "img_1.png")], allow_overlap=True)
    assert split.record()["overlap"] == [f"{tmp_path / 'img_1.png'} (as {image_digest(images[1])})"]
    assert separate_images([images[0]], [images[2]]).overlap == []


def test_prompts_from_masks_box_and_deepest_click() -> None:
    mask = np.zeros((20, 30), bool)
    mask[2:18, 3:9] = True  # a tall bar
    mask[8:12, 3:28] = True  # and a long arm: the deepest point is in the bar, not the middle of the box
    box, point = prompts_from_masks([np.zeros((20, 30), bool), mask])
    assert box.kind == "box" and box.coords == (3.0, 2.0, 27.0, 17.0) and box.object_index == 1
    x, y = point.coords
    assert point.kind == "point" and mask[int(y), int(x)] and 3 <= x <= 8
