"""Recognising torch-level ops in fx graphs, whichever way upstream code spells them.

``x.softmax(-1)``, ``torch.softmax(x, -1)`` and ``F.softmax(x, dim=-1)`` are
one op to a pass; :func:`op_name` gives the canonical name of a node's op for
both ``call_method`` and ``call_function`` nodes (graphs from
``torch.fx.symbolic_trace`` and from Dynamo alike).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["node_arg", "node_value", "op_name"]

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
