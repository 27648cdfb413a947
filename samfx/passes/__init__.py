"""Graph passes. Each module registers one pass; ``list_passes()`` shows them.

Example::

    >>> import samfx
    >>> [p.name for p in samfx.passes.list_passes()]
    ['split_qkv', 'fuse_attention']
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
from .fuse_attention import FuseAttentionConfig, fuse_attention

__all__ = [
    "FuseAttentionConfig",
    "PassConfig",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PassResult",
    "SplitQKVConfig",
    "get_pass",
    "list_passes",
    "register_pass",
    "fuse_attention",
    "split_qkv",
]
