"""CPU kernels for lattice codes (numba; imported only when a CPU kernel runs).

Each kernel is a row-parallel loop over one layer's codes that decodes in
registers, so nothing here holds more than one layer's dense weights:

* :func:`quantize` finds each pair's nearest lattice point (the encoder's hot loop);
* :func:`pack` / :func:`theta` convert between lattice coordinates, pair codes
  and the bit-packed runtime layout;
* :func:`decode` writes one layer's dense ``float32`` weight (for convolutions,
  and for Linears applied to many tokens, where one GEMM on the decoded layer
  is fastest);
* :func:`linear_few` multiplies a few tokens by the coded weight without
  materialising it: each row is decoded into a small buffer and dotted with
  every token, so a layer costs a read of its codes instead of its fp32 weight
  (the mask decoder's MLPs run on a handful of prompt tokens).

The plain-PyTorch references are in :mod:`samfx.codecs.lattice`; the tests
check every kernel against them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch

from ..codecs.lattice_layout import code_shape, layout_of, plane_widths

SQRT3 = math.sqrt(3.0)
SQRT3_2 = SQRT3 / 2

_JIT = {"nogil": True, "cache": True}


_THREADS = [0]


def threads() -> None:
    """Use as many threads as torch does (the benchmarks pin both)."""
    count = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if count != _THREADS[0]:
        numba.set_num_threads(count)
        _THREADS[0] = count


@numba.njit(inline="always", **_JIT)
def _plane(codes, r, start, count, width, low, acc):
    """OR one bit plane's fields, shifted to bit ``low``, into the row's codes.
    Each width has its own loop so that a byte's fields are unrolled and the loop
    over bytes vectorises."""
    if width == 8:
        for q in range(count):
            acc[q] |= np.int32(codes[r, start + q]) << low
    elif width == 4:
        for q in range(count):
            byte = np.int32(codes[r, start + q])
            acc[q] |= (byte & 15) << low
            acc[q + count] |= (byte >> 4) << low
    elif width == 2:
        for q in range(count):
            byte = np.int32(codes[r, start + q])
            acc[q] |= (byte & 3) << low
            acc[q + count] |= ((byte >> 2) & 3) << low
            acc[q + 2 * count] |= ((byte >> 4) & 3) << low
            acc[q + 3 * count] |= (byte >> 6) << low
    else:
        for q in range(count):
            byte = np.int32(codes[r, start + q])
            for k in range(8):
                acc[q + k * count] |= ((byte >> k) & 1) << low


@numba.njit(inline="always", **_JIT)
def _row_theta(codes, r, packed, widths, pairs, acc, theta):
    """Pair codes of row ``r`` into ``theta`` (float32, exact below 2**24);
    ``acc`` is int32 scratch of the padded row length."""
    if not packed:
        for p in range(pairs):
            theta[p] = np.float32(np.uint16(codes[r, p]))
        return
    size = theta.shape[0]  # pairs padded to a multiple of 8
    acc[:] = 0
    start = 0
    low = 0
    for width in widths:
        count = size * width // 8
        _plane(codes, r, start, count, width, low, acc)
        start += count
        low += width
    for p in range(pairs):
        theta[p] = np.float32(acc[p])


@numba.njit(inline="always", **_JIT)
def _row_decode(theta, pairs, cols, nx, i0, j0, step, center, out):
    """Dense weights of one row from its pair codes (see samfx.codecs.lattice)."""
    inv_nx = np.float32(1.0) / np.float32(nx)
    nxf = np.float32(nx)
    i0f = np.float32(i0)
    j0f = np.float32(j0)
    for p in range(pairs):
        ju = np.floor((theta[p] + np.float32(0.5)) * inv_nx)
        half = ju * np.float32(0.5)
        x = theta[p] - ju * nxf + i0f + (half - np.floor(half))
        out[p] = x * step + center
    for p in range(cols - pairs):
        ju = np.floor((theta[p] + np.float32(0.5)) * inv_nx)
        out[p + pairs] = (ju + j0f) * np.float32(SQRT3_2) * step + center


@numba.njit(inline="always", fastmath=True, **_JIT)
def _decode_rows(first, last, codes, packed, widths, cols, nx, i0, j0, step, center, out):
    pairs = (cols + 1) // 2
    theta = np.empty(-(-pairs // 8) * 8, np.float32)
    acc = np.empty(theta.shape[0], np.int32)
    for r in range(first, last):
        _row_theta(codes, r, packed, widths, pairs, acc, theta)
        _row_decode(theta, pairs, cols, nx, i0, j0, step[r], center[r], out[r])


@numba.njit(inline="always", fastmath=True, **_JIT)
def _linear_rows(first, last, x, codes, packed, widths, cols, nx, i0, j0, step, center, bias, has_bias, out):
    pairs = (cols + 1) // 2
    theta = np.empty(-(-pairs // 8) * 8, np.float32)
    acc = np.empty(theta.shape[0], np.int32)
    weight = np.empty(cols, np.float32)
    for r in range(first, last):
        _row_theta(codes, r, packed, widths, pairs, acc, theta)
        _row_decode(theta, pairs, cols, nx, i0, j0, step[r], center[r], weight)
        for t in range(x.shape[0]):
            total = np.float32(0.0)
            for k in range(cols):
                total += weight[k] * x[t, k]
            out[t, r] = total + bias[r] if has_bias else total


# Small layers run serially: waking the thread pool costs more than they do.
@numba.njit(fastmath=True, **_JIT)
def _decode_serial(codes, packed, widths, cols, nx, i0, j0, step, center, out):
    _decode_rows(0, out.shape[0], codes, packed, widths, cols, nx, i0, j0, step, center, out)


@numba.njit(parallel=True, fastmath=True, **_JIT)
def _decode_parallel(codes, packed, widths, cols, nx, i0, j0, step, center, out):
    rows = out.shape[0]
    chunks = min(rows, 64)
    for chunk in numba.prange(chunks):
        _decode_rows(chunk * rows // chunks, (chunk + 1) * rows // chunks, codes, packed, widths, cols, nx, i0, j0,
                     step, center, out)


@numba.njit(fastmath=True, **_JIT)
def _linear_serial(x, codes, packed, widths, cols, nx, i0, j0, step, center, bias, has_bias, out):
    _linear_rows(0, out.shape[1], x, codes, packed, widths, cols, nx, i0, j0, step, center, bias, has_bias, out)


@numba.njit(parallel=True, fastmath=True, **_JIT)
def _linear_parallel(x, codes, packed, widths, cols, nx, i0, j0, step, center, bias, has_bias, out):
    rows = out.shape[1]
    chunks = min(rows, 64)
    for chunk in numba.prange(chunks):
        _linear_rows(chunk * rows // chunks, (chunk + 1) * rows // chunks, x, codes, packed, widths, cols, nx, i0, j0,
                     step, center, bias, has_bias, out)


_DECODE = {False: _decode_serial, True: _decode_parallel}
_LINEAR_FEW = {False: _linear_serial, True: _linear_parallel}
#: Layers with fewer weights than this run on one thread (a quarter of a
#: millisecond of decoding, which waking the other threads would not repay).
PARALLEL_MIN = 1 << 18


@numba.njit(parallel=True, **_JIT)
def _row_stats(w, out):
    rows, cols = w.shape
    for r in numba.prange(rows):
        lo = np.float64(w[r, 0])
        hi = lo
        total = 0.0
        for k in range(cols):
            value = np.float64(w[r, k])
            lo = min(lo, value)
            hi = max(hi, value)
            total += value
        mean = total / cols
        squares = 0.0
        for k in range(cols):
            squares += (np.float64(w[r, k]) - mean) ** 2
        out[r, 0] = lo
        out[r, 1] = hi
        out[r, 2] = np.sqrt(squares / cols)


@numba.njit(parallel=True, **_JIT)
def _quantize(w, center, inv_step, cols, pairs, i_out, j_out, bounds):
    rows = w.shape[0]
    inv_sqrt3 = 1.0 / SQRT3
    for r in numba.prange(rows):
        c = center[r]
        inv = inv_step[r]
        i_lo, i_hi, j_lo, j_hi = 1 << 30, -(1 << 30), 1 << 30, -(1 << 30)
        for p in range(pairs):
            u = (np.float64(w[r, p]) - c) * inv
            # an odd row's missing last weight sits at the centre
            v = (np.float64(w[r, p + pairs]) - c) * inv if p + pairs < cols else 0.0
            i_even = np.round(u)
            m_even = np.round(v * inv_sqrt3)
            i_odd = np.floor(u)
            m_odd = np.floor(v * inv_sqrt3)
            d_even = (u - i_even) ** 2 + (v - SQRT3 * m_even) ** 2
            d_odd = (u - i_odd - 0.5) ** 2 + (v - SQRT3 * (m_odd + 0.5)) ** 2
            if d_odd < d_even:
                i = np.int32(i_odd)
                j = np.int32(2 * m_odd + 1)
            else:
                i = np.int32(i_even)
                j = np.int32(2 * m_even)
            i_out[r, p] = i
            j_out[r, p] = j
            i_lo, i_hi, j_lo, j_hi = min(i_lo, i), max(i_hi, i), min(j_lo, j), max(j_hi, j)
        bounds[r, 0] = i_lo
        bounds[r, 1] = i_hi
        bounds[r, 2] = j_lo
        bounds[r, 3] = j_hi


@numba.njit(parallel=True, **_JIT)
def _pack(i, j, i0, j0, nx, widths, out):
    rows, pairs = i.shape
    size = -(-pairs // 8) * 8
    for r in numba.prange(rows):
        start = 0
        low = 0
        for width in widths:
            per_byte = 8 // width
            count = size // per_byte
            mask = (1 << width) - 1
            for q in range(count):
                byte = 0
                for k in range(per_byte):
                    p = q + k * count
                    if p < pairs:
                        theta = (np.int64(i[r, p]) - i0) + nx * (np.int64(j[r, p]) - j0)
                        byte |= ((theta >> low) & mask) << (width * k)
                out[r, start + q] = byte
            start += count
            low += width


@numba.njit(parallel=True, **_JIT)
def _unpack(codes, packed, widths, out):
    rows, pairs = out.shape
    for r in numba.prange(rows):
        theta = np.empty(-(-pairs // 8) * 8, np.float32)
        acc = np.empty(theta.shape[0], np.int32)
        _row_theta(codes, r, packed, widths, pairs, acc, theta)
        for p in range(pairs):
            out[r, p] = np.int32(theta[p])


class Prepared(NamedTuple):
    """A layer's codes as the kernels take them (numpy views, float32 row parameters)."""

    codes: np.ndarray
    packed: bool
    widths: np.ndarray
    step: np.ndarray
    center: np.ndarray
    bias: np.ndarray | None
    weights: int

    @property
    def parallel(self) -> bool:
        return self.weights >= PARALLEL_MIN


def prepare(codes: torch.Tensor, row_params: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> Prepared:
    packed = layout_of(codes) == "packed"
    params = row_params.float().numpy()
    pairs = codes.shape[1] * 8 // bits if packed else codes.shape[1]
    return Prepared(codes.contiguous().numpy(), packed,
                    np.array(plane_widths(bits) if packed else [16], dtype=np.int64),
                    np.ascontiguousarray(params[:, 0]), np.ascontiguousarray(params[:, 1]),
                    None if bias is None else bias.detach().float().contiguous().numpy(), 2 * codes.shape[0] * pairs)


def row_stats(w: torch.Tensor) -> torch.Tensor:
    """``float64 [rows, 3]``: each row's minimum, maximum and standard deviation."""
    threads()
    out = torch.empty(w.shape[0], 3, dtype=torch.float64)
    _row_stats(w.contiguous().numpy(), out.numpy())
    return out


def quantize(w: torch.Tensor, center: torch.Tensor, inv_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest A2 point of each pair ``(w[:, k], w[:, k + pairs])`` in steps from
    the row centre (``w``: ``float32 [rows, cols]``; a missing last weight of an
    odd row counts as the centre).

    Returns:
        ``(i, j)`` as ``int16 [rows, pairs]`` and ``int32 [rows, 4]`` per-row bounds
        (min i, max i, min j, max j).
    """
    threads()
    rows, cols = w.shape
    pairs = (cols + 1) // 2
    i = torch.empty(rows, pairs, dtype=torch.int16)
    j = torch.empty(rows, pairs, dtype=torch.int16)
    bounds = torch.empty(rows, 4, dtype=torch.int32)
    _quantize(w.contiguous().numpy(), center.double().numpy(), inv_step.double().numpy(), cols, pairs,
              i.numpy(), j.numpy(), bounds.numpy())
    return i, j, bounds


def pack(i: torch.Tensor, j: torch.Tensor, i0: int, j0: int, nx: int, bits: int) -> torch.Tensor:
    """Bit-plane runtime codes from lattice coordinates (``theta = i - i0 + nx*(j - j0)``)."""
    threads()
    rows, pairs = i.shape
    out = torch.empty(code_shape(rows, 2 * pairs, bits, "packed"), dtype=torch.uint8)
    _pack(i.numpy(), j.numpy(), i0, j0, nx, np.array(plane_widths(bits), dtype=np.int64), out.numpy())
    return out


def theta(codes: torch.Tensor, pairs: int, bits: int) -> torch.Tensor:
    """Pair codes ``int32 [rows, pairs]`` from either runtime layout."""
    threads()
    prepared = prepare(codes, torch.zeros(codes.shape[0], 2), bits)
    out = torch.empty(codes.shape[0], pairs, dtype=torch.int32)
    _unpack(prepared.codes, prepared.packed, prepared.widths, out.numpy())
    return out


def decode(prepared: Prepared, cols: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """Dense ``float32 [rows, cols]`` weights."""
    if prepared.parallel:
        threads()
    out = torch.empty(prepared.codes.shape[0], cols, dtype=torch.float32)
    _DECODE[prepared.parallel](prepared.codes, prepared.packed, prepared.widths, cols, nx, i0, j0, prepared.step,
                               prepared.center, out.numpy())
    return out


_NO_BIAS = np.zeros(1, np.float32)


def linear(x: torch.Tensor, prepared: Prepared, cols: int, nx: int, i0: int, j0: int,
           few_tokens: int = 16) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[..., cols]`` (``bias`` from ``prepared``).

    Up to ``few_tokens`` float32 tokens are multiplied row by row as the rows are
    decoded; more tokens decode the layer once and run one GEMM.
    """
    flat = x.reshape(-1, cols)
    rows = prepared.codes.shape[0]
    if x.dtype != torch.float32 or flat.shape[0] > few_tokens:
        weight = decode(prepared, cols, nx, i0, j0).to(x.dtype)
        bias = None if prepared.bias is None else torch.from_numpy(prepared.bias).to(x.dtype)
        out = torch.nn.functional.linear(flat, weight, bias)
    else:
        if prepared.parallel:
            threads()
        out = torch.empty(flat.shape[0], rows, dtype=torch.float32)
        has_bias = prepared.bias is not None
        _LINEAR_FEW[prepared.parallel](flat.contiguous().numpy(), prepared.codes, prepared.packed, prepared.widths,
                                       cols, nx, i0, j0, prepared.step, prepared.center,
                                       prepared.bias if has_bias else _NO_BIAS, has_bias, out.numpy())
    return out.reshape(*x.shape[:-1], rows)
