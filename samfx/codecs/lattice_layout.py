"""The runtime layouts of lattice codes: bit-plane widths and code shapes.

Shared by the codec (:mod:`samfx.codecs.lattice`) and its CPU and GPU kernels;
kept apart so that the kernels, which the codec calls to encode, do not import
the codec back.

Example::

    >>> from samfx.codecs.lattice_layout import code_shape, plane_widths
    >>> plane_widths(11), code_shape(4, 10, 11, "packed"), code_shape(4, 10, 11, "uint16")
    ([8, 2, 1], (4, 11), (4, 5))
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "code_shape", "layout_of", "padded_pairs", "plane_widths"]

LAYOUTS = ("packed", "uint16")


def layout_of(codes: torch.Tensor) -> str:
    """``"uint16"`` for one ``int16`` per pair, else ``"packed"`` bit planes."""
    return "uint16" if codes.dtype == torch.int16 else "packed"


def plane_widths(bits: int) -> list[int]:
    """Widths of the bit planes of ``bits``-bit codes, lowest bits first."""
    return [8] * (bits // 8) + [w for w in (4, 2, 1) if bits % 8 & w]


def padded_pairs(pairs: int) -> int:
    """Pairs per row rounded up to a multiple of 8 (a byte of 1-bit fields)."""
    return -(-pairs // 8) * 8


def code_shape(rows: int, cols: int, bits: int, layout: str) -> tuple[int, int]:
    """Shape of the runtime codes of a ``rows x cols`` tensor."""
    pairs = (cols + 1) // 2
    return (rows, pairs) if layout == "uint16" else (rows, padded_pairs(pairs) * bits // 8)
