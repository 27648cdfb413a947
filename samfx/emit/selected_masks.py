"""Only the masks a decoder returns are computed.

SAM's mask decoder computes all of its mask tokens' masks, ``hyper_in @
upscaled`` with one hypernetwork MLP per token, and then keeps one
(``multimask_output=False``) or three of the four. A deployment graph is
traced for one of the two, so the selection can move before the product: the
mask product of ``multimask_output=False`` shrinks to a quarter (LiteMedSAM,
24 boxes: a 24 x 4 x 32 x 65536 product in OpenVINO, 17-23 ms of the decoder's
~370) and the unused tokens' MLPs drop out of the graph.

:func:`compute_selected_masks_only` rewrites an exported program's ATen graph
in place; the returned masks are unchanged (up to the rounding of a
smaller product).
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["compute_selected_masks_only"]

_aten = torch.ops.aten


def _val(node: object) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def compute_selected_masks_only(gm: fx.GraphModule) -> int:
    """Replace ``view(A @ B, (N, -1, H, W))[:, s:e]`` by ``view(A[:, s:e] @ B, (N, -1, H, W))``
    (and a stacked ``A``'s unused rows by nothing); returns how many selections moved."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.slice.Tensor or node.args[1] != 1:
            continue
        view = node.args[0]
        if view.target not in (_aten.view.default, _aten.reshape.default) or len(view.users) != 1:
            continue
        product = view.args[0]
        if (not isinstance(product, fx.Node) or product.target is not _aten.matmul.default
                or len(product.users) != 1):
            continue
        rows, out = _val(product.args[0]), _val(view)
        if rows is None or rows.dim() != 3 or out.dim() != 4 or tuple(out.shape[:2]) != tuple(rows.shape[:2]):
            continue
        count = rows.shape[1]
        start, end = node.args[2] if len(node.args) > 2 else 0, node.args[3] if len(node.args) > 3 else count
        step = node.args[4] if len(node.args) > 4 else 1
        if not all(isinstance(v, int) for v in (start, end, step, count)) or step != 1:
            continue
        start, end = max(0, min(start, count)), max(0, min(end, count))
        if end - start == count:
            continue
        shape = list(view.args[1])
        if shape[1] != -1:
            shape[1] = end - start
        with graph.inserting_before(node):
            selected = _select_rows(graph, product.args[0], start, end)
            smaller = graph.call_function(_aten.matmul.default, (selected, product.args[1]))
            masks = graph.call_function(view.target, (smaller, shape))
        mode = torch._guards.detect_fake_mode([rows])
        with mode:
            selected.meta["val"] = rows[:, start:end]
            smaller.meta["val"] = torch.matmul(selected.meta["val"], _val(product.args[1]))
            masks.meta["val"] = _val(node)
        node.replace_all_uses_with(masks)
        for dead in (node, view, product):
            graph.erase_node(dead)
        done += 1
    if done:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return done


def _select_rows(graph: fx.Graph, rows: fx.Node, start: int, end: int) -> fx.Node:
    """``rows[:, start:end]``: of a ``stack(tensors, 1)``, a stack of the selected tensors only."""
    if rows.target is _aten.stack.default and (rows.args[1] if len(rows.args) > 1 else 0) == 1:
        return graph.call_function(_aten.stack.default, (list(rows.args[0])[start:end], 1))
    return graph.call_function(_aten.slice.Tensor, (rows, 1, start, end))
