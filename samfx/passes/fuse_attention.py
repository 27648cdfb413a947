"""``fuse_attention``: attention cores become one fused call.

An attention core is ``softmax(f * (q @ k^T) + bias) @ v`` however upstream
spells it: SAM's ``(q * scale) @ k.transpose(-2, -1)`` plus decomposed relative
positions broadcast onto a ``(B, qh, qw, kh, kw)`` view, TinyViT's
``(q @ k^T) * scale + ab``, the mask decoders' ``q @ k.permute(...) /
sqrt(c)``, Hugging Face's eager attention (``softmax(..., dtype=float32).to(...)``,
inactive dropout) or its SDPA call with the decomposed bias materialised as the
mask. The matcher walks from each ``softmax`` (or ``scaled_dot_product_attention``)
back through views, scalar factors and bias additions to the ``q @ k^T``
matmul, and classifies each added bias by its shape:

* a term broadcast along the key columns (``(..., qh, qw, kh, 1)``) or rows
  (``(..., qh, qw, 1, kw)``) of a ``(qh, qw, kh, kw)`` view of the scores is a
  decomposed relative position: the core becomes ``samfx::rel_pos_attention``,
  which adds them block by block and never builds the ``(N, N)`` scores
  (``rel_pos="mask"`` instead gives SDPA the materialised bias, as
  segment-anything-fast's first step did);
* any other term that broadcasts onto the scores is an additive mask for
  ``torch.nn.functional.scaled_dot_product_attention``.

The rewrite is exact up to float rounding. SAM 2's Hiera and the Hugging Face
decoder already call SDPA without a bias; they are reported, not changed.

The matcher and the rewrite are :mod:`samfx.graph.attention`'s, shared with
the ``samfx`` torch.compile backend.

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> fast = samfx.optimize(sam, ["fuse_attention"])
    >>> print(fast.samfx_report.passes[0].summary)
    image_encoder: 2 rel_pos_attention; mask_decoder: 7 sdpa
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..capture import CapturedModel
from ..graph import REL_POS_MODES, AttentionMatch, NoMatch, match_attention, module_path, op_name, replace_attention_core
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass

__all__ = ["FuseAttentionConfig", "fuse_attention"]

SITE_KINDS = ("sam_vit", "hf_vit", "hiera", "tinyvit", "rope", "decoder")


@dataclass(frozen=True)
class FuseAttentionConfig(PassConfig):
    """Options of :func:`fuse_attention`.

    Attributes:
        rel_pos: decomposed relative positions go to ``samfx::rel_pos_attention``
            (``"blockwise"``: the bias is added per block, memory stays linear in
            tokens) or to SDPA with the bias materialised as a mask (``"mask"``).
        kinds: rewrite only attention sites of these kinds (``sam_vit``,
            ``hf_vit``, ``hiera``, ``tinyvit``, ``rope``, ``decoder``); empty: all.
    """

    rel_pos: str = "blockwise"
    kinds: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.rel_pos not in REL_POS_MODES:
            raise PassError(f"fuse_attention: rel_pos must be one of {REL_POS_MODES}, got {self.rel_pos!r}")
        unknown = set(self.kinds) - set(SITE_KINDS)
        if unknown:
            raise PassError(f"fuse_attention: unknown attention kinds {sorted(unknown)}; kinds are {SITE_KINDS}")


# -- the pass -------------------------------------------------------------------


@register_pass("fuse_attention", FuseAttentionConfig, exact=True)
def fuse_attention(captured: CapturedModel, config: FuseAttentionConfig, context: PassContext) -> PassResult:
    """Attention cores -> SDPA / blockwise rel-pos attention (exact; segment-anything-fast)."""
    counts: dict[str, dict[str, int]] = {}
    skipped: list[str] = []
    for role, component in captured.components.items():
        sites = [s for s in captured.adapter.attention_sites(component.root)
                 if not config.kinds or s.kind in config.kinds]
        if not sites:
            continue
        component.propagate_shapes()
        by_path = {s.path: s for s in sites}
        # Plan every site in every graph first: a site is rewritten everywhere or nowhere.
        plans: dict[str, list[tuple[fx.Graph, AttentionMatch]]] = {s.path: [] for s in sites}
        failed: dict[str, str] = {}
        for key, graph in component.graphs.items():
            for node in graph.nodes:
                path = module_path(node)
                if path not in by_path or op_name(node) not in ("softmax", "sdpa"):
                    continue
                try:
                    plans[path].append((graph, match_attention(node)))
                except NoMatch as why:
                    failed.setdefault(path, f"{why} (at {node.name})")
        tally = counts.setdefault(role, {})
        for site in sites:
            if site.path in failed:
                skipped.append(f"{role}: {site.path} ({site.kind}) left as is: {failed[site.path]}")
                continue
            if not plans[site.path]:
                skipped.append(f"{role}: {site.path} ({site.kind}): no softmax or SDPA found")
                continue
            todo = [(g, m) for g, m in plans[site.path] if not m.fused]
            if not todo:
                tally["already sdpa"] = tally.get("already sdpa", 0) + 1
                continue
            for graph, match in todo:
                replace_attention_core(graph, match, config.rel_pos)
            kind = "sdpa" if not todo[0][1].rel_pos else (
                "rel_pos_attention" if config.rel_pos == "blockwise" else "sdpa + rel-pos mask")
            tally[kind] = tally.get(kind, 0) + 1
        component.recompile()
    changed = any(n for t in counts.values() for k, n in t.items() if k != "already sdpa")
    summary = "; ".join(
        f"{role}: " + ", ".join(f"{n} {kind}" for kind, n in tally.items()) for role, tally in counts.items() if tally
    ) or "no attention found"
    report = PassReport(changed, summary, {"attentions": counts}, skipped)
    return PassResult(captured, report)
