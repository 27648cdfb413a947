"""Export a video model's path (SAM 2's video predictor, Hugging Face's
``Sam2VideoModel``, ``Sam3TrackerVideoModel`` and ``EdgeTamVideoModel``): four
ONNX graphs and a torch-free tracking loop.

Writes, in ``out_dir``:

* ``encoder.onnx`` (frame -> features, position encoding, high-resolution maps),
  ``memory_attention.onnx`` (features conditioned on ``memories`` and
  ``pointers``, both counts dynamic; RoPE in real ``cos``/``sin`` arithmetic),
  ``decoder.onnx`` (prompts -> mask at the video's size, object pointer and
  score) and ``memory_encoder.onnx`` (mask -> memory: SAM 2's map, EdgeTAM's
  perceiver latents), from the family
  adapter's :meth:`~samfx.adapters.Adapter.video_deployment`, each with the
  passes the model went through;
* ``samfx_video_runtime.py`` (:mod:`samfx.emit.video_runtime`, the loop) and
  ``samfx_runtime.py`` (its file checks);
* for OpenVINO, each graph as ``.xml`` + ``.bin`` converted from the ONNX one;
* ``samfx_video_export.json``: every file with its SHA-256 and size, the loop's
  settings, the passes, and the check: the exported loop against the family's
  own video API (``propagate_in_video``, the Hugging Face session loop) on a
  synthetic clip, per-frame mask IoU.

Example (not run as a doctest: four exports and a check take a minute;
``tests/emit/test_video_export.py`` exports the small model once)::

    >>> import samfx, tempfile
    >>> from samfx.emit.video import export_video
    >>> model = samfx.models.build("sam2.1_hiera_t_video", small=True)
    >>> export = export_video(model, tempfile.mkdtemp())           # doctest: +SKIP
    >>> min(export.checks["mask_iou"]) >= 0.99                      # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import find_adapter
from ..adapters.deploy import VideoDeployment
from ..capture import capture
from ..data import synthetic_clip
from ..fidelity import mask_iou
from . import onnx as onnx_graphs
from . import runtime, video_runtime
from .export import eval_mode

__all__ = ["VideoExport", "export_video"]

#: Graph inputs and outputs, in the order of the deployment modules' arguments and results.
NAMES = {
    "encoder": (["image"], ["features", "position", "no_memory_features", "high_res_0", "high_res_1"]),
    "memory_attention": (["features", "position", "memories", "memory_positions", "memory_slots", "pointers",
                          "pointer_distances"], ["conditioned"]),
    "decoder": (["features", "high_res_0", "high_res_1", "point_coords", "point_labels", "orig_im_size"],
                ["masks", "low_res_masks", "pointer", "object_score"]),
    "memory_encoder": (["features", "low_res_masks", "object_score", "from_points"], ["memory", "memory_position"]),
}


@dataclass
class VideoExport:
    """What :func:`export_video` wrote and how its loop compares with the eager model.

    ``checks``: ``mask_iou`` per frame of the synthetic clip, and the largest
    logit difference.
    """

    directory: Path
    manifest: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)


class _VideoResolutionDecoder(nn.Module):
    """The frame decoder with its mask also resized to the video's ``orig_im_size``,
    as ``SAM2VideoPredictor`` and the Hugging Face processors' ``post_process_masks``
    return it (sizes read from the input, so one graph serves every video)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, features, high_res_0, high_res_1, point_coords, point_labels, orig_im_size):
        low_res, pointer, score = self.decoder(features, high_res_0, high_res_1, point_coords, point_labels)
        height = onnx_graphs._size(orig_im_size[0].to(torch.int64), onnx_graphs._MAX_SIDE)
        width = onnx_graphs._size(orig_im_size[1].to(torch.int64), onnx_graphs._MAX_SIDE)
        masks = F.interpolate(low_res, (height, width), mode="bilinear", align_corners=False)
        return masks, low_res, pointer, score


def _dynamic_shapes(deployment: VideoDeployment) -> dict[str, Any]:
    settings = deployment.settings
    memories = torch.export.Dim("memories", min=1, max=settings["num_maskmem"])
    pointers = torch.export.Dim("pointers", min=1, max=settings["max_obj_ptrs_in_encoder"])
    points = torch.export.Dim("points", min=1, max=1 << 10)
    return {
        "encoder": None,
        "memory_attention": {"features": None, "position": None, "memories": {0: memories},
                             "memory_positions": {0: memories}, "memory_slots": {0: memories},
                             "pointers": {0: pointers}, "pointer_distances": {0: pointers}},
        "decoder": {"features": None, "high_res_0": None, "high_res_1": None, "point_coords": {1: points},
                    "point_labels": {1: points}, "orig_im_size": None},
        "memory_encoder": None,
    }


def export_video(model: nn.Module, out_dir: str | Path, format: str = "onnx", opset: int = 18,
                 check_frames: int = 6, onnx_export: str | Path | None = None) -> VideoExport:
    """Export a (plain or optimized) video model's path for onnxruntime
    (``format="onnx"``) or OpenVINO (``"openvino"``: the checked ONNX graphs
    read by OpenVINO's ONNX frontend and saved, float32 weights kept).

    The files are checked as written: the torch-free loop tracks a click through
    a ``check_frames``-frame synthetic clip and is compared with the family's own
    video API (``init_state`` / ``add_new_points_or_box`` /
    ``propagate_in_video``; the Hugging Face processor's session and
    ``propagate_in_video_iterator``).
    ``onnx_export``: an ONNX video export of this model (its files verified) to
    convert to OpenVINO instead of exporting the graphs again.

    Raises:
        ValueError: a model that is not a video model this export follows, one
            with video settings the loop does not follow, or an unknown format.
    """
    adapter = find_adapter(model)
    if format not in runtime.FORMATS:
        raise ValueError(f"format must be one of {sorted(runtime.FORMATS)}, got {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with eval_mode(model), torch.no_grad(), tempfile.TemporaryDirectory(dir=out) as scratch:
        # Traced from a captured copy: upstream's RoPE attentions rotate in complex numbers (which ONNX lacks) or
        # branch on the memory length; the captured ones (and the components of an optimized model, kept as they
        # are) rotate in real arithmetic for every length.
        deployment = adapter.video_deployment(capture(model).model)
        if onnx_export is not None:
            onnx_dir = Path(onnx_export)
            runtime.verify_files(onnx_dir, video_runtime.read_manifest(onnx_dir))
        else:
            onnx_dir = out if format == "onnx" else Path(scratch)
            _write_graphs(deployment, onnx_dir, opset)
        onnx_files = {name: onnx_dir / f"{name}.onnx" for name in video_runtime.GRAPHS}
        signatures = {name: onnx_graphs.graph_signature(path) for name, path in onnx_files.items()}
        if format == "openvino":
            from . import openvino as openvino_graphs

            parts = {name: openvino_graphs.convert(path, out / f"{name}.xml") for name, path in onnx_files.items()}
        else:
            parts = {name: [path] for name, path in onnx_files.items()}
    shutil.copyfile(video_runtime.__file__, out / "samfx_video_runtime.py")
    shutil.copyfile(runtime.__file__, out / "samfx_runtime.py")
    report = getattr(model, "samfx_report", None)
    listed = [path for files in parts.values() for path in files] + [out / "samfx_video_runtime.py",
                                                                      out / "samfx_runtime.py"]
    manifest: dict[str, Any] = {
        "schema": video_runtime.SCHEMA,
        "format": format,
        "runtime": runtime.FORMATS[format],
        "family": adapter.name,
        "model": getattr(model, "samfx_zoo", {}).get("name"),
        "passes": [p.config for p in report.passes] if report is not None else [],
        "graphs": {name: files[0].name for name, files in parts.items()},
        "signatures": signatures,
        "settings": deployment.settings,
        "opset": opset,
        "files": {path.name: {"sha256": runtime.file_digest(path), "bytes": path.stat().st_size} for path in listed},
    }
    _write(out, manifest)
    result = VideoExport(out, manifest)
    with tempfile.TemporaryDirectory() as scratch:
        clip = synthetic_clip(scratch, frames=check_frames)
        tracker = video_runtime.load(out)  # the files as written, verified against the manifest
        exported = tracker.track(clip.directory, [clip.click], [1])
        eager = [t.numpy() for t in adapter.track_video(model, clip.directory, [clip.click], [1])]
    result.checks = {"mask_iou": [mask_iou(a > 0, b > 0) for a, b in zip(exported, eager)],
                     "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(exported, eager))}
    manifest["checks"] = result.checks
    _write(out, manifest)
    return result


def _write_graphs(deployment: VideoDeployment, out: Path, opset: int) -> None:
    examples = dict(deployment.examples)
    examples["decoder"] += (torch.tensor([120.0, 160.0]),)  # orig_im_size
    dynamic = _dynamic_shapes(deployment)
    modules = {"encoder": deployment.encoder, "memory_attention": deployment.memory_attention,
               "decoder": _VideoResolutionDecoder(deployment.decoder), "memory_encoder": deployment.memory_encoder}
    for name in video_runtime.GRAPHS:
        inputs, outputs = NAMES[name]
        onnx_graphs._to_onnx(modules[name], examples[name], inputs, outputs, dynamic[name], out / f"{name}.onnx",
                             opset, None)


def _write(out: Path, manifest: dict[str, Any]) -> None:
    (out / video_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
