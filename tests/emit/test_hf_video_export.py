"""Hugging Face video classes (``Sam2VideoModel``, ``Sam3TrackerVideoModel``,
``EdgeTamVideoModel``) exported as the four video graphs and tracked by the torch-free
loop, against the transformers session loop."""

from __future__ import annotations

from pathlib import Path

import pytest

import samfx
from samfx.emit import video_runtime
from samfx.emit.video import VideoExport, export_video

from ..adapters.test_hf_video import video_model

FRAMES = 6
#: zoo name -> passes the exported model went through (the graphs carry them)
FAMILIES = {"hf_sam2.1_hiera_tiny_video": ["split_qkv", "fuse_attention"], "hf_sam3_tracker_video": [],
            "hf_edgetam_video": []}
#: zoo name -> one memory as the loop stores it: a map, or EdgeTAM's perceiver latents (float32, as upstream)
MEMORIES = {"hf_sam2.1_hiera_tiny_video": ("bfloat16", 3), "hf_sam3_tracker_video": ("bfloat16", 3),
            "hf_edgetam_video": ("float32", 2)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, VideoExport]:
    exported = {}
    for name, passes in FAMILIES.items():
        model = samfx.optimize(video_model(name), passes) if passes else video_model(name)
        exported[name] = export_video(model, tmp_path_factory.mktemp(name), check_frames=FRAMES)
    return exported


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_loop_tracks_like_the_session_loop_on_every_frame(name: str, exports, tmp_path: Path) -> None:
    exported = exports[name]
    assert len(exported.checks["mask_iou"]) == FRAMES
    assert min(exported.checks["mask_iou"]) >= 0.99, exported.checks
    manifest = exported.manifest
    assert manifest["family"] == samfx.models.spec(name).family
    assert [p["pass"] for p in manifest["passes"]] == FAMILIES[name]
    # Frames as the Hugging Face video processor stretches them.
    assert manifest["settings"]["resample"] == "bilinear"
    inputs = {i["name"]: i["shape"] for i in manifest["signatures"]["memory_attention"]["inputs"]}
    assert isinstance(inputs["memories"][0], str) and isinstance(inputs["pointers"][0], str)
    dtype, rank = MEMORIES[name]
    assert manifest["settings"]["memory_dtype"] == dtype and len(inputs["memories"]) == 1 + rank
    # The loop, loaded from the files as written, follows an object: every frame holds a mask
    # that is neither empty nor the whole frame.
    clip = samfx.data.synthetic_clip(tmp_path, frames=FRAMES)
    logits = video_runtime.load(exported.directory).track(clip.directory, [clip.click], [1])
    assert all(0.001 < (frame > 0).mean() < 0.9 for frame in logits)


def test_openvino_runs_the_same_loop(exports, tmp_path: Path) -> None:
    name = "hf_sam3_tracker_video"
    converted = export_video(video_model(name), tmp_path, format="openvino", check_frames=4,
                             onnx_export=exports[name].directory)
    assert sorted(converted.manifest["graphs"].values()) == sorted(f"{g}.xml" for g in video_runtime.GRAPHS)
    assert min(converted.checks["mask_iou"]) >= 0.99, converted.checks

