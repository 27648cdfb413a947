"""Adapters: family detection and declared attention layouts."""

from __future__ import annotations

import pytest

import samfx
from samfx.adapters import find_adapter

from .conftest import small_model


@pytest.mark.parametrize("name, family", [
    ("sam_vit_b", "sam"), ("sam_hq_vit_b", "sam_hq"), ("sam2.1_hiera_t", "sam2"), ("hf_sam_vit_b", "hf_sam"),
    ("lite_medsam", "lite_medsam"), ("mobile_sam", "sam"),
])
def test_family_detection(name: str, family: str) -> None:
    assert find_adapter(small_model(name)).name == family


def test_bare_image_encoder_is_recognised() -> None:
    encoder = small_model("sam_vit_b").image_encoder
    specs = find_adapter(encoder).components(encoder)
    assert [(s.role, s.path) for s in specs] == [("image_encoder", "")]


@pytest.mark.parametrize("name, layout, count", [
    ("sam_vit_b", "blocked", 2), ("sam2.1_hiera_t", "blocked", 5), ("hf_sam_vit_b", "blocked", 2),
    ("lite_medsam", "head_interleaved", 10),
])
def test_qkv_sites(name: str, layout: str, count: int) -> None:
    model = small_model(name)
    adapter = find_adapter(model)
    spec = next(s for s in adapter.components(model) if s.role == "image_encoder")
    sites = adapter.qkv_sites(model.get_submodule(spec.path))
    assert len(sites) == count and {s.layout.kind for s in sites} == {layout}


def test_hiera_qkv_widths_follow_each_stage() -> None:
    model = small_model("sam2.1_hiera_t")
    sites = find_adapter(model).qkv_sites(model.image_encoder)
    widths = [s.layout.sizes[0] for s in sites]
    assert widths == sorted(widths) and len(set(widths)) > 1  # dim_out doubles at stage changes


def test_adapters_are_listed() -> None:
    names = [a.name for a in samfx.adapters.list_adapters()]
    assert {"sam", "sam_hq", "lite_medsam", "sam2", "hf_sam"} <= set(names)


@pytest.mark.parametrize("name, role, kinds, count", [
    ("sam_vit_b", "image_encoder", {"sam_vit"}, 2), ("sam2.1_hiera_t", "image_encoder", {"hiera"}, 5),
    ("hf_sam_vit_b", "image_encoder", {"hf_vit"}, 2), ("lite_medsam", "image_encoder", {"tinyvit"}, 10),
    ("sam_vit_b", "mask_decoder", {"decoder"}, 7), ("sam2.1_hiera_t", "mask_decoder", {"decoder"}, 7),
])
def test_attention_sites(name: str, role: str, kinds: set, count: int) -> None:
    model = small_model(name)
    adapter = find_adapter(model)
    spec = next(s for s in adapter.components(model) if s.role == role)
    sites = adapter.attention_sites(model.get_submodule(spec.path))
    assert len(sites) == count and {s.kind for s in sites} == kinds


def test_attention_site_details_for_sam_vit() -> None:
    model = small_model("sam_vit_b")
    sites = find_adapter(model).attention_sites(model.image_encoder)
    assert [s.window_size for s in sites] == [4, 0]  # block 1 is global
    assert all(s.rel_pos and s.num_heads == 2 and s.head_dim == 32 for s in sites)


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_hq_vit_b", "sam2.1_hiera_t", "hf_sam_vit_b", "lite_medsam",
                                  "mobile_sam"])
def test_batched_clicks_match_one_prompt_at_a_time(name: str) -> None:
    import numpy as np
    import torch

    from samfx.data import package_images

    image = package_images(["coins"])[0].image
    model = small_model(name)
    predictor = find_adapter(model).predictor(model)
    predictor.set_image(image)
    clicks = np.array([[50.0, 60.0], [200.0, 150.0], [380.0, 300.0]], np.float32)
    with torch.inference_mode():
        low_res, iou = predictor.predict_points(clicks)
        logits = predictor.logits_to_image(low_res.flatten(0, 1)).reshape(*iou.shape, *image.shape[:2])
    for index, click in enumerate(clicks):
        masks, scores = predictor.predict(point_coords=click[None], point_labels=np.array([1]), multimask_output=True)
        assert np.allclose(scores, iou[index].numpy(), atol=1e-5)
        # The same masks up to float rounding: a batched GEMM may sum in another order (AMX,
        # AVX-512), which can flip pixels whose logit is within rounding of the threshold.
        decided = np.abs(logits[index].numpy()) > 1e-3
        assert (masks == (logits[index] > 0).numpy())[decided].all()


def test_prompts_are_checked_for_every_family(family_model) -> None:
    import warnings

    import numpy as np

    from samfx.adapters import PromptError

    name, model = family_model
    predictor = find_adapter(model).predictor(model)
    with pytest.raises(PromptError, match="set_image"):
        predictor.predict(box=np.array([1, 2, 3, 4]))
    image = samfx.data.package_images(["coins"])[0].image[:96, :128]
    predictor.set_image(image)
    for bad, message in [
        (dict(point_coords=[[np.nan, np.nan]], point_labels=[1]), "finite"),
        (dict(box=[0, 0, np.inf, 10]), "finite"),
        (dict(), "at least one point or a box"),
        (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "at least one point or a box"),
        (dict(point_coords=[[1, 2]]), "point_labels"),
        (dict(point_coords=[[1, 2]], point_labels=[7]), "labels in"),
    ]:
        with pytest.raises(PromptError, match=message):
            predictor.predict(**bad)
    with pytest.warns(UserWarning, match="inverted"):
        inverted, _ = predictor.predict(box=np.array([100, 80, 20, 10]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upright, _ = predictor.predict(box=np.array([20, 10, 100, 80]))
    assert np.array_equal(inverted, upright)
    with pytest.warns(UserWarning, match="outside the 128 x 96 image"):
        predictor.predict(point_coords=[[5000, 10]], point_labels=[1])
    with pytest.raises(PromptError, match="H x W x 3 uint8"):
        predictor.set_image(image.astype(np.float32))


def test_a_bare_image_encoder_has_no_predictor_but_takes_token_cluster() -> None:
    from samfx.adapters import UnsupportedModelError

    encoder = small_model("sam_vit_b").image_encoder
    with pytest.raises(UnsupportedModelError, match="bare image_encoder .* has no predictor"):
        find_adapter(encoder).predictor(encoder)
    fast = samfx.optimize(encoder, [samfx.TokenClusterConfig(location=1, clusters=4)], min_box_iou=None)
    assert fast.samfx_report.passes[0].changed
    with pytest.raises(samfx.PassError, match="optimize the whole model") as refused:
        samfx.optimize(encoder, ["token_cluster"], min_box_iou=None)  # tuning measures masks
    assert isinstance(refused.value.__cause__, UnsupportedModelError)
