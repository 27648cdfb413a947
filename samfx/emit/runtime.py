"""Run an exported encoder/decoder pair with onnxruntime and numpy only.

This file imports neither torch nor the rest of samfx, so an edge device needs
``onnxruntime`` and ``numpy`` (and Pillow to read and write image files from the
command line). :func:`samfx.export_onnx` copies it into the export directory as
``samfx_runtime.py``, next to ``encoder.onnx``, ``decoder.onnx`` and
``samfx_onnx.json`` (how the family's predictor prepares images and prompts,
which this runtime follows: resize, normalisation, padding, prompt frame)::

    python samfx_runtime.py photo.jpg --model-dir . --point 120,80 --out mask.png
    samfx run-onnx photo.jpg --model-dir out/ --box 30,40,200,220 --out mask.png

Example (after ``samfx export-onnx --model lite_medsam --out out/``)::

    from samfx.emit.runtime import OnnxPredictor

    predictor = OnnxPredictor("out/")
    predictor.set_image(image)                                  # H x W x 3 uint8 RGB
    masks, scores, low_res = predictor.predict(point_coords=[[120, 80]], point_labels=[1])
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["FORMAT", "METADATA", "OnnxPredictor", "main", "prepare_image", "prompt_inputs", "resize", "to_model_frame"]

FORMAT = "samfx-onnx/1"
METADATA = "samfx_onnx.json"


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


def prompt_inputs(metadata: dict[str, Any], image_hw: tuple[int, int], point_coords: Any = None,
                  point_labels: Any = None, box: Any = None,
                  mask_input: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The decoder's prompt inputs for prompts in the pixels of an ``image_hw`` image.

    The SAM convention: box corners are points labelled 2 and 3; a padding point
    (label -1) is added where the family's predictor adds one.
    """
    preprocessing = metadata["preprocessing"]
    coords, labels = [], []
    if point_coords is not None:
        points = np.asarray(point_coords, np.float64).reshape(-1, 2)
        if point_labels is None or len(np.asarray(point_labels).reshape(-1)) != len(points):
            raise ValueError("give one label (1 foreground, 0 background) per point")
        coords.append(points)
        labels.append(np.asarray(point_labels, np.float64).reshape(-1))
    if box is not None:
        coords.append(np.asarray(box, np.float64).reshape(2, 2))
        labels.append(np.array([2.0, 3.0]))
    if not coords:
        raise ValueError("give at least one point or a box")
    if box is None or preprocessing["pad_point"] == "always":
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([-1.0]))
    frame = to_model_frame(np.concatenate(coords), image_hw, preprocessing)
    side = metadata["mask_input_size"]
    mask = np.zeros((1, 1, side, side), np.float32) if mask_input is None else \
        np.asarray(mask_input, np.float32).reshape(1, 1, side, side)
    return {
        "point_coords": frame[None].astype(np.float32),
        "point_labels": np.concatenate(labels)[None].astype(np.float32),
        "mask_input": mask,
        "has_mask_input": np.array([float(mask_input is not None)], np.float32),
        "orig_im_size": np.array(image_hw, np.float32),
    }


class OnnxPredictor:
    """Segment with an exported pair: ``set_image`` once, then ``predict`` per prompt.

    Args:
        model_dir: what :func:`samfx.export_onnx` wrote.
        threads: onnxruntime intra-op threads (0: onnxruntime's choice).
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(self, model_dir: str | Path, threads: int = 0, providers: Sequence[str] | None = None) -> None:
        import onnxruntime

        self.model_dir = Path(model_dir)
        meta_path = self.model_dir / METADATA
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.model_dir} has no {METADATA}: not a directory written by samfx.export_onnx")
        self.metadata = json.loads(meta_path.read_text())
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {self.metadata.get('format')!r}; this runtime reads {FORMAT!r}")
        self.preprocessing = self.metadata["preprocessing"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        self.encoder = onnxruntime.InferenceSession(str(self.model_dir / self.metadata["encoder"]), options,
                                                    providers=providers)
        self.decoder = onnxruntime.InferenceSession(str(self.model_dir / self.metadata["decoder"]), options,
                                                    providers=providers)
        self._embeddings: dict[str, np.ndarray] | None = None
        self._image_hw = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``H x W x 3`` uint8 RGB image."""
        inputs = {self.encoder.get_inputs()[0].name: prepare_image(image, self.preprocessing)}
        outputs = self.encoder.run(None, inputs)
        self._embeddings = dict(zip(self.metadata["embeddings"], outputs))
        self._image_hw = tuple(image.shape[:2])

    @property
    def image_embedding(self) -> np.ndarray:
        if self._embeddings is None:
            raise RuntimeError("call set_image first")
        return self._embeddings[self.metadata["embeddings"][0]]

    def predict(self, point_coords: Any = None, point_labels: Any = None, box: Any = None,
                mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for points (``(N, 2)`` pixel x, y with labels) and/or a box
        (``x0, y0, x1, y1``) on the last image.

        Returns:
            ``(masks, scores, low_res_logits)``: ``M x H x W`` bools, ``M`` predicted
            IoUs, and the low-res logits to pass back as ``mask_input``.
        """
        if self._embeddings is None:
            raise RuntimeError("call set_image first")
        feeds = {**self._embeddings,
                 **prompt_inputs(self.metadata, self._image_hw, point_coords, point_labels, box, mask_input)}
        masks, scores, low_res = self.decoder.run(None, feeds)
        return masks[0] > 0.0, scores[0], low_res[0]


def _pair(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} must be {count} comma-separated finite numbers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run-onnx`` arguments (shared by ``samfx run-onnx`` and this file's ``main``)."""
    parser.add_argument("image", help="an image file (PNG, JPEG, ... read with Pillow) or an H x W x 3 uint8 .npy")
    parser.add_argument("--model-dir", required=True, help="directory written by samfx.export_onnx")
    parser.add_argument("--point", action="append", default=[], type=lambda t: _pair(t, 2, "--point"),
                        metavar="X,Y", help="foreground point in image pixels (repeatable)")
    parser.add_argument("--negative", action="append", default=[], type=lambda t: _pair(t, 2, "--negative"),
                        metavar="X,Y", help="background point (repeatable)")
    parser.add_argument("--box", type=lambda t: _pair(t, 4, "--box"), metavar="X0,Y0,X1,Y1", help="box prompt")
    parser.add_argument("--out", required=True, help="mask PNG to write (the highest-scoring mask)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: its choice)")


def _read_image(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("reading image files needs Pillow (pip install pillow), or pass an H x W x 3 uint8 .npy") \
            from None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run(args: argparse.Namespace) -> int:
    """``run-onnx``: segment one image, write the best mask, print its score."""
    if not args.point and not args.negative and args.box is None:
        raise SystemExit("run-onnx: give at least one --point, --negative or --box")
    points = args.point + args.negative
    labels = [1] * len(args.point) + [0] * len(args.negative)
    try:
        predictor = OnnxPredictor(args.model_dir, threads=args.threads)
        predictor.set_image(_read_image(args.image))
        masks, scores, _ = predictor.predict(point_coords=points or None, point_labels=labels or None, box=args.box)
    except (OSError, ValueError) as err:
        raise SystemExit(f"run-onnx: error: {err}") from None
    best = int(np.argmax(scores))
    mask = (masks[best] * 255).astype(np.uint8)
    if args.out.endswith(".npy"):
        np.save(args.out, masks[best])
    else:
        from PIL import Image

        Image.fromarray(mask).save(args.out)
    print(f"wrote {args.out}: mask {best} of {len(scores)}, predicted IoU {scores[best]:.3f}, "
          f"{int(masks[best].sum())} of {masks[best].size} pixels")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samfx_runtime", description="Segment an image with an exported SAM pair.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
