"""fx graph helpers shared by passes and emitters: reading nodes, matching attention.

Below :mod:`samfx.passes` and :mod:`samfx.emit`, above capture: a helper here
works on any torch-level fx graph (captured by samfx, or handed to the
torch.compile backend by Dynamo).

Example::

    >>> import torch
    >>> from samfx.graph import op_name
    >>> gm = torch.fx.symbolic_trace(lambda x: torch.softmax(x, -1) + x.softmax(-1))
    >>> [op_name(n) for n in gm.graph.nodes]
    [None, 'softmax', 'softmax', 'add', None]
"""

from .attention import REL_POS_MODES, AttentionMatch, NoMatch, fuse_graph_attention, match_attention, replace_attention_core
from .nodes import follows_softmax, module_path, module_paths, node_arg, node_value, op_name

__all__ = [
    "REL_POS_MODES",
    "AttentionMatch",
    "NoMatch",
    "follows_softmax",
    "fuse_graph_attention",
    "match_attention",
    "module_path",
    "module_paths",
    "node_arg",
    "node_value",
    "op_name",
    "replace_attention_core",
]
