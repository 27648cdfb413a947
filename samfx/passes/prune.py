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
    >>> slim = samfx.optimize(sam, [samfx.PruneConfig(mlp=0.5, head_dims=0.5)])
    >>> slim.image_encoder.blocks[0].mlp.lin1.out_features, slim.image_encoder.blocks[0].attn.q.out_features
    (128, 32)
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..adapters.base import AttentionSite
from ..capture import CapturedModel, Component, _compile_graph, literal_source, module_caches_kept
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass

__all__ = ["IMPORTANCES", "PruneConfig", "prune"]

IMPORTANCES = ("magnitude", "taylor", "disturbed_taylor", "fluctuation")
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


# An edit removes indices along one dimension of a layer ("out"/"in") or of a
# parameter (its dimension number): (target path, dimension, removed indices).
Edit = tuple[str, Any, list[int]]


# -- analysis through torch-pruning ---------------------------------------------------

@dataclass
class _Item:
    """One layer or parameter of a dependency group, with each of its indices'
    position in the group's root layer."""

    target: str
    dim: Any
    index_roots: list[tuple[int, int]]


@dataclass
class _Group:
    kind: str  # "mlp", "attention" or "embed"
    name: str
    items: list[_Item]
    width: int
    heads: int = 1
    tp_group: Any = None
    reason: str | None = None  # why samfx leaves the group alone
    scores: torch.Tensor | None = None
    kept: list[int] | None = None

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@contextlib.contextmanager
def _on_meta(root: nn.Module) -> Iterator[dict[int, str]]:
    """Parameters and buffers of ``root`` on the meta device for the duration
    (torch-pruning traces by running the model; on meta that costs nothing).

    Yields a map from the meta parameters' ids to their names.
    """
    saved: list[tuple[dict[str, Any], str, Any]] = []
    names: dict[int, str] = {}
    modes = {m: m.training for m in root.modules()}
    with module_caches_kept(root):  # sine position encodings memoise per size: no meta tensor may stay
        try:
            for path, module in root.named_modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None:
                            continue
                        saved.append((store, name, tensor))
                        meta = torch.empty_like(tensor, device="meta")
                        if store is module._parameters:
                            meta = nn.Parameter(meta, requires_grad=True)
                            names[id(meta)] = f"{path}.{name}" if path else name
                        store[name] = meta
            yield names
        finally:
            for store, name, tensor in saved:
                store[name] = tensor
            for module, mode in modes.items():  # torch-pruning calls eval(); set flags back without train() hooks
                module.training = mode


@contextlib.contextmanager
def _index_maps_frozen() -> Iterator[None]:
    """torch-pruning recomputes every index map of the graph on each group query
    (0.7 s per query on SAM ViT-H); shapes do not change between queries here."""
    from torch_pruning.dependency import graph as tp_graph

    update = tp_graph.index_mapping.update_index_mapping
    tp_graph.index_mapping.update_index_mapping = lambda dg: None
    try:
        yield
    finally:
        tp_graph.index_mapping.update_index_mapping = update


def _tensor_valued(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


class _NoShapes(Exception):
    """A node lacks the recorded value the analysis needs."""


def _cut_relative_positions(graph: fx.Graph, tables: set[str]) -> fx.Graph:
    """A copy of ``graph`` in which every term built from the relative-position
    tables is detached where it meets the attention (the einsum with q).

    Run on this copy, torch-pruning never walks into the decomposed rel-pos
    arithmetic, whose index maps make its grouping loop forever. samfx slices the
    tables itself, with the head dims q and k keep.
    """
    graph = copy.deepcopy(graph)
    tainted: set[fx.Node] = set()
    joins = []
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in tables:
            tainted.add(node)
            continue
        inputs = node.all_input_nodes
        if not any(i in tainted for i in inputs):
            continue
        if any("val" not in i.meta for i in inputs if i not in tainted):
            raise _NoShapes(node.name)
        if any(i not in tainted and _tensor_valued(i) for i in inputs):
            joins.append(node)
        else:
            tainted.add(node)
    for node in joins:
        with graph.inserting_after(node):
            detached = graph.call_method("detach", (node,))
        node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
    return graph


def _meta_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return fx.node.map_aggregate(args, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)


def _grad_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor a component returns (nested in tuples, lists, dicts) that
    depends on parameters: torch-pruning marks these channels as the output."""
    if isinstance(out, torch.Tensor):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _grad_outputs(item)]
    return []


class _Analysis:
    """torch-pruning's dependency graph of one captured component."""

    def __init__(self, captured: CapturedModel, component: Component, sites: list[AttentionSite]) -> None:
        import torch_pruning as tp

        self.tp = tp
        self.root = root = component.root
        self.order = {name: i for i, (name, _) in enumerate(root.named_modules())}
        key = next(iter(component.graphs))
        tables = {f"{s.path}.{t}" for s in sites for t in s.rel_pos_tables}
        try:
            graph = _cut_relative_positions(component.graphs[key], tables)
        except _NoShapes:  # nodes added since the last shape propagation
            component.propagate_shapes()
            graph = _cut_relative_positions(component.graphs[key], tables)
        forward = _compile_graph(graph, f"{component.role}[prune]")
        declared = captured.adapter.parameter_channel_dims(root)
        self.param_dims: dict[str, int] = {}
        with _on_meta(root) as param_names, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch-pruning warns about every op it treats as element-wise
            unwrapped = []
            layer_params = {id(p) for m in root.modules() if self._prunable_layer(m) for p in m.parameters(recurse=False)}
            for param in root.parameters():
                name = param_names[id(param)]
                if id(param) in layer_params:
                    continue
                if name in declared:
                    self.param_dims[name] = declared[name]
                elif param.dim() == 1:
                    self.param_dims[name] = 0
                else:
                    continue  # unknown layout: a group that reaches it is left alone
                unwrapped.append((param, self.param_dims[name]))
            self.outputs: set[Any] = set()

            def outputs(out: Any) -> list[torch.Tensor]:
                tensors = _grad_outputs(out)
                self.outputs.update(t.grad_fn for t in tensors)
                return tensors

            self.dg = tp.DependencyGraph().build_dependency(
                root,
                example_inputs=_meta_args(component.example_args(key)),
                forward_fn=lambda model, inputs: forward(model, *inputs),
                output_transform=outputs,
                unwrapped_parameters=unwrapped,
                verbose=False,
            )
            self.param_names = {p: param_names[id(p)] for p in self.dg._param_to_name}

    def _prunable_layer(self, module: nn.Module) -> bool:
        """A layer torch-pruning prunes itself (its parameters are not "unwrapped")."""
        return self.tp.ops.module2type(module) in self.tp.pruner.function.PrunerBox

    def group(self, kind: str, name: str | None, layer: str, out: bool, heads: int = 1) -> _Group:
        """The group that prunes ``layer``'s outputs (``out``) or inputs, with each
        index's root. It is named ``name``, or by the first layer that writes its
        channels; ``reason`` says why samfx must leave it alone, if it must."""
        module = self.root.get_submodule(layer)
        if module not in self.dg.module2node:
            return _Group(kind, name or layer, [], 0, reason=f"{layer} is not used by the traced graph")
        pruner = self.dg.get_pruner_of_module(module)
        width = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
        fn = pruner.prune_out_channels if out else pruner.prune_in_channels
        tp_group = self.dg.get_pruning_group(module, fn, list(range(width)))
        ops = self.tp.ops.OPTYPE
        items, reasons = [], []
        for item in tp_group:
            dep, target = item.dep, item.dep.target
            pairs = list(zip(item.idxs, item.root_idxs))
            if any(r is None for _, r in pairs):
                reasons.append(f"torch-pruning cannot map every index of {target.name} to {layer}")
            # A returned tensor carries these channels unless this node only consumes them.
            consumes = isinstance(target.module, nn.Module) and not self.dg.is_out_channel_pruning_fn(dep.handler)
            if target.type == ops.OUTPUT or (target.grad_fn in self.outputs and not consumes):
                reasons.append("the component returns these channels (another component reads them), "
                               "so their width is kept")
            if target.type == ops.PARAMETER:
                param_name = self.param_names[target.module]
                if param_name not in self.param_dims:
                    reasons.append(f"coupled with parameter {param_name}, whose channel layout is unknown")
                else:
                    items.append(_Item(param_name, self.param_dims[param_name], pairs))
            elif isinstance(target.module, nn.Module) and target.module in self.dg._module2name:
                dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
                items.append(_Item(self.dg._module2name[target.module], dim, pairs))
        writers = [i.target for i in items if i.dim == "out" and i.target in self.order]
        writer = min(writers, key=self.order.__getitem__) if writers else layer
        return _Group(kind, name or writer, items, width, heads, tp_group=tp_group,
                      reason="; ".join(dict.fromkeys(reasons)) or None)

    def scores(self, group: _Group, criterion: Callable[[Any], torch.Tensor | None]) -> torch.Tensor:
        """Importance per root channel, from one of torch-pruning's group criteria."""
        scores = criterion(group.tp_group)
        if scores is None:  # no weighted layer in the group
            return torch.zeros(group.width)
        return scores.detach().float().cpu()


def _calibration_inputs(captured: CapturedModel, component: Component, config: PruneConfig,
                        context: PassContext, why: str) -> list[torch.Tensor]:
    """Encoder inputs made from the calibration images by the family's predictor."""
    images = list(context.calibration_images[: config.calibration_images])
    if not images:
        raise PassError(f"prune: {why} needs calibration images "
                        "(optimize(..., calibration_images=[...]) or --images); importance='magnitude' needs none")
    if component.path == "" and len(captured.components) == 1:
        raise PassError(f"prune: {why} needs the whole model, whose predictor prepares images; "
                        "a bare image encoder can only use importance='magnitude' without compensation")
    predictor = captured.adapter.predictor(captured.model)
    return [predictor.encoder_input(image) for image in images]


def _accumulate_gradients(captured: CapturedModel, component: Component, inputs: list[torch.Tensor],
                          config: PruneConfig, context: PassContext) -> None:
    """Fill ``.grad`` of the component's parameters for the Taylor criteria."""
    from tqdm.auto import tqdm

    params = list(component.root.parameters())
    flags = [p.requires_grad for p in params]
    generator = torch.Generator().manual_seed(context.seed)
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for x in tqdm(inputs, desc=f"prune: {config.importance}", unit="image", disable=not context.progress):
                features = captured.adapter.encoder_features(component.root(x))
                if config.importance == "taylor":
                    loss = sum(0.5 * f.pow(2).mean() for f in features)
                else:  # SlimSAM: the disturbed target makes the gradient non-zero before anything is pruned
                    loss = sum(F.mse_loss(f, f.detach() + config.noise * torch.randn(f.shape, generator=generator).to(f))
                               for f in features)
                loss.backward()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _reads_channels(module: nn.Module) -> bool:
    """A Linear or a dense Conv: each output mixes all input channels."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _input_statistics(component: Component, inputs: list[torch.Tensor],
                      context: PassContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance of every input channel of every Linear and dense Conv,
    over all positions of the calibration inputs."""
    from tqdm.auto import tqdm

    sums: dict[str, list[Any]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(1, -1).reshape(-1, x.shape[1])
            entry = sums.setdefault(name, [0, 0.0, 0.0])
            entry[0] += x.shape[0]
            entry[1] = entry[1] + x.sum(0)
            entry[2] = entry[2] + x.pow(2).sum(0)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in component.root.named_modules() if _reads_channels(m)]
    try:
        with torch.no_grad():
            for x in tqdm(inputs, desc="prune: statistics", unit="image", disable=not context.progress):
                component.root(x)
    finally:
        for hook in hooks:
            hook.remove()
    statistics = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        statistics[name] = (mean.float(), (squares / count - mean.pow(2)).clamp_min(0).float())
    return statistics


def _column_energy(module: nn.Module) -> torch.Tensor:
    """Squared norm of the weights that read each input channel."""
    weight = module.weight.detach()
    return weight.pow(2).sum(0) if weight.dim() == 2 else weight.pow(2).sum((0, 2, 3))


class _Fluctuation:
    """FLAP's criterion, as a torch-pruning group criterion: for every layer of the
    group that reads the channels, variance times squared weight norm, summed."""

    def __init__(self, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]], names: dict[nn.Module, str]) -> None:
        self.statistics, self.names = statistics, names

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores, found = None, False
        for item in group:
            layer, name = item.dep.target.module, self.names.get(item.dep.target.module)
            if name not in self.statistics or group._DG.is_out_channel_pruning_fn(item.dep.handler):
                continue
            variance = self.statistics[name][1]
            local = (variance * _column_energy(layer))[item.idxs]
            scores = torch.zeros(len(group[0].idxs)) if scores is None else scores
            scores.index_add_(0, torch.as_tensor(item.root_idxs), local.cpu())
            found = True
        return scores if found else None


def _criterion(importance: str, statistics: dict[str, Any] | None, names: dict[nn.Module, str]) -> Any:
    import torch_pruning as tp

    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    if importance == "fluctuation":
        return _Fluctuation(statistics or {}, names)
    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)


def _compensation(root: nn.Module, edits: list[Edit],
                  statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per layer, the bias change that stands for its removed inputs at their mean
    (computed on the unpruned weights, over the full output width)."""
    deltas: dict[str, torch.Tensor] = {}
    for target, dim, removed in edits:
        if dim != "in" or target not in statistics:
            continue
        layer = root.get_submodule(target)
        weight = layer.weight.detach()
        columns = weight[:, removed] if weight.dim() == 2 else weight[:, removed].sum((2, 3))
        delta = columns @ statistics[target][0][removed].to(weight)
        deltas[target] = deltas.get(target, 0) + delta
    return deltas


# -- choosing what to keep ---------------------------------------------------------------

def _keep(total: int, ratio: float, round_to: int = 1) -> int:
    """How many of ``total`` channels a ratio keeps: rounded down to a multiple of
    ``round_to`` (never below it), at least one."""
    kept = int(total * (1.0 - ratio) + 1e-9)
    if round_to > 1:
        kept = max(kept - kept % round_to, min(round_to, total))
    return max(1, min(kept, total))


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest scores, ascending (ties: lower index first)."""
    order = torch.argsort(-scores, stable=True)
    return sorted(order[:count].tolist())


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0)
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def _counts(units: list[torch.Tensor], ratios: list[float], pooled: bool, minimum: int = 1) -> list[int]:
    """How many units (channels, heads, dims) each group keeps.

    Locally each group keeps its ratio's share; pooled (global ranking), the
    groups keep together the sum of their shares, taken where the z-normalised
    scores are highest, and each at least ``minimum``.
    """
    local = [_keep(len(u), r) for u, r in zip(units, ratios)]
    if not pooled or len(units) < 2:
        return local
    z = torch.cat([_zscore(u) for u in units])
    owner = torch.cat([torch.full((len(u),), i) for i, u in enumerate(units)])
    chosen = owner[torch.argsort(-z, stable=True)[: sum(local)]]
    return [max(minimum, min(len(u), int((chosen == i).sum()))) for i, u in enumerate(units)]


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


def _select_channels(groups: list[_Group], config: PruneConfig, kind: str) -> None:
    ratios = [_ratio(config, kind, g.name) for g in groups]
    pooled = [i for i, (_, overridden) in enumerate(ratios) if config.global_ranking and not overridden]
    counts = [_keep(g.width, r) for g, (r, _) in zip(groups, ratios)]
    for i, count in zip(pooled, _counts([groups[i].scores for i in pooled], [ratios[i][0] for i in pooled], True)):
        counts[i] = count
    for group, count in zip(groups, counts):
        group.kept = _top(group.scores, _round_down(count, group.width, config.round_to))


def _select_attention(groups: list[_Group], config: PruneConfig) -> None:
    """Whole heads first (score: mean over the head's channels), then the dims
    every kept head keeps (score: mean over kept heads)."""
    per_head = [g.scores.view(g.heads, g.head_dim) for g in groups]
    head_ratios = [_ratio(config, "heads", g.name) for g in groups]
    pooled = [i for i, (_, o) in enumerate(head_ratios) if config.global_ranking and not o]
    head_counts = [_keep(g.heads, r) for g, (r, _) in zip(groups, head_ratios)]
    pooled_counts = _counts([per_head[i].mean(1) for i in pooled], [head_ratios[i][0] for i in pooled], True)
    for i, count in zip(pooled, pooled_counts):
        head_counts[i] = count
    kept_heads = [_top(s.mean(1), n) for s, n in zip(per_head, head_counts)]

    dim_scores = [s[h].mean(0) for s, h in zip(per_head, kept_heads)]
    dim_ratios = [_ratio(config, "head_dims", g.name) for g in groups]
    pooled = [i for i, (_, o) in enumerate(dim_ratios) if config.global_ranking and not o]
    dim_counts = [_keep(g.head_dim, r) for g, (r, _) in zip(groups, dim_ratios)]
    for i, count in zip(pooled, _counts([dim_scores[i] for i in pooled], [dim_ratios[i][0] for i in pooled], True)):
        dim_counts[i] = count
    for group, heads, scores, dims in zip(groups, kept_heads, dim_scores, dim_counts):
        if dims < group.head_dim:  # round the q/k/v width, heads * dims
            while dims > 1 and (len(heads) * dims) % config.round_to:
                dims -= 1
        kept_dims = _top(scores, dims)
        group.kept = [h * group.head_dim + d for h in heads for d in kept_dims]


def _edits(groups: list[_Group]) -> list[Edit]:
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


# -- applying edits (also what samfx.load replays) -----------------------------------------

def _edit(root: nn.Module, target: str, dim: Any, removed: list[int]) -> None:
    """Remove indices ``removed`` along one dimension of a layer or parameter, with
    torch-pruning's per-layer pruning functions (``dim == "bias"``: give a layer
    without bias a zero one, for compensation)."""
    from torch_pruning import ops
    from torch_pruning.pruner import function

    parent_path, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if dim == "bias":
        layer = getattr(parent, name)
        if not _reads_channels(layer) or layer.bias is not None:
            raise PassError(f"prune: cannot add a bias to {target}")
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device))
        return
    if isinstance(dim, int):
        param = getattr(parent, name)
        if not isinstance(param, nn.Parameter) or not 0 <= dim < param.dim() or max(removed) >= param.shape[dim]:
            raise PassError(f"prune: cannot remove indices along dim {dim} of {target}")
        setattr(parent, name, function.ParameterPruner(pruning_dim=dim).prune_out_channels(param, removed))
        return
    module = getattr(parent, name)
    pruner = function.PrunerBox.get(ops.module2type(module))
    if pruner is None or dim not in ("out", "in"):
        raise PassError(f"prune: no pruning function for {target} ({type(module).__name__}, {dim})")
    width = pruner.get_out_channels(module) if dim == "out" else pruner.get_in_channels(module)
    if max(removed) >= width:
        raise PassError(f"prune: {target} has {width} {dim}put channels, cannot remove index {max(removed)}")
    (pruner.prune_out_channels if dim == "out" else pruner.prune_in_channels)(module, removed)


def _attention_projections(component: Component, site: AttentionSite) -> list[str] | None:
    """The q, k and v Linears of an attention (split ones read the same input),
    in graph order; ``None`` while they are fused."""
    graph = next(iter(component.graphs.values()))
    by_input: dict[fx.Node, list[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target.rpartition(".")[0] == site.path \
                and isinstance(component.root.get_submodule(node.target), nn.Linear):
            by_input.setdefault(node.args[0], []).append(node.target)
    shared = [targets for targets in by_input.values() if len(set(targets)) == 3]
    return list(dict.fromkeys(shared[0])) if len(shared) == 1 else None


def _head_layout(kept: list[int], head_dim: int, where: str) -> tuple[list[int], list[int]]:
    """Kept heads and the dims every kept head keeps, from kept projection rows."""
    heads: dict[int, list[int]] = {}
    for row in kept:
        heads.setdefault(row // head_dim, []).append(row % head_dim)
    layouts = {tuple(dims) for dims in heads.values()}
    if len(layouts) != 1:
        raise PassError(f"prune: {where} keeps different dims in different heads")
    return sorted(heads), list(next(iter(layouts)))


def _pin_attention_scale(component: Component, site: AttentionSite) -> int:
    """Give ``scaled_dot_product_attention`` calls of ``site`` the scale they used
    implicitly (1/sqrt of the original head width), which narrower heads would change."""
    pinned = 0
    for _, node in component.nodes():
        stack = list(node.meta.get("nn_module_stack", {}))
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention \
                and stack and stack[-1] == site.path and len(node.args) < 7 and node.kwargs.get("scale") is None:
            node.kwargs = {**node.kwargs, "scale": site.head_dim ** -0.5}
            pinned += 1
    return pinned


def _check_runs(component: Component) -> None:
    """Run every graph of the component on the meta device: a width the pass did
    not reconcile fails here (the pipeline then discards its private copy)."""
    for key in component.graphs:
        args = component.example_args(key)
        if args is None:
            continue
        try:
            with _on_meta(component.root), torch.no_grad():
                _compile_graph(component.graphs[key], f"{component.role}[check]")(component.root, *_meta_args(args))
        except Exception as err:
            raise PassError(f"prune: the pruned {component.role} is inconsistent: {type(err).__name__}: {err}") from err


def _width_attributes(root: nn.Module) -> dict[tuple[str, str], Any]:
    return {(path, name): value for path, module in root.named_modules()
            for name, value in vars(module).items() if type(value) in (int, float)}


def _rewrite_literals(component: Component, changed: dict[tuple[str, str], Any]) -> int:
    """Replace graph literals read from attributes that changed."""
    count = 0

    def rewrite(value: Any) -> Any:
        nonlocal count
        source = literal_source(value)
        if source in changed:
            count += 1
            return type(value)(changed[source], source)
        return value

    for _, node in component.nodes():
        node.args = fx.node.map_aggregate(node.args, rewrite)
        node.kwargs = fx.node.map_aggregate(node.kwargs, rewrite)
    return count


def _apply(captured: CapturedModel, component: Component, sites: list[AttentionSite],
           edits: list[Edit]) -> dict[str, Any]:
    """Apply ``edits`` and make the component consistent with them."""
    root = component.root
    before = _width_attributes(root)
    projections = {s.path: _attention_projections(component, s) for s in sites}
    removed_out = {target: removed for target, dim, removed in edits if dim == "out"}
    for target, dim, removed in edits:
        _edit(root, target, dim, removed)
    attention = {}
    for site in sites:
        qkv = projections[site.path]
        if not qkv or qkv[0] not in removed_out:
            continue
        width = site.num_heads * site.head_dim
        kept = sorted(set(range(width)) - set(removed_out[qkv[0]]))
        kept_heads, kept_dims = _head_layout(kept, site.head_dim, site.path)
        captured.adapter.resize_attention(root.get_submodule(site.path), kept_heads, kept_dims)
        if len(kept_dims) != site.head_dim:
            _pin_attention_scale(component, site)
        attention[site.path] = {"heads": [site.num_heads, len(kept_heads)], "head_dim": [site.head_dim, len(kept_dims)]}
    captured.adapter.sync_width_attributes(root)
    changed = {k: v for k, v in _width_attributes(root).items() if k in before and before[k] != v}
    literals = _rewrite_literals(component, changed)
    component.recompile()
    _check_runs(component)
    layers = {path for path, module in root.named_modules() if module is not root and not list(module.children())
              and any(True for _ in module.parameters(recurse=False))}
    attributes = {f"{p}.{a}" if p else a: v for (p, a), v in changed.items() if p not in layers}
    return {"attention": attention, "attributes": attributes, "literals_rewritten": literals}


# -- the pass --------------------------------------------------------------------------------

def _analyse(captured: CapturedModel, component: Component, sites: list[AttentionSite], config: PruneConfig,
             context: PassContext, skipped: list[str]) -> tuple[list[Edit], list[_Group], dict[str, torch.Tensor]]:
    """Groups, importance and the channels to keep, through torch-pruning; with
    compensation, the bias change of each layer that loses inputs."""
    root = component.root
    statistics = None
    if config.importance != "magnitude" or (config.compensate and context.calibration_images):
        why = f"importance={config.importance!r}" if config.importance != "magnitude" else "compensation"
        inputs = _calibration_inputs(captured, component, config, context, why)
        if config.importance in ("taylor", "disturbed_taylor"):
            _accumulate_gradients(captured, component, inputs, config, context)
        if config.importance == "fluctuation" or config.compensate:
            statistics = _input_statistics(component, inputs, context)
    analysis = _Analysis(captured, component, sites)
    candidates: list[_Group] = []
    groups: list[_Group] = []
    seeds: list[str] = []  # layers whose inputs are the residual stream
    with _index_maps_frozen():
        if config.heads > 0 or config.head_dims > 0 or any(p.startswith("head") for p, _ in config.overrides):
            for site in sites:
                qkv = _attention_projections(component, site)
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
            seeds += [qkv[0] for s in sites if (qkv := _attention_projections(component, s))]
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
        criterion = _criterion(config.importance, statistics, analysis.dg._module2name)
        for group in groups:
            group.scores = analysis.scores(group, criterion)
    for p in root.parameters():
        p.grad = None
    by_kind: dict[str, list[_Group]] = {}
    for group in groups:
        by_kind.setdefault(group.kind, []).append(group)
    for kind, members in by_kind.items():
        if kind == "attention":
            _select_attention(members, config)
        else:
            _select_channels(members, config, kind)
    edits = _edits(groups)
    deltas = _compensation(root, edits, statistics) if config.compensate and statistics else {}
    edits += [(target, "bias", []) for target in deltas if root.get_submodule(target).bias is None]
    return edits, groups, deltas


def _add_deltas(root: nn.Module, deltas: dict[str, torch.Tensor], edits: list[Edit]) -> None:
    """Add compensation to the (pruned) layers' biases, at their kept outputs."""
    removed_out = {target: removed for target, dim, removed in edits if dim == "out"}
    with torch.no_grad():
        for target, delta in deltas.items():
            layer = root.get_submodule(target)
            kept = sorted(set(range(len(delta))) - set(removed_out.get(target, [])))
            layer.bias += delta[kept].to(layer.bias)


def _encode(edits: list[Edit]) -> dict[str, Any]:
    """Replay data: index lists stored once (a group removes the same indices
    from many layers)."""
    indices: list[list[int]] = []
    ids: dict[tuple[int, ...], int] = {}
    rows = []
    for target, dim, removed in edits:
        key = tuple(removed)
        if key not in ids:
            ids[key] = len(indices)
            indices.append(list(removed))
        rows.append([target, dim, ids[key]])
    return {"edits": rows, "indices": indices}


def _decode(replay: Any, role: str) -> list[Edit]:
    try:
        return [(str(t), d, [int(i) for i in replay["indices"][k]]) for t, d, k in replay["edits"]]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise PassError(f"prune: the saved replay data of {role} is malformed ({err})") from err


def _summary(groups: list[_Group], attention: dict[str, Any]) -> dict[str, Any]:
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


@register_pass("prune", PruneConfig, requires=("split_qkv",))
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
        if context.replay is not None:
            if role not in context.replay:
                continue
            edits, groups, deltas = _decode(context.replay[role], role), [], {}
        elif config.prunes_anything():
            edits, groups, deltas = _analyse(captured, component, sites, config, context, skipped)
        else:
            continue
        if not edits:
            continue
        applied = _apply(captured, component, sites, edits)
        _add_deltas(component.root, deltas, edits)
        applied["compensated_layers"] = len(deltas)
        kinds = _summary(groups, applied["attention"])
        details[role] = {"kinds": kinds, "layers_edited": len({t for t, _, _ in edits}), **applied,
                         "groups": {f"{'heads' if g.kind == 'attention' else g.kind}:{g.name}":
                                    [g.width, len(g.kept) if g.kept is not None else g.width] for g in groups}}
        replay[role] = _encode(edits)
        parts = [f"{k} {v['channels'][0]} -> {v['channels'][1]} ch" for k, v in kinds.items() if "channels" in v]
        if "attention" in kinds:
            a = kinds["attention"]
            parts.append(f"attention q/k/v {a['qkv_width'][0]} -> {a['qkv_width'][1]} ({a['heads'][0]} -> {a['heads'][1]} heads)")
        summaries.append(f"{role}: " + (", ".join(parts) if parts else f"{len(edits)} edits replayed"))
    changed = bool(replay)
    summary = "; ".join(summaries) + f" ({config.importance})" if changed else "nothing pruned"
    return PassResult(captured, PassReport("prune", config.to_dict(), changed, summary, details, skipped, replay))
