"""``prune``: structural pruning of SAM-family image encoders (DepGraph, SlimSAM).

Which layers must lose the same channels is decided by torch-pruning's
dependency graph (DepGraph); samfx decides how many channels each group keeps
and makes the rest of the model agree, so there is nothing left to patch:

* **groups**: feed-forward hidden channels (``mlp``: MLP hidden layers and
  TinyViT's MBConv expansions), attention (``heads``: whole heads;
  ``head_dims``: the same q/k/v dims removed from every head, as SlimSAM does)
  and the residual width of each stage (``embed``: patch embedding, position
  embeddings, norms, the inputs of q/k/v/MLP/neck and the outputs of the
  projections that write into the stream).
* **importance**: ``magnitude`` (L2 norm of the group's weights, data-free),
  ``taylor`` (|w * dL/dw| with L the image embedding's energy),
  ``disturbed_taylor`` (SlimSAM: L = MSE(embedding, embedding.detach() + N(0,
  sigma^2)), without which the gradient would be zero) or ``fluctuation``
  (FLAP: the variance of each channel where a layer reads it, times the squared
  norm of the weights reading it: the error its removal leaves once its mean is
  compensated), on unlabeled calibration images. Ratios apply per group, or
  with ``global_ranking`` to a whole kind at once (scores z-normalised per
  group, as SlimSAM does).
* **compensation**: with calibration images, the mean of every removed input
  channel is folded into the bias of the layer that read it (FLAP). Trained
  SAM encoders have hidden channels that are nearly constant, with large means
  and small weights; removing them without this shifts every later feature.
* **consistency**: the relative-position tables keep the head dims their
  heads keep (sliced, not re-initialised); head counts, head widths and the
  other width attributes are updated by the family adapter; every graph literal
  read from a changed attribute (``self.num_heads`` in a reshape, ``B *
  num_heads``, ``self.dh``) is rewritten; attention logits keep their original
  scale (an explicit ``scale=`` on ``scaled_dot_product_attention`` calls that
  relied on the implicit ``1/sqrt(head_dim)``), so the kept weights see the
  logits they were trained with.

Two things torch-pruning cannot do on these models are done around it: the
decomposed relative-position einsum makes its grouping loop forever (issue
VainF/Torch-Pruning#337), so the dependency graph is built on a copy of the
graph whose relative-position terms are detached; and its tracing runs the
model, so it runs on the meta device (free even for SAM ViT-H at 1024 px).

Replay: the pass records, per layer or parameter, the indices it removed; a
later :func:`samfx.load` re-applies them without data or tracing.

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> slim = samfx.optimize(sam, [samfx.PruneConfig(mlp=0.5, head_dims=0.5)], min_box_iou=None)  # random weights
    >>> slim.image_encoder.blocks[0].mlp.lin1.out_features, slim.image_encoder.blocks[0].attn.q.out_features
    (128, 32)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ...adapters.base import AttentionSite
from ...capture import CapturedModel, Component
from ..base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass
from .apply import add_deltas, apply_edits, compensation, decode_replay, encode_replay
from .depgraph import DependencyAnalysis, Group, attention_projections, index_maps_frozen
from .importance import IMPORTANCES, accumulate_gradients, get_importance, input_statistics
from .selection import Edit, edits_of, select_attention, select_channels

__all__ = ["IMPORTANCES", "PruneConfig", "decode_replay", "prune", "weaker"]

_KINDS = ("mlp", "heads", "head_dims", "embed")


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """Options of :func:`prune`. Ratios are the fraction of a group removed.

    Attributes:
        mlp: feed-forward hidden channels (MLP hidden layers, MBConv expansions).
        heads: whole attention heads.
        head_dims: q/k/v dims removed from every head alike (SlimSAM).
        embed: the residual width of each stage.
        importance: ``magnitude`` (data-free), ``taylor``, ``disturbed_taylor``
            or ``fluctuation`` (on the ``calibration_images`` of the optimize call).
        compensate: with calibration images, add the mean of every removed
            input channel, times its weights, to the bias of the layer that
            read it (FLAP's bias compensation); without images, nothing.
        global_ranking: rank all groups of a kind together (scores z-normalised
            per group) instead of pruning every group by the same ratio.
        round_to: kept widths are multiples of this (8 or 16 suit GEMM kernels);
            for attention, the q/k/v width ``heads * head_dim``.
        overrides: ``(pattern, ratio)`` pairs; a group whose name matches the
            glob pattern gets that ratio (names: ``mlp:<layer>``,
            ``heads:<attention>``, ``head_dims:<attention>``, ``embed:<layer>``,
            listed in the report).
        calibration_images: at most this many calibration images for the
            gradient-based importances.
        noise: the standard deviation of the disturbance (``disturbed_taylor``).
    """

    mlp: float = 0.5
    heads: float = 0.0
    head_dims: float = 0.0
    embed: float = 0.0
    importance: str = "magnitude"
    compensate: bool = True
    global_ranking: bool = False
    round_to: int = 1
    overrides: tuple[tuple[str, float], ...] = ()
    calibration_images: int = 8
    noise: float = 0.01

    def validate(self) -> None:
        if any(len(o) != 2 or not isinstance(o[0], str) for o in self.overrides):
            raise PassError(f"prune: overrides are (pattern, ratio) pairs, got {self.overrides!r}")
        ratios = {kind: getattr(self, kind) for kind in _KINDS}
        ratios.update({f"override {p!r}": r for p, r in self.overrides})
        for what, ratio in ratios.items():
            if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
                raise PassError(f"prune: the {what} ratio must be in [0, 1), got {ratio!r}")
        if self.importance not in IMPORTANCES:
            raise PassError(f"prune: importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PassError(f"prune: round_to must be a positive integer, got {self.round_to!r}")
        if self.calibration_images < 1 or self.noise <= 0:
            raise PassError("prune: calibration_images must be >= 1 and noise > 0")

    def prunes_anything(self) -> bool:
        return any(getattr(self, kind) > 0 for kind in _KINDS) or any(r > 0 for _, r in self.overrides)


def _calibration_inputs(captured: CapturedModel, component: Component, config: PruneConfig,
                        context: PassContext, why: str) -> list[torch.Tensor]:
    """Encoder inputs made from the calibration images by the family's predictor."""
    images = context.calibration_set()[: config.calibration_images]
    if not images:
        raise PassError(f"prune: {why} needs calibration images "
                        "(optimize(..., calibration_images=[...]) or --images); importance='magnitude' needs none")
    if component.path == "" and len(captured.components) == 1:
        raise PassError(f"prune: {why} needs the whole model, whose predictor prepares images; "
                        "a bare image encoder can only use importance='magnitude' without compensation")
    predictor = captured.adapter.predictor(captured.model)
    return [predictor.encoder_input(image) for image in images]


def _analyse(captured: CapturedModel, component: Component, sites: list[AttentionSite], config: PruneConfig,
             context: PassContext, skipped: list[str]) -> tuple[list[Edit], list[Group], dict[str, torch.Tensor]]:
    """Groups, importance and the channels to keep, through torch-pruning; with
    compensation, the bias change of each layer that loses inputs."""
    root = component.root
    importance = get_importance(config.importance)
    statistics = None
    if importance.needs_data or (config.compensate and context.calibration_images):
        why = f"importance={config.importance!r}" if importance.needs_data else "compensation"
        inputs = _calibration_inputs(captured, component, config, context, why)
        if importance.loss is not None:
            accumulate_gradients(captured, component, inputs, importance, config.noise, context)
        if importance.statistics or config.compensate:
            statistics = input_statistics(component, inputs, context)
    analysis = DependencyAnalysis(captured, component, sites)
    candidates: list[Group] = []
    groups: list[Group] = []
    seeds: list[str] = []  # layers whose inputs are the residual stream
    with index_maps_frozen():
        if config.heads > 0 or config.head_dims > 0 or any(p.startswith("head") for p, _ in config.overrides):
            for site in sites:
                qkv = attention_projections(component, site)
                if qkv is None:
                    skipped.append(f"heads:{site.path}: q, k and v are fused (split_qkv left them so)")
                    continue
                seeds.append(qkv[0])
                if site.head_dim != site.value_dim:
                    skipped.append(f"heads:{site.path}: query width {site.head_dim} != value width {site.value_dim}")
                    continue
                group = analysis.group("attention", site.path, qkv[0], out=True, heads=site.num_heads)
                others = {i.target for i in group.items if i.dim == "out"} - set(qkv)
                if others and group.reason is None:
                    group.reason = f"q/k/v are coupled with {sorted(others)}"
                candidates.append(group)
        else:
            seeds += [qkv[0] for s in sites if (qkv := attention_projections(component, s))]
        hidden = captured.adapter.mlp_hidden_layers(root)
        if config.mlp > 0 or any(p.startswith("mlp") for p, _ in config.overrides):
            candidates += [analysis.group("mlp", layer, layer, out=True) for layer in hidden]
        seeds += hidden
        if config.embed > 0 or any(p.startswith("embed") for p, _ in config.overrides):
            covered: set[str] = set()
            for seed in seeds:
                if seed not in covered:
                    group = analysis.group("embed", None, seed, out=False)
                    covered |= {seed} | {i.target for i in group.items if i.dim == "in"}
                    candidates.append(group)
        for group in candidates:
            if group.reason is not None:
                skipped.append(f"{'heads' if group.kind == 'attention' else group.kind}:{group.name}: {group.reason}")
            else:
                groups.append(group)
        criterion = importance.build(statistics, analysis.dg._module2name)
        for group in groups:
            group.scores = analysis.scores(group, criterion)
    for p in root.parameters():
        p.grad = None
    by_kind: dict[str, list[Group]] = {}
    for group in groups:
        by_kind.setdefault(group.kind, []).append(group)
    for kind, members in by_kind.items():
        if kind == "attention":
            select_attention(members, config)
        else:
            select_channels(members, config, kind)
    edits = edits_of(groups)
    deltas = compensation(root, edits, statistics) if config.compensate and statistics else {}
    edits += [(target, "bias", []) for target in deltas if root.get_submodule(target).bias is None]
    return edits, groups, deltas


def _summary(groups: list[Group], attention: dict[str, Any]) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = {}
    for group in groups:
        if group.kind == "attention":
            continue
        entry = kinds.setdefault(group.kind, {"groups": 0, "channels": [0, 0]})
        entry["groups"] += 1
        entry["channels"][0] += group.width
        entry["channels"][1] += len(group.kept) if group.kept is not None else group.width
    if attention:
        kinds["attention"] = {
            "groups": len(attention),
            "heads": [sum(a["heads"][0] for a in attention.values()), sum(a["heads"][1] for a in attention.values())],
            "qkv_width": [sum(a["heads"][0] * a["head_dim"][0] for a in attention.values()),
                          sum(a["heads"][1] * a["head_dim"][1] for a in attention.values())],
        }
    return kinds


def weaker(config: PruneConfig) -> PruneConfig | None:
    """The fidelity floor's back-off: every ratio halved; ``None`` once the
    largest would fall below 5%.

    Example::

        >>> weaker(PruneConfig(mlp=0.5, heads=0.25)).mlp, weaker(PruneConfig(mlp=0.08))
        (0.25, None)
    """
    ratios = {kind: round(getattr(config, kind) / 2, 4) for kind in _KINDS}
    overrides = tuple((pattern, round(ratio / 2, 4)) for pattern, ratio in config.overrides)
    if max([*ratios.values(), *(r for _, r in overrides)]) < 0.05:
        return None
    return dataclasses.replace(config, **ratios, overrides=overrides)


@register_pass("prune", PruneConfig, requires=("split_qkv",), data_driven=True, backoff=weaker)
def prune(captured: CapturedModel, config: PruneConfig, context: PassContext) -> PassResult:
    """Structural pruning of image-encoder widths (DepGraph via torch-pruning; SlimSAM)."""
    skipped: list[str] = []
    details: dict[str, Any] = {"importance": config.importance,
                               "compensation": config.compensate and bool(context.calibration_images)}
    replay: dict[str, Any] = {}
    summaries = []
    for role, component in captured.components.items():
        if role != "image_encoder":
            continue
        sites = [s for s in captured.adapter.attention_sites(component.root) if s.kind != "decoder"]
        if not sites and not captured.adapter.mlp_hidden_layers(component.root):
            skipped.append(f"{role}: {captured.adapter.name} declares no MLP layers or attention heads in it "
                           "(a convolutional backbone): nothing to prune")
            continue
        if context.replay is not None:
            if role not in context.replay:
                continue
            edits, groups, deltas = decode_replay(context.replay[role], role), [], {}
        elif config.prunes_anything():
            edits, groups, deltas = _analyse(captured, component, sites, config, context, skipped)
        else:
            continue
        if not edits:
            continue
        applied = apply_edits(captured, component, sites, edits)
        add_deltas(component.root, deltas, edits)
        applied["compensated_layers"] = len(deltas)
        kinds = _summary(groups, applied["attention"])
        details[role] = {"kinds": kinds, "layers_edited": len({t for t, _, _ in edits}), **applied,
                         "groups": {f"{'heads' if g.kind == 'attention' else g.kind}:{g.name}":
                                    [g.width, len(g.kept) if g.kept is not None else g.width] for g in groups}}
        replay[role] = encode_replay(edits)
        parts = [f"{k} {v['channels'][0]} -> {v['channels'][1]} ch" for k, v in kinds.items() if "channels" in v]
        if "attention" in kinds:
            a = kinds["attention"]
            parts.append(f"attention q/k/v {a['qkv_width'][0]} -> {a['qkv_width'][1]} ({a['heads'][0]} -> {a['heads'][1]} heads)")
        summaries.append(f"{role}: " + (", ".join(parts) if parts else f"{len(edits)} edits replayed"))
    changed = bool(replay)
    summary = "; ".join(summaries) + f" ({config.importance})" if changed else "nothing pruned"
    return PassResult(captured, PassReport(changed, summary, details, skipped, replay))
