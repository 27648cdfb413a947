"""Graph passes. Each module registers one pass; ``list_passes()`` shows them.

Example::

    >>> import samfx
    >>> [p.name for p in samfx.passes.list_passes()]
    ['split_qkv', 'fuse_attention', 'bf16', 'hyper', 'token_cluster', 'prune', 'quantize', 'share_image_side']
"""

from .base import (
    FidelityFloorError,
    PassConfig,
    PassContext,
    PassError,
    PassFailed,
    PassInfo,
    PassReport,
    PassResult,
    get_pass,
    list_passes,
    register_pass,
    unregister_pass,
)
from .options import PassOption, format_value, parse_pass, parse_passes, pass_options
from .split_qkv import SplitQKVConfig, split_qkv
from .fuse_attention import FuseAttentionConfig, fuse_attention
from .bf16 import BF16Config, bf16
from .hyper import HyperConfig, hyper
from .token_cluster import TokenClusterConfig, token_cluster
from .token_cluster import tune as tune_token_cluster
from .prune import PruneConfig, prune
from .quantize import QuantizeConfig, quantize
from .share_image_side import ShareImageSideConfig, share_image_side

__all__ = [
    "BF16Config",
    "FidelityFloorError",
    "FuseAttentionConfig",
    "HyperConfig",
    "PassConfig",
    "PassContext",
    "PassError",
    "PassFailed",
    "PassInfo",
    "PassOption",
    "PassReport",
    "PassResult",
    "PruneConfig",
    "QuantizeConfig",
    "ShareImageSideConfig",
    "SplitQKVConfig",
    "TokenClusterConfig",
    "format_value",
    "get_pass",
    "hyper",
    "list_passes",
    "parse_pass",
    "parse_passes",
    "pass_options",
    "prune",
    "quantize",
    "register_pass",
    "unregister_pass",
    "bf16",
    "fuse_attention",
    "share_image_side",
    "split_qkv",
    "token_cluster",
    "tune_token_cluster",
]
