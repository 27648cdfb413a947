"""SAM 2's video path exported as four ONNX graphs, tracked by the torch-free loop."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import samfx
from samfx.emit import runtime, video_runtime
from samfx.emit.video import VideoExport, export_video

from ..adapters.test_sam2_video import video_model


@pytest.fixture(scope="module")
def optimized():
    # An optimized model: the graphs carry its passes (split q/k/v in the encoder).
    return samfx.optimize(video_model(), ["split_qkv", "fuse_attention"])


@pytest.fixture(scope="module")
def exported(optimized, tmp_path_factory) -> VideoExport:
    return export_video(optimized, tmp_path_factory.mktemp("video_export"), check_frames=9)


def test_the_loop_tracks_like_the_video_predictor_on_every_frame(exported: VideoExport) -> None:
    # 9 frames: the last ones attend to the clicked frame plus 6 earlier memories, and 8 pointers.
    assert len(exported.checks["mask_iou"]) == 9
    assert min(exported.checks["mask_iou"]) >= 0.99, exported.checks
    assert exported.checks["max_abs_diff"] < 1e-3
    manifest = json.loads((exported.directory / video_runtime.MANIFEST).read_text())
    assert [p["pass"] for p in manifest["passes"]] == ["split_qkv", "fuse_attention"]


def test_memory_and_pointer_counts_are_dynamic(exported: VideoExport) -> None:
    inputs = {i["name"]: i["shape"] for i in exported.manifest["signatures"]["memory_attention"]["inputs"]}
    assert isinstance(inputs["memories"][0], str) and inputs["memories"][0] == inputs["memory_slots"][0]
    assert isinstance(inputs["pointers"][0], str) and inputs["pointers"][0] != inputs["memories"][0]


def test_the_loop_runs_without_torch_from_the_export_directory(exported: VideoExport, tmp_path: Path) -> None:
    tree = ast.parse((exported.directory / "samfx_video_runtime.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in imported and "samfx" not in imported
    clip = samfx.data.synthetic_clip(tmp_path / "frames", frames=3)
    # torch made unimportable: the loop needs only numpy, onnxruntime and Pillow.
    code = ("import sys; sys.modules['torch'] = None; import samfx_video_runtime as r; "
            f"sys.exit(r.main([{str(clip.directory)!r}, '--point', '{clip.click[0]},{clip.click[1]}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=exported.directory, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(exported.directory)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("mask pixels") == 3


def test_a_changed_graph_is_refused(exported: VideoExport, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(exported.directory, copy)
    graph = copy / "memory_attention.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(runtime.IntegrityError, match="memory_attention.onnx"):
        video_runtime.load(copy)


def test_an_image_model_is_refused() -> None:
    from ..conftest import small_model

    with pytest.raises(ValueError, match="video predictor"):
        export_video(small_model("sam2.1_hiera_t"), "unused")


def test_bfloat16_rounding_matches_torch() -> None:
    import torch

    values = torch.randn(1000) * 10
    expected = values.to(torch.bfloat16).float().numpy()
    assert np.array_equal(video_runtime.bfloat16_round(values.numpy()), expected)


def test_openvino_runs_the_same_loop(optimized, exported: VideoExport, tmp_path: Path) -> None:
    # The checked ONNX graphs converted, not exported again.
    converted = export_video(optimized, tmp_path / "ov", format="openvino", check_frames=4,
                             onnx_export=exported.directory)
    assert sorted(converted.manifest["graphs"].values()) == sorted(f"{g}.xml" for g in video_runtime.GRAPHS)
    assert min(converted.checks["mask_iou"]) >= 0.99, converted.checks
