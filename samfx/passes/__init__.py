"""Graph passes. Each module registers one pass; ``list_passes()`` shows them.

Example::

    >>> import samfx
    >>> [p.name for p in samfx.passes.list_passes()]
    ['quantize', 'split_qkv']
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
from .quantize import QuantizeConfig, quantize
from .split_qkv import SplitQKVConfig, split_qkv

__all__ = [
    "PassConfig",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PassResult",
    "QuantizeConfig",
    "SplitQKVConfig",
    "get_pass",
    "list_passes",
    "quantize",
    "register_pass",
    "split_qkv",
]
