"""Hugging Face video classes (``Sam2VideoModel``, ``Sam3TrackerVideoModel``,
``EdgeTamVideoModel``): capture of the memory components, and optimized models
tracking a short synthetic clip through the transformers session loop
unchanged, on small configs with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import samfx
from samfx.adapters.hf_video import latent_rotary_embedding, track
from samfx.data import package_images, synthetic_clip
from samfx.fidelity import mask_iou
from samfx.passes import BF16Config, HyperConfig, QuantizeConfig

from .test_hf_families import family_model

# zoo name -> (adapter, {role: (attention kinds, count)})
FAMILIES = {
    "hf_sam2.1_hiera_tiny_video": ("hf_sam2_video", {"image_encoder": ({"hiera"}, 6),
                                                     "memory_attention": ({"rope"}, 4)}),
    "hf_sam3_tracker_video": ("hf_sam3_tracker_video", {"image_encoder": ({"rope"}, 2),
                                                        "memory_attention": ({"rope"}, 4)}),
    # RepViT: convolutions only; the perceiver's attentions are plain q/k/v/o ones.
    "hf_edgetam_video": ("hf_edgetam_video", {"image_encoder": (set(), 0), "memory_attention": ({"rope"}, 4),
                                              "spatial_perceiver": ({"decoder"}, 4)}),
}
NAMES = sorted(FAMILIES)
MEMORY_ROLES = ("memory_attention", "memory_encoder")


def video_model(name: str) -> torch.nn.Module:
    """The family's small model with ordinary random weights; its object-score head,
    which would call every frame empty, is biased so that frames carry masks."""
    model = family_model(name)
    with torch.no_grad():
        model.mask_decoder.pred_obj_score_head.proj_out.bias += 10
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[list[np.ndarray], tuple[float, float]]:
    clip = synthetic_clip(tmp_path_factory.mktemp("clip"), frames=4)
    return [np.array(Image.open(p).convert("RGB")) for p in sorted(clip.directory.iterdir())], clip.click


def _track(model: torch.nn.Module, clip) -> list[torch.Tensor]:
    frames, click = clip
    return track(model, frames, [click], [1])


@pytest.fixture(scope="module")
def reference(clip) -> dict[str, list[torch.Tensor]]:
    return {name: _track(video_model(name), clip) for name in NAMES}


def per_frame_iou(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [mask_iou((x > 0).numpy(), (y > 0).numpy()) for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("name", NAMES)
def test_captured_model_tracks_exactly_through_the_session_loop(name: str, clip, reference) -> None:
    family, sites = FAMILIES[name]
    model = video_model(name)
    captured = samfx.capture(model)
    assert captured.adapter.name == family and samfx.models.spec(name).family == family
    for role, (kinds, count) in sites.items():
        found = captured.adapter.attention_sites(captured.component(role).root)
        assert {s.kind for s in found} == kinds and len(found) == count, role
    # One graph for every memory length and pointer count.
    assert len(captured.component("memory_attention").graphs) == 1
    assert captured.adapter.precision_islands(captured.component("memory_attention").root)  # rotary tables, norms
    tracked = _track(captured.model, clip)
    assert len(tracked) == len(clip[0])
    # Frames after the click hold a mask that is neither empty nor the whole frame.
    assert all(0.001 < (t > 0).float().mean() < 0.9 for t in reference[name][1:]), name
    for got, expected in zip(tracked, reference[name], strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", NAMES)
def test_exact_passes_are_drop_ins(name: str, clip, reference, tmp_path, no_mac_counting) -> None:
    optimized = samfx.optimize(video_model(name), ["split_qkv", "fuse_attention"])
    assert type(optimized).__name__ == type(video_model(name)).__name__
    reports = {p.name: p for p in optimized.samfx_report.passes}
    # The RoPE attentions already call SDPA: nothing to fuse, said so.
    assert reports["fuse_attention"].details["attentions"]["memory_attention"] == {"already sdpa": 4}
    candidates = [optimized]
    if name == "hf_sam2.1_hiera_tiny_video":  # saved and loaded: the zoo model rebuilt, the passes replayed
        assert reports["split_qkv"].changed
        candidates.append(samfx.load(samfx.save(optimized, tmp_path / "saved")))
    for candidate in candidates:
        tracked = _track(candidate, clip)
        assert min(per_frame_iou(tracked, reference[name])) >= 0.999
        for got, expected in zip(tracked, reference[name], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("memories, pointers", [(1, 0), (1, 4), (3, 8)])
def test_latent_rotation_is_upstreams_for_every_memory_count(memories: int, pointers: int) -> None:
    from transformers.models.edgetam_video.modeling_edgetam_video import apply_rotary_pos_emb_2d_cross_attn

    # Per memory 2 global latents (not rotated) and 4 2-D latents, then the pointers.
    generator = torch.Generator().manual_seed(memories)
    q, k = torch.randn(1, 2, 16, 8, generator=generator), torch.randn(1, 2, memories * 6 + pointers, 8,
                                                                     generator=generator)
    cos, sin, cos_k, sin_k = (torch.randn(1, n, 8, generator=generator) for n in (16, 16, 4, 4))
    expected = apply_rotary_pos_emb_2d_cross_attn(q, k, cos, sin, cos_k, sin_k, pointers, memories)
    got = latent_rotary_embedding(q, k, cos, sin, cos_k, sin_k, pointers, memories)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _image() -> np.ndarray:
    return package_images(["coins"])[0].image


def _embedding(model: torch.nn.Module) -> torch.Tensor:
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    predictor.set_image(_image())
    masks, scores = predictor.predict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, *_image().shape[:2]) and np.isfinite(scores).all()
    return predictor.image_embedding.flatten()


# One family per lossy pass (the image tests run each on every family's layers): the pass
# applies to the memory components too where it can, and the session loop runs on the result.
# Random weights give flat logits, so masks say little: the image embedding is compared, as
# tests/adapters/test_hf_families.py does, and tracking must run.
VIDEO_ROLES = ("image_encoder", "mask_decoder") + MEMORY_ROLES
LOSSY = [("hf_sam2.1_hiera_tiny_video", BF16Config(roles=VIDEO_ROLES), 0.999),
         ("hf_edgetam_video", QuantizeConfig(roles=VIDEO_ROLES, prompts_per_image=2), 0.99),
         ("hf_sam3_tracker_video", HyperConfig(), 0.99)]


@pytest.mark.parametrize("name, config, cosine", LOSSY, ids=[c.name for _, c, _ in LOSSY])
def test_lossy_passes_apply_and_stay_drop_ins(name, config, cosine, clip, reference, no_mac_counting) -> None:
    model = video_model(name)
    optimized = samfx.optimize(model, [config], calibration_images=[_image()], min_box_iou=None)
    report = optimized.samfx_report.passes[-1]
    assert report.changed, report.skipped
    assert torch.nn.functional.cosine_similarity(_embedding(optimized), _embedding(model), dim=0) >= cosine
    if isinstance(config, BF16Config):
        assert "memory_attention" in report.summary
    if isinstance(config, QuantizeConfig):
        # The image predictor that calibrates never runs the memory attention: it stays float, reported.
        assert any(s.startswith("memory_attention/") and "never ran it" in s for s in report.skipped)
    tracked = _track(optimized, clip)
    assert len(tracked) == len(clip[0]) and all(torch.isfinite(t).all() for t in tracked)
    if isinstance(config, BF16Config):  # the closest to exact: it still follows the object
        assert min(per_frame_iou(tracked, reference[name])) >= 0.9


def test_structural_passes_refuse_where_they_cannot_apply(no_mac_counting) -> None:
    model = video_model("hf_edgetam_video")
    report = samfx.optimize(model, ["prune"], min_box_iou=None).samfx_report.passes[-1]
    assert not report.changed and report.skipped == [
        "image_encoder: hf_edgetam_video declares no MLP layers or attention heads in it (a convolutional backbone): "
        "nothing to prune"]
    with pytest.raises(samfx.PassError, match="no stage of blocks"):
        samfx.optimize(model, ["token_cluster"])
