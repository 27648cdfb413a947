"""Attention between a few prompt tokens and many image tokens, reassociated.

A SAM mask decoder's cross-attentions pair ~7 prompt tokens with 4096 image
tokens, and project the image side to the attention width with a Linear per
head group: ``X W^T`` costs ``N x C x D`` multiply-adds for ``N`` image tokens,
while the attention itself only ever needs ``N x (heads x tokens)`` products.
Matrix products are associative, so each projection of the many can move to the
few (per head ``h`` with width ``c``):

* keys of many: ``q_h (X W_k,h^T + b_k,h)^T = (q_h W_k,h) X^T + const per row``;
  the constant drops out of the softmax;
* values of many: ``P_h (X W_v,h^T + b_v,h) = (P_h X) W_v,h^T + b_v,h`` (rows of
  ``P`` sum to one);
* queries of many: ``(X W_q,h^T + b_q,h) k_h^T = X (W_q,h^T k_h^T) + b_q,h k_h^T``;
* outputs of many: ``concat_h(P_h v_h) W_o^T = sum_h P_h (v_h W_o,h^T)``.

Where the queries are the many, the scores are made ``(B, h, Nk, Nq)``: the
softmax then runs over a few keys with the many queries contiguous.

Each costs ``N x heads x tokens x C`` instead of ``N x C x D``: with SAM's 8
heads, width 128 and a box prompt's 7 tokens, 56 against 128 per image token,
so the decoder's image-side projections fall to 44% of their MACs. The choice
is made per site from the exported shapes (a symbolic token count is judged by
the example the program was exported with; other counts stay correct).

:func:`reassociate_few_token_attention` rewrites an exported program's ATen graph
in place; outputs are unchanged up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = ["reassociate_few_token_attention"]

_aten = torch.ops.aten


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _hint(size: Any) -> int:
    """An int, or a symbolic size's value in the example the program was exported with."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return optimization_hint(size)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass(frozen=True)
class _Heads:
    """``transpose(reshape(linear(x, weight, bias), (B, N, h, c)), 1, 2)``."""

    output: fx.Node
    linear: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    heads: int
    width: int


def _heads(node: Any) -> _Heads | None:
    if not isinstance(node, fx.Node) or node.target is not _aten.transpose.int or node.args[1:] != (1, 2):
        return None
    split = node.args[0]
    if split.target not in (_aten.reshape.default, _aten.view.default) or _only_user(split) is not node:
        return None
    linear = split.args[0]
    if linear.target is not _aten.linear.default or _only_user(linear) is not split:
        return None
    shape = _val(split).shape
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]) or _val(linear.args[0]).dim() != 3:
        return None
    bias = linear.args[2] if len(linear.args) > 2 else None
    return _Heads(node, linear, linear.args[0], linear.args[1], bias, shape[2], shape[3])


class _Emitter:
    """Adds nodes before ``anchor`` with fake values, so later passes see shapes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor = graph, anchor
        self.mode = torch._guards.detect_fake_mode([_val(n) for n in anchor.all_input_nodes])

    def __call__(self, target: Any, *args: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args)
        fake = fx.node.map_aggregate(args, lambda a: _val(a) if isinstance(a, fx.Node) else a)
        with self.mode:
            node.meta["val"] = target(*fake)
        return node


@dataclass(frozen=True)
class _Core:
    """``softmax(scale(q @ k^T)) @ v`` with each operand's head split."""

    scores: fx.Node
    probs: fx.Node
    output: fx.Node
    q: fx.Node
    k: fx.Node  # (B, h, N, c), before the transpose for the product
    v: fx.Node


def _core(softmax: fx.Node) -> _Core | None:
    if softmax.target is not _aten.softmax.int or softmax.args[1] not in (-1, 3):
        return None
    scores = softmax.args[0]
    while scores.target in (_aten.div.Tensor, _aten.mul.Tensor) and not isinstance(scores.args[1], fx.Node):
        if _only_user(scores) is None:
            return None
        scores = scores.args[0]
    if scores.target is not _aten.matmul.default or _only_user(scores) is None:
        return None
    q, k_t = scores.args
    if k_t.target is _aten.permute.default and list(k_t.args[1]) == [0, 1, 3, 2]:
        k = k_t.args[0]
    elif k_t.target is _aten.transpose.int and {a % 4 for a in k_t.args[1:]} == {2, 3}:
        k = k_t.args[0]
    else:
        return None
    output = _only_user(softmax)
    if output is None or output.target is not _aten.matmul.default or output.args[0] is not softmax:
        return None
    return _Core(scores, softmax, output, q, k, output.args[1])


def _profitable(many: int, few: int, width: int) -> bool:
    """Per token of the many, a projection costs ``C x heads x width`` and the
    product through the few ``C x heads x few``; the few's own projections are
    negligible once the many outnumber a head's width several times."""
    return few < width and many >= 4 * width


def _projected_once(x: fx.Node, scores: fx.Node) -> bool:
    """The many's projection runs on one row that broadcasts over a batch of
    prompts (``share_image_side``): it is already paid once, the product
    through the few would be paid per prompt."""
    rows, batch = _val(x).shape[0], _val(scores).shape[0]
    return isinstance(rows, int) and rows == 1 and not (isinstance(batch, int) and batch == 1)


def _rewrite_core(graph: fx.Graph, core: _Core) -> int:
    done = 0
    q, k, v = _heads(core.q), _heads(core.k), _heads(core.v)
    n_q, n_k = (_hint(_val(core.scores).shape[i]) for i in (2, 3))
    if (k is not None and _profitable(n_k, n_q, k.width) and _only_user(k.output) is not None
            and not _projected_once(k.x, core.scores)):
        emit = _Emitter(graph, core.scores)
        weight = emit(_aten.view.default, k.weight, [k.heads, k.width, _val(k.weight).shape[1]])
        queries = emit(_aten.matmul.default, core.q, weight)                     # (B, h, Nq, C)
        # The heads' queries as the rows of one product with the many keys they share:
        # (B, h Nq, C) x (B, C, Nk), not h products of Nq rows.
        scores = emit(_aten.matmul.default, emit(_aten.flatten.using_ints, queries, 1, 2),
                      emit(_aten.transpose.int, k.x, 1, 2))
        core.scores.replace_all_uses_with(emit(_aten.unflatten.int, scores, 1, [k.heads, -1]))  # (B, h, Nq, Nk)
        done += 1
    if (v is not None and _profitable(n_k, n_q, v.width) and _only_user(v.output) is core.output
            and not _projected_once(v.x, core.scores)):
        emit = _Emitter(graph, core.output)
        mixed = emit(_aten.matmul.default, emit(_aten.flatten.using_ints, core.probs, 1, 2), v.x)  # (B, h Nq, C)
        mixed = emit(_aten.unflatten.int, mixed, 1, [v.heads, -1])                            # (B, h, Nq, C)
        weight = emit(_aten.view.default, v.weight, [v.heads, v.width, _val(v.weight).shape[1]])
        values = emit(_aten.matmul.default, mixed, emit(_aten.transpose.int, weight, 1, 2))   # (B, h, Nq, c)
        if v.bias is not None:
            values = emit(_aten.add.Tensor, values, emit(_aten.view.default, v.bias, [v.heads, 1, v.width]))
        core.output.replace_all_uses_with(values)
        core = _Core(core.scores, core.probs, values, core.q, core.k, core.v)
        done += 1
    project = _output_projection(core, n_q, n_k)
    if (q is not None and _profitable(n_q, n_k, q.width) and _only_user(q.output) is core.scores
            and not _projected_once(q.x, core.scores)):
        # With the output projection reassociated too, the scores are made keys-major,
        # (B, h, Nk, Nq): the softmax then runs along an axis of a few keys with the many
        # queries contiguous (OpenVINO's softmax over a last axis of 7 ran at a third of
        # the speed), and the products take the transposes as operand layouts.
        emit = _Emitter(graph, core.scores)
        weight = emit(_aten.view.default, q.weight, [q.heads, q.width, _val(q.weight).shape[1]])  # (h, c, C)
        if project is None:
            keys = emit(_aten.matmul.default, emit(_aten.transpose.int, weight, 1, 2), core.scores.args[1])
            scores = emit(_aten.matmul.default, emit(_aten.unsqueeze.default, q.x, 1), keys)     # (B, h, Nq, Nk)
        else:
            keys = emit(_aten.flatten.using_ints, emit(_aten.matmul.default, core.k, weight), 1, 2)  # (B, h Nk, C)
            scores = emit(_aten.matmul.default, keys, emit(_aten.transpose.int, q.x, 1, 2))
            scores = emit(_aten.unflatten.int, scores, 1, [q.heads, -1])                             # (B, h, Nk, Nq)
        if q.bias is not None:
            bias = emit(_aten.view.default, q.bias, [q.heads, q.width, 1])
            bias = (emit(_aten.matmul.default, core.k, bias) if project is not None
                    else emit(_aten.transpose.int, emit(_aten.matmul.default, core.k, bias), 2, 3))
            scores = emit(_aten.add.Tensor, scores, bias)
        core.scores.replace_all_uses_with(scores)
        if project is not None:
            _keys_major(core, scores)
        done += 1
    elif project is not None and n_q > n_k:  # queries projected once per image (share_image_side)
        emit = _Emitter(graph, core.scores)
        scores = emit(_aten.matmul.default, core.k, emit(_aten.transpose.int, core.q, 2, 3))  # (B, h, Nk, Nq)
        core.scores.replace_all_uses_with(scores)
        _keys_major(core, scores)
    if project is not None:
        _rewrite_output(graph, core, project, keys_major=core.probs.args[1] == 2)
        done += 1
    return done


def _keys_major(core: _Core, scores: fx.Node) -> None:
    """The scaling and softmax between ``scores``, now ``(B, h, Nk, Nq)``, and the
    probabilities, along the keys' axis."""
    node = _only_user(scores)
    while node is not core.probs:
        _refresh(node)
        node = _only_user(node)
    core.probs.args = (core.probs.args[0], 2, *core.probs.args[2:])
    _refresh(core.probs)


def _refresh(node: fx.Node) -> None:
    """``node``'s fake value, recomputed from its (changed) inputs."""
    mode = torch._guards.detect_fake_mode([_val(n) for n in node.all_input_nodes])
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), lambda a: _val(a) if isinstance(a, fx.Node) else a)
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def _output_projection(core: _Core, n_q: int, n_k: int) -> fx.Node | None:
    """The ``linear`` of ``linear(reshape(transpose(P @ v, 1, 2), (B, Nq, D)), W_o, b_o)``
    when a product over heads x tokens is cheaper."""
    merge = _only_user(core.output)
    if merge is None or merge.target is not _aten.transpose.int or merge.args[1:] != (1, 2):
        return None
    flat = _only_user(merge)
    if flat is None or flat.target not in (_aten.reshape.default, _aten.view.default):
        return None
    project = _only_user(flat)
    if project is None or project.target is not _aten.linear.default or project.args[0] is not flat:
        return None
    heads, width = _val(core.v).shape[1], _val(core.v).shape[3]
    if not (isinstance(heads, int) and isinstance(width, int) and _profitable(n_q, n_k, width)):
        return None
    return project


def _rewrite_output(graph: fx.Graph, core: _Core, project: fx.Node, keys_major: bool) -> None:
    """The output projection as one product over heads x tokens (``keys_major``:
    the probabilities are ``(B, h, Nk, Nq)``)."""
    heads, width = _val(core.v).shape[1], _val(core.v).shape[3]
    emit = _Emitter(graph, project)
    weight, bias = project.args[1], project.args[2] if len(project.args) > 2 else None
    per_head = emit(_aten.permute.default, emit(_aten.view.default, weight, [_val(weight).shape[0], heads, width]),
                    [1, 2, 0])                                                             # (h, c, C_out)
    values = emit(_aten.flatten.using_ints, emit(_aten.matmul.default, core.v, per_head), 1, 2)  # (B, h Nk, C_out)
    if keys_major:
        probs = emit(_aten.transpose.int, emit(_aten.flatten.using_ints, core.probs, 1, 2), 1, 2)  # (B, Nq, h Nk)
    else:
        probs = emit(_aten.flatten.using_ints, emit(_aten.transpose.int, core.probs, 1, 2), 2, 3)  # (B, Nq, h Nk)
    out = emit(_aten.matmul.default, probs, values)
    if bias is not None:
        out = emit(_aten.add.Tensor, out, bias)
    project.replace_all_uses_with(out)


def _drop_identity_casts(graph: fx.Graph) -> int:
    """Remove dtype casts to the dtype a tensor already has, and export's metadata
    asserts. A bfloat16 model's float32 islands (softmax, norms) are such casts in
    the float32 copy an export traces; left in, they hide the attention's pattern."""
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            dropped += 1
        elif node.target in (_aten.to.dtype, _aten._to_copy.default) and isinstance(node.args[0], fx.Node):
            source, result = _val(node.args[0]), _val(node)
            if (source is not None and result is not None and source.dtype == result.dtype
                    and source.device == result.device and set(node.kwargs) <= {"dtype"}):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                dropped += 1
    return dropped


def reassociate_few_token_attention(gm: fx.GraphModule) -> int:
    """Project the few tokens instead of the many wherever that saves MACs.

    Args:
        gm: a graph of ATen ops with ``meta["val"]`` fake tensors (a
            ``torch.export`` program's ``graph_module``); rewritten in place.

    Returns:
        How many projections of the many were replaced.
    """
    done = 0
    tidied = _drop_identity_casts(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _aten.softmax.int:
            core = _core(node)
            if core is not None:
                done += _rewrite_core(gm.graph, core)
    if done or tidied:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done
