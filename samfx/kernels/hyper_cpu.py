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

import numba
import numpy as np
import torch

SQRT3 = math.sqrt(3.0)
SQRT3_2 = SQRT3 / 2

_JIT = {"nogil": True, "cache": True}


def threads() -> int:
    """Use as many threads as torch does (the benchmarks pin both)."""
    count = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(count)
    return count


@numba.njit(inline="always", **_JIT)
def _theta(codes, r, p, bits, mask, packed):
    if packed:
        offset = p * bits
        word = offset >> 5
        shift = offset & 31
        value = np.int64(codes[r, word])
        if shift + bits > 32:
            value |= np.int64(codes[r, word + 1]) << 32
        return (value >> shift) & mask
    return np.int64(codes[r, p]) & 0xFFFF


@numba.njit(inline="always", **_JIT)
def _pair(theta, nx, inv_nx, i0, j0):
    # exact for theta < 2**21: (theta + 0.5)/nx is at least 0.5/nx away from an integer
    ju = np.int64((np.float32(theta) + np.float32(0.5)) * inv_nx)
    iu = theta - ju * nx
    x = np.float32(iu + i0) + np.float32(0.5) * np.float32(ju & 1)
    y = np.float32(ju + j0) * np.float32(SQRT3_2)
    return x, y


@numba.njit(parallel=True, **_JIT)
def _decode(codes, packed, bits, cols, nx, i0, j0, step, center, out):
    rows = out.shape[0]
    pairs = (cols + 1) // 2
    mask = (np.int64(1) << bits) - 1
    inv_nx = np.float32(1.0) / np.float32(nx)
    for r in numba.prange(rows):
        d = step[r]
        c = center[r]
        for p in range(pairs):
            x, y = _pair(_theta(codes, r, p, bits, mask, packed), nx, inv_nx, i0, j0)
            out[r, p] = x * d + c
            if p + pairs < cols:
                out[r, p + pairs] = y * d + c


@numba.njit(parallel=True, fastmath=True, **_JIT)
def _linear_few(x, codes, packed, bits, cols, nx, i0, j0, step, center, bias, has_bias, out):
    tokens = x.shape[0]
    rows = out.shape[1]
    pairs = (cols + 1) // 2
    mask = (np.int64(1) << bits) - 1
    inv_nx = np.float32(1.0) / np.float32(nx)
    chunks = min(rows, 64)
    for chunk in numba.prange(chunks):
        buf = np.empty(cols, np.float32)
        for r in range(chunk * rows // chunks, (chunk + 1) * rows // chunks):
            d = step[r]
            c = center[r]
            for p in range(pairs):
                a, b = _pair(_theta(codes, r, p, bits, mask, packed), nx, inv_nx, i0, j0)
                buf[p] = a * d + c
                if p + pairs < cols:
                    buf[p + pairs] = b * d + c
            for t in range(tokens):
                acc = np.float32(0.0)
                for k in range(cols):
                    acc += buf[k] * x[t, k]
                out[t, r] = acc + bias[r] if has_bias else acc


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
def _pack(i, j, i0, j0, nx, bits, out):
    rows, pairs = i.shape
    for r in numba.prange(rows):
        acc = np.int64(0)
        filled = 0
        word = 0
        for p in range(pairs):
            acc |= (np.int64(i[r, p] - i0) + np.int64(nx) * np.int64(j[r, p] - j0)) << filled
            filled += bits
            if filled >= 32:
                out[r, word] = np.uint32(acc & 0xFFFFFFFF)
                word += 1
                acc >>= 32
                filled -= 32
        if filled > 0:
            out[r, word] = np.uint32(acc & 0xFFFFFFFF)


@numba.njit(parallel=True, **_JIT)
def _unpack(codes, packed, bits, out):
    rows, pairs = out.shape
    mask = (np.int64(1) << bits) - 1
    for r in numba.prange(rows):
        for p in range(pairs):
            out[r, p] = _theta(codes, r, p, bits, mask, packed)


def _codes_view(codes: torch.Tensor) -> tuple[np.ndarray, bool]:
    packed = codes.dtype == torch.int32
    array = codes.contiguous().numpy()
    return (array.view(np.uint32) if packed else array), packed


def _row_params(row_params: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    params = row_params.float().numpy()
    return np.ascontiguousarray(params[:, 0]), np.ascontiguousarray(params[:, 1])


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
    """Bit-packed runtime codes ``int32 [rows, words]`` from lattice coordinates."""
    threads()
    rows, pairs = i.shape
    out = torch.zeros(rows, -(-pairs * bits // 32), dtype=torch.int32)
    _pack(i.numpy(), j.numpy(), i0, j0, nx, bits, out.numpy().view(np.uint32))
    return out


def theta(codes: torch.Tensor, pairs: int, bits: int) -> torch.Tensor:
    """Pair codes ``int32 [rows, pairs]`` from either runtime layout."""
    threads()
    array, packed = _codes_view(codes)
    out = torch.empty(codes.shape[0], pairs, dtype=torch.int32)
    _unpack(array, packed, bits, out.numpy())
    return out


def decode(codes: torch.Tensor, row_params: torch.Tensor, cols: int, bits: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """Dense ``float32 [rows, cols]`` weights from runtime codes."""
    threads()
    array, packed = _codes_view(codes)
    step, center = _row_params(row_params)
    out = torch.empty(codes.shape[0], cols, dtype=torch.float32)
    _decode(array, packed, bits, cols, nx, i0, j0, step, center, out.numpy())
    return out


def linear_few(x: torch.Tensor, codes: torch.Tensor, row_params: torch.Tensor, bias: torch.Tensor | None,
               cols: int, bits: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[tokens, cols]`` (float32), decoding ``W`` row by row."""
    threads()
    array, packed = _codes_view(codes)
    step, center = _row_params(row_params)
    rows = codes.shape[0]
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    bias_array = bias.detach().float().contiguous().numpy() if bias is not None else np.zeros(1, np.float32)
    _linear_few(x.contiguous().numpy(), array, packed, bits, cols, nx, i0, j0, step, center, bias_array,
                bias is not None, out.numpy())
    return out
