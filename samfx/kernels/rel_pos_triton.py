"""Triton flash-attention kernel for ``samfx::rel_pos_attention`` (imported lazily).

One program handles ``BLOCK_M`` queries of one batch-head and loops over the
key map one row at a time, with the online softmax of FlashAttention. Key ``n``
sits at row ``n // Kw`` and column ``n % Kw``, so within a key row the bias is
``rel_h[m, row] + rel_w[m, column]``: the ``(BLOCK_M, Kw)`` tile of ``rel_w`` is
loaded once before the loop and each step adds one column of ``rel_h``. Neither
the ``(Nq, Nk)`` scores nor a bias of that size is ever written, and the bias
costs one add per score. A key row is padded to a power of two (``Kw`` = 64 for
SAM's global blocks, 14 -> 16 for its windows) with masked loads; head dims up
to 256 likewise (ViT-H's 80 runs as 128). Dtypes: float16, bfloat16 and
float32 (IEEE dot products unless ``torch.backends.cuda.matmul.allow_tf32``
allows TF32, as for PyTorch's own matmuls).

Under ``TRITON_INTERPRET=1`` the kernel runs on the CPU with one fixed block
configuration; on a GPU ``BLOCK_M`` and the launch parameters are autotuned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["rel_pos_attention", "supports"]

_MAX_HEAD_DIM = 256
_MAX_KEY_ROW = 256


def supports(q: Tensor, k: Tensor, v: Tensor, rel_w: Tensor) -> bool:
    """Whether the kernel covers these inputs (else the caller falls back)."""
    return (
        q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] <= _MAX_HEAD_DIM
        and v.shape[-1] <= _MAX_HEAD_DIM
        and rel_w.shape[-1] <= _MAX_KEY_ROW
    )


@triton.jit
def _kernel(
    Q, K, V, RH, RW, O,
    scale_log2e,
    n_q, k_h, k_w,
    sq_g, sq_m, sq_d,
    sk_g, sk_n, sk_d,
    sv_g, sv_n, sv_d,
    sh_g, sh_m, sh_k,
    sw_g, sw_m, sw_k,
    so_g, so_m, so_d,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_j = tl.arange(0, BLOCK_W)  # key columns of one key row
    m_ok = offs_m < n_q
    j_ok = offs_j < k_w

    q = tl.load(Q + g * sq_g + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    # rel_w is the same for every key row: one (BLOCK_M, BLOCK_W) tile, in the log2 domain;
    # padded columns get -inf so that they drop out of the softmax.
    bias_w = tl.load(RW + g * sw_g + offs_m[:, None] * sw_m + offs_j[None, :] * sw_k,
                     mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32) * LOG2E
    bias_w = tl.where(j_ok[None, :], bias_w, float("-inf"))
    rh_col = RH + g * sh_g + offs_m * sh_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for row in range(0, k_h):
        offs_n = row * k_w + offs_j
        k = tl.load(K + g * sk_g + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                    mask=j_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        bias_h = tl.load(rh_col + row * sh_k, mask=m_ok, other=0.0).to(tl.float32) * LOG2E
        s = s * scale_log2e + bias_h[:, None] + bias_w  # log2 domain: exp2 is the native instruction
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + g * sv_g + offs_n[:, None] * sv_n + offs_dv[None, :] * sv_d,
                    mask=j_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + g * so_g + offs_m[:, None] * so_m + offs_dv[None, :] * so_d, acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))


_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm, w, s in [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 2), (128, 8, 3), (64, 8, 3)]
]
_tuned = triton.autotune(_CONFIGS, key=["n_q", "k_h", "k_w", "D", "DV", "IEEE"])(_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    """Flattened inputs: ``q (G, Nq, D)``, ``k (G, Nk, D)``, ``v (G, Nk, Dv)``,
    ``rel_h (G, Nq, Kh)``, ``rel_w (G, Nq, Kw)``; returns ``(G, Nq, Dv)``."""
    g, n_q, d = q.shape
    d_v, k_h, k_w = v.shape[-1], rel_h.shape[-1], rel_w.shape[-1]
    out = q.new_empty(g, n_q, d_v)
    args = (
        q, k, v, rel_h, rel_w, out,
        scale * 1.4426950408889634,
        n_q, k_h, k_w,
        *q.stride(), *k.stride(), *v.stride(), *rel_h.stride(), *rel_w.stride(), *out.stride(),
    )
    meta = {
        "D": d, "DV": d_v,
        "BLOCK_D": max(16, triton.next_power_of_2(d)), "BLOCK_DV": max(16, triton.next_power_of_2(d_v)),
        "BLOCK_W": max(16, triton.next_power_of_2(k_w)),
        "IEEE": q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
    }
    if _interpreting():
        _kernel[(triton.cdiv(n_q, 16), g)](*args, **meta, BLOCK_M=16)
    else:
        _tuned[lambda c: (triton.cdiv(n_q, c["BLOCK_M"]), g)](*args, **meta)
    return out
