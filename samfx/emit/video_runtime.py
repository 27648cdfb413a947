"""Track an object through a clip with exported SAM 2-style video graphs: onnxruntime and numpy.

This file imports neither torch nor the rest of samfx (next to it in an export
directory: ``samfx_runtime.py`` for the file checks; numpy, onnxruntime or
OpenVINO, and Pillow). :func:`samfx.emit.video.export_video` copies it into the export
directory as ``samfx_video_runtime.py``, next to the four graphs and
``samfx_video_export.json``, whose SHA-256 entries are checked before any
graph is loaded.

The loop is ``SAM2VideoPredictor``'s (and the Hugging Face video classes'
session loop's) for one object clicked on one frame and tracked forward: frame features (``encoder.onnx``); on the clicked frame the
features with the no-memory embedding, on the others the features conditioned
on the clicked frame's memory and the last ``num_maskmem - 1`` frames' memories
plus up to ``max_obj_ptrs_in_encoder`` object pointers
(``memory_attention.onnx``, whose memory and pointer counts are dynamic);
``decoder.onnx`` gives the mask, the object pointer and score;
``memory_encoder.onnx`` turns the mask into the frame's memory, kept in the
manifest's ``memory_dtype`` as upstream keeps it (SAM 2: bfloat16). Memories
are stacked along their first axis, whatever their shape (SAM 2's maps,
EdgeTAM's perceiver latents).

    python samfx_video_runtime.py frames/ --model-dir . --point 40,60

Example (after :func:`samfx.emit.video.export_video`)::

    import samfx_video_runtime
    tracker = samfx_video_runtime.load("out/")
    logits = tracker.track("frames/", points=[[40, 60]], labels=[1])   # per frame, H x W; masks: > 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # inside samfx
    from . import runtime as _files
except ImportError:  # copied into an export directory
    import samfx_runtime as _files  # type: ignore[no-redef]

__all__ = ["GRAPHS", "MANIFEST", "SCHEMA", "VideoTracker", "bfloat16_round", "load", "main", "read_frame"]

SCHEMA = "samfx-video-export/1"
MANIFEST = "samfx_video_export.json"
GRAPHS = ("encoder", "memory_attention", "decoder", "memory_encoder")
_JPEG = (".jpg", ".jpeg", ".JPG", ".JPEG")


def bfloat16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even) and back, as
    ``tensor.to(torch.bfloat16).float()`` does.

    Example::

        >>> float(bfloat16_round(np.array([1.00390625], np.float32))[0])
        1.0
    """
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def read_frame(path: str | Path, settings: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """A JPEG frame as the family's video loader prepares it: RGB, stretched to the
    model's square size by Pillow's ``settings["resample"]`` filter (SAM 2's
    ``load_video_frames``: bicubic; Hugging Face's video processors: bilinear,
    as torchvision resizes 8-bit frames), scaled to [0, 1] and normalised; and
    its ``(height, width)``."""
    from PIL import Image

    size = settings["image_size"]
    resample = Image.Resampling[settings["resample"].upper()]
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.array(image.convert("RGB").resize((size, size), resample))
    pixels = (pixels / 255.0).astype(np.float32).transpose(2, 0, 1)
    mean = np.asarray(settings["mean"], np.float32)[:, None, None]
    std = np.asarray(settings["std"], np.float32)[:, None, None]
    return ((pixels - mean) / std)[None], (height, width)


def _frames(directory: str | Path) -> list[Path]:
    paths = [p for p in Path(directory).iterdir() if p.suffix in _JPEG]
    if not paths:
        raise FileNotFoundError(f"no JPEG frames in {directory}")
    return sorted(paths, key=lambda p: int(p.stem))


class VideoTracker:
    """Runs the loop on graphs given as ``{name: callable(feeds) -> outputs}``."""

    def __init__(self, graphs: dict[str, Any], settings: dict[str, Any]) -> None:
        if settings["memory_dtype"] not in ("bfloat16", "float32"):
            raise ValueError(f"memory_dtype {settings['memory_dtype']!r} is neither bfloat16 nor float32")
        self.graphs = graphs
        self.settings = settings

    def _run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.graphs[name](feeds)

    def track(self, frames: str | Path, points: Sequence[Sequence[float]], labels: Sequence[int],
              frame_idx: int = 0) -> list[np.ndarray]:
        """Click ``points`` (``(x, y)`` pixels, labels 1/0) on frame ``frame_idx`` and
        track forward: per frame from ``frame_idx`` on, the ``H x W`` mask logits."""
        settings = self.settings
        size, num_maskmem = settings["image_size"], settings["num_maskmem"]
        paths = _frames(frames)
        num_frames = len(paths)
        if not 0 <= frame_idx < num_frames:
            raise ValueError(f"frame_idx {frame_idx} is not a frame of the {num_frames}-frame clip")
        max_pointers = min(num_frames, settings["max_obj_ptrs_in_encoder"])
        outputs: dict[int, dict[str, np.ndarray]] = {}
        logits = []
        memory_pos = None
        for index in range(frame_idx, num_frames):
            pixels, (height, width) = read_frame(paths[index], settings)
            features, position, no_memory, high_res_0, high_res_1 = self._run("encoder", image=pixels)
            orig = np.array([height, width], np.float32)
            if index == frame_idx:
                coords = np.asarray(points, np.float32).reshape(1, -1, 2) / np.array([width, height], np.float32) * size
                coords = coords.astype(np.float32)
                point_labels = np.asarray(labels, np.float32).reshape(1, -1)
                conditioned = no_memory
            else:
                coords, point_labels = np.zeros((1, 1, 2), np.float32), -np.ones((1, 1), np.float32)
                conditioned = self._condition(index, features, position, outputs, memory_pos, max_pointers,
                                              num_maskmem, frame_idx)
            masks, low_res, pointer, score = self._run(
                "decoder", features=conditioned, high_res_0=high_res_0, high_res_1=high_res_1,
                point_coords=coords, point_labels=point_labels, orig_im_size=orig)
            memory, memory_pos = self._run("memory_encoder", features=features, low_res_masks=low_res,
                                           object_score=score,
                                           from_points=np.array([float(index == frame_idx)], np.float32))
            outputs[index] = {"memory": self._stored(memory), "pointer": pointer}
            logits.append(masks[0, 0])
        return logits

    def _stored(self, memory: np.ndarray) -> np.ndarray:
        return bfloat16_round(memory) if self.settings["memory_dtype"] == "bfloat16" else memory

    def _condition(self, index: int, features: np.ndarray, position: np.ndarray,
                   outputs: dict[int, dict[str, np.ndarray]], memory_pos: np.ndarray, max_pointers: int,
                   num_maskmem: int, clicked: int) -> np.ndarray:
        # SAM2Base._prepare_memory_conditioned_features: the clicked frame at t_pos 0,
        # then the frames 6, 5, ..., 1 before this one at t_pos 1..6, where tracked.
        chosen = [(0, clicked)] + [(t_pos, index - (num_maskmem - t_pos)) for t_pos in range(1, num_maskmem)
                                   if index - (num_maskmem - t_pos) in outputs
                                   and index - (num_maskmem - t_pos) != clicked]
        memories = np.concatenate([outputs[t]["memory"] for _, t in chosen])
        slots = np.array([num_maskmem - t_pos - 1 for t_pos, _ in chosen], np.int64)
        # Pointers: the clicked frame's, then those of up to max_pointers - 1 frames before this one.
        distances = [index - clicked]
        pointers = [outputs[clicked]["pointer"]]
        for t_diff in range(1, max_pointers):
            t = index - t_diff
            if t < 0:
                break
            if t in outputs and t != clicked:
                distances.append(t_diff)
                pointers.append(outputs[t]["pointer"])
        scaled = np.array(distances, np.float32) / np.float32(max_pointers - 1)
        (conditioned,) = self._run("memory_attention", features=features, position=position, memories=memories,
                                   memory_positions=np.repeat(memory_pos, len(chosen), axis=0),
                                   memory_slots=slots, pointers=np.concatenate(pointers),
                                   pointer_distances=scaled.astype(np.float32))
        return conditioned


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The video export's manifest, checked for its schema."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {MANIFEST}: not a directory written by the video export")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"{path} has schema {manifest.get('schema')!r}; this runtime reads {SCHEMA!r}")
    return manifest


def load(model_dir: str | Path, threads: int | None = None) -> VideoTracker:
    """The export in ``model_dir`` as a :class:`VideoTracker` on onnxruntime or
    OpenVINO (as the manifest says), after checking every file against the
    manifest (``IntegrityError`` otherwise)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    _files.verify_files(model_dir, manifest)
    paths = {name: str(model_dir / manifest["graphs"][name]) for name in GRAPHS}
    graphs = {}
    if manifest["format"] == "openvino":
        import openvino

        core = openvino.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        for name, path in paths.items():
            compiled = core.compile_model(core.read_model(path), "CPU", config)
            graphs[name] = lambda feeds, _compiled=compiled: [
                value.copy() for value in _compiled(feeds).to_tuple()]
    else:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.log_severity_level = 3
        for name, path in paths.items():
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            graphs[name] = lambda feeds, _session=session: _session.run(None, feeds)
    return VideoTracker(graphs, manifest["settings"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Track a clicked object through a folder of JPEG frames.")
    parser.add_argument("frames", help="folder of numbered JPEG frames (00000.jpg, ...)")
    parser.add_argument("--model-dir", default=str(Path(__file__).parent))
    parser.add_argument("--point", action="append", required=True, help="x,y of a positive click on the first frame")
    args = parser.parse_args(argv)
    points = [[float(v) for v in p.split(",")] for p in args.point]
    logits = load(args.model_dir).track(args.frames, points, [1] * len(points))
    for index, frame in enumerate(logits):
        print(f"frame {index}: {int((frame > 0).sum())} mask pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
