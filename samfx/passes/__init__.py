"""Graph passes. Each module registers one pass; ``list_passes()`` shows them.

Example::

    >>> import samfx
    >>> [p.name for p in samfx.passes.list_passes()]
    ['split_qkv', 'token_cluster']
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
from .split_qkv import SplitQKVConfig, split_qkv
from .token_cluster import TokenClusterConfig, token_cluster

__all__ = [
    "PassConfig",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PassResult",
    "SplitQKVConfig",
    "TokenClusterConfig",
    "get_pass",
    "list_passes",
    "register_pass",
    "split_qkv",
    "token_cluster",
]
