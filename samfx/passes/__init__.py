"""Graph passes. Each module registers one pass; ``list_passes()`` shows them.

Example::

    >>> import samfx
    >>> [p.name for p in samfx.passes.list_passes()]
    ['prune', 'split_qkv']
"""

from .base import (
    PassConfig,
    PassContext,
    PassError,
    PassInfo,
    PassReport,
    PassResult,
    get_pass,
    list_passes,
    register_pass,
)
from .prune import PruneConfig, prune
from .split_qkv import SplitQKVConfig, split_qkv

__all__ = [
    "PassConfig",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PassResult",
    "PruneConfig",
    "SplitQKVConfig",
    "get_pass",
    "list_passes",
    "prune",
    "register_pass",
    "split_qkv",
]
