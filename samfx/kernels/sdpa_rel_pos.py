"""Attention with SAM's decomposed relative-position bias, without the full score matrix.

SAM's ViT attention (and SAM-HQ's, MedSAM's, Hugging Face ``SamVisionAttention``)
adds two terms to the scores of each query::

    scores[n, (i, j), (k, l)] = scale * q[n, (i, j)] . k[n, (k, l)] + rel_h[n, i, j, k] + rel_w[n, i, j, l]

for a query at row ``i``, column ``j`` and a key at row ``k``, column ``l``. Written
out as in upstream code, the scores, the bias and the probabilities of a global
block of SAM ViT-B (12 heads, 4096 tokens) are 805 MB each. ``samfx::sdpa_rel_pos``
computes the same attention one band of query rows at a time: the bias of a
band is built from ``rel_h`` and ``rel_w`` and handed to
``scaled_dot_product_attention`` (the fused kernel of the device) as its
additive mask, so the largest temporary is the bias of one band (a few MB).

:func:`reference_sdpa_rel_pos` is the upstream formula, the oracle of the tests
and the decomposition the ONNX emitter uses.

Example::

    >>> import torch
    >>> from samfx.kernels.sdpa_rel_pos import sdpa_rel_pos, reference_sdpa_rel_pos
    >>> q, k, v = (torch.randn(2, 16, 8) for _ in range(3))           # 4 x 4 tokens
    >>> rel_h, rel_w = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    >>> out = sdpa_rel_pos(q, k, v, rel_h, rel_w, scale=8 ** -0.5)
    >>> torch.allclose(out, reference_sdpa_rel_pos(q, k, v, rel_h, rel_w, 8 ** -0.5), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BAND_BYTES", "reference_sdpa_rel_pos", "sdpa_rel_pos"]

#: Bytes of bias per band of query rows (at least one row per band). On SAM ViT-B's
#: shapes on a 2-core CPU (2 threads), 32 MB bands ran the global block (12 x 4096
#: tokens) in 2.5 s against 6.0 s for the upstream formula and 4.7 s for it under
#: inductor, and the windowed blocks (300 x 196 tokens) in 123 ms against 284 ms
#: and 292 ms; 1-8 MB bands were 10-60% slower on the windows.
BAND_BYTES = 32 << 20


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> None:
    n, qh, qw, kh = rel_h.shape
    kw = rel_w.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (batch, tokens, dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if rel_w.shape[:3] != (n, qh, qw) or q.shape[:2] != (n, qh * qw) or k.shape[:2] != (n, kh * kw) \
            or v.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"shapes do not fit a ({qh} x {qw}) query grid and a ({kh} x {kw}) key grid: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, rel_h {tuple(rel_h.shape)}, rel_w {tuple(rel_w.shape)}"
        )


@torch.library.custom_op("samfx::sdpa_rel_pos", mutates_args=())
def _sdpa_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                  scale: float) -> torch.Tensor:
    _check(q, k, v, rel_h, rel_w)
    n, qh, qw, kh = rel_h.shape
    kw = rel_w.shape[-1]
    rows = max(1, min(qh, BAND_BYTES // max(1, n * qw * kh * kw * q.element_size())))
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    keys, values = k[None], v[None]
    for top in range(0, qh, rows):
        bottom = min(qh, top + rows)
        bias = (rel_h[:, top:bottom, :, :, None] + rel_w[:, top:bottom, :, None, :]).reshape(n, -1, kh * kw)
        queries = q[None, :, top * qw:bottom * qw]
        out[:, top * qw:bottom * qw] = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=bias[None].to(q.dtype), scale=scale
        )[0]
    return out


@_sdpa_rel_pos.register_fake
def _(q, k, v, rel_h, rel_w, scale):
    _check(q, k, v, rel_h, rel_w)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def sdpa_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Attention over a grid of tokens with a decomposed relative-position bias.

    Args:
        q: ``(N, qh * qw, E)`` queries (not yet scaled), ``N`` = batch x heads.
        k: ``(N, kh * kw, E)`` keys.
        v: ``(N, kh * kw, Ev)`` values.
        rel_h: ``(N, qh, qw, kh)`` bias of each query towards each key row.
        rel_w: ``(N, qh, qw, kw)`` bias of each query towards each key column.
        scale: multiplies ``q . k``.

    Returns:
        ``(N, qh * qw, Ev)``, as :func:`reference_sdpa_rel_pos`.
    """
    return torch.ops.samfx.sdpa_rel_pos(q, k, v, rel_h, rel_w, scale)


def reference_sdpa_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                           rel_w: torch.Tensor, scale: float) -> torch.Tensor:
    """The upstream formula (``segment_anything``'s ``add_decomposed_rel_pos``), full scores."""
    n, qh, qw, kh = rel_h.shape
    kw = rel_w.shape[-1]
    scores = (q * scale) @ k.transpose(-2, -1)
    scores = scores.view(n, qh, qw, kh, kw) + rel_h[..., None] + rel_w[..., None, :]
    return scores.view(n, qh * qw, kh * kw).softmax(dim=-1) @ v
