"""Token sequences turned back into feature maps, as a reshape then a permute.

SAM's mask decoder hands its image tokens ``(B, H*W, C)`` to the upscaling
convolutions as ``tokens.transpose(1, 2).view(B, C, H, W)``. In that order the
runtime must move every element (the transpose) and then, as its convolutions
want channels last, move them all back (OpenVINO: a 24 x 4096 x 256 transpose
and reorder, 40 ms of LiteMedSAM's 24-box decoder). Written
``tokens.view(B, H, W, C).permute(0, 3, 1, 2)``, the same tensor is the tokens'
own memory seen channels-last, which OpenVINO fuses with its reorder.

:func:`reshape_then_permute` rewrites an exported program's ATen graph in place;
values are unchanged (bit for bit).
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["reshape_then_permute"]

_aten = torch.ops.aten


def _val(node: object) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def reshape_then_permute(gm: fx.GraphModule) -> int:
    """Replace ``view(transpose(x, 1, 2), (B, C, H, W))`` of a ``(B, H*W, C)`` ``x`` by
    ``permute(view(x, (B, H, W, C)), (0, 3, 1, 2))``; returns how many were replaced."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (_aten.view.default, _aten.reshape.default):
            continue
        transpose = node.args[0]
        if (not isinstance(transpose, fx.Node) or transpose.target is not _aten.transpose.int
                or tuple(a % 3 for a in transpose.args[1:]) not in ((1, 2), (2, 1)) or len(transpose.users) != 1):
            continue
        tokens, out = _val(transpose.args[0]), _val(node)
        if tokens is None or out is None or tokens.dim() != 3 or out.dim() != 4:
            continue
        batch, channels, height, width = out.shape
        if tokens.shape[0] != batch or tokens.shape[2] != channels:
            continue
        sizes = list(node.args[1])  # the graph's own size arguments (nodes for symbolic sizes)
        with graph.inserting_before(node):
            maps = graph.call_function(_aten.view.default, (transpose.args[0], [sizes[0], *sizes[2:], sizes[1]]))
            permuted = graph.call_function(_aten.permute.default, (maps, [0, 3, 1, 2]))
        mode = torch._guards.detect_fake_mode([tokens])
        with mode:
            maps.meta["val"] = tokens.view(batch, height, width, channels)
            permuted.meta["val"] = maps.meta["val"].permute(0, 3, 1, 2)
        node.replace_all_uses_with(permuted)
        graph.erase_node(node)
        graph.erase_node(transpose)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
