"""``samfx::rel_pos_attention``: attention with a decomposed relative-position bias,
computed block by block so that the full score tensor never exists.

SAM's ViT (and SAM-HQ's, and Hugging Face's ``SamVisionAttention``) computes::

    softmax(scale * q @ k^T + rel_h[..., m, n // Kw] + rel_w[..., m, n % Kw]) @ v

where key ``n`` sits at row ``n // Kw`` and column ``n % Kw`` of a ``Kh x Kw``
map (MViTv2's decomposed relative positions). Upstream broadcasts the two terms
onto the full ``(..., Nq, Nk)`` scores (805 MB per global block of ViT-B in
float32, several copies alive at once), and SDPA with the bias as an additive
mask still needs that mask. This op takes ``rel_h`` and ``rel_w`` as they are
(``(..., Nq, Kh)`` and ``(..., Nq, Kw)``) and adds them per block:

* CPU (and any device without a kernel): queries in chunks whose scores fit a
  small budget; each chunk is one batched matmul, two in-place broadcast adds,
  a softmax and a matmul with ``v``. Half-precision inputs are computed in
  float32 (the softmax accumulation stays in float32) and cast back.
* CUDA: a flash-attention Triton kernel that adds the bias inside its loop over
  key blocks (``rel_pos_triton``); shapes it does not cover fall back
  to the chunked path.

:func:`rel_pos_attention_reference` is the plain PyTorch oracle the tests use.

Shapes: ``q (*L, Nq, D)``, ``k (*L, Nk, D)``, ``v (*L, Nk, Dv)``, ``rel_h
(*L', Nq, Kh)``, ``rel_w (*L', Nq, Kw)`` with ``Kh * Kw == Nk`` and
``prod(L') == prod(L)`` (the leading dims are flattened, so ``(B * heads, ...)``
and ``(B, heads, ...)`` layouts mix freely). The result is ``(*L, Nq, Dv)``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_BYTES", "rel_pos_attention", "rel_pos_attention_reference", "rel_pos_sdpa"]

#: Bytes of float32 scores one chunk of the CPU path may hold (all heads of a
#: chunk of queries). Measured on a 2-core AVX2 machine: 16 MiB chunks ran the
#: SAM ViT-B global block fastest (benchmarks/attention_cpu.py).
CHUNK_BYTES = int(os.environ.get("SAMFX_ATTENTION_CHUNK_BYTES", 16 << 20))

_MIN_QUERY_CHUNK = 64


def rel_pos_attention_reference(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    """The op's definition in plain PyTorch: builds the full bias and scores."""
    q3, k3, v3, rh, rw, out_shape = _flattened(q, k, v, rel_h, rel_w)
    bias = (rh[:, :, :, None] + rw[:, :, None, :]).flatten(2)
    attn = torch.softmax((q3 * scale) @ k3.transpose(-2, -1) + bias, dim=-1)
    return (attn @ v3).reshape(out_shape)


def rel_pos_sdpa(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    """The same attention through SDPA with the bias materialised as an additive
    mask (segment-anything-fast's first step): fast kernels, but the mask is as
    large as the scores."""
    q3, k3, v3, rh, rw, out_shape = _flattened(q, k, v, rel_h, rel_w)
    mask = (rh[:, :, :, None] + rw[:, :, None, :]).flatten(2)
    # 4-d (1, G, N, C): the layout SDPA's fused GPU kernels take (3-d inputs fall back to the math path)
    out = F.scaled_dot_product_attention(q3[None], k3[None], v3[None], attn_mask=mask[None], scale=scale)
    return out.reshape(out_shape)


@torch.library.custom_op("samfx::rel_pos_attention", mutates_args=())
def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q @ k^T + rel_h[..., n // Kw] + rel_w[..., n % Kw]) @ v``
    without materialising the ``(..., Nq, Nk)`` scores (see the module docstring)."""
    return _chunked(q, k, v, rel_h, rel_w, scale)


@rel_pos_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    _flattened(q, k, v, rel_h, rel_w)  # the same checks, on shapes only
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@rel_pos_attention.register_kernel("cuda")
def _(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    from . import rel_pos_triton as triton_kernel

    if triton_kernel.supports(q, k, v, rel_w):
        q3, k3, v3, rh, rw, out_shape = _flattened(q, k, v, rel_h, rel_w)
        return triton_kernel.rel_pos_attention(q3, k3, v3, rh, rw, scale).reshape(out_shape)
    return _chunked(q, k, v, rel_h, rel_w, scale)


def _flattened(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor):
    """Check shapes and view everything with one leading dim ``G``."""
    for name, t in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        if t.dim() < 3:
            raise ValueError(f"rel_pos_attention: {name} must have a leading dim, got shape {tuple(t.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype or rel_h.dtype != q.dtype or rel_w.dtype != q.dtype:
        raise ValueError(
            "rel_pos_attention: q, k, v, rel_h, rel_w must share a dtype, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}, {rel_h.dtype}, {rel_w.dtype}"
        )
    nq, d = q.shape[-2:]
    nk, kh, kw = k.shape[-2], rel_h.shape[-1], rel_w.shape[-1]
    g = math.prod(q.shape[:-2])
    if k.shape[-1] != d or v.shape[-2] != nk or k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"rel_pos_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form an attention"
        )
    if kh * kw != nk:
        raise ValueError(f"rel_pos_attention: rel_h's {kh} rows x rel_w's {kw} columns != {nk} keys")
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if t.shape[-2] != nq or math.prod(t.shape[:-2]) != g:
            raise ValueError(
                f"rel_pos_attention: {name} {tuple(t.shape)} does not match {g} x {nq} queries of q {tuple(q.shape)}"
            )
    out_shape = (*q.shape[:-1], v.shape[-1])
    return (q.reshape(g, nq, d), k.reshape(g, nk, d), v.reshape(g, nk, v.shape[-1]),
            rel_h.reshape(g, nq, kh), rel_w.reshape(g, nq, kw), out_shape)


def _chunked(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
    q3, k3, v3, rh, rw, out_shape = _flattened(q, k, v, rel_h, rel_w)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # Scores, bias and softmax in float32: the precision-critical part, and
        # CPUs without native half matmuls run float32 faster anyway.
        q3, k3, v3, rh, rw = (t.float() for t in (q3, k3, v3, rh, rw))
    g, nq, _ = q3.shape
    nk, kh, kw = k3.shape[1], rh.shape[-1], rw.shape[-1]
    row_bytes = nk * q3.element_size()
    q_chunk = min(nq, max(_MIN_QUERY_CHUNK, CHUNK_BYTES // (g * row_bytes)))
    g_chunk = min(g, max(1, CHUNK_BYTES // (q_chunk * row_bytes)))
    qs = q3 * scale
    kt = k3.transpose(-2, -1)
    out = q3.new_empty(g, nq, v3.shape[-1])
    # Flat buffers, so that every (possibly smaller, last) chunk is a contiguous view.
    scores_buffer = q3.new_empty(g_chunk * q_chunk * nk)
    probs_buffer = torch.empty_like(scores_buffer)
    for g0 in range(0, g, g_chunk):
        gs = slice(g0, min(g0 + g_chunk, g))
        for m0 in range(0, nq, q_chunk):
            ms = slice(m0, min(m0 + q_chunk, nq))
            size = (gs.stop - gs.start, ms.stop - ms.start, nk)
            scores = scores_buffer[: math.prod(size)].view(size)
            probs = probs_buffer[: math.prod(size)].view(size)
            torch.bmm(qs[gs, ms], kt[gs], out=scores)
            grid = scores.view(*size[:2], kh, kw)
            grid.add_(rh[gs, ms, :, None])
            grid.add_(rw[gs, ms, None, :])
            torch.ops.aten._softmax.out(scores, -1, False, out=probs)
            out[gs, ms] = torch.bmm(probs, v3[gs])
    return out.to(dtype).reshape(out_shape)
