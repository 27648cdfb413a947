"""Pictures of what an optimization changed, written as PNG files.

* :func:`compare_pictures`: for each image, the original model's masks and the
  optimized model's side by side (one box prompt per object, the prompts the
  fidelity check uses), and where they disagree; optionally a second row with
  both models' segment-everything masks. The caption carries the fidelity
  figures of that image.
* :func:`speed_fidelity_plot`: speed-up against mask IoU vs the original for
  benchmark rows (``benchmarks/run.py`` and ``benchmarks/everything.py`` JSON).
* :func:`draw_everything`: one image's segment-everything masks.

matplotlib draws off-screen (its Agg canvas, no pyplot and no display); it is
imported only here.

Example::

    >>> import samfx, tempfile
    >>> from samfx.pictures import compare_pictures
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> fast = samfx.optimize(sam, ["split_qkv"])
    >>> paths = compare_pictures(sam, fast, tempfile.mkdtemp(), images=["coins"])
    >>> paths[0].name
    'compare_coins.png'
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, find_adapter
from .data import DEFAULT_IMAGES, ImageSample, package_images
from .fidelity import FidelityReport, compare
from .segment_everything import EverythingConfig, EverythingResult, MaskGenerator, match_masks

__all__ = ["compare_pictures", "draw_everything", "speed_fidelity_plot", "speed_fidelity_points"]

_LOST = np.array([0.10, 0.55, 1.00])    # in the original's mask only
_GAINED = np.array([1.00, 0.25, 0.20])  # in the optimized model's mask only


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("samfx pictures need matplotlib: pip install 'samfx[pictures]'") from err
    return Figure, FigureCanvasAgg


def _colors(count: int, seed: int = 0) -> np.ndarray:
    """Distinct, stable colours for ``count`` masks."""
    hues = (np.arange(count) * 0.618034 + 0.1 * seed) % 1.0
    import colorsys

    return np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues]).reshape(-1, 3)


def _overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.55) -> np.ndarray:
    """The image with each mask filled in its own colour and outlined (largest drawn first)."""
    from skimage.segmentation import find_boundaries

    out = image.astype(np.float32) / 255.0
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    colors = _colors(len(masks))
    for i in order:
        mask = masks[i]
        out[mask] = (1 - alpha) * out[mask] + alpha * colors[i]
        out[find_boundaries(mask, mode="inner")] = colors[i] * 0.6
    return np.clip(out, 0, 1)


def _disagreement(image: np.ndarray, original: Sequence[np.ndarray], optimized: Sequence[np.ndarray]) -> tuple[np.ndarray, int, int]:
    """Grey image with pixels only in the original's masks in blue and only in
    the optimized model's in red, per object; and the two pixel counts."""
    gray = image.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    out = np.repeat(0.35 + 0.4 * gray, 3, axis=2)
    lost = np.zeros(image.shape[:2], bool)
    gained = np.zeros(image.shape[:2], bool)
    for a, b in zip(original, optimized):
        lost |= a & ~b
        gained |= b & ~a
    out[lost] = _LOST
    out[gained] = _GAINED
    return out, int(lost.sum()), int(gained.sum())


def _masks(count: int) -> str:
    return f"{count} mask{'' if count == 1 else 's'}"


def _box_masks(predictor: Any, sample: ImageSample) -> list[np.ndarray]:
    predictor.set_image(sample.image)
    masks = []
    for prompt in sample.prompts:
        if prompt.kind == "box":
            mask, _ = predictor.predict(**prompt.as_kwargs())
            masks.append(np.asarray(mask[0], bool))
    return masks


def _boxes(sample: ImageSample) -> list[tuple[float, ...]]:
    return [p.coords for p in sample.prompts if p.kind == "box"]


def _caption(sample: ImageSample, fidelity: FidelityReport, lost: int, gained: int,
             everything: tuple[EverythingResult, EverythingResult] | None) -> str:
    image = next((p for p in fidelity.per_image if p["image"] == sample.name), None)
    parts = [f"{sample.name}: {len(_boxes(sample))} objects, one box prompt each "
             f"({'ground-truth coins' if sample.has_ground_truth else 'regions of a Felzenszwalb segmentation'})."]
    if image is not None:
        parts.append(f"Fidelity on this image ({image['prompts']} box and point prompts): mask IoU vs original "
                     f"mean {image['mask_iou_mean']:.4f}, worst {image['mask_iou_min']:.4f}; "
                     f"embedding cosine {image['embedding_cosine']:.5f}.")
    if sample.has_ground_truth and fidelity.gt_miou_original is not None and sample.name in fidelity.images:
        parts.append(f"Box mIoU vs ground truth: original {100 * fidelity.gt_miou_original:.1f}, "
                     f"optimized {100 * fidelity.gt_miou_optimized:.1f}.")
    parts.append(f"Disagreement of the box-prompt masks: {lost} px only in the original's (blue), "
                 f"{gained} px only in the optimized model's (red).")
    if everything is not None:
        ref, new = everything
        match = match_masks(ref, new)
        parts.append(f"Segment everything ({ref.strategy}): {_masks(len(ref))} -> {len(new)}; "
                     f"{match.matched} matched at IoU >= {match.iou_threshold} (recall {match.recall:.2f}, "
                     f"mean IoU {match.mean_iou:.3f}).")
    return " ".join(parts)


def compare_pictures(
    original: nn.Module,
    optimized: nn.Module,
    out_dir: str | Path,
    images: Iterable[str | ImageSample] = DEFAULT_IMAGES,
    fidelity: FidelityReport | None = None,
    everything: bool = False,
    everything_config: EverythingConfig | None = None,
    adapter: Adapter | None = None,
) -> list[Path]:
    """Write ``compare_<image>.png`` for each image; returns the paths.

    Args:
        original: the reference model.
        optimized: the model to show against it (e.g. from :func:`samfx.optimize`).
        out_dir: where to write.
        images: names from :func:`samfx.data.available_images` or samples.
        fidelity: the figures for the captions (e.g. ``report.fidelity``); when
            it does not cover an image, :func:`samfx.fidelity.compare` measures it.
        everything: add a row with both models' segment-everything masks.
        everything_config: settings for that row (hierarchical strategy).
        adapter: the family adapter (detected from ``original`` by default).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    adapter = adapter or find_adapter(original)
    samples = [s if isinstance(s, ImageSample) else package_images([s])[0] for s in images]
    if fidelity is None or any(s.name not in fidelity.images for s in samples):
        fidelity = compare(original, optimized, samples, adapter=adapter)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference, candidate = adapter.predictor(original), adapter.predictor(optimized)
    paths = []
    for sample in samples:
        with torch.inference_mode():
            masks_ref, masks_new = _box_masks(reference, sample), _box_masks(candidate, sample)
        diff, lost, gained = _disagreement(sample.image, masks_ref, masks_new)
        panels = [("original", _overlay(sample.image, masks_ref), _boxes(sample)),
                  ("optimized", _overlay(sample.image, masks_new), _boxes(sample)),
                  ("disagreement (blue: original only, red: optimized only)", diff, [])]
        pair = None
        if everything:
            config = everything_config or EverythingConfig()
            pair = tuple(MaskGenerator(model, config, adapter).generate(sample.image, "hierarchical")
                         for model in (original, optimized))
            panels += [(f"original, everything: {_masks(len(pair[0]))}", _overlay(sample.image, list(pair[0].masks())), []),
                       (f"optimized, everything: {_masks(len(pair[1]))}", _overlay(sample.image, list(pair[1].masks())), []),
                       ("image", sample.image.astype(np.float32) / 255.0, [])]
        rows = len(panels) // 3
        h, w = sample.image.shape[:2]
        width, title_in, caption_in = 15.0, 0.3, 0.75
        panel_h = 0.98 * width / 3.04 * h / w  # three panels across 98% of the width, 2% apart
        height = rows * (panel_h + title_in) + caption_in
        fig = Figure(figsize=(width, height), dpi=110)
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(rows, 3, left=0.01, right=0.99, top=1 - title_in / height,
                                bottom=caption_in / height, wspace=0.02, hspace=title_in / panel_h)
        for index, (title, picture, boxes) in enumerate(panels):
            ax = fig.add_subplot(grid[index // 3, index % 3])
            ax.imshow(picture, interpolation="nearest")
            for x0, y0, x1, y1 in boxes:
                ax.add_patch(_rectangle(x0, y0, x1, y1))
            ax.set_title(title, fontsize=10)
            ax.set_axis_off()
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(_caption(sample, fidelity, lost, gained, pair), 175)),
                 fontsize=8.5, va="bottom", ha="left", family="monospace")
        path = out_dir / f"compare_{Path(sample.name).stem}.png"  # a user's image is named by its path
        fig.savefig(path)
        paths.append(path)
    return paths


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=0.8)


def draw_everything(image: np.ndarray, result: EverythingResult, path: str | Path, title: str | None = None) -> Path:
    """Write the image with every mask of ``result`` filled in its own colour,
    beside the image itself."""
    Figure, FigureCanvasAgg = _matplotlib()
    h, w = image.shape[:2]
    fig = Figure(figsize=(10.0, 5.0 * h / w + 0.6), dpi=110)
    FigureCanvasAgg(fig)
    for index, (label, picture) in enumerate((("image", image.astype(np.float32) / 255.0),
                                              (title or result.summary(), _overlay(image, list(result.masks()))))):
        ax = fig.add_subplot(1, 2, index + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label, 70)), fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def speed_fidelity_points(rows: Iterable[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """``(label, speed-up, fidelity)`` of the benchmark rows that have both.

    Speed-up is ``speedup`` (segment-everything rows) or ``encoder_speedup``
    (pass rows); fidelity is ``fidelity.mask_iou_mean``, the mask IoU against
    the reference (the original model, or the grid for everything rows).
    """
    points = []
    for row in rows:
        speed = row.get("speedup", row.get("encoder_speedup"))
        fidelity = (row.get("fidelity") or {}).get("mask_iou_mean")
        if speed is not None and fidelity is not None and np.isfinite(fidelity):
            points.append((str(row.get("case", "?")), float(speed), float(fidelity)))
    return points


def speed_fidelity_plot(rows: Iterable[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Scatter speed-up against mask IoU vs the reference, one labelled point per row.

    Raises:
        ValueError: no row has both a speed-up and a fidelity figure.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    points = speed_fidelity_points(rows)
    if not points:
        raise ValueError("no benchmark row has both a speed-up and a fidelity figure (mask_iou_mean)")
    fig = Figure(figsize=(8.0, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    speeds = [p[1] for p in points]
    fidelities = [p[2] for p in points]
    colors = _colors(len(points))
    ax.axvline(1.0, color="0.6", linewidth=0.8, linestyle="--")
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
    for (label, speed, fid), color in zip(points, colors):
        # A legend rather than labels at the points: nearby points would overprint them.
        ax.scatter([speed], [fid], s=60, color=color, edgecolor="black", linewidth=0.6, zorder=3,
                   label=f"{label}: {speed:.2f}x, IoU {fid:.4f}")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    low = min(fidelities)
    ax.set_ylim(min(low - 0.02, 0.95 * low + 0.05 * 1.0), 1.005 + 0.05 * (1.0 - low))
    ax.set_xlim(0, max(max(speeds) * 1.25, 1.5))
    ax.set_xlabel("speed-up vs reference (x, measured side by side in one run)")
    ax.set_ylabel("mask IoU vs reference")
    ax.set_title(title or "speed against fidelity", fontsize=10)
    ax.grid(True, linewidth=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
