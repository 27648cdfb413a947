"""Graph passes. Each module registers one pass; ``list_passes()`` shows them.

Example::

    >>> import samfx
    >>> [p.name for p in samfx.passes.list_passes()][:2]
    ['split_qkv', 'hyper']
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
from .hyper import HyperConfig, hyper

__all__ = [
    "HyperConfig",
    "PassConfig",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PassResult",
    "SplitQKVConfig",
    "get_pass",
    "hyper",
    "list_passes",
    "register_pass",
    "split_qkv",
]
