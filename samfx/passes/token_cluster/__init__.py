"""``token_cluster``: Expedit-SAM's training-free token clustering and reconstruction.

Windowed ViT encoders (SAM ViT-B/L/H, SAM-HQ, Hugging Face ``SamModel``,
SAM 2's Hiera stages) run every block on the full token map. Expedit-SAM
clusters the tokens of each window into a small grid before block
``location``, runs the remaining blocks on the cluster map, and rebuilds the
full map once at the end (see :mod:`samfx.kernels.token_cluster` for the ops).
This pass does it on the captured graph:

* a ``token_cluster`` node goes before the block at ``location`` and replaces
  the map that block reads;
* every later windowed block of the stage splits the cluster map into windows
  of the cluster grid (each new window is one old window); global blocks
  attend over the whole cluster map; SAM's relative-position tables are
  interpolated to the new sizes by the model's own ``get_rel_pos``, which is
  given the sizes the graph now computes;
* every use of the map outside the clustered blocks (the neck, SAM-HQ's early
  features, the next Hiera stage) reads a ``token_reconstruct`` node instead.

Where the clusters go comes from the adapter (:meth:`Adapter.token_stages`,
:meth:`Adapter.window_call`); nothing here depends on a model class. Families
without a plain-ViT stage (TinyViT, whose blocks bake the map size into their
code) are a reported skip.

With ``location=None`` the pass tunes: it tries locations and cluster counts on
calibration images and keeps the cheapest setting whose masks stay within a
mask-IoU floor of the unclustered model's (:func:`tune`).

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> fast = samfx.optimize(sam, [samfx.TokenClusterConfig(location=1, clusters=4)], min_box_iou=None)
    >>> print(fast.samfx_report.passes[0].summary)
    image_encoder: 8x8 tokens -> 4x4 clusters before block 1 (2x2 per 4x4 window)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...capture import CapturedModel
from ..base import PassContext, PassReport, PassResult, register_pass
from .rewrite import TokenClusterConfig, _apply, _setting, _summary, cluster_grid
from .tune import Candidate, TuneResult, tune

__all__ = ["Candidate", "TokenClusterConfig", "TuneResult", "cluster_grid", "token_cluster", "tune", "weaker"]


def weaker(config: TokenClusterConfig) -> TokenClusterConfig | None:
    """The fidelity floor's back-off: fewer tokens clustered. A tuned config
    raises its tuning floor halfway to 1 (0.9 -> 0.95 -> 0.975 -> 0.9875;
    ``None`` beyond 0.99); a given setting keeps one more row and column of
    clusters per window (a grid as large as the window clusters nothing, and
    the back-off ends there).

    Example::

        >>> weaker(TokenClusterConfig()).floor, weaker(TokenClusterConfig(location=2, clusters=81)).clusters
        (0.95, (10, 10))
    """
    if config.location is None:
        floor = round(1 - (1 - config.floor) / 2, 6)
        return dataclasses.replace(config, floor=floor) if floor <= 0.99 else None
    rows, cols = cluster_grid(config.clusters)
    return dataclasses.replace(config, clusters=(rows + 1, cols + 1))


@register_pass("token_cluster", TokenClusterConfig, data_driven=True, backoff=weaker)
def token_cluster(captured: CapturedModel, config: TokenClusterConfig, context: PassContext) -> PassResult:
    """Cluster encoder tokens mid-way and rebuild them before the neck (Expedit-SAM)."""
    tuning: dict[str, Any] | None = None
    if context.replay:
        location, clusters = context.replay["location"], tuple(context.replay["clusters"])
    elif config.location is None:
        result = tune(captured, config, context.calibration_images or None, progress=context.progress)
        tuning = result.to_dict()
        if result.chosen is None:
            curve = result.curve()
            reason = (f"no setting tried reached a mask IoU of {config.floor} against the unclustered model "
                      f"(best {max(c.mask_iou for c in curve):.4f})" if curve else
                      f"no setting could be tried: {result.candidates[0].note if result.candidates else 'none'}")
            report = PassReport(False, "nothing clustered", {"tuning": tuning},
                                [reason])
            return PassResult(captured, report)
        location, clusters = result.chosen.location, result.chosen.clusters
    else:
        location, clusters = config.location, config.clusters
    setting = _setting(config, location, clusters)
    details, skipped = _apply(captured, setting)
    if tuning is not None:
        details["tuning"] = tuning
    changed = any(role != "tuning" for role in details)
    summary = _summary({r: d for r, d in details.items() if r != "tuning"}, setting) if changed else "nothing clustered"
    replay = {"location": setting.location, "clusters": list(setting.grid)} if changed else {}
    report = PassReport(changed, summary, details, skipped, replay)
    return PassResult(captured, report)
