"""``split_qkv``: fused query/key/value projections become three Linears (SlimSAM).

SAM-family attentions compute ``qkv = Linear(dim, 3*dim)(x)`` and then slice it
with reshapes, permutes and an ``unbind``/``split``. Dependency-graph pruning
cannot follow channels through that fused tensor, so SlimSAM splits it. This
pass does the split on the captured graph for any layout an adapter declares:
it follows the fused tensor through the layout ops, carrying the split along
(a reshape that factors the split axis, a permute that moves it, ...), until the
three tensors are taken apart, and rebuilds each of q, k and v from its own
Linear with the same ops. The result is exact: the new Linears hold the rows of
the fused one.

If the fused tensor is used in a way the pass cannot follow, that projection is
left fused and the reason reported; nothing is half-rewritten.
"""

from __future__ import annotations

import keyword
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..adapters.base import QKVLayout, QKVSite
from ..capture import CapturedModel, Component
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass

__all__ = ["SplitQKVConfig", "split_qkv"]


@dataclass(frozen=True)
class SplitQKVConfig(PassConfig):
    """Options of :func:`split_qkv`.

    Attributes:
        names: attribute names of the new q, k and v Linears (next to the fused one).
    """

    names: tuple[str, str, str] = ("q", "k", "v")

    def validate(self) -> None:
        if len(set(self.names)) != 3 or not all(n.isidentifier() and not keyword.iskeyword(n) for n in self.names):
            raise PassError(f"split_qkv: names must be three distinct Python identifiers (attribute names of the "
                            f"q, k and v Linears), got {self.names!r}")


# An emitter adds one op for a part: (graph, part node, part index) -> new node.
Emit = Callable[[fx.Graph, fx.Node, int], fx.Node]


@dataclass
class _Split:
    """A graph value that equals ``cat(parts, dim=axis)``; ``chains[i]`` rebuild part i."""

    axis: int
    sizes: tuple[int, ...]
    chains: list[list[Emit]]


@dataclass
class _SplitTuple:
    """A tuple from ``unbind``/``split`` along the split axis: element i is part i."""

    parts: list[list[Emit]]


class _Unsupported(Exception):
    pass


def _val(node: fx.Node) -> Any:
    value = node.meta.get("val")
    if value is None:
        raise _Unsupported(f"no shape recorded for {node.name}")
    return value


def _method_args(node: fx.Node) -> tuple[list[Any], dict[str, Any]]:
    """Arguments after the tensor, for ``x.op(...)`` and ``torch.op(x, ...)`` alike."""
    return list(node.args[1:]), dict(node.kwargs)


_FUNCTIONS = {
    operator.getitem: "getitem",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.unbind: "unbind",
    torch.split: "split",
    torch.chunk: "chunk",
}


def _op_name(node: fx.Node) -> str | None:
    """The layout op a node performs, for method and function forms alike."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    return None


def _flat_sizes(args: list[Any]) -> list[Any]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


def _part_shape(shape_args: list[Any], axis: int, size: int) -> tuple[Any, ...]:
    """Shape arguments for one part: ``size`` along the split axis, unless upstream
    wrote ``-1`` there, which stays so that the graph keeps inferring widths
    (a pass that narrows the projection later need not touch it)."""
    part_shape = list(shape_args)
    if not (isinstance(part_shape[axis], int) and part_shape[axis] == -1):
        part_shape[axis] = size
    return tuple(part_shape)


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _emit_call(op: str, make_args: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]) -> Emit:
    def emit(graph: fx.Graph, x: fx.Node, i: int) -> fx.Node:
        args, kwargs = make_args(i)
        return graph.call_method(op, (x, *args), kwargs)

    return emit


def _transfer(state: _Split, user: fx.Node) -> _Split | _SplitTuple:
    """The split state of ``user``, an op applied to a split tensor."""
    op = _op_name(user)
    if op is None:
        raise _Unsupported(f"{user.op} {user.target}")
    args, kwargs = _method_args(user)
    rank_in = len(_val(user.args[0]).shape)
    a, sizes = state.axis, state.sizes

    if op in ("reshape", "view"):
        shape_args = _flat_sizes(args)
        in_shape, out_shape = list(_val(user.args[0]).shape), list(_val(user).shape)
        prefix = math.prod(in_shape[:a])
        inner_in = math.prod(in_shape[a + 1:])
        # The output dim that starts where the split axis starts (skipping unit dims).
        candidates = [r for r in range(len(out_shape)) if math.prod(out_shape[:r]) == prefix]
        if not candidates:
            raise _Unsupported(f"{op} to {tuple(out_shape)} mixes the split axis with earlier dims")
        r = candidates[-1]
        inner_out = math.prod(out_shape[r + 1:])
        if any(s * inner_in % inner_out for s in sizes):
            raise _Unsupported(f"{op} to {tuple(out_shape)} cuts through a q/k/v boundary")
        new_sizes = tuple(s * inner_in // inner_out for s in sizes)

        def make(i: int, r: int = r, new_sizes: tuple[int, ...] = new_sizes) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return _part_shape(shape_args, r, new_sizes[i]), {}

        return _Split(r, new_sizes, [c + [_emit_call(op, make)] for c in state.chains])
    if op == "permute":
        dims = [_norm(d, rank_in) for d in _flat_sizes(args)]
        emit = _emit_call("permute", lambda i: (tuple(dims), {}))
        return _Split(dims.index(a), sizes, [c + [emit] for c in state.chains])
    if op == "transpose":
        d0, d1 = (_norm(d, rank_in) for d in args[:2])
        emit = _emit_call("transpose", lambda i: ((d0, d1), {}))
        new_axis = d1 if a == d0 else d0 if a == d1 else a
        return _Split(new_axis, sizes, [c + [emit] for c in state.chains])
    if op == "contiguous":
        return state
    if op == "unbind":
        dim = _norm(args[0] if args else kwargs.get("dim", 0), rank_in)
        if dim != a or any(s != 1 for s in sizes):
            raise _Unsupported(f"unbind along dim {dim} of a tensor split along {a}")
        squeeze = _emit_call("squeeze", lambda i: ((a,), {}))
        return _SplitTuple([c + [squeeze] for c in state.chains])
    if op in ("split", "split_with_sizes", "chunk"):
        spec = args[0] if args else kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("chunks")))
        dim = _norm(args[1] if len(args) > 1 else kwargs.get("dim", 0), rank_in)
        if op == "chunk":
            expected = spec == len(sizes) and len(set(sizes)) == 1
        elif isinstance(spec, int):
            expected = all(s == spec for s in sizes)
        else:
            expected = tuple(spec) == sizes
        if dim != a or not expected:
            raise _Unsupported(f"{op}({spec}, dim={dim}) does not match q/k/v sizes {sizes} along {a}")
        return _SplitTuple([list(c) for c in state.chains])
    raise _Unsupported(op)


@dataclass
class _Plan:
    """Replacements for one fused projection in one graph."""

    qkv: fx.Node
    terminals: list[tuple[fx.Node, int, list[Emit]]]
    dead: list[fx.Node]


def _plan(graph: fx.Graph, qkv: fx.Node, layout: QKVLayout) -> _Plan:
    if layout.kind == "blocked":
        rank = len(_val(qkv).shape)
        root, state = qkv, _Split(rank - 1, layout.sizes, [[], [], []])
        dead = [qkv]
    else:
        users = list(qkv.users)
        if len(users) != 1 or _op_name(users[0]) not in ("view", "reshape"):
            raise _Unsupported("a head-interleaved qkv must be viewed as (..., heads, q+k+v) first")
        view = users[0]
        shape = list(_val(view).shape)
        if shape[-2:] != [layout.num_heads, sum(layout.sizes)]:
            raise _Unsupported(f"view to {tuple(shape)} is not (..., {layout.num_heads}, {sum(layout.sizes)})")
        shape_args = _flat_sizes(list(view.args[1:]))

        def make(i: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return _part_shape(shape_args, len(shape_args) - 1, layout.sizes[i]), {}

        root, state = view, _Split(len(shape) - 1, layout.sizes, [[_emit_call(str(view.target), make)] for _ in range(3)])
        dead = [qkv, view]
    terminals: list[tuple[fx.Node, int, list[Emit]]] = []
    pending: list[tuple[fx.Node, _Split | _SplitTuple]] = [(root, state)]
    while pending:
        node, node_state = pending.pop()
        for user in list(node.users):
            if isinstance(node_state, _SplitTuple):
                if _op_name(user) != "getitem" or not isinstance(user.args[1], int):
                    raise _Unsupported(f"{user.op} {user.target} on the q/k/v tuple")
                index = user.args[1]
                terminals.append((user, index, node_state.parts[index]))
                continue
            if _op_name(user) == "getitem" and isinstance(user.args[1], int):
                # x[i] along a split axis 0 of unit parts: part i without that axis
                if node_state.axis != 0 or any(s != 1 for s in node_state.sizes):
                    raise _Unsupported("indexing the fused tensor")
                squeeze = _emit_call("squeeze", lambda i: ((0,), {}))
                terminals.append((user, user.args[1], node_state.chains[user.args[1]] + [squeeze]))
                continue
            if user.args[0] is not node or any(node in _flatten(a) for a in list(user.args[1:]) + list(user.kwargs.values())):
                raise _Unsupported(f"{user.op} {user.target} uses the fused tensor in another position")
            pending.append((user, _transfer(node_state, user)))
            dead.append(user)
    if {index for _, index, _ in terminals} != {0, 1, 2}:
        raise _Unsupported("q, k and v are not all taken apart")
    return _Plan(qkv, terminals, dead)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _apply(graph: fx.Graph, plan: _Plan, targets: tuple[str, str, str]) -> None:
    x = plan.qkv.args[0]
    # New nodes belong to the same attention module as the ones they replace.
    fused_stack = dict(plan.qkv.meta.get("nn_module_stack", {}))
    fused_type = fused_stack.pop(plan.qkv.target, None)
    for terminal, index, chain in plan.terminals:
        with graph.inserting_before(terminal):
            node = graph.call_module(targets[index], (x,))
            node.meta["nn_module_stack"] = {**fused_stack, targets[index]: fused_type}
            for emit in chain:
                node = emit(graph, node, index)
                node.meta["nn_module_stack"] = dict(terminal.meta.get("nn_module_stack", {}))
        terminal.replace_all_uses_with(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted([t for t, _, _ in plan.terminals] + plan.dead, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


def _split_linear(fused: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    weight = fused.weight.detach()[rows].clone()
    linear = nn.Linear(fused.in_features, len(rows), bias=fused.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=fused.weight.requires_grad)
    if fused.bias is not None:
        linear.bias = nn.Parameter(fused.bias.detach()[rows].clone(), requires_grad=fused.bias.requires_grad)
    return linear


def _split_site(component: Component, site: QKVSite, names: tuple[str, str, str]) -> str | None:
    """Split one fused projection in every graph of ``component``; a reason if not."""
    fused = component.root.get_submodule(site.linear)
    if not isinstance(fused, nn.Linear):
        return f"{site.linear}: {type(fused).__name__} is not an nn.Linear"
    parent_path, _, _ = site.linear.rpartition(".")
    parent = component.root.get_submodule(parent_path) if parent_path else component.root
    taken = [n for n in names if hasattr(parent, n)]
    if taken:
        return f"{site.linear}: {parent_path or 'root'} already has attributes {taken}"
    plans = []
    for graph in component.graphs.values():
        for node in graph.nodes:
            if node.op == "call_module" and node.target == site.linear:
                try:
                    plans.append((graph, _plan(graph, node, site.layout)))
                except _Unsupported as why:
                    return f"{site.linear}: left fused ({why})"
    if not plans:
        return f"{site.linear}: not called in the graph"
    targets = tuple(f"{parent_path}.{n}" if parent_path else n for n in names)
    for target, rows in zip(targets, site.layout.part_rows()):
        component.set_submodule(target, _split_linear(fused, rows))
    for graph, plan in plans:
        _apply(graph, plan, targets)  # type: ignore[arg-type]
    component.mark_replaced(site.linear)
    parent.samfx_qkv_names = names  # adapters find the split projections by it (query_projection)
    return None


@register_pass("split_qkv", SplitQKVConfig, exact=True)
def split_qkv(captured: CapturedModel, config: SplitQKVConfig, context: PassContext) -> PassResult:
    """Split fused q/k/v projections into three Linears (exact; SlimSAM)."""
    split: dict[str, int] = {}
    skipped: list[str] = []
    for role, component in captured.components.items():
        sites = captured.adapter.qkv_sites(component.root)
        if not sites:
            continue
        component.propagate_shapes()
        count = 0
        for site in sites:
            reason = _split_site(component, site, config.names)
            if reason is None:
                count += 1
            else:
                skipped.append(f"{role}: {reason}")
        if count:
            component.delete_unused_submodules()
            component.recompile()
            split[role] = count
    total = sum(split.values())
    if total:
        summary = "; ".join(f"{role}: {n} fused qkv -> q, k, v" for role, n in split.items())
    else:
        summary = "no fused qkv projection found" if not skipped else "nothing split"
    report = PassReport("split_qkv", config.to_dict(), total > 0, summary, {"split": split}, skipped)
    return PassResult(captured, report)
