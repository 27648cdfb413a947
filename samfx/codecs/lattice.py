"""samfx's hyper codec: each pair of weights becomes one integer on the hexagonal lattice.

Hyper-Compression (Birkhoff) replaces each pair of weights, a point in R², by
the index of a nearby point of a fixed 2-D point set. This codec keeps that
idea and changes what limits it:

* **per-row centre and step.** Each output channel (row) ``r`` gets a centre
  ``c_r`` (the midpoint of its range) and a step ``Δ_r`` proportional to its
  spread, so every row is quantized to the same *relative* error ``rel_error``.
  Birkhoff uses one absolute square (side 0.1) per tensor: far too coarse for
  small decoder weights, while large encoder weights fall into its rings.
* **the hexagonal lattice A2.** It is the best 2-D lattice for quantization:
  at equal point density its mean squared error is 3.8 % lower than a square
  grid's (normalised second moment 5/(36√3) against 1/12). Its nearest point is
  computed, not searched: A2 is the union of two rectangular grids, and the
  nearest point is the nearer of the two rounded candidates.
* **an error target, not a point budget.** The step follows from the target
  (per-coordinate RMS error = √(5/72)·step for A2), so the codes take as many
  distinct values as the data needs; the checkpoint entropy-codes them
  (:func:`samfx.codecs.huffman`), which costs close to the entropy of the codes
  instead of a fixed ⌈log2(U·(K+1))⌉ bits.
* **fixed-width runtime codes.** In memory each pair is one code θ of ``bits``
  bits (the smallest width that holds the tensor's codes), packed in bit
  planes (``layout="packed"``, exactly ``bits`` bits per pair) or one ``int16``
  per pair (``layout="uint16"``). Rows whose outliers would need a much wider
  code get a coarser step, within ``range_slack`` of the tensor's target MSE.

The packed layout splits θ into planes of 8, 4, 2 and 1 bits (the binary
digits of ``bits``; 16 bits are two byte planes), lowest bits first. A plane of
width ``w`` packs ``g = 8/w`` fields per byte; with the pairs of a row padded to
a multiple of 8 (``P8``), byte ``q`` of the plane holds the fields of pairs
``q + k·P8/g`` for ``k < g``, at bit ``w·k``. Each field is then a shift and a
mask of a byte whose index is contiguous in ``q``, so decoding vectorises on
CPUs and coalesces on GPUs, with no code straddling a word.

Pairing: weight ``j`` of a row is paired with weight ``j + pairs`` (``pairs =
ceil(cols/2)``), so a kernel reads the two halves of the input with two
contiguous loads. A pair's code is ``θ = (i − i0) + nx·(j − j0)``: ``i`` and
``j`` are its coordinates on the lattice, whose points are
``(i + (j mod 2)/2, (√3/2)·j)`` in units of the row's step; ``j0`` is even.

Decoding (the plain-PyTorch reference every kernel is checked against)::

    ju, iu = divmod(θ, nx)
    w[r, k]         = Δ_r · (iu + i0 + (ju mod 2)/2) + c_r
    w[r, k + pairs] = Δ_r · (ju + j0) · √3/2         + c_r

Example::

    >>> import torch
    >>> from samfx.codecs.lattice import encode
    >>> w = torch.randn(64, 256) * 0.02
    >>> code = encode(w, rel_error=0.02)
    >>> err = (code.decode() - w).norm() / w.norm()
    >>> bool(0.015 < err < 0.025), code.bits <= 16
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import TensorCodec, huffman, register_tensor_codec, unhuffman
from .lattice_layout import LAYOUTS, layout_of, padded_pairs, plane_widths

__all__ = ["A2_RMS", "LatticeCode", "SQRT3_2", "decode_planes", "encode", "entropy_bits", "nearest_a2", "pack_codes",
           "plane_widths", "to_planes", "unpack_codes"]

SQRT3_2 = math.sqrt(3.0) / 2
#: Per-coordinate RMS quantization error of A2 with unit minimum distance: √(G·V) = √(5/72).
A2_RMS = math.sqrt(5.0 / 72.0)


@dataclass
class LatticeCode:
    """A tensor viewed as ``rows x cols``, coded pairwise on the hexagonal lattice.

    Attributes:
        codes: ``uint8 [rows, P8*bits/8]`` bit planes (``packed``), or
            ``int16 [rows, pairs]`` holding θ's 16 bits (``uint16``).
        row_params: ``bfloat16 [rows, 2]``: each row's step and centre.
        cols: weights per row.
        bits: width of one pair's code.
        nx: codes per lattice row (θ = iu + nx·ju).
        i0, j0: lattice coordinates of code 0 (``j0`` even).
        shape: the original tensor shape.
    """

    codes: torch.Tensor
    row_params: torch.Tensor
    cols: int
    bits: int
    nx: int
    i0: int
    j0: int
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.row_params.shape[0]

    @property
    def pairs(self) -> int:
        return (self.cols + 1) // 2

    @property
    def layout(self) -> str:
        return layout_of(self.codes)

    def meta(self) -> dict[str, Any]:
        """The integers a decoder needs besides the tensors (JSON-serialisable)."""
        return {"cols": self.cols, "bits": self.bits, "nx": self.nx, "i0": self.i0, "j0": self.j0,
                "shape": list(self.shape), "layout": self.layout}

    def theta(self) -> torch.Tensor:
        """The pair codes as ``int64 [rows, pairs]``."""
        return unpack_codes(self.codes, self.pairs, self.bits)

    def decode(self) -> torch.Tensor:
        """The coded tensor in float32, in its original shape (plain PyTorch)."""
        return decode_rows(self.codes, self.row_params, self.cols, self.bits, self.nx, self.i0, self.j0).reshape(self.shape)

    def to_layout(self, layout: str) -> "LatticeCode":
        """The same codes in another runtime layout (lossless)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == self.layout:
            return self
        codes = pack_codes(self.theta(), self.bits, layout)
        return LatticeCode(codes, self.row_params, self.cols, self.bits, self.nx, self.i0, self.j0, self.shape)

    def runtime_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.row_params.numel() * 2


def nearest_a2(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of the hexagonal lattice (minimum distance 1) to ``(u, v)``.

    A2 is the union of the rectangular grid ``{(i, √3 m)}`` and its copy shifted
    by ``(1/2, √3/2)``; the nearest point of a rectangular grid is coordinate-wise
    rounding, so the nearest lattice point is the nearer of those two.

    Returns:
        ``(i, j)`` as int64: the point is ``(i + (j mod 2)/2, (√3/2)·j)``.
    """
    sqrt3 = 2 * SQRT3_2
    i_even, m_even = torch.round(u), torch.round(v / sqrt3)
    i_odd, m_odd = torch.floor(u), torch.floor(v / sqrt3)
    d_even = (u - i_even).square_() + (v - sqrt3 * m_even).square_()
    d_odd = (u - i_odd - 0.5).square_() + (v - sqrt3 * (m_odd + 0.5)).square_()
    odd = d_odd < d_even
    i = torch.where(odd, i_odd, i_even).long()
    j = torch.where(odd, 2 * m_odd + 1, 2 * m_even).long()
    return i, j


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values ``>= x`` (x positive), as float64."""
    rounded = x.to(torch.bfloat16)
    below = rounded.double() < x
    bumped = (rounded.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(below, bumped, rounded).double()


def _box_points(h: float) -> float:
    """Most codes a row spanning ``[-h, h]`` (in steps) on both coordinates can need:
    the lattice point may lie a covering radius (1/√3) outside the range, the
    odd rows shift x by 1/2, and j0 is rounded down to even."""
    reach = h + 1 / math.sqrt(3)
    return (2 * reach + 2) * (2 * reach / SQRT3_2 + 3)


def _half_width_for(bits: int) -> float:
    """Largest normalised half-range ``h`` whose codes fit ``bits`` bits."""
    lo, hi = 0.0, 2.0 ** bits
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _box_points(mid) <= 2 ** bits else (lo, mid)
    return lo


def _range_scales(extent: torch.Tensor, weight: torch.Tensor, max_bits: int, slack: float) -> torch.Tensor:
    """Per-row step multipliers (>= 1) for the narrowest code width whose
    range-limited rows raise the tensor's squared error by at most ``slack``.

    ``extent`` is each row's half-range in steps; ``weight`` each row's squared
    error at the target step (a limited row's error grows with its step).
    """
    total = float(weight.sum()) or 1.0
    for bits in range(1, max_bits + 1):
        h = _half_width_for(bits)
        scale = torch.clamp(extent / h, min=1.0)
        if bits == max_bits or float((weight * scale.square()).sum()) <= slack * total:
            return scale
    raise AssertionError("unreachable")


def encode(
    weight: torch.Tensor,
    rel_error: float = 0.02,
    *,
    max_bits: int = 16,
    range_slack: float = 1.05,
    layout: str = "packed",
) -> LatticeCode:
    """Code a tensor (rows = its first dimension) on the hexagonal lattice.

    Args:
        weight: any float tensor with at least one element; viewed as ``shape[0] x rest``.
        rel_error: target RMS error of each row relative to the row's standard
            deviation (0.02 = 2 %).
        max_bits: widest runtime code per pair (2..16).
        range_slack: how much the tensor's squared error may grow so that rows
            with outliers fit a narrower code (1.05 = 5 %).
        layout: runtime layout, ``"packed"`` or ``"uint16"``.

    Raises:
        ValueError: a bad option or an empty or non-finite tensor.
    """
    if not 0 < rel_error < 1:
        raise ValueError(f"rel_error must be in (0, 1), got {rel_error}")
    if not 2 <= max_bits <= 16:
        raise ValueError(f"max_bits must be in [2, 16], got {max_bits}")
    if range_slack < 1:
        raise ValueError(f"range_slack must be >= 1, got {range_slack}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if weight.numel() == 0 or weight.dim() == 0:
        raise ValueError(f"cannot code an empty or 0-d tensor (shape {tuple(weight.shape)})")
    w = weight.detach().reshape(weight.shape[0], -1).float().cpu().contiguous()
    if not torch.isfinite(w).all():
        raise ValueError("cannot code a tensor with inf or nan values")
    from ..kernels import hyper_cpu

    rows, cols = w.shape
    stats = hyper_cpu.row_stats(w)
    lo, hi, sigma = stats.unbind(1)
    center = ((hi + lo) / 2).to(torch.bfloat16).double()
    extent = torch.maximum(hi - center, center - lo)
    # A constant row only has to resolve the rounding of its centre.
    spread = torch.where(sigma > 0, sigma, extent)
    step = (rel_error / A2_RMS) * spread
    step = torch.where(step > 0, step, torch.ones_like(step))
    step = _bf16_at_least(step * _range_scales(extent / step, spread.square(), max_bits, range_slack))
    i, j, bounds = hyper_cpu.quantize(w, center, 1.0 / step)
    i0 = int(bounds[:, 0].min())
    j0 = int(bounds[:, 2].min()) // 2 * 2
    nx = int(bounds[:, 1].max()) - i0 + 1
    ny = int(bounds[:, 3].max()) - j0 + 1
    bits = max(1, math.ceil(math.log2(nx * ny)))
    if bits > max_bits:
        raise AssertionError(f"codes need {bits} bits > {max_bits}: the range limit is wrong")
    if layout == "packed":
        codes = hyper_cpu.pack(i, j, i0, j0, nx, bits)
    else:
        codes = pack_codes((i.long() - i0) + nx * (j.long() - j0), bits, layout)
    row_params = torch.stack([step, center], 1).to(torch.bfloat16)
    return LatticeCode(codes, row_params, cols, bits, nx, i0, j0, tuple(weight.shape))


def pack_codes(theta: torch.Tensor, bits: int, layout: str = "packed") -> torch.Tensor:
    """Pair codes ``int64 [rows, pairs]`` (each < 2**bits) into a runtime layout."""
    if layout == "uint16":
        return theta.to(torch.int32).to(torch.int16)  # keeps the low 16 bits
    rows, pairs = theta.shape
    full = torch.zeros(rows, padded_pairs(pairs), dtype=torch.int64)
    full[:, :pairs] = theta
    planes, low = [], 0
    for width in plane_widths(bits):
        fields = (full >> low) & ((1 << width) - 1)
        per_byte = 8 // width
        chunks = fields.reshape(rows, per_byte, -1)
        planes.append(sum(chunks[:, k] << (width * k) for k in range(per_byte)))
        low += width
    return torch.cat(planes, 1).to(torch.uint8)


def unpack_codes(codes: torch.Tensor, pairs: int, bits: int) -> torch.Tensor:
    """Pair codes ``int64 [rows, pairs]`` from either runtime layout.

    Written with integer arithmetic only (no bit operations), so that ONNX
    exporters can trace it.
    """
    if codes.dtype == torch.int16:
        return codes.long() % 65536
    parts = []
    start = low = 0
    for width in plane_widths(bits):
        per_byte = 8 // width
        size = padded_pairs(pairs) // per_byte
        plane = codes[:, start:start + size].long()
        fields = [(plane // 2 ** (width * k)) % 2 ** width for k in range(per_byte)]
        parts.append(torch.cat(fields, 1) * 2 ** low)
        start += size
        low += width
    return sum(parts[1:], parts[0])[:, :pairs]


def decode_rows(codes: torch.Tensor, row_params: torch.Tensor, cols: int, bits: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """Reference decode: ``float32 [rows, cols]`` from runtime codes (see the module doc),
    or from :func:`to_planes`'s planes (``[rows, 2, pairs]`` codes)."""
    if codes.dim() == 3:
        return decode_planes(codes, row_params, cols)
    pairs = (cols + 1) // 2
    theta = unpack_codes(codes, pairs, bits)
    ju = theta // nx
    iu = theta - ju * nx
    x = (iu + i0).float() + 0.5 * (ju % 2).float()
    y = (ju + j0).float() * SQRT3_2
    params = row_params.float()
    step, center = params[:, 0:1], params[:, 1:2]
    return torch.cat([x * step + center, y * step + center], 1)[:, :cols]


def to_planes(code: LatticeCode) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The codes as two signed integers per pair (8-bit, or 16-bit when a coordinate
    needs more), each an affine function of a weight.

    ``w[r, k] = (Δ_r/2)·X + c_r`` with ``X = 2·(iu + i0) + (ju mod 2)`` and
    ``w[r, k + pairs] = (Δ_r·√3/2)·Y + c_r`` with ``Y = ju + j0``: per row and half,
    a scale and a zero point over an integer, the form of weight compression that
    runtimes decompress natively (OpenVINO keeps ``int8 -> convert -> subtract ->
    multiply`` compressed in its IR).

    Returns:
        ``(planes, affine)``: ``int8`` or ``int16 [rows, 2, pairs]`` (X, Y) and
        ``float32 [rows, 2, 2]`` (scale, zero point of X and of Y); ``None`` when a
        coordinate needs more than 16 bits.
    """
    theta = code.theta()
    ju = theta // code.nx
    x = 2 * (theta - ju * code.nx + code.i0) + ju % 2
    y = ju + code.j0
    low, high = min(int(x.min()), int(y.min())), max(int(x.max()), int(y.max()))
    dtype = next((t for t in (torch.int8, torch.int16) if torch.iinfo(t).min <= low and high <= torch.iinfo(t).max),
                 None)
    if dtype is None:
        return None
    params = code.row_params.float()
    step, center = params[:, 0], params[:, 1]
    scale = torch.stack([step / 2, step * SQRT3_2], 1)
    affine = torch.stack([scale, -center[:, None] / scale], -1)
    return torch.stack([x, y], 1).to(dtype), affine


def decode_planes(planes: torch.Tensor, affine: torch.Tensor, cols: int) -> torch.Tensor:
    """``float32 [rows, cols]`` from :func:`to_planes`'s planes: ``(X - zero) · scale``."""
    weight = (planes.float() - affine[..., 1:2]) * affine[..., 0:1]
    return weight.reshape(planes.shape[0], -1)[:, :cols]


def entropy_bits(code: LatticeCode) -> float:
    """Zeroth-order entropy of the two coordinate streams, in bits (a lower bound
    on what the checkpoint's Huffman coding reaches)."""
    from ..kernels import hyper_cpu

    theta = hyper_cpu.theta(code.codes.cpu(), code.pairs, code.bits).numpy().ravel()
    total = 0.0
    for plane in (theta % code.nx, theta // code.nx):
        counts = np.bincount(plane)
        p = counts[counts > 0] / plane.size
        total -= float((p * np.log2(p)).sum()) * plane.size
    return total


# -- checkpoint codec ---------------------------------------------------------------
# The runtime codes are fixed-width for the kernels; in the file each coordinate
# stream (iu, ju) is Huffman-coded on its own, since each has its own distribution.


def _byte_planes(values: torch.Tensor, wide: bool) -> list[np.ndarray]:
    values = values.numpy().astype(np.uint16)
    planes = [(values & 0xFF).astype(np.uint8)]
    return planes + [(values >> 8).astype(np.uint8)] if wide else planes


def _encode_codes(codes: torch.Tensor, params: dict[str, Any]) -> bytes:
    from ..kernels import hyper_cpu

    theta = hyper_cpu.theta(codes.cpu(), (params["cols"] + 1) // 2, params["bits"])
    iu, ju = theta % params["nx"], theta // params["nx"]
    planes = _byte_planes(iu, params["nx"] > 0x100) + _byte_planes(ju, bool(ju.max() > 0xFF))
    chunks = [huffman(plane) for plane in planes]
    header = np.array([len(chunks)] + [len(c) for c in chunks], dtype=np.uint64).tobytes()
    return header + b"".join(chunks)


def _decode_codes(data: bytes, params: dict[str, Any], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.frombuffer(data[:8], dtype=np.uint64)[0])
    sizes = np.frombuffer(data[8:8 + 8 * count], dtype=np.uint64).astype(np.int64)
    starts = 8 + 8 * count + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    planes = [unhuffman(data[s:s + n]).astype(np.int64) for s, n in zip(starts, sizes)]
    # The low then (when present) high byte of iu, then of ju; iu has a high byte iff nx > 256.
    x_planes = 2 if params["nx"] > 0x100 else 1
    iu = sum(plane << (8 * k) for k, plane in enumerate(planes[:x_planes]))
    ju = sum(plane << (8 * k) for k, plane in enumerate(planes[x_planes:]))
    rows, pairs = shape[0], (params["cols"] + 1) // 2
    iu = torch.from_numpy(iu.astype(np.int32)).reshape(rows, pairs)
    ju = torch.from_numpy(ju.astype(np.int32)).reshape(rows, pairs)
    if dtype == torch.int16:
        codes = pack_codes(iu.long() + params["nx"] * ju.long(), params["bits"], "uint16")
    else:
        from ..kernels import hyper_cpu

        codes = hyper_cpu.pack(iu, ju, 0, 0, params["nx"], params["bits"])
    if tuple(codes.shape) != tuple(shape):
        raise ValueError(f"decoded codes have shape {tuple(codes.shape)}, expected {tuple(shape)}")
    return codes


#: Entropy-coded lattice codes (params: ``cols``, ``bits``, ``nx``).
CODES = register_tensor_codec(TensorCodec("samfx.lattice-codes/1", _encode_codes, _decode_codes))
