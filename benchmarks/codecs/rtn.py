"""Round-to-nearest per-channel integers: the plain quantizer hyper is compared with.

Each row (output channel) gets a symmetric scale ``max|w| / (2**(bits-1) - 1)``
and every weight is rounded to the nearest multiple of it. Stored, that is
``bits`` per weight plus one float16 scale per row.

Example::

    >>> import torch
    >>> from benchmarks.codecs.rtn import quantize
    >>> w = torch.randn(64, 256)
    >>> back, bits_per_weight = quantize(w, 8)
    >>> bool((back - w).abs().max() <= w.abs().amax(1).max() / 127 / 2 + 1e-6), round(bits_per_weight, 3)
    (True, 8.062)
"""

from __future__ import annotations

import torch

__all__ = ["quantize"]


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """The tensor rounded to ``bits``-bit integers per row, and the stored bits per weight."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    levels = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(1, keepdim=True) / levels).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    back = torch.clamp(torch.round(w / scale), -levels, levels) * scale
    return back.reshape(weight.shape), bits + 16 * w.shape[0] / w.numel()
