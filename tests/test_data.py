"""Package images: ground truth and prompts placed the way people prompt."""

from __future__ import annotations

import numpy as np
import pytest

from samfx.data import available_images, image_digest, load_images, package_images


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
