"""Graph-local rewrites for the ``samfx`` torch.compile backend.

Dynamo hands a backend torch-level graphs: modules inlined, parameters as
inputs, one graph per region between graph breaks. What samfx's passes know as
modules (an attention block, a Linear) is there only as a pattern of ops, so the
rewrites here match patterns on the graph and replace them in place. They never
change a parameter, so the caller's model stays as it is. A pass whose rewrite
is graph-local keeps it in :mod:`samfx.graph` and registers it here (``attention``
is :mod:`samfx.graph.attention`, which the ``fuse_attention`` pass also runs).

A rewrite is a function ``(graph_module, context) -> int`` (how many sites it
rewrote) registered by name with :func:`register_rewrite`; the backend runs the
ones its options name, in order, then lowers the graph to inductor.

Example::

    >>> from samfx.emit.rewrites import list_rewrites, register_rewrite
    >>> "attention" in [r.name for r in list_rewrites()]
    True
    >>> @register_rewrite("noop_example", default=False)
    ... def noop(gm, context):
    ...     '''Rewrites nothing.'''
    ...     return 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..graph import fuse_graph_attention, node_value, op_name

__all__ = ["GraphRewrite", "RewriteContext", "get_rewrite", "list_rewrites", "register_rewrite", "rewrite_attention"]


@dataclass
class RewriteContext:
    """What a rewrite may consult besides the graph.

    Attributes:
        example_inputs: the inputs Dynamo compiled the graph for.
        differentiable: whether the compiled code must support backward (grad
            mode on and some input requires grad); ops without a backward
            formula must then be avoided.
        skipped: reasons for matches a rewrite left alone (for reports and tests).
    """

    example_inputs: Sequence[Any]
    differentiable: bool = False
    skipped: list[str] = field(default_factory=list)


RewriteFn = Callable[[fx.GraphModule, RewriteContext], int]


@dataclass(frozen=True)
class GraphRewrite:
    """A registered rewrite: its name, function, whether the backend runs it by
    default, and a one-line description."""

    name: str
    run: RewriteFn
    default: bool
    doc: str


_REWRITES: dict[str, GraphRewrite] = {}


def register_rewrite(name: str, *, default: bool = True) -> Callable[[RewriteFn], RewriteFn]:
    """Register a graph-local rewrite under ``name`` (``default``: run it when the
    backend's options do not list rewrites)."""

    def decorate(fn: RewriteFn) -> RewriteFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        _REWRITES[name] = GraphRewrite(name, fn, default, doc[0] if doc else "")
        return fn

    return decorate


def get_rewrite(name: str) -> GraphRewrite:
    try:
        return _REWRITES[name]
    except KeyError:
        raise ValueError(f"unknown samfx rewrite {name!r}; registered: {', '.join(sorted(_REWRITES))}") from None


def list_rewrites() -> list[GraphRewrite]:
    return list(_REWRITES.values())


def _static(node: fx.Node) -> bool:
    """Whether ``node`` and its tensor inputs have static shapes. The matcher
    reads shapes as ints; on a symbolic size that would add a guard and make
    Dynamo recompile a dynamic graph (the decoder's point count) for every size."""
    values = [node_value(n) for n in (node, *node.all_input_nodes)]
    return all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in values)


@register_rewrite("attention")
def rewrite_attention(gm: fx.GraphModule, context: RewriteContext) -> int:
    """softmax(scale * q @ k^T + bias) @ v -> fused SDPA; SAM's decomposed rel-pos bias -> samfx::rel_pos_attention.

    :mod:`samfx.graph.attention` (as in the ``fuse_attention`` pass) on Dynamo's graph. The
    samfx op has no backward: a graph that needs one gets SDPA with the bias
    materialised as its mask.
    """
    candidates, dynamic = [], []
    for node in gm.graph.nodes:
        if op_name(node) in ("softmax", "sdpa"):
            (candidates if _static(node) else dynamic).append(node)
    fused, skipped = fuse_graph_attention(gm.graph, candidates, rel_pos="mask" if context.differentiable else "blockwise")
    context.skipped.extend(skipped + [f"{n.name}: symbolic shapes" for n in dynamic])
    if fused:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return len(fused)
