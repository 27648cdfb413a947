"""Graph-local rewrites for the ``samfx`` torch.compile backend.

Dynamo hands a backend torch-level graphs: modules inlined, parameters as
inputs, one graph per region between graph breaks. What samfx's passes know as
modules (an attention block, a Linear) is there only as a pattern of ops, so the
rewrites here match patterns on the graph and replace them in place. They never
change a parameter, so the caller's model stays as it is.

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

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from ..kernels import rel_pos as _rel_pos  # noqa: F401  (registers samfx::rel_pos_attention)

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


# -- matching helpers ------------------------------------------------------------

def _is(node: Any, functions: tuple[Any, ...], methods: tuple[str, ...]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


_MATMUL = ((operator.matmul, torch.matmul, torch.bmm), ("matmul", "bmm", "__matmul__"))
_ADD = ((operator.add, torch.add), ("add", "__add__"))
_MUL = ((operator.mul, torch.mul), ("mul", "__mul__"))
_DIV = ((operator.truediv, torch.div, torch.true_divide), ("div", "__truediv__"))
_VIEW = ((torch.reshape,), ("view", "reshape"))
_SOFTMAX = ((torch.softmax, F.softmax, torch.nn.functional.softmax), ("softmax",))
_DROPOUT = ((F.dropout, torch.dropout), ("dropout",))
_SDPA = ((F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention), ())


def _value(node: Any) -> Any:
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _shape(node: Any) -> tuple[int, ...] | None:
    """The static shape of a node's value; ``None`` when unknown or symbolic."""
    value = _value(node)
    if not isinstance(value, torch.Tensor):
        return None
    if not all(isinstance(s, int) for s in value.shape):
        return None
    return tuple(value.shape)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _transposed_key(node: Any) -> fx.Node | None:
    """``k`` if ``node`` is ``k`` with its last two dimensions swapped."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    source = node.args[0] if node.args else None
    value = _value(source)
    if not isinstance(value, torch.Tensor):
        return None
    rank = value.dim()
    if _is(node, (torch.transpose,), ("transpose",)):
        dims = {d % rank for d in node.args[1:3]} if len(node.args) >= 3 else set()
        return source if dims == {rank - 2, rank - 1} else None
    if _is(node, (torch.permute,), ("permute",)):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        expected = list(range(rank - 2)) + [rank - 1, rank - 2]
        return source if [d % rank for d in dims] == expected else None
    return None


@dataclass
class _Scores:
    """``scale * q @ k^T`` plus bias terms, each term with the shape it is added at."""

    q: fx.Node
    k: fx.Node
    scale: float
    terms: list[tuple[fx.Node, tuple[int, ...]]] = field(default_factory=list)


def _scores(node: Any) -> _Scores | None:
    """Decompose the input of a softmax into scaled ``q @ k^T`` and additive terms.

    Every node on the way must feed only the next one, so the whole chain can go.
    """
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if _is(node, *_VIEW):
        found = _scores(node.args[0])
    elif _is(node, *_ADD) and len(node.args) == 2 and "alpha" not in node.kwargs:
        found = None
        for path, term in (node.args, node.args[::-1]):
            level = _shape(node)
            if isinstance(term, fx.Node) and level is not None:
                found = _scores(path)
                if found is not None:
                    found.terms.extend((t, s) for t, s in _split_term(term, level))
                    break
    elif (_is(node, *_MUL) or _is(node, *_DIV)) and len(node.args) == 2:
        tensor, factor = node.args
        if _is(node, *_MUL) and _number(tensor) is not None:
            tensor, factor = factor, tensor
        found = _scores(tensor) if _number(factor) is not None else None
        if found is None or found.terms:
            return None
        found.scale *= _number(factor) if _is(node, *_MUL) else 1.0 / _number(factor)
    elif _is(node, *_MATMUL) and len(node.args) == 2:
        key = _transposed_key(node.args[1])
        query = node.args[0]
        if key is None or len(node.args[1].users) != 1 or not isinstance(query, fx.Node):
            return None
        found = _Scores(query, key, 1.0)
        if (_is(query, *_MUL) and len(query.users) == 1 and isinstance(query.args[0], fx.Node)
                and _number(query.args[1]) is not None):
            found.q, found.scale = query.args[0], _number(query.args[1])
    else:
        return None
    return found


def _split_term(term: fx.Node, level: tuple[int, ...]) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """A term that is a reshaped sum of two broadcast terms (Hugging Face adds
    ``rel_h[..., None] + rel_w[..., None, :]`` before reshaping) is taken apart."""
    if _is(term, *_VIEW) and len(term.users) == 1 and _shape(term) == level:
        inner = term.args[0]
        inner_shape = _shape(inner)
        if (_is(inner, *_ADD) and len(inner.users) == 1 and len(inner.args) == 2 and inner_shape is not None
                and all(isinstance(a, fx.Node) for a in inner.args)):
            return [(inner.args[0], inner_shape), (inner.args[1], inner_shape)]
    return [(term, level)]


def _rel_pos_terms(terms: list[tuple[fx.Node, tuple[int, ...]]], scores_shape: tuple[int, ...]
                   ) -> tuple[fx.Node, fx.Node, tuple[int, int, int, int, int]] | None:
    """``(rel_h, rel_w, (n, qh, qw, kh, kw))`` if the terms are SAM's decomposed
    relative-position bias: ``(n, qh, qw, kh, 1)`` and ``(n, qh, qw, 1, kw)``
    added at ``(n, qh, qw, kh, kw)`` to ``(n, qh * qw, kh * kw)`` scores."""
    if len(terms) != 2 or terms[0][1] != terms[1][1] or len(terms[0][1]) != 5:
        return None
    n, qh, qw, kh, kw = terms[0][1]
    if scores_shape != (n, qh * qw, kh * kw):
        return None
    shapes = [_shape(t) for t, _ in terms]
    rows, cols = (n, qh, qw, kh, 1), (n, qh, qw, 1, kw)
    if shapes == [rows, cols]:
        return terms[0][0], terms[1][0], (n, qh, qw, kh, kw)
    if shapes == [cols, rows]:
        return terms[1][0], terms[0][0], (n, qh, qw, kh, kw)
    return None


def _output_value(node: fx.Node) -> Any:
    """The value a new node will have, computed on the fake tensors of its inputs."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), _value)
    modes = {id(t.fake_mode): t.fake_mode for t in _tensors((args, kwargs)) if isinstance(t, FakeTensor)}
    if len(modes) != 1:
        return None
    (mode,) = modes.values()
    fn = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
    with mode:
        return fn(*args, **kwargs)


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(tree, lambda x: found.append(x) if isinstance(x, torch.Tensor) else None)
    return found


class _Builder:
    """Inserts nodes before ``anchor`` and records their fake values."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor = graph, anchor

    def __call__(self, op: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta["example_value"] = _output_value(node)
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        return node


def _to_4d(build: _Builder, node: fx.Node) -> fx.Node:
    return build("call_method", "unsqueeze", node, 0) if _value(node).dim() == 3 else node


def _attention_output(softmax: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(probs @ v node, v)`` if the softmax result only feeds one matmul with values."""
    node = softmax
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if _is(user, *_DROPOUT) and (_arg(user, 2, "training", True) is False or _arg(user, 1, "p", 0.5) == 0):
        node, user = user, next(iter(user.users)) if len(user.users) == 1 else None
    if user is None or not _is(user, *_MATMUL) or user.args[0] is not node or not isinstance(user.args[1], fx.Node):
        return None
    return user, user.args[1]


def _rewrite_softmax_attention(gm: fx.GraphModule, softmax: fx.Node, context: RewriteContext) -> bool:
    logits = _value(softmax.args[0])
    if not isinstance(logits, torch.Tensor):
        return False
    rank = logits.dim()
    dim = _arg(softmax, 1, "dim")
    dtype = softmax.kwargs.get("dtype", _arg(softmax, 3, "dtype") if softmax.op == "call_function" else None)
    if not isinstance(dim, int) or dim % rank != rank - 1 or dtype not in (None, logits.dtype):
        return False
    found = _attention_output(softmax)
    scores = _scores(softmax.args[0])
    if found is None or scores is None:
        return False
    matmul, v = found
    q, k = scores.q, scores.k
    ranks = {_value(t).dim() if isinstance(_value(t), torch.Tensor) else 0 for t in (q, k, v)}
    if ranks != {rank} or rank not in (3, 4):
        return False
    shape = _shape(softmax.args[0])
    if scores.terms and (shape is None or _shape(q)[:-1] + _shape(k)[-2:-1] != shape):
        return False  # a bias is reshaped to the scores' shape, which must be known
    build = _Builder(gm.graph, matmul)
    rel_pos = _rel_pos_terms(scores.terms, shape) if rank == 3 and scores.terms else None
    if rel_pos is not None and not context.differentiable:
        rel_h, rel_w, (n, qh, qw, kh, kw) = rel_pos
        rows = build("call_method", "reshape", rel_h, n, qh * qw, kh)
        cols = build("call_method", "reshape", rel_w, n, qh * qw, kw)
        out = build("call_function", torch.ops.samfx.rel_pos_attention.default, q, k, v, rows, cols, scores.scale)
    else:
        mask = None
        for term, level in scores.terms:
            expanded = build("call_method", "expand", term, *level)
            term4 = build("call_method", "reshape", expanded, *((1,) * (4 - rank) + shape))
            mask = term4 if mask is None else build("call_function", operator.add, mask, term4)
        out4 = build("call_function", F.scaled_dot_product_attention, _to_4d(build, q), _to_4d(build, k),
                     _to_4d(build, v), attn_mask=mask, scale=scores.scale)
        out = build("call_method", "squeeze", out4, 0) if rank == 3 else out4
    matmul.replace_all_uses_with(out)
    return True


def _rewrite_sdpa_rel_pos(gm: fx.GraphModule, sdpa: fx.Node, context: RewriteContext) -> bool:
    """SDPA whose mask is SAM's decomposed bias, built in full (Hugging Face's
    ``SamVisionSdpaAttention``) -> ``samfx::rel_pos_attention`` on the two terms."""
    if context.differentiable:
        return False
    q, k, v = (_arg(sdpa, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = _arg(sdpa, 3, "attn_mask")
    if _arg(sdpa, 4, "dropout_p", 0.0) != 0.0 or _arg(sdpa, 5, "is_causal", False) or sdpa.kwargs.get("enable_gqa"):
        return False
    shapes = [_shape(t) for t in (q, k, v)]
    if mask is None or any(s is None or len(s) != 4 for s in shapes):
        return False
    (b, heads, length, dim), (_, _, keys, _), _ = shapes
    mask_shape = _shape(mask)
    if mask_shape not in ((b, heads, length, keys), (b * heads, length, keys)) or len(mask.users) != 1:
        return False
    rel_pos = _rel_pos_terms(_split_term(mask, mask_shape), (b * heads, length, keys))
    if rel_pos is None:
        return False
    rel_h, rel_w, (_, _, _, kh, kw) = rel_pos
    scale = _arg(sdpa, 6, "scale")
    build = _Builder(gm.graph, sdpa)
    rows = build("call_method", "reshape", rel_h, b, heads, length, kh)
    cols = build("call_method", "reshape", rel_w, b, heads, length, kw)
    out = build("call_function", torch.ops.samfx.rel_pos_attention.default, q, k, v, rows, cols,
                dim ** -0.5 if scale is None else float(scale))
    sdpa.replace_all_uses_with(out)
    return True


@register_rewrite("attention")
def rewrite_attention(gm: fx.GraphModule, context: RewriteContext) -> int:
    """softmax(scale * q @ k^T + bias) @ v -> fused SDPA; SAM's decomposed rel-pos bias -> samfx::rel_pos_attention."""
    count = 0
    for node in list(gm.graph.nodes):
        if _is(node, *_SOFTMAX):
            count += _rewrite_softmax_attention(gm, node, context)
        elif _is(node, *_SDPA):
            count += _rewrite_sdpa_rel_pos(gm, node, context)
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
