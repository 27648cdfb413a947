"""Triton kernels for lattice codes (imported only when a GPU kernel runs).

``linear`` computes ``x @ W.T + bias`` with ``W`` decoded tile by tile in
registers from its pair codes and fed straight to ``tl.dot``: the dense weight
never exists in memory. Each program owns a ``BLOCK_M x BLOCK_N`` output tile
(tokens x output features) and walks the pairs in steps of ``BLOCK_P``: a pair
tile gives two weight tiles, the first halves and the second halves of the
rows, which meet two contiguous tiles of the input (columns ``k`` and
``k + pairs``), so no shuffle is needed. Per-layer integers (code width, lattice
offsets) are run-time arguments: one compiled kernel serves every layer.
Activations may be float32 (ieee or tf32 dot), bfloat16 or float16; weights are
decoded in float32 and rounded once to the activation type.

``decode`` writes one layer's dense weight (for convolutions, and as the
baseline "decode, then cuBLAS").
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..codecs.lattice_layout import layout_of, padded_pairs

SQRT3_2 = math.sqrt(3.0) / 2


@triton.jit
def _sub_byte_plane(base, pairs, inside, bits, padded, start, low, WIDTH: tl.constexpr):
    """One plane of ``WIDTH`` (4, 2 or 1) bits: its fields shifted to bit ``low``, and
    where the next plane starts. An absent plane loads nothing and moves nothing."""
    present = (bits & WIDTH) != 0
    count = padded // (8 // WIDTH)
    field = tl.load(base + start + pairs % count, mask=inside & present, other=0).to(tl.int32)
    field = (field >> (WIDTH * (pairs // count))) & ((1 << WIDTH) - 1)
    flag = present.to(tl.int32)
    return field << low, start + flag * count, low + flag * WIDTH


@triton.jit
def _theta(codes_ptr, rows, pairs, row_stride, n_rows, n_pairs, bits, padded, PACKED: tl.constexpr):
    """Codes of ``rows x pairs`` (broadcast index tensors) as int32.

    Packed codes are bit planes (see samfx.codecs.lattice): up to two byte
    planes, then planes of 4, 2 and 1 bits, those present given by ``bits``.
    Absent planes are loaded fully masked, so no branch depends on ``bits``.
    """
    inside = (rows < n_rows) & (pairs < n_pairs)
    base = codes_ptr + rows.to(tl.int64) * row_stride
    if PACKED:
        theta = tl.zeros_like(rows + pairs)
        start = 0
        low = 0
        for plane in tl.static_range(2):
            present = (bits // 8) > plane
            byte = tl.load(base + start + pairs, mask=inside & present, other=0).to(tl.int32)
            theta = theta | (byte << low)
            start += present.to(tl.int32) * padded
            low += present.to(tl.int32) * 8
        field, start, low = _sub_byte_plane(base, pairs, inside, bits, padded, start, low, 4)
        theta = theta | field
        field, start, low = _sub_byte_plane(base, pairs, inside, bits, padded, start, low, 2)
        theta = theta | field
        field, start, low = _sub_byte_plane(base, pairs, inside, bits, padded, start, low, 1)
        return theta | field
    return tl.load(base + pairs, mask=inside, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _lattice(theta, nx, inv_nx, i0, j0):
    """Lattice coordinates (x, y) of codes, in steps (see samfx.codecs.lattice)."""
    ju = ((theta.to(tl.float32) + 0.5) * inv_nx).to(tl.int32)
    iu = theta - ju * nx
    x = (iu + i0).to(tl.float32) + 0.5 * (ju & 1).to(tl.float32)
    y = (ju + j0).to(tl.float32) * 0.8660254037844386
    return x, y


@triton.jit
def _linear_kernel(
    x_ptr, codes_ptr, params_ptr, bias_ptr, out_ptr,
    M, N, K, P, stride_xm, stride_om, code_stride,
    bits, padded, nx, inv_nx, i0, j0,
    HAS_BIAS: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_N: tl.constexpr,
):
    # The product is computed transposed, out.T = W @ x.T: the decoded weight tile
    # is the MMA's first operand, which Hopper's wgmma reads from registers, so it
    # never goes through shared memory; the activations are the second operand.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    # grouped order: programs that run together share weight tiles in L2
    in_group = GROUP_N * num_m
    first_n = (pid // in_group) * GROUP_N
    group_n = min(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % group_n
    pid_m = (pid % in_group) // group_n

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tl.arange(0, BLOCK_P)
    step = tl.load(params_ptr + rn * 2, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    center = tl.load(params_ptr + rn * 2 + 1, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    m_inside = rm[:, None] < M

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + rp
        x1 = tl.load(x_rows + pp[None, :], mask=m_inside & (pp[None, :] < P), other=0.0)
        x2 = tl.load(x_rows + (pp + P)[None, :], mask=m_inside & ((pp + P)[None, :] < K), other=0.0)
        theta = _theta(codes_ptr, rn[:, None], pp[None, :], code_stride, N, P, bits, padded, PACKED)
        wx, wy = _lattice(theta, nx, inv_nx, i0, j0)
        w1 = (wx * step + center).to(x1.dtype)
        w2 = (wy * step + center).to(x1.dtype)
        if UPCAST:
            x1, x2, w1, w2 = x1.to(tl.float32), x2.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32)
        acc = tl.dot(w1, tl.trans(x1), acc, input_precision=PRECISION)
        acc = tl.dot(w2, tl.trans(x2), acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + rm.to(tl.int64)[None, :] * stride_om + rn[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


@triton.jit
def _decode_kernel(
    codes_ptr, params_ptr, out_ptr, N, K, P, code_stride, bits, padded, nx, inv_nx, i0, j0,
    PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    step = tl.load(params_ptr + rn * 2, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    center = tl.load(params_ptr + rn * 2 + 1, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    theta = _theta(codes_ptr, rn[:, None], pp[None, :], code_stride, N, P, bits, padded, PACKED)
    wx, wy = _lattice(theta, nx, inv_nx, i0, j0)
    rows = out_ptr + rn.to(tl.int64)[:, None] * K
    inside = rn[:, None] < N
    tl.store(rows + pp[None, :], (wx * step + center).to(out_ptr.dtype.element_ty), mask=inside & (pp[None, :] < P))
    tl.store(rows + (pp + P)[None, :], (wy * step + center).to(out_ptr.dtype.element_ty),
             mask=inside & ((pp + P)[None, :] < K))


def _config(tokens: int) -> dict[str, int]:
    """Tile sizes by token count (tokens are the MMA's narrow side)."""
    if tokens <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_P": 64, "GROUP_N": 1, "num_warps": 4, "num_stages": 3}
    if tokens <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_P": 32, "GROUP_N": 8, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_P": 32, "GROUP_N": 8, "num_warps": 8, "num_stages": 3}


def linear(x: torch.Tensor, codes: torch.Tensor, row_params: torch.Tensor, bias: torch.Tensor | None,
           cols: int, bits: int, nx: int, i0: int, j0: int, config: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[tokens, cols]`` on a CUDA device."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"hyper_linear supports float32, bfloat16 and float16 inputs, not {x.dtype}")
    x = x.contiguous()
    tokens, rows, pairs = x.shape[0], codes.shape[0], (cols + 1) // 2
    out = torch.empty(tokens, rows, device=x.device, dtype=x.dtype)
    config = dict(config or _config(tokens))
    grid = (triton.cdiv(tokens, config["BLOCK_M"]) * triton.cdiv(rows, config["BLOCK_N"]),)
    precision = None
    if x.dtype == torch.float32:
        # Without TF32, float32 stays float32-accurate through three TF32 products.
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits; there
    # the (already bf16-rounded) tiles are multiplied in float32 instead.
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    _linear_kernel[grid](
        x, codes, row_params, bias if bias is not None else out, out,
        tokens, rows, cols, pairs, x.stride(0), out.stride(0), codes.stride(0),
        bits, padded_pairs(pairs), nx, 1.0 / nx, i0, j0,
        HAS_BIAS=bias is not None, PACKED=layout_of(codes) == "packed", PRECISION=precision, UPCAST=upcast, **config,
    )
    return out


def decode(codes: torch.Tensor, row_params: torch.Tensor, cols: int, bits: int, nx: int, i0: int, j0: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[rows, cols]`` weight on the codes' device."""
    rows, pairs = codes.shape[0], (cols + 1) // 2
    out = torch.empty(rows, cols, device=codes.device, dtype=dtype)
    block_n, block_p = 32, 64
    grid = (triton.cdiv(rows, block_n), triton.cdiv(pairs, block_p))
    _decode_kernel[grid](codes, row_params, out, rows, cols, pairs, codes.stride(0), bits, padded_pairs(pairs), nx,
                         1.0 / nx, i0, j0, PACKED=layout_of(codes) == "packed", BLOCK_N=block_n, BLOCK_P=block_p)
    return out
