"""Run an exported encoder/decoder pair with onnxruntime or OpenVINO, and numpy.

This file imports neither torch nor the rest of samfx, so an edge device needs
``numpy`` and the runtime of the export's format (``onnxruntime`` or
``openvino``; Pillow to read and write image files from the command line).
:func:`samfx.export` copies it into the export directory as
``samfx_runtime.py``, next to the graphs and ``samfx_export.json``, the
manifest: every file with its SHA-256 and size, and how the family's predictor
prepares images and prompts, which this runtime follows (resize,
normalisation, padding, prompt frame). Every file is checked against the
manifest before anything is loaded: a changed or truncated file is refused.

    python samfx_runtime.py photo.jpg --model-dir . --box 30,40,200,220 --box 5,5,90,80 --out mask.png
    samfx run photo.jpg --model-dir out/ --point 120,80 --out mask.png

Example (after ``samfx export --model lite_medsam --format openvino --out out/``)::

    import samfx_runtime   # or: from samfx.emit import runtime as samfx_runtime

    predictor = samfx_runtime.load("out/")
    predictor.set_image(image)                                   # H x W x 3 uint8 RGB
    masks, scores, low_res = predictor.predict(box=[[30, 40, 200, 220], [5, 5, 90, 80]])
    masks.shape                                                  # (2, 3, H, W): one decoder call
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["FORMATS", "MANIFEST", "SCHEMA", "IntegrityError", "OnnxPredictor", "Predictor", "file_digest", "load",
           "main", "prepare_image", "prompt_inputs", "read_manifest", "resize", "to_model_frame", "verify_files"]

SCHEMA = "samfx-export/1"
MANIFEST = "samfx_export.json"
#: Export formats and the runtime that runs each.
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}
PRECISIONS = ("f32", "bf16")


def _resample_weights(in_size: int, out_size: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of each output pixel along one axis.

    Bilinear (triangle) filter centred on each output pixel, widened by the
    downscaling factor when ``antialias`` (PIL's and torchvision's antialiased
    bilinear), or not widened (``F.interpolate``, ``align_corners=False``).
    """
    scale = in_size / out_size
    support = max(scale, 1.0) if antialias else 1.0
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((last - first).max())
    index = first[:, None] + np.arange(taps)[None, :]
    weights = np.clip(1.0 - np.abs((index - centers[:, None] + 0.5) / support), 0.0, None)
    weights = np.where(index < last[:, None], weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.minimum(index, in_size - 1), weights


def _resample_axis(image: np.ndarray, axis: int, out_size: int, antialias: bool) -> np.ndarray:
    index, weights = _resample_weights(image.shape[axis], out_size, antialias)
    shape = [1] * image.ndim
    shape[axis] = out_size
    result = np.zeros(image.shape[:axis] + (out_size,) + image.shape[axis + 1:], np.float64)
    for tap in range(index.shape[1]):
        result += np.take(image, index[:, tap], axis=axis) * weights[:, tap].reshape(shape)
    return result


def resize(image: np.ndarray, size: tuple[int, int], antialias: bool, uint8: bool) -> np.ndarray:
    """Bilinear resize of an ``H x W x C`` image to ``size`` = (height, width).

    ``uint8``: resample the 8-bit image and round to 8 bits after each pass
    (width first, as PIL does); otherwise resample float pixels.
    """
    out = np.asarray(image, np.float64)
    for axis, out_size in ((1, size[1]), (0, size[0])):
        if out.shape[axis] != out_size:
            out = _resample_axis(out, axis, out_size, antialias)
            if uint8:
                out = np.clip(np.floor(out + 0.5), 0, 255)
    return out


def _resized_shape(height: int, width: int, preprocessing: dict[str, Any]) -> tuple[int, int]:
    size = preprocessing["size"]
    if preprocessing["resize"] == "stretch":
        return size, size
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def prepare_image(image: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """The ``(1, 3, size, size)`` float32 encoder input for an ``H x W x 3`` uint8 image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} array of shape {image.shape}")
    size = preprocessing["size"]
    new_h, new_w = _resized_shape(*image.shape[:2], preprocessing)
    pixels = resize(image, (new_h, new_w), preprocessing["antialias"], preprocessing["resample_uint8"])
    pixels = (pixels - np.asarray(preprocessing["mean"])) / np.asarray(preprocessing["std"])
    padded = np.zeros((size, size, 3), np.float32)
    padded[:new_h, :new_w] = pixels
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None])


def to_model_frame(coords: np.ndarray, image_hw: tuple[int, int], preprocessing: dict[str, Any]) -> np.ndarray:
    """Pixel ``(x, y)`` coordinates of the image in the encoder input's frame."""
    new_h, new_w = _resized_shape(*image_hw, preprocessing)
    return np.asarray(coords, np.float64) * np.array([new_w / image_hw[1], new_h / image_hw[0]])


class IntegrityError(ValueError):
    """A file of an export directory is missing, or differs from what the manifest recorded."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export directory, checked for its schema and format.

    Raises:
        FileNotFoundError: no manifest (not a directory written by ``samfx.export``).
        ValueError: a manifest this runtime cannot read.
    """
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {MANIFEST}: not a directory written by samfx.export")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has schema {found!r}; this runtime reads {SCHEMA!r}")
    if manifest.get("format") not in FORMATS:
        raise ValueError(f"{path} has format {manifest.get('format')!r}; this runtime runs {sorted(FORMATS)}")
    return manifest


def verify_files(model_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its recorded size and SHA-256.

    Raises:
        IntegrityError: naming the first file that is missing or differs.
    """
    for name, entry in manifest["files"].items():
        path = Path(model_dir) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"the manifest names {name!r}, outside the export directory")
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (the manifest lists it)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(f"{path} has {size} bytes, the manifest recorded {entry['bytes']}: "
                                 "the file was changed or truncated after export")
        if file_digest(path) != entry["sha256"]:
            raise IntegrityError(f"{path} does not match its SHA-256 in {MANIFEST}: the file was changed after export")


def _batched(value: Any, trailing: int, what: str) -> np.ndarray | None:
    """``value`` as float64 with a leading batch axis (``trailing`` axes after it)."""
    if value is None:
        return None
    array = np.asarray(value, np.float64)
    if array.ndim == trailing:
        array = array[None]
    if array.ndim != trailing + 1:
        raise ValueError(f"{what} has shape {array.shape}; expected {trailing} or {trailing + 1} axes")
    return array


def prompt_inputs(manifest: dict[str, Any], image_hw: tuple[int, int], point_coords: Any = None,
                  point_labels: Any = None, box: Any = None,
                  mask_input: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The decoder's prompt inputs for prompts in the pixels of an ``image_hw`` image.

    Prompts may be batched: ``box`` ``(N, 4)``, ``point_coords`` ``(N, P, 2)`` with
    ``point_labels`` ``(N, P)``, ``mask_input`` ``(N, 1, h, w)``; a prompt without the
    batch axis is shared by the batch. The SAM convention: box corners are points
    labelled 2 and 3; a padding point (label -1) is added where the family's
    predictor adds one.
    """
    preprocessing = manifest["preprocessing"]
    points = _batched(point_coords, 2, "point_coords")
    if points is not None and points.shape[-1] != 2:
        raise ValueError(f"point_coords has shape {np.shape(point_coords)}; points are (x, y) pairs")
    boxes = _batched(box, 1, "box")
    if boxes is not None and boxes.shape[-1] != 4:
        raise ValueError(f"box has shape {np.shape(box)}; a box is x0, y0, x1, y1")
    if points is None and boxes is None:
        raise ValueError("give at least one point or a box")
    coords, labels = [], []
    if points is not None:
        if point_labels is None or np.size(point_labels) not in (points.shape[1], points.shape[0] * points.shape[1]):
            raise ValueError("give one label (1 foreground, 0 background) per point")
        coords.append(points)
        labels.append(np.asarray(point_labels, np.float64).reshape(-1, points.shape[1]))
    if boxes is not None:
        coords.append(boxes.reshape(-1, 2, 2))
        labels.append(np.full((1, 2), [2.0, 3.0]))
    if boxes is None or preprocessing["pad_point"] == "always":
        coords.append(np.zeros((1, 1, 2)))
        labels.append(np.full((1, 1), -1.0))
    batch = max(len(c) for c in coords + labels)
    if any(len(c) not in (1, batch) for c in coords + labels):
        raise ValueError(f"prompt batches differ: {sorted({len(c) for c in coords + labels})}")
    coords = np.concatenate([np.broadcast_to(c, (batch, *c.shape[1:])) for c in coords], axis=1)
    labels = np.concatenate([np.broadcast_to(lab, (batch, lab.shape[1])) for lab in labels], axis=1)
    frame = to_model_frame(coords, image_hw, preprocessing)
    side = manifest["mask_input_size"]
    if mask_input is None:
        mask = np.zeros((batch, 1, side, side), np.float32)
    else:
        mask = np.asarray(mask_input, np.float32)
        if mask.size not in (side * side, batch * side * side):
            raise ValueError(f"mask_input has shape {mask.shape}; expected ({batch}, 1, {side}, {side}) low-res logits")
        mask = np.array(np.broadcast_to(mask.reshape(-1, 1, side, side), (batch, 1, side, side)))
    return {
        "point_coords": frame.astype(np.float32),
        "point_labels": labels.astype(np.float32),
        "mask_input": mask,
        "has_mask_input": np.array([float(mask_input is not None)], np.float32),
        "orig_im_size": np.array(image_hw, _input_dtype(manifest, "orig_im_size")),
    }


def _input_dtype(manifest: dict[str, Any], name: str) -> np.dtype:
    """The element type the decoder graph declares for input ``name`` (float32 by SAM's convention;
    OpenVINO exports take ``orig_im_size`` as int64, so that bfloat16 compute never rounds it)."""
    inputs = manifest.get("graphs", {}).get("decoder", {}).get("inputs", [])
    return np.dtype(next((i["dtype"] for i in inputs if i["name"] == name), "float32"))


def graph_parts(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The graphs of an export: encoder, decoder and, in exports since it exists, the
    decoder for prompts without a mask input."""
    return tuple(part for part in ("encoder", "decoder", "decoder_no_mask") if part in manifest)


class _OnnxRuntimeGraphs:
    """The export's graphs as onnxruntime sessions."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any], threads: int | None, precision: str | None,
                 providers: Sequence[str] | None = None) -> None:
        import onnxruntime

        if precision not in (None, "f32"):
            raise ValueError(f"onnxruntime's CPU provider runs float32 only, not {precision!r}")
        self.parts = graph_parts(manifest)
        self.precision = "f32"
        self.precisions = {part: "f32" for part in self.parts}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.log_severity_level = 3
        providers = list(providers or ["CPUExecutionProvider"])
        try:
            self.sessions = {part: onnxruntime.InferenceSession(str(model_dir / manifest[part]), options,
                                                                providers=providers) for part in self.parts}
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"onnxruntime cannot load {model_dir}: {err}") from None
        self.inputs = {part: [i.name for i in session.get_inputs()] for part, session in self.sessions.items()}

    def encode(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.sessions["encoder"].run(None, {"image": pixels})

    def decode(self, feeds: dict[str, np.ndarray], part: str = "decoder") -> list[np.ndarray]:
        return self.sessions[part].run(None, {name: feeds[name] for name in self.inputs[part]})


def part_hints(manifest: dict[str, Any]) -> dict[str, str]:
    """The export's precision hint of each graph (older manifests: one hint, decoder float32)."""
    precision = manifest.get("precision", {})
    hints = {"encoder": precision.get("hint", "f32"), "decoder": "f32", **precision.get("parts", {})}
    return {part: hints["encoder" if part == "encoder" else "decoder"] for part in graph_parts(manifest)}


def native_bf16(core: Any) -> bool:
    """OpenVINO's CPU plugin multiplies bfloat16 natively on this CPU (AVX-512 BF16, AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class _OpenVinoGraphs:
    """The export's graphs compiled by OpenVINO's CPU plugin."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any], threads: int | None, precision: str | None,
                 providers: Sequence[str] | None = None) -> None:
        import openvino

        if providers:
            raise ValueError("providers are onnxruntime's; OpenVINO runs on its CPU plugin here")
        core = openvino.Core()
        self.parts = graph_parts(manifest)
        hints = part_hints(manifest)
        if precision is not None:
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
            hints = {part: precision for part in hints}
        # bf16 only where it is native: emulated, it is slower than float32 and still lossy.
        # A decoder only when its graph takes orig_im_size as an integer: bfloat16 rounds
        # float sizes (303 is 304), which older exports carry as float32.
        native = native_bf16(core)
        integer_sizes = _input_dtype(manifest, "orig_im_size").kind == "i"
        self.precisions = {part: "bf16" if hint == "bf16" and native and (part == "encoder" or integer_sizes)
                           else "f32" for part, hint in hints.items()}
        self.precision = self.precisions["encoder"]
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = [core.compile_model(core.read_model(str(model_dir / manifest[part])), "CPU",
                                                {**config, "INFERENCE_PRECISION_HINT": self.precisions[part]})
                             for part in self.parts]
        except RuntimeError as err:
            raise ValueError(f"OpenVINO cannot load {model_dir}: {str(err).splitlines()[0]}") from None
        self.requests = dict(zip(self.parts, (compiled.create_infer_request() for compiled in self.compiled)))
        # A port has every name the graph gave its tensor; the manifest's is one of them.
        self.inputs = {part: [next(name for name in sorted(port.get_names()) if name in manifest[f"{part}_inputs"])
                              for port in compiled.inputs]
                       for part, compiled in zip(self.parts, self.compiled) if part != "encoder"}

    def _run(self, part: str, inputs: dict[Any, np.ndarray]) -> list[np.ndarray]:
        request = self.requests[part]
        request.infer(inputs)
        return [request.get_output_tensor(i).data.copy() for i in range(len(request.model_outputs))]

    def encode(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self._run("encoder", {0: pixels})

    def decode(self, feeds: dict[str, np.ndarray], part: str = "decoder") -> list[np.ndarray]:
        return self._run(part, {name: feeds[name] for name in self.inputs[part]})


_GRAPHS = {"onnx": _OnnxRuntimeGraphs, "openvino": _OpenVinoGraphs}


def decoder_part(manifest: dict[str, Any], has_mask: bool) -> str:
    """The graph that decodes a prompt batch: ``decoder_no_mask`` for prompts without a mask
    where the export has it (the mask embedding is then shared), else ``decoder``."""
    return "decoder_no_mask" if not has_mask and "decoder_no_mask" in manifest else "decoder"


class Predictor:
    """Segment with an exported pair: ``set_image`` once, then ``predict`` per prompt batch.

    Every file is checked against the manifest's SHA-256 before the runtime
    reads it (:class:`IntegrityError` names the file that differs).

    Args:
        model_dir: what :func:`samfx.export` wrote.
        threads: runtime threads (``None``: the runtime's choice).
        precision: OpenVINO's inference precision of both graphs, ``"f32"`` or
            ``"bf16"`` (``None``: the manifest's hint for each graph); bf16 only where
            the CPU has it natively, and for the decoder only where the export takes
            ``orig_im_size`` as an integer.
        providers: onnxruntime execution providers (default: CPU).

    Attributes:
        manifest: the content of ``samfx_export.json``.
        format: ``"onnx"`` or ``"openvino"``.
        graphs: the runtime's encoder and decoder: ``encode(pixels)`` and
            ``decode(feeds)`` give the graphs' outputs as numpy arrays.
        precision: the encoder's inference precision.
        precisions: each graph's inference precision (``{"encoder": ..., "decoder": ...}``).
    """

    def __init__(self, model_dir: str | Path, threads: int | None = None, precision: str | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        verify_files(self.model_dir, self.manifest)
        self.format = self.manifest["format"]
        self.preprocessing = self.manifest["preprocessing"]
        self.graphs = _GRAPHS[self.format](self.model_dir, self.manifest, threads, precision, providers)
        self.precision = self.graphs.precision
        self.precisions = self.graphs.precisions
        self._embeddings: dict[str, np.ndarray] | None = None
        self._image_hw = (0, 0)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest

    @property
    def trained_prompts(self) -> tuple[str, ...]:
        """The prompt kinds the exported model was trained with (older exports: points and boxes)."""
        return tuple(self.manifest.get("prompts", {}).get("trained", ("point", "box")))

    @property
    def untrained_prompts_note(self) -> str:
        return self.manifest.get("prompts", {}).get("untrained_note", "")

    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``H x W x 3`` uint8 RGB image."""
        outputs = self.graphs.encode(prepare_image(image, self.preprocessing))
        self._embeddings = dict(zip(self.manifest["embeddings"], outputs))
        self._image_hw = tuple(image.shape[:2])

    @property
    def image_embedding(self) -> np.ndarray:
        if self._embeddings is None:
            raise RuntimeError("call set_image first")
        return self._embeddings[self.manifest["embeddings"][0]]

    def predict(self, point_coords: Any = None, point_labels: Any = None, box: Any = None,
                mask_input: np.ndarray | None = None,
                multimask_output: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for points (``(P, 2)`` pixel x, y with labels) and/or a box
        (``x0, y0, x1, y1``) on the last image; ``box`` ``(N, 4)`` (or points
        ``(N, P, 2)``) decodes N prompts in one decoder call.

        ``multimask_output`` must be the export's (``None``: the export's): the
        decoder graph holds one of SAM's two mask heads.

        Returns:
            ``(masks, scores, low_res_logits)``: ``M x H x W`` bools, ``M`` predicted
            IoUs and ``M x h x w`` logits to pass back as ``mask_input``, with a
            leading ``N`` axis for batched prompts.
        """
        if self._embeddings is None:
            raise RuntimeError("call set_image first")
        exported = self.manifest["multimask_output"]
        if multimask_output is not None and bool(multimask_output) != exported:
            raise ValueError(f"this export's decoder gives the {'multi' if exported else 'single'}-mask output; "
                             f"export with multimask_output={bool(multimask_output)} for the other")
        batched = any(value is not None and np.ndim(value) == ndim
                      for value, ndim in ((box, 2), (point_coords, 3)))
        feeds = {**self._embeddings,
                 **prompt_inputs(self.manifest, self._image_hw, point_coords, point_labels, box, mask_input)}
        masks, scores, low_res = self.graphs.decode(feeds, decoder_part(self.manifest, mask_input is not None))
        masks = masks > 0.0
        return (masks, scores, low_res) if batched else (masks[0], scores[0], low_res[0])


    def predict_boxes(self, boxes: Any) -> tuple[np.ndarray, np.ndarray]:
        """One mask per box ``(N, 4)`` (pixel ``x0, y0, x1, y1``), all boxes in one decoder call,
        as the family predictors' ``predict_boxes`` gives them (what ``samfx.evaluate`` runs).

        Returns ``(masks, scores)``: ``N x H x W`` bools and ``N`` predicted IoUs. An
        export with the multi-mask output gives, per box, its candidate with the highest
        predicted IoU (export with ``multimask_output=False`` for SAM's single-mask output).
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if not len(boxes):
            return np.zeros((0, *self._image_hw), bool), np.zeros(0, np.float32)
        masks, scores, _ = self.predict(box=boxes)
        best = np.argmax(scores, axis=1)
        rows = np.arange(len(boxes))
        return masks[rows, best], scores[rows, best].astype(np.float32)


    def predict_clicks(self, points: Any) -> tuple[np.ndarray, np.ndarray]:
        """One mask per single positive click ``(N, 2)`` (pixel ``x, y``), all clicks in one
        decoder call, as the family predictors' ``predict_clicks`` gives them: of a
        multi-mask export's candidates, the one with the highest predicted IoU.

        Returns ``(masks, scores)``: ``N x H x W`` bools and ``N`` predicted IoUs.
        """
        points = np.asarray(points, np.float32).reshape(-1, 1, 2)
        if not len(points):
            return np.zeros((0, *self._image_hw), bool), np.zeros(0, np.float32)
        masks, scores, _ = self.predict(point_coords=points, point_labels=np.ones((len(points), 1)))
        best = np.argmax(scores, axis=1)
        rows = np.arange(len(points))
        return masks[rows, best], scores[rows, best].astype(np.float32)


class OnnxPredictor(Predictor):
    """:class:`Predictor` of an ONNX export (onnxruntime).

    Args:
        model_dir: what :func:`samfx.export` wrote with ``format="onnx"``.
        threads: onnxruntime intra-op threads (0: onnxruntime's choice).
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(self, model_dir: str | Path, threads: int = 0, providers: Sequence[str] | None = None) -> None:
        manifest = read_manifest(model_dir)
        if manifest["format"] != "onnx":
            raise ValueError(f"{model_dir} holds a {manifest['format']} export; use samfx_runtime.load")
        super().__init__(model_dir, threads=threads or None, providers=providers)


def load(model_dir: str | Path, threads: int | None = None, precision: str | None = None) -> Predictor:
    """A :class:`Predictor` for an export of either format, its files verified first."""
    return Predictor(model_dir, threads=threads, precision=precision)


def _numbers(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} must be {count} comma-separated finite numbers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` arguments (shared by ``samfx run`` and this file's ``main``)."""
    parser.add_argument("image", help="an image file (PNG, JPEG, ... read with Pillow) or an H x W x 3 uint8 .npy")
    parser.add_argument("--model-dir", required=True, help="directory written by samfx.export (either format)")
    parser.add_argument("--point", action="append", default=[], type=lambda t: _numbers(t, 2, "--point"),
                        metavar="X,Y", help="foreground point in image pixels (repeatable)")
    parser.add_argument("--negative", action="append", default=[], type=lambda t: _numbers(t, 2, "--negative"),
                        metavar="X,Y", help="background point (repeatable)")
    parser.add_argument("--box", action="append", default=[], type=lambda t: _numbers(t, 4, "--box"),
                        metavar="X0,Y0,X1,Y1",
                        help="box prompt (repeatable: all boxes are decoded in one call, points apply to each)")
    parser.add_argument("--out", required=True,
                        help="PNG to write: the best mask (one prompt) or labels 1..N (N boxes); .npy: the bools")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: its choice)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="OpenVINO inference precision (default: the export's hint; bf16 only if native)")


def _read_image(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading image files needs Pillow (pip install pillow), or pass an H x W x 3 uint8 .npy") \
            from None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def segment(args: argparse.Namespace) -> str:
    """Segment one image with the prompts of ``args``, write ``args.out``; returns what was written.

    Raises:
        ValueError, OSError: bad prompts, files or export directory (:class:`IntegrityError` included).
    """
    if not args.point and not args.negative and not args.box:
        raise ValueError("give at least one --point, --negative or --box")
    points = args.point + args.negative
    labels = [1] * len(args.point) + [0] * len(args.negative)
    predictor = load(args.model_dir, threads=args.threads, precision=args.precision)
    predictor.set_image(_read_image(args.image))
    boxes = np.array(args.box).reshape(-1, 4) if args.box else None
    masks, scores, _ = predictor.predict(point_coords=points or None, point_labels=labels or None, box=boxes)
    if masks.ndim == 3:
        masks, scores = masks[None], scores[None]
    best = scores.argmax(axis=1)
    chosen = masks[np.arange(len(masks)), best]
    if args.out.endswith(".npy"):
        np.save(args.out, chosen if len(chosen) > 1 else chosen[0])
    else:
        from PIL import Image

        labelled = np.zeros(chosen.shape[1:], np.uint8)
        for index, mask in enumerate(chosen):
            labelled[mask] = index + 1 if len(chosen) > 1 else 255
        Image.fromarray(labelled).save(args.out)
    shown = ", ".join(f"{int(mask.sum())} px (IoU {scores[i, best[i]]:.3f})" for i, mask in enumerate(chosen[:8]))
    more = f", ... {len(chosen) - 8} more" if len(chosen) > 8 else ""
    return (f"wrote {args.out}: {len(chosen)} mask{'s' if len(chosen) > 1 else ''} from {predictor.format} "
            f"({predictor.precision}): {shown}{more}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samfx_runtime", description="Segment an image with an exported SAM pair.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(segment(args))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"samfx_runtime: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
