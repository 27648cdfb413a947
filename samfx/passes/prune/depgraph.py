"""torch-pruning's dependency graph of a captured component: which layers and
parameters must lose the same channels (Torch-Pruning's ``dependency`` seam).

Two things torch-pruning cannot do on SAM-family models are done around it: the
decomposed relative-position einsum makes its grouping loop forever (issue
VainF/Torch-Pruning#337), so the graph is built on a copy whose
relative-position terms are detached; and its tracing runs the model, so it
runs on the meta device (free even for SAM ViT-H at 1024 px).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from ...adapters.base import AttentionSite
from ...capture import CapturedModel, Component, _compile_graph, meta_args, on_meta

__all__ = ["DependencyAnalysis", "Group", "Item", "attention_projections", "index_maps_frozen"]


@dataclass
class Item:
    """One layer or parameter of a dependency group, with each of its indices'
    position in the group's root layer."""

    target: str
    dim: Any
    index_roots: list[tuple[int, int]]


@dataclass
class Group:
    kind: str  # "mlp", "attention" or "embed"
    name: str
    items: list[Item]
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
def index_maps_frozen() -> Iterator[None]:
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


class DependencyAnalysis:
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
        with on_meta(root) as param_names, warnings.catch_warnings():
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
                example_inputs=meta_args(component.example_args(key)),
                forward_fn=lambda model, inputs: forward(model, *inputs),
                output_transform=outputs,
                unwrapped_parameters=unwrapped,
                verbose=False,
            )
            self.param_names = {p: param_names[id(p)] for p in self.dg._param_to_name}

    def _prunable_layer(self, module: nn.Module) -> bool:
        """A layer torch-pruning prunes itself (its parameters are not "unwrapped")."""
        return self.tp.ops.module2type(module) in self.tp.pruner.function.PrunerBox

    def group(self, kind: str, name: str | None, layer: str, out: bool, heads: int = 1) -> Group:
        """The group that prunes ``layer``'s outputs (``out``) or inputs, with each
        index's root. It is named ``name``, or by the first layer that writes its
        channels; ``reason`` says why samfx must leave it alone, if it must."""
        module = self.root.get_submodule(layer)
        if module not in self.dg.module2node:
            return Group(kind, name or layer, [], 0, reason=f"{layer} is not used by the traced graph")
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
                    items.append(Item(param_name, self.param_dims[param_name], pairs))
            elif isinstance(target.module, nn.Module) and target.module in self.dg._module2name:
                dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
                items.append(Item(self.dg._module2name[target.module], dim, pairs))
        writers = [i.target for i in items if i.dim == "out" and i.target in self.order]
        writer = min(writers, key=self.order.__getitem__) if writers else layer
        return Group(kind, name or writer, items, width, heads, tp_group=tp_group,
                      reason="; ".join(dict.fromkeys(reasons)) or None)

    def scores(self, group: Group, criterion: Callable[[Any], torch.Tensor | None]) -> torch.Tensor:
        """Importance per root channel, from one of torch-pruning's group criteria."""
        scores = criterion(group.tp_group)
        if scores is None:  # no weighted layer in the group
            return torch.zeros(group.width)
        return scores.detach().float().cpu()


def attention_projections(component: Component, site: AttentionSite) -> list[str] | None:
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
