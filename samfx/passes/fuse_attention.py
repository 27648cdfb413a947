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

:func:`match_attention` and :func:`rewrite_attention` work on any torch-level
fx graph (``torch.fx.symbolic_trace``, Dynamo) whose nodes carry fake-tensor
values in ``meta["val"]`` or ``meta["example_value"]``, so a compile backend can
reuse them.

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> fast = samfx.optimize(sam, ["fuse_attention"])
    >>> print(fast.samfx_report.passes[0].summary)
    image_encoder: 2 rel_pos_attention; mask_decoder: 7 sdpa
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture import CapturedModel
from ..kernels.rel_pos import rel_pos_sdpa  # also registers torch.ops.samfx.rel_pos_attention
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass
from .fx_ops import node_arg, node_value, op_name

__all__ = [
    "AttentionMatch",
    "FuseAttentionConfig",
    "NoMatch",
    "fuse_attention",
    "fuse_graph_attention",
    "match_attention",
    "rewrite_attention",
]

REL_POS_MODES = ("blockwise", "mask")
SITE_KINDS = ("sam_vit", "hf_vit", "hiera", "tinyvit", "decoder")


@dataclass(frozen=True)
class FuseAttentionConfig(PassConfig):
    """Options of :func:`fuse_attention`.

    Attributes:
        rel_pos: decomposed relative positions go to ``samfx::rel_pos_attention``
            (``"blockwise"``: the bias is added per block, memory stays linear in
            tokens) or to SDPA with the bias materialised as a mask (``"mask"``).
        kinds: rewrite only attention sites of these kinds (``sam_vit``,
            ``hf_vit``, ``hiera``, ``tinyvit``, ``decoder``); empty: all.
    """

    rel_pos: str = "blockwise"
    kinds: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.rel_pos not in REL_POS_MODES:
            raise PassError(f"fuse_attention: rel_pos must be one of {REL_POS_MODES}, got {self.rel_pos!r}")
        unknown = set(self.kinds) - set(SITE_KINDS)
        if unknown:
            raise PassError(f"fuse_attention: unknown attention kinds {sorted(unknown)}; kinds are {SITE_KINDS}")


class NoMatch(Exception):
    """A softmax or SDPA node that is not an attention core this pass can fuse."""


_VIEWS = ("view",)
_CASTS = ("to", "type", "type_as", "float", "contiguous")


def _value(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return node
    value = node_value(node)
    if value is None:
        raise NoMatch(f"no shape recorded for {node.name} (propagate shapes first)")
    return value


def _shape(node: Any) -> tuple[int, ...]:
    value = _value(node)
    if not isinstance(value, torch.Tensor):
        raise NoMatch(f"{getattr(node, 'name', node)} is not a tensor")
    return tuple(int(s) for s in value.shape)


def _is_scalar(x: Any) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    return isinstance(x, fx.Node) and isinstance(_value(x), (int, float, torch.SymInt, torch.SymFloat))


# -- the match ----------------------------------------------------------------


@dataclass
class AttentionMatch:
    """One attention core found in a graph.

    Attributes:
        output: the node whose value is the attention output (replaced).
        q, k, v: nodes of shape ``(*L, Nq, D)``, ``(*L, Nk, D)``, ``(*L, Nk, Dv)``;
            ``k_transposed`` means ``k`` is given as ``(*L, D, Nk)``.
        factors: ``("mul" | "div", scalar)`` applied to ``q @ k^T``.
        rows, cols: decomposed relative-position terms, as
            ``(node, factors)``: a ``(..., qh, qw, kh, 1)`` or ``(..., qh, qw, 1, kw)``
            tensor and the scalar factors applied to it.
        masks: other additive terms ``(node, factors)`` that broadcast onto the scores.
        nodes: nodes of the original core that the rewrite removes.
        sdpa: the core already is an SDPA call.
    """

    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_transposed: bool = False
    factors: list[tuple[str, Any]] = field(default_factory=list)
    rows: list[tuple[fx.Node, tuple]] = field(default_factory=list)
    cols: list[tuple[fx.Node, tuple]] = field(default_factory=list)
    masks: list[tuple[fx.Node, tuple]] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    sdpa: bool = False

    @property
    def rel_pos(self) -> bool:
        return bool(self.rows)

    @property
    def fused(self) -> bool:
        """Already a fused call (SDPA with no decomposed bias): nothing to rewrite."""
        return self.sdpa and not self.rel_pos


def match_attention(node: fx.Node) -> AttentionMatch:
    """Match the attention core around a ``softmax`` or SDPA node.

    Raises:
        NoMatch: with the reason, when ``node`` is not a core this pass handles
            (its scores or probabilities are used elsewhere, a bias it cannot
            place, an active dropout, a causal SDPA, ...).
    """
    name = op_name(node)
    if name == "softmax":
        match = _match_softmax(node)
    elif name == "sdpa":
        match = _match_sdpa(node)
    else:
        raise NoMatch(f"{node.name} is neither a softmax nor an SDPA call")
    if bool(match.rows) != bool(match.cols):
        raise NoMatch("a decomposed relative position on one axis only")
    if match.rel_pos and match.masks:
        raise NoMatch("both decomposed relative positions and another additive bias")
    return match


def _match_softmax(softmax: fx.Node) -> AttentionMatch:
    rank = len(_shape(softmax))
    dim = node_arg(softmax, 1, "dim")
    if dim is None or dim % rank != rank - 1:
        raise NoMatch("softmax is not over the last dim")
    chain = [softmax]
    probs = softmax
    while True:
        users = list(probs.users)
        if len(users) != 1:
            raise NoMatch("the attention probabilities are used elsewhere")
        user = users[0]
        name = op_name(user)
        if name in _CASTS and user.args[0] is probs:
            pass
        elif name == "dropout" and (node_arg(user, 1, "p", 0.5) == 0 or node_arg(user, 2, "training", True) is False):
            pass
        elif name == "matmul" and user.args[0] is probs and user.args[1] is not probs:
            av = user
            break
        else:
            raise NoMatch(f"the attention probabilities go into {name or user.op}")
        chain.append(user)
        probs = user
    nodes = chain + [av]
    factors: list[tuple[str, Any]] = []
    pending: list[tuple[fx.Node, fx.Node, tuple]] = []  # (term, add node, factors applied after it)
    scores = softmax.args[0]
    while True:
        if not isinstance(scores, fx.Node) or len(_value_users(scores)) != 1:
            raise NoMatch("the attention scores are used elsewhere")
        name = op_name(scores)
        if name in _VIEWS:
            nodes.append(scores)
            scores = scores.args[0]
        elif name == "add" and len(scores.args) == 2 and not scores.kwargs:
            a, b = scores.args
            on_chain, term = (a, b) if _reaches_matmul(a) else (b, a)
            if not isinstance(term, fx.Node):
                raise NoMatch(f"a constant {term!r} added to the scores")
            pending.append((term, scores, tuple(factors)))
            nodes.append(scores)
            scores = on_chain
        elif name in ("mul", "div") and len(scores.args) == 2:
            scores = _take_factor(scores, factors, nodes)
        elif name == "matmul":
            break
        else:
            raise NoMatch(f"the scores come from {name or scores.op}, not q @ k^T")
    qk = scores
    nodes.append(qk)
    q, k_t = qk.args
    q = _strip_factors(q, factors, nodes)
    k_t = _strip_factors(k_t, factors, nodes)
    k, transposed = _untranspose(k_t, nodes)
    match = AttentionMatch(av, q, k, av.args[1], not transposed, factors, nodes=nodes)
    _check_qkv(match)
    score_shape = _shape(qk)
    for term, add, outer in pending:
        _classify(term, _shape(add), score_shape, outer, match)
    return match


def _match_sdpa(sdpa: fx.Node) -> AttentionMatch:
    q, k, v = (node_arg(sdpa, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = node_arg(sdpa, 3, "attn_mask")
    if node_arg(sdpa, 4, "dropout_p", 0.0) != 0.0:
        raise NoMatch("SDPA with active dropout")
    if node_arg(sdpa, 5, "is_causal", False) or node_arg(sdpa, 7, "enable_gqa", False):
        raise NoMatch("causal or grouped-query SDPA")
    scale = node_arg(sdpa, 6, "scale")
    if scale is None:
        scale = _shape(q)[-1] ** -0.5
    match = AttentionMatch(sdpa, q, k, v, False, [("mul", scale)], nodes=[sdpa], sdpa=True)
    _check_qkv(match)
    if mask is not None:
        score_shape = (*_shape(q)[:-1], _shape(k)[-2])
        _classify(mask, score_shape, score_shape, (), match)
    return match


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read ``node``'s values, not only its shape (HF's
    ``bias.reshape_as(scores)``, ``scores.size()``)."""
    def shape_only(user: fx.Node) -> bool:
        if user.op == "call_function" and user.target is getattr:
            return user.args[1] in ("shape", "dtype", "device")
        if user.op == "call_method" and user.target in ("size", "dim"):
            return True
        return user.op == "call_method" and user.target in ("view_as", "reshape_as", "expand_as") \
            and user.args[0] is not node
    return [u for u in node.users if not shape_only(u)]


def _reaches_matmul(node: Any) -> bool:
    """Whether ``node`` is on a chain of views, factors and additions down to a matmul."""
    while isinstance(node, fx.Node):
        name = op_name(node)
        if name == "matmul":
            return True
        if name == "add":
            return any(_reaches_matmul(a) for a in node.args)
        if name not in _VIEWS + ("mul", "div"):
            return False
        node = next((a for a in node.args if isinstance(a, fx.Node) and not _is_scalar(a)), None)
    return False


def _take_factor(node: fx.Node, factors: list, nodes: list) -> fx.Node:
    """Record the scalar of ``x * s``, ``s * x`` or ``x / s``; return ``x``."""
    a, b = node.args
    if op_name(node) == "mul" and _is_scalar(a) and not _is_scalar(b):
        a, b = b, a
    if not _is_scalar(b) or _is_scalar(a):
        raise NoMatch(f"{node.name} multiplies the scores by a tensor")
    factors.append((op_name(node), b))
    nodes.append(node)
    return a


def _strip_factors(node: Any, factors: list, nodes: list) -> Any:
    while op_name(node) in ("mul", "div") and len(node.users) == 1 and len(node.args) == 2:
        a, b = node.args
        if not (_is_scalar(b) or (op_name(node) == "mul" and _is_scalar(a))) or (_is_scalar(a) and _is_scalar(b)):
            break
        node = _take_factor(node, factors, nodes)
    return node


def _untranspose(k_t: fx.Node, nodes: list) -> tuple[fx.Node, bool]:
    """``k`` from ``k.transpose(-2, -1)`` or a permute that swaps the last two dims."""
    name = op_name(k_t)
    if name in ("transpose", "permute") and len(k_t.users) == 1:
        rank = len(_shape(k_t))
        dims = [d % rank for d in (k_t.args[1:] if name == "transpose" else _dims(k_t.args[1:]))]
        swap = sorted(dims) == [rank - 2, rank - 1] if name == "transpose" else (
            dims == list(range(rank - 2)) + [rank - 1, rank - 2])
        if swap:
            nodes.append(k_t)
            return k_t.args[0], True
    return k_t, False


def _dims(args: Iterable[Any]) -> list[int]:
    args = list(args)
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _check_qkv(match: AttentionMatch) -> None:
    q, v = _shape(match.q), _shape(match.v)
    k = _shape(match.k)
    if match.k_transposed:
        k = (*k[:-2], k[-1], k[-2])
    if len(q) < 3 or q[:-2] != k[:-2] or q[:-2] != v[:-2] or q[-1] != k[-1] or k[-2] != v[-2]:
        raise NoMatch(f"q {q}, k {k}, v {v} are not batched alike")


def _frame(shape: tuple[int, ...], score_shape: tuple[int, ...]) -> str | None:
    """``flat`` for a ``(*L, Nq, Nk)`` view of the scores, ``split`` for ``(*L, qh, qw, kh, kw)``."""
    lead = math.prod(score_shape[:-2])
    nq, nk = score_shape[-2:]
    if shape[-2:] == (nq, nk) and math.prod(shape[:-2]) == lead:
        return "flat"
    if len(shape) >= 4 and shape[-4] * shape[-3] == nq and shape[-2] * shape[-1] == nk \
            and math.prod(shape[:-4]) == lead:
        return "split"
    return None


def _classify(term: Any, frame: tuple[int, ...], score_shape: tuple[int, ...], outer: tuple,
              match: AttentionMatch) -> None:
    """Sort the bias ``term``, added to scores viewed as ``frame``, into the match."""
    kind = _frame(frame, score_shape)
    if kind is None:
        raise NoMatch(f"scores viewed as {frame} are not a view of {score_shape}")
    name = op_name(term)
    if name == "add" and len(term.args) == 2 and all(isinstance(a, fx.Node) for a in term.args):
        for part in term.args:
            _classify(part, frame, score_shape, outer, match)
        return
    if name in _VIEWS and _shape(term) == frame and _frame(_shape(term.args[0]), score_shape) is not None:
        _classify(term.args[0], _shape(term.args[0]), score_shape, outer, match)
        return
    shape = _shape(term)
    shape = (1,) * (len(frame) - len(shape)) + shape
    if kind == "split":
        full_lead = math.prod(shape[:-4]) == math.prod(score_shape[:-2])
        if full_lead and shape[-4:-1] == frame[-4:-1] and shape[-1] == 1:
            match.rows.append((term, outer))
            return
        if full_lead and shape[-4:-2] == frame[-4:-2] and shape[-2] == 1 and shape[-1] == frame[-1]:
            match.cols.append((term, outer))
            return
        raise NoMatch(f"a bias of shape {_shape(term)} on scores viewed as {frame}")
    if frame[:-2] != score_shape[:-2] or torch.broadcast_shapes(shape, score_shape) != score_shape:
        raise NoMatch(f"a bias of shape {_shape(term)} that does not broadcast onto scores {score_shape}")
    match.masks.append((term, outer))


# -- the rewrite ----------------------------------------------------------------


def rewrite_attention(graph: fx.Graph, match: AttentionMatch, rel_pos: str = "blockwise") -> fx.Node:
    """Replace a matched core by SDPA or ``samfx::rel_pos_attention``; return the new node.

    New nodes take the ``nn_module_stack`` of the core's output node.
    """
    if rel_pos not in REL_POS_MODES:
        raise ValueError(f"rel_pos must be one of {REL_POS_MODES}, got {rel_pos!r}")
    stack = match.output.meta.get("nn_module_stack")
    created: list[fx.Node] = []

    def emit(kind: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = graph.create_node(kind, target, args, kwargs or {})
        if stack is not None:
            node.meta["nn_module_stack"] = dict(stack)
        created.append(node)
        return node

    def scaled(x: Any, factors: Iterable[tuple[str, Any]]) -> Any:
        for op, s in factors:
            x = emit("call_function", operator.mul if op == "mul" else operator.truediv, (x, s))
        return x

    def total(terms: list[tuple[fx.Node, tuple]], convert: Any) -> fx.Node:
        result = None
        for term, outer in terms:
            part = scaled(convert(term), outer)
            result = part if result is None else emit("call_function", operator.add, (result, part))
        return result

    with graph.inserting_before(match.output):
        k = match.k
        if match.k_transposed:
            k = emit("call_method", "transpose", (k, -2, -1))
        scale = _fold(match.factors)
        if not isinstance(scale, float):
            scale = scaled(1.0, match.factors)
        if match.rel_pos:
            rel_h = total(match.rows, lambda t: emit("call_method", "squeeze",
                                                     (emit("call_method", "flatten", (t, -4, -3)), -1)))
            rel_w = total(match.cols, lambda t: emit("call_method", "squeeze",
                                                     (emit("call_method", "flatten", (t, -4, -3)), -2)))
            target = torch.ops.samfx.rel_pos_attention.default if rel_pos == "blockwise" else rel_pos_sdpa
            fused = emit("call_function", target, (match.q, k, match.v, rel_h, rel_w, scale))
        else:
            kwargs: dict[str, Any] = {"scale": scale}
            if match.masks:
                kwargs["attn_mask"] = total(match.masks, lambda t: t)
            fused = emit("call_function", F.scaled_dot_product_attention, (match.q, k, match.v), kwargs)
    match.output.replace_all_uses_with(fused)
    _erase(graph, match.nodes)
    return fused


def _fold(factors: list[tuple[str, Any]]) -> float | None:
    """The product of constant factors, or ``None`` if any is computed in the graph."""
    value = 1.0
    for op, s in factors:
        if isinstance(s, fx.Node):
            return None
        value = value * s if op == "mul" else value / s
    return float(value)


def _erase(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the core's nodes, then whatever only they used (shape arithmetic,
    the materialised bias), never a node with side effects."""
    candidates = set(nodes)
    while True:
        dead = [n for n in candidates if not n.users and n.op in ("call_function", "call_method", "get_attr")
                and (n.op == "get_attr" or not n.is_impure())]
        if not dead:
            return
        for node in dead:
            candidates.discard(node)
            candidates.update(node.all_input_nodes)
            graph.erase_node(node)


def fuse_graph_attention(graph: fx.Graph, nodes: Iterable[fx.Node] | None = None,
                         rel_pos: str = "blockwise") -> tuple[list[fx.Node], list[str]]:
    """Fuse every attention core among ``nodes`` (default: the whole graph).

    Returns the new nodes and the reasons for softmax/SDPA nodes left alone.
    Cores that already are plain SDPA calls are neither.
    """
    candidates = [n for n in (graph.nodes if nodes is None else nodes) if op_name(n) in ("softmax", "sdpa")]
    matches, reasons = [], []
    for node in candidates:
        try:
            match = match_attention(node)
        except NoMatch as why:
            reasons.append(f"{node.name}: {why}")
            continue
        if not match.fused:
            matches.append(match)
    return [rewrite_attention(graph, m, rel_pos) for m in matches], reasons


# -- the pass -------------------------------------------------------------------


def _site_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else None


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
                path = _site_of(node)
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
                rewrite_attention(graph, match, config.rel_pos)
            kind = "sdpa" if not todo[0][1].rel_pos else (
                "rel_pos_attention" if config.rel_pos == "blockwise" else "sdpa + rel-pos mask")
            tally[kind] = tally.get(kind, 0) + 1
        component.recompile()
    changed = any(n for t in counts.values() for k, n in t.items() if k != "already sdpa")
    summary = "; ".join(
        f"{role}: " + ", ".join(f"{n} {kind}" for kind, n in tally.items()) for role, tally in counts.items() if tally
    ) or "no attention found"
    report = PassReport("fuse_attention", config.to_dict(), changed, summary, {"attentions": counts}, skipped)
    return PassResult(captured, report)
