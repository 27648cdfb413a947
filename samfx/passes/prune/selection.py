"""Which channels each ``prune`` group keeps (Torch-Pruning's ``pruner`` seam):
per-group ratios (or an override's), optionally pooled across a kind (global
ranking on z-normalised scores), heads before the dims every kept head keeps.

Example::

    >>> from samfx.passes.prune.selection import keep_count
    >>> keep_count(64, 0.5), keep_count(3, 0.9)
    (32, 1)
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import torch

from .depgraph import Group

if TYPE_CHECKING:
    from . import PruneConfig

__all__ = ["Edit", "edits_of", "keep_count", "select_attention", "select_channels"]

# An edit removes indices along one dimension of a layer ("out"/"in") or of a
# parameter (its dimension number): (target path, dimension, removed indices).
Edit = tuple[str, Any, list[int]]


def keep_count(total: int, ratio: float) -> int:
    """How many of ``total`` units (channels, heads, dims) a ratio keeps: at least one."""
    return max(1, min(int(total * (1.0 - ratio) + 1e-9), total))


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest scores, ascending (ties: lower index first)."""
    order = torch.argsort(-scores, stable=True)
    return sorted(order[:count].tolist())


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0)
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def _round_down(count: int, total: int, multiple: int) -> int:
    if multiple <= 1 or count >= total:
        return count
    return max(count - count % multiple, min(multiple, total))


def _ratio(config: PruneConfig, kind: str, name: str) -> tuple[float, bool]:
    """The ratio of group ``kind:name`` and whether an override set it."""
    for pattern, ratio in config.overrides:
        if fnmatch.fnmatchcase(f"{kind}:{name}", pattern):
            return float(ratio), True
    return getattr(config, kind), False


def _kept_counts(config: PruneConfig, kind: str, names: list[str], scores: list[torch.Tensor]) -> list[int]:
    """How many units (one score each) every group of ``kind`` keeps.

    Each group keeps its ratio's share (an override's, if one matches its name).
    With global ranking, the groups without an override keep together the sum
    of their shares, taken where their z-normalised scores are highest, each at
    least one.
    """
    ratios = [_ratio(config, kind, name) for name in names]
    counts = [keep_count(len(s), r) for s, (r, _) in zip(scores, ratios)]
    pooled = [i for i, (_, overridden) in enumerate(ratios) if config.global_ranking and not overridden]
    if len(pooled) < 2:
        return counts
    z = torch.cat([_zscore(scores[i]) for i in pooled])
    owner = torch.cat([torch.full((len(scores[i]),), i) for i in pooled])
    chosen = owner[torch.argsort(-z, stable=True)[: sum(counts[i] for i in pooled)]]
    for i in pooled:
        counts[i] = max(1, min(len(scores[i]), int((chosen == i).sum())))
    return counts


def select_channels(groups: list[Group], config: PruneConfig, kind: str) -> None:
    """Kept channels of ``mlp`` or ``embed`` groups, widths rounded to ``round_to``."""
    counts = _kept_counts(config, kind, [g.name for g in groups], [g.scores for g in groups])
    for group, count in zip(groups, counts):
        group.kept = _top(group.scores, _round_down(count, group.width, config.round_to))


def select_attention(groups: list[Group], config: PruneConfig) -> None:
    """Whole heads first (score: mean over the head's channels), then the dims
    every kept head keeps (score: mean over kept heads)."""
    names = [g.name for g in groups]
    per_head = [g.scores.view(g.heads, g.head_dim) for g in groups]
    head_scores = [s.mean(1) for s in per_head]
    kept_heads = [_top(s, n) for s, n in zip(head_scores, _kept_counts(config, "heads", names, head_scores))]
    dim_scores = [s[h].mean(0) for s, h in zip(per_head, kept_heads)]
    dim_counts = _kept_counts(config, "head_dims", names, dim_scores)
    for group, heads, scores, dims in zip(groups, kept_heads, dim_scores, dim_counts):
        if dims < group.head_dim:  # round the q/k/v width, heads * dims
            while dims > 1 and (len(heads) * dims) % config.round_to:
                dims -= 1
        kept_dims = _top(scores, dims)
        group.kept = [h * group.head_dim + d for h in heads for d in kept_dims]


def edits_of(groups: list[Group]) -> list[Edit]:
    """What to remove from each layer and parameter, from the kept root channels."""
    edits = []
    for group in groups:
        if group.kept is None or len(group.kept) == group.width:
            continue
        kept = set(group.kept)
        for item in group.items:
            removed = sorted({index for index, root in item.index_roots if root not in kept})
            if removed:
                edits.append((item.target, item.dim, removed))
    return edits
