"""``token_cluster``'s tuner: the location and cluster count for a mask-IoU floor.

Every setting gets a predicted speed-up from its encoder MACs (counted on fake
tensors); settings are then run on images, fastest first, against the
unclustered model, until one reaches the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from ...capture import CapturedModel, capture
from ...graph import module_paths
from ..base import PassError
from .rewrite import TokenClusterConfig, _apply, _Setting, _setting, _stage_window, _Unsupported

__all__ = ["Candidate", "TuneResult", "tune"]


@dataclass
class Candidate:
    """One setting the tuner looked at.

    Attributes:
        location, clusters: the setting.
        macs_ratio: encoder MACs of the original over the setting's (the
            predicted speed-up; attention matmuls included).
        mask_iou: mean mask IoU against the unclustered model on the images,
            ``None`` when the tuner did not run it.
        mask_iou_min: the worst prompt's mask IoU.
        embedding_cosine: mean cosine of the image embeddings.
        encoder_s: median seconds of the setting's ``set_image`` during the
            fidelity run (single runs per image, not a benchmark).
        note: why it was not run.
    """

    location: int
    clusters: tuple[int, int]
    macs_ratio: float
    mask_iou: float | None = None
    mask_iou_min: float | None = None
    embedding_cosine: float | None = None
    encoder_s: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, clusters=list(self.clusters))


@dataclass
class TuneResult:
    """What :func:`tune` measured and chose.

    Attributes:
        floor: the mask-IoU floor asked for.
        chosen: the fastest setting that met it, or ``None``.
        candidates: every setting considered, fastest first.
        images: the images the fidelity was measured on.
        original_encoder_s: median ``set_image`` seconds of the unclustered model.
    """

    floor: float
    chosen: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    original_encoder_s: float | None = None

    def curve(self) -> list[Candidate]:
        """The settings that were run, fastest first: the speed/fidelity curve."""
        return [c for c in self.candidates if c.mask_iou is not None]

    def table(self) -> str:
        lines = [f"{'location':>8} {'clusters':>9} {'MACs x':>7} {'mask IoU':>9} {'worst':>7} {'cosine':>8} "
                 f"{'enc s':>7}"]
        for c in self.curve():
            mark = "  <- chosen" if c is self.chosen else ""
            lines.append(f"{c.location:>8} {c.clusters[0]:>4}x{c.clusters[1]:<4} {c.macs_ratio:>7.2f} "
                         f"{c.mask_iou:>9.4f} {c.mask_iou_min:>7.4f} {c.embedding_cosine:>8.5f} "
                         f"{c.encoder_s:>7.2f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "chosen": self.chosen.to_dict() if self.chosen else None,
                "candidates": [c.to_dict() for c in self.candidates], "images": self.images,
                "original_encoder_s": self.original_encoder_s}


def _block_of(paths: Sequence[str]) -> Any:
    """Names a node by the block it belongs to ("" outside ``paths``)."""
    wanted = set(paths)

    def group(node: fx.Node) -> str:
        return next(iter(set(module_paths(node)) & wanted), "")

    return group


def _candidate_model(captured: CapturedModel, setting: _Setting) -> CapturedModel:
    trial = capture(captured.model, adapter=captured.adapter)
    details, skipped = _apply(trial, setting)
    if not details:
        raise _Unsupported("; ".join(skipped))
    return trial


def _predicted_speedups(captured: CapturedModel, stages: Sequence[Any], config: TokenClusterConfig,
                        locations: Sequence[int]) -> list[Candidate]:
    """Encoder MACs of every setting, from one count per stage and cluster grid.

    A block's MACs depend only on whether it runs on clusters, so the cost of
    clustering before block ``L`` is the original's, minus what each block
    from ``L`` on saves when it runs on clusters, plus the two ops.
    """
    from ...stats import graph_macs

    paths = [p for s in stages for p in s.blocks]
    group = _block_of(paths)
    base = graph_macs(captured.component("image_encoder"), group)
    total = sum(base.values())
    candidates = []
    for stage in stages:
        wanted = [i for i in stage.indices if i in locations]
        if not wanted:
            continue
        try:
            window = _stage_window(stage.windows, stage.blocks[0])
        except _Unsupported as why:
            candidates += [Candidate(i, (0, 0), 1.0, note=f"cannot cluster: {why}") for i in wanted]
            continue
        # By default every square grid from half the window's side to one short of it.
        counts = config.cluster_choices or tuple(side * side for side in range((window + 1) // 2, window))
        for clusters in sorted(set(counts)):
            setting = _setting(config, stage.indices[0], clusters)
            try:
                trial = _candidate_model(captured, setting)
            except _Unsupported as why:
                candidates += [Candidate(i, setting.grid, 1.0, note=f"cannot cluster: {why}") for i in wanted]
                continue
            clustered = graph_macs(trial.component("image_encoder"), group)
            overhead = clustered.get("", 0) - base.get("", 0)
            for location in wanted:
                start = stage.indices.index(location)
                saved = sum(base.get(p, 0) - clustered.get(p, 0) for p in stage.blocks[start:])
                candidates.append(Candidate(location, setting.grid, total / (total - saved + overhead)))
    return candidates


def tune(
    model: torch.nn.Module | CapturedModel,
    config: TokenClusterConfig = TokenClusterConfig(),
    images: Sequence[Any] | None = None,
    progress: bool = False,
) -> TuneResult:
    """Choose the location and cluster count for a mask-IoU floor, on images.

    Every setting ``(location, clusters)`` from ``config.locations`` (all
    valid ones if empty) and ``config.cluster_choices`` gets a predicted
    speed-up from its encoder MACs, counted on fake tensors. Settings are then
    run on the images, fastest first, and compared with the unclustered model
    by :func:`samfx.fidelity.compare` (points and boxes); the first one whose
    mean mask IoU reaches ``config.floor`` is chosen. Fidelity only grows
    with a later location and with more clusters, so a setting that fails
    rules out every setting that is earlier with no more clusters, and those
    are not run.

    Args:
        model: a SAM-family model, or a captured one (as a pass sees it).
        config: the tuning options (floor, choices, images, budget) and the
            clustering options every setting shares.
        images: package image names, :class:`samfx.data.ImageSample` objects
            or ``H x W x 3`` uint8 arrays (prompts are then placed on large
            regions); default ``config.images``.
        progress: show progress bars.

    Returns:
        A :class:`TuneResult`; ``chosen`` is ``None`` if nothing met the floor.

    Example::

        >>> import samfx
        >>> sam = samfx.models.build("lite_medsam")
        >>> result = samfx.passes.tune_token_cluster(sam, samfx.TokenClusterConfig(floor=0.9))  # doctest: +SKIP
        >>> print(result.table())                                    # doctest: +SKIP
    """
    from ...data import calibration_sample, package_images
    from ...fidelity import CachedPredictor, compare

    captured = model if isinstance(model, CapturedModel) else capture(model)
    adapter = captured.adapter
    stages = adapter.token_stages(captured.component("image_encoder").root)
    if not stages:
        raise PassError("token_cluster: cannot tune, the image encoder has no stage of blocks over one token map")
    valid = [i for s in stages for i in s.indices]
    locations = list(config.locations or valid)
    bad = sorted(set(locations) - set(valid))
    if bad:
        raise PassError(f"token_cluster: locations {bad} cannot take clusters; valid: {valid}")
    samples = []
    for item in (config.images if images is None else images):
        if isinstance(item, np.ndarray):
            samples.append(calibration_sample(item, f"calibration {len(samples)}"))
        elif isinstance(item, str):
            samples += package_images([item])
        else:
            samples.append(item)

    candidates = _predicted_speedups(captured, stages, config, locations)
    candidates.sort(key=lambda c: (-c.macs_ratio, -c.location))
    reference = CachedPredictor(adapter.predictor(captured.model))
    result = TuneResult(config.floor, None, candidates, [s.name for s in samples])
    failed: list[Candidate] = []
    runs = 0
    for candidate in candidates:
        if candidate.note:
            continue
        if any(candidate.location <= f.location and math.prod(candidate.clusters) <= math.prod(f.clusters)
               for f in failed):
            candidate.note = "not run: an equally early setting with as many clusters missed the floor"
            continue
        if runs == config.max_evaluations:
            candidate.note = f"not run: the budget of {config.max_evaluations} evaluations was spent"
            continue
        trial = _candidate_model(captured, _setting(config, candidate.location, candidate.clusters))
        report = compare(reference, trial.model, samples, adapter=adapter, progress=progress)
        runs += 1
        candidate.mask_iou, candidate.mask_iou_min = report.mask_iou_mean, report.mask_iou_min
        candidate.embedding_cosine = report.embedding_cosine_mean
        candidate.encoder_s = report.set_image_s_optimized
        result.original_encoder_s = report.set_image_s_original
        if candidate.mask_iou >= config.floor:
            result.chosen = candidate
            break
        failed.append(candidate)
    return result
