"""FLOP formulas for ``torch.utils.flop_counter``: samfx's ops and the attention
kernels PyTorch leaves uncounted, so that MACs stay honest after a rewrite.

Registered on first use by :func:`register_flop_formulas` (``flop_counter``
imports Triton, which ``import samfx`` must not).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["attention_flops", "register_flop_formulas"]

_registered = False


def attention_flops(q_shape: Any, k_shape: Any, v_shape: Any) -> int:
    """FLOPs of ``softmax(q @ k^T) @ v`` (two matmuls; the softmax is not counted,
    as for PyTorch's own SDPA formulas)."""
    *lead, n_q, d = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * math.prod(lead) * n_q * n_k * (d + d_v)


def register_flop_formulas() -> None:
    """Count samfx's ops (``rel_pos_attention``, ``hyper_linear``, the int8 ops) and the CPU
    flash-attention kernel."""
    global _registered
    if _registered:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    from . import hyper, quantized, rel_pos  # noqa: F401  (the ops must exist)

    hyper.register_flop_formula()
    quantized.register_flop_formulas()

    def formula(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return attention_flops(q_shape, k_shape, v_shape)

    targets = [torch.ops.samfx.rel_pos_attention]
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash.default not in flop_registry:
        targets.append(cpu_flash)
    register_flop_formula(targets)(formula)
    _registered = True
