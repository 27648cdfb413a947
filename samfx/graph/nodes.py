"""Reading fx nodes: which op a node calls, its arguments, its recorded value, its module.

``x.softmax(-1)``, ``torch.softmax(x, -1)`` and ``F.softmax(x, dim=-1)`` are
one op to a pass; :func:`op_name` gives the canonical name of a node's op for
both ``call_method`` and ``call_function`` nodes (graphs from
``torch.fx.symbolic_trace`` and from Dynamo alike). :func:`module_path` names
the module a node was traced in.

Example::

    >>> import torch
    >>> import torch.fx as fx
    >>> class Attention(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.drop = torch.nn.Dropout(0.0)
    ...     def forward(self, q, k):
    ...         return self.drop((q @ k.transpose(-2, -1)).softmax(-1))
    >>> class Model(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = Attention()
    ...     def forward(self, q, k):
    ...         return self.attn(q, k)
    >>> graph = fx.Tracer().trace(Model())
    >>> [(op_name(n), module_path(n)) for n in graph.nodes if n.op.startswith("call_")]
    [('transpose', 'attn'), ('matmul', 'attn'), ('softmax', 'attn'), (None, 'attn.drop')]
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["follows_softmax", "module_path", "module_paths", "node_arg", "node_value", "op_name"]

_FUNCTIONS: dict[Any, str] = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    torch.softmax: "softmax", F.softmax: "softmax", torch.special.softmax: "softmax",
    operator.add: "add", torch.add: "add",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    torch.reshape: "view",
    torch.transpose: "transpose", torch.permute: "permute",
    F.dropout: "dropout", torch.dropout: "dropout",
    F.scaled_dot_product_attention: "sdpa",
    operator.getitem: "getitem", torch.unbind: "unbind", torch.split: "split", torch.chunk: "chunk",
}
_METHODS = {"bmm": "matmul", "true_divide": "div", "view_as": "view", "reshape_as": "view", "reshape": "view"}


def op_name(node: Any) -> str | None:
    """Canonical name of the op ``node`` calls (``None`` for other nodes and non-nodes).

    Reshapes of all spellings are ``"view"``, ``bmm`` is ``"matmul"``, division is
    ``"div"``, SDPA is ``"sdpa"``; methods keep their own name otherwise.
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return _METHODS.get(str(node.target), str(node.target))
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    return None


def node_arg(node: fx.Node, index: int, keyword: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, given positionally or as ``keyword``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(keyword, default)


def node_value(node: fx.Node) -> Any:
    """The value recorded by shape propagation (``meta["val"]``, Dynamo's
    ``meta["example_value"]``), or ``None``."""
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    return None


def module_paths(node: fx.Node) -> list[str]:
    """Paths of the modules ``node`` was traced in, outermost first.

    Read from ``meta["nn_module_stack"]``; fx names the second and later calls
    of one module ``path@1``, ``path@2``, ...: the suffix is dropped, so every
    call of a module has its path.
    """
    return [key.split("@")[0] for key in node.meta.get("nn_module_stack") or {}]


def module_path(node: fx.Node) -> str | None:
    """Path of the innermost module ``node`` was traced in (``None`` outside any)."""
    paths = module_paths(node)
    return paths[-1] if paths else None


#: Ops that pass a tensor's values through unchanged (in eval mode) for :func:`follows_softmax`.
_PASSTHROUGH = ("to", "type", "type_as", "float", "contiguous", "dropout")


def follows_softmax(node: Any, root: nn.Module | None = None) -> bool:
    """Whether ``node``'s value is a softmax's output, directly or through casts,
    dropouts and identities (probabilities: every value in ``[0, 1]``).

    ``root`` resolves ``call_module`` nodes, so that dropout and identity modules
    are recognised by type, whatever their attribute name.
    """
    while isinstance(node, fx.Node):
        name = op_name(node)
        if name == "softmax":
            return True
        passthrough = name in _PASSTHROUGH or (
            node.op == "call_module" and root is not None
            and isinstance(root.get_submodule(str(node.target)), (nn.Dropout, nn.Identity)))
        if not passthrough or not node.args:
            return False
        node = node.args[0]
    return False
