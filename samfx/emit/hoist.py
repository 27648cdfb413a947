"""Work that is the same for every prompt of a batch, done once.

SAM-family mask decoders take one image embedding and a batch of prompts, and
start by copying the embedding once per prompt (``repeat_interleave``). Every
operation between that copy and the first one that meets the prompts then runs
once per prompt on identical rows: on SAM's decoder the first layer's three
image-side projections (keys and values of the token-to-image attention, the
queries of the image-to-token attention), about a quarter of its MACs per box.
A runtime cannot see that the rows are equal; the exported graph can say so.

:func:`hoist_batch_invariant` rewrites an exported program's graph (ATen ops
with fake-tensor metadata, as ``torch.export`` leaves it): it moves each
``repeat_interleave`` of a batch-1 tensor along dimension 0 past the operations
that act on each row independently and whose other operands are batch-free,
so they run on the single row and the copy comes after them. The outputs are
unchanged up to float rounding (a GEMM on one row instead of N identical
rows).

Example::

    >>> import torch
    >>> from torch.export import Dim
    >>> class Decoder(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.keys = torch.nn.Linear(8, 8)
    ...     def forward(self, image, prompts):
    ...         batch = torch.repeat_interleave(image, prompts.shape[0], dim=0)
    ...         return self.keys(batch) @ prompts.transpose(1, 2)
    >>> decoder, image, prompts = Decoder(), torch.randn(1, 16, 8), torch.randn(3, 2, 8)
    >>> program = torch.export.export(decoder, (image, prompts), dynamic_shapes=({}, {0: Dim("n")}), strict=False)
    >>> hoist_batch_invariant(program.graph_module)
    1
    >>> torch.allclose(program.module()(image, prompts), decoder(image, prompts), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["hoist_batch_invariant"]

_aten = torch.ops.aten

#: Ops that act on each index of dimension 0 independently whatever their other
#: arguments, as long as the tensors among those are batch-free.
_ROWWISE = {
    _aten.linear.default, _aten.layer_norm.default, _aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor,
    _aten.div.Tensor, _aten.relu.default, _aten.gelu.default, _aten.sigmoid.default, _aten.conv2d.default,
    _aten.conv_transpose2d.input, _aten.clone.default, _aten.contiguous.default,
}


def _keeps_dim0(node: fx.Node) -> bool:
    """Whether a layout op leaves dimension 0 where it is."""
    if node.target is _aten.permute.default:
        return node.args[1][0] == 0
    if node.target is _aten.transpose.int:
        rank = node.args[0].meta["val"].dim()
        return 0 not in (node.args[1] % rank, node.args[2] % rank)
    if node.target is _aten.flatten.using_ints:
        start = node.args[1] if len(node.args) > 1 else 0
        return start % node.args[0].meta["val"].dim() >= 1
    return node.target in _ROWWISE


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _batch_free(arg: Any, rank: int) -> bool:
    """A tensor that broadcasts the same values to every row of a rank-``rank``
    batch: one row, or fewer dimensions (broadcast from the right)."""
    value = _val(arg)
    if not isinstance(value, torch.Tensor):
        return not isinstance(arg, fx.Node)  # Python scalars and constants
    return value.dim() < rank or (isinstance(value.shape[0], int) and value.shape[0] == 1)


def _copy_of_one_row(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not _aten.repeat_interleave.self_int:
        return False
    source = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    value = _val(source)
    return dim == 0 and isinstance(value, torch.Tensor) and isinstance(value.shape[0], int) and value.shape[0] == 1


def _hoist_through(user: fx.Node, copies: dict[fx.Node, tuple[fx.Node, Any]]) -> fx.Node | None:
    """Compute ``user`` on the single rows and copy its result, if that is exact."""
    if user.op != "call_function" or not _keeps_dim0(user) or user.kwargs.get("out") is not None:
        return None
    rank = _val(user).dim() if isinstance(_val(user), torch.Tensor) else -1
    repeats = None
    for arg in user.all_input_nodes:
        if arg in copies:
            if repeats is not None and copies[arg][1] is not repeats:
                return None
            repeats = copies[arg][1]
        elif not _batch_free(arg, rank):
            return None
    if repeats is None:
        return None
    def single(a: Any) -> Any:
        return copies[a][0] if isinstance(a, fx.Node) and a in copies else a

    graph = user.graph
    args, kwargs = fx.node.map_aggregate(user.args, single), fx.node.map_aggregate(user.kwargs, single)
    with graph.inserting_before(user):
        row = graph.call_function(user.target, args, kwargs)
        fake = fx.node.map_aggregate((args, kwargs), lambda a: _val(a) if isinstance(a, fx.Node) else a)
        mode = torch._guards.detect_fake_mode([_val(n) for n in user.all_input_nodes])
        with mode:
            row.meta["val"] = user.target(*fake[0], **fake[1])
        copy = graph.call_function(_aten.repeat_interleave.self_int, (row, repeats), {"dim": 0})
        copy.meta["val"] = _val(user)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in user.meta:
            row.meta[key] = copy.meta[key] = user.meta[key]
    user.replace_all_uses_with(copy)
    graph.erase_node(user)
    copies[copy] = (row, repeats)
    return copy


def hoist_batch_invariant(gm: fx.GraphModule) -> int:
    """Run batch-invariant work once instead of once per prompt.

    Args:
        gm: a graph of ATen ops with ``meta["val"]`` fake tensors (the
            ``graph_module`` of a ``torch.export`` program); rewritten in place
            and recompiled.

    Returns:
        How many operations now run on a single row instead of the batch.
    """
    copies: dict[fx.Node, tuple[fx.Node, Any]] = {}
    for node in gm.graph.nodes:
        if _copy_of_one_row(node):
            copies[node] = (node.args[0], node.args[1])
    hoisted = 0
    pending = list(copies)
    while pending:
        copy = pending.pop()
        for user in list(copy.users):
            moved = _hoist_through(user, copies)
            if moved is not None:
                hoisted += 1
                pending.append(moved)
    if hoisted:
        for copy in copies:
            if copy.graph is gm.graph and not copy.users and copy.op == "call_function":
                gm.graph.erase_node(copy)
        gm.graph.lint()
        gm.recompile()
    return hoisted
