"""SAM 2.1's video predictor: capture of the memory attention and memory encoder,
and optimized models run unchanged under init_state / add_new_points_or_box /
propagate_in_video on a short synthetic clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samfx
from samfx.adapters.sam2_video import rotary_encoding, track
from samfx.data import synthetic_clip
from samfx.fidelity import mask_iou

from ..conftest import small_model

MEMORY_ROLES = ("image_encoder", "mask_decoder", "memory_attention", "memory_encoder")


def video_model() -> torch.nn.Module:
    """The small video predictor. With random weights its object-score head calls
    every tracked frame empty (all masks -1024); its bias is raised so that frames
    after the click carry real masks to compare."""
    model = small_model("sam2.1_hiera_t_video")
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 10
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synthetic_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def reference(clip) -> list[torch.Tensor]:
    return track(video_model(), clip.directory, [clip.click], [1])


def per_frame_iou(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [mask_iou((x > 0).numpy(), (y > 0).numpy()) for x, y in zip(a, b)]


def test_the_video_predictor_gets_its_own_adapter_and_components() -> None:
    model = video_model()
    assert samfx.adapters.find_adapter(model).name == "sam2_video"
    assert samfx.adapters.find_adapter(small_model("sam2.1_hiera_t")).name == "sam2"
    captured = samfx.capture(model)
    assert sorted(captured.components) == sorted(MEMORY_ROLES + ("prompt_encoder",))
    # One graph for every memory length and pointer count; the encoder is specialised on the sigmoid flag only.
    assert len(captured.component("memory_attention").graphs) == 1
    assert len(captured.component("memory_encoder").graphs) == 2
    sites = captured.adapter.attention_sites(captured.component("memory_attention").root)
    assert [(s.path, s.kind) for s in sites] == [(f"layers.{i}.{a}", "rope") for i in range(2)
                                                 for a in ("self_attn", "cross_attn_image")]


def test_rotary_encoding_matches_upstream_complex_rope() -> None:
    from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 3 * 16 + 4, 8)
    expected_q, expected_k = apply_rotary_enc(q, k[:, :, :48].clone(), compute_axial_cis(8, 4, 4), repeat_freqs_k=True)
    rq, rk = rotary_encoding(q, k, 4, 10000.0)
    torch.testing.assert_close(rq, expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rk[:, :, :48], expected_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(rk[:, :, 48:], k[:, :, 48:])  # object pointers are not rotated


@pytest.mark.parametrize("frames,pointers", [(1, 0), (3, 8), (7, 16)])
def test_captured_memory_attention_takes_any_memory_length(frames: int, pointers: int) -> None:
    model = video_model()
    captured = samfx.capture(model, roles=("memory_attention",))
    torch.manual_seed(frames)
    tokens = (model.image_size // model.backbone_stride) ** 2
    curr, curr_pos = torch.randn(tokens, 1, 256), torch.randn(tokens, 1, 256)
    memory = torch.randn(frames * tokens + pointers, 1, 64)
    memory_pos = torch.randn_like(memory)
    with torch.no_grad():
        expected = model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                          num_obj_ptr_tokens=pointers)
        got = captured.model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory,
                                              memory_pos=memory_pos, num_obj_ptr_tokens=pointers)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_captured_model_tracks_like_the_original(clip, reference) -> None:
    captured = samfx.capture(video_model())
    tracked = track(captured.model, clip.directory, [clip.click], [1])
    assert len(tracked) == clip.frames
    # Frames after the click hold a mask that is neither empty nor the whole frame.
    assert all(0.01 < (t > 0).float().mean() < 0.9 for t in reference[1:])
    for got, expected in zip(tracked, reference):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_exact_passes_are_drop_ins(clip, reference, tmp_path) -> None:
    model = video_model()
    optimized = samfx.optimize(model, ["split_qkv", "fuse_attention", "share_image_side"])
    assert type(optimized).__name__ == "SAM2VideoPredictor"
    # Saved and loaded (the zoo model rebuilt, the passes replayed): still the same tracker.
    loaded = samfx.load(samfx.save(optimized, tmp_path / "saved"))
    for candidate in (optimized, loaded):
        tracked = track(candidate, clip.directory, [clip.click], [1])
        assert min(per_frame_iou(tracked, reference)) >= 0.999
        for got, expected in zip(tracked, reference):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    reports = {p.name: p for p in optimized.samfx_report.passes}
    # The RoPE attentions already call SDPA: nothing to fuse, said so.
    assert reports["fuse_attention"].details["attentions"]["memory_attention"] == {"already sdpa": 4}


def test_lossy_passes_run_on_every_video_component(clip, reference) -> None:
    model = video_model()
    for config in (samfx.passes.BF16Config(roles=MEMORY_ROLES),
                   samfx.passes.QuantizeConfig(roles=MEMORY_ROLES, images=("camera",), prompts_per_image=2)):
        optimized = samfx.optimize(model, [config])
        ious = per_frame_iou(track(optimized, clip.directory, [clip.click], [1]), reference)
        # Random weights give flat logits, so these figures say little beyond "it runs and follows".
        assert min(ious) > 0.8, (config, ious)
        report = optimized.samfx_report.passes[-1]
        assert report.changed
        if isinstance(config, samfx.passes.QuantizeConfig):
            # The image predictor that calibrates never runs the memory attention: it stays float, reported.
            assert any(s.startswith("memory_attention/") and "never ran it" in s for s in report.skipped)
    assert np.isfinite(ious).all()
