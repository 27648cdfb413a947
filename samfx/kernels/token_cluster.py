"""Token clustering and reconstruction (Expedit-SAM), batched over windows.

Expedit-SAM ("Expediting Large-Scale Vision Transformer for Dense Prediction
without Fine-tuning") shrinks the token map of a windowed ViT in the middle of
the encoder and restores it at the end:

* ``samfx::token_cluster`` splits the ``(B, H, W, C)`` map into the encoder's
  windows and, in each window, groups the tokens into a ``grid[0] x grid[1]``
  grid of clusters by soft k-means: centroids start as the mean of the tokens
  in their cell, and each iteration assigns every token to the centroids whose
  cell lies within ``neighbourhood`` cells of its own (softmax over
  ``-temperature * squared distance``) and moves each centroid to the weighted
  mean of its tokens. The centroids of all windows, stitched together, form a
  smaller map that later blocks run on.
* ``samfx::token_reconstruct`` rebuilds every original token from the
  processed clusters of its window: weights ``exp(-temperature * |f - c|^2)``
  between the token's features before clustering ``f`` and each centroid at
  clustering time ``c``, kept for the ``k`` largest, L2-normalised as in
  Expedit-SAM or normalised to sum to one; optionally each token keeps its own
  features and only the clusters' change is spread back (``residual``).

Padding is handled differently from Expedit-SAM's code, which clusters the
zero padding of the border windows along with real tokens: here padding never
enters a centroid or a weight, and cells that hold no real token are cropped,
so the clustered map is padded again by later windowed blocks exactly as the
original map was. With as many clusters as tokens per window, no iterations
and ``k = 1`` the pair is the identity, which is how tests check the rewrite.

Both ops are compositions of standard PyTorch ops, batched over all windows of
all images (no Python loop per window). They are registered as
``CompositeImplicitAutograd``, so ``torch.compile``, ``torch.export`` and the
ONNX exporter (``torch.onnx.export(..., dynamo=True)``) decompose them into
standard ops; a Triton kernel would not pay off (they are a few batched
matmuls, well under 1% of an encoder's time). :func:`reference_token_cluster`
and :func:`reference_token_reconstruct` are plain per-window implementations
in float64, the oracle the tests check the ops against.

Example::

    >>> import torch
    >>> from samfx.kernels.token_cluster import token_cluster, token_reconstruct
    >>> x = torch.randn(1, 20, 20, 8)
    >>> c = token_cluster(x, window=(7, 7), grid=(4, 4))
    >>> tuple(c.shape)                      # 3 windows per side, the last one partial
    (1, 11, 11, 8)
    >>> tuple(token_reconstruct(c, x, c, window=(7, 7), grid=(4, 4)).shape)
    (1, 20, 20, 8)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "NORMS",
    "clustered_size",
    "partition_windows",
    "reference_token_cluster",
    "reference_token_reconstruct",
    "token_cluster",
    "token_reconstruct",
    "unpartition_windows",
]

_NAMESPACE = "samfx"


# -- windows -------------------------------------------------------------------

def partition_windows(x: torch.Tensor, window: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``(B, H, W, C)`` into ``(B * nh * nw, wh, ww, C)`` windows, padding
    the bottom and right with zeros; also returns the padded size.

    SAM's ``window_partition`` for rectangular windows (same order, same padding).
    """
    wh, ww = window
    b, h, w, c = x.shape
    pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh, ww, c), (hp, wp)


def unpartition_windows(
    windows: torch.Tensor, window: Sequence[int], padded: Sequence[int], size: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`partition_windows`: ``(B * nh * nw, wh, ww, C)`` windows
    back to the ``(B, H, W, C)`` map of ``size``, padding cropped."""
    wh, ww = window
    hp, wp = padded
    h, w = size
    x = windows.reshape(-1, hp // wh, wp // ww, wh, ww, windows.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, windows.shape[-1])[:, :h, :w]


def clustered_size(size: Sequence[int], window: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
    """Size of the clustered map for a ``size`` map: ``grid`` cells per full
    window, and in a partial border window only the cells that hold a token."""
    # One past the cell of the last token; no branch, so symbolic sizes stay symbolic.
    (h, w), (wh, ww), (gh, gw) = size, window, grid
    return ((h - 1) // wh * gh + (h - 1) % wh * gh // wh + 1,
            (w - 1) // ww * gw + (w - 1) % ww * gw // ww + 1)


def _cells(window: Sequence[int], grid: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell row and column of each token of a window (row-major), and of each cell."""
    (wh, ww), (gh, gw) = window, grid
    token_row = (torch.arange(wh, device=device) * gh // wh)[:, None].expand(wh, ww).reshape(-1)
    token_col = (torch.arange(ww, device=device) * gw // ww)[None, :].expand(wh, ww).reshape(-1)
    cell_row = torch.arange(gh, device=device)[:, None].expand(gh, gw).reshape(-1)
    cell_col = torch.arange(gw, device=device)[None, :].expand(gh, gw).reshape(-1)
    return torch.stack([token_row, token_col]), torch.stack([cell_row, cell_col])


def _valid(size: Sequence[int], window: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    """``(batch * nh * nw, wh * ww)``: which window positions hold a real token of a ``size`` map."""
    (h, w), (wh, ww) = size, window
    nh, nw = (h + wh - 1) // wh, (w + ww - 1) // ww
    rows = torch.arange(nh * wh, device=device).reshape(nh, 1, wh, 1) < h
    cols = torch.arange(nw * ww, device=device).reshape(1, nw, 1, ww) < w
    valid = (rows & cols).reshape(1, nh * nw, wh * ww).expand(batch, nh * nw, wh * ww)
    return valid.reshape(batch * nh * nw, wh * ww)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|^2`` for ``(N, I, C)`` and ``(N, J, C)``, as one batched matmul."""
    d = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None, :] - 2 * (a @ b.transpose(1, 2))
    return d.clamp_min(0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Squared distances of wide features lose everything in half precision.
    return torch.promote_types(dtype, torch.float32)


# -- the ops --------------------------------------------------------------------

def _token_cluster(x: torch.Tensor, window: Sequence[int], grid: Sequence[int], iterations: int,
                   temperature: float, neighbourhood: int) -> torch.Tensor:
    b, h, w, c = x.shape
    gh, gw = grid
    windows, _ = partition_windows(x.to(_compute_dtype(x.dtype)), window)
    tokens = windows.reshape(windows.shape[0], -1, c)                                   # (N, T, C)
    valid = _valid((h, w), window, b, x.device).to(tokens.dtype)[..., None]             # (N, T, 1)
    token_cell, cell = _cells(window, grid, x.device)
    member = (token_cell[0][:, None] == cell[0]) & (token_cell[1][:, None] == cell[1])  # (T, S)
    near = ((token_cell[:, :, None] - cell[:, None, :]).abs() <= neighbourhood).all(0)  # (T, S)
    member = member.to(tokens.dtype)
    count = member.T @ valid                                                            # (N, S, 1)
    occupied = count.transpose(1, 2) > 0                                                # (N, 1, S)
    centroids = (member.T @ (tokens * valid)) / count.clamp_min(1)                      # (N, S, C)
    allowed = near & occupied
    lowest = torch.finfo(tokens.dtype).min
    for _ in range(iterations):
        logits = (-temperature * _squared_distances(tokens, centroids)).masked_fill(~allowed, lowest)
        assign = logits.softmax(-1) * valid                                             # (N, T, S)
        mass = assign.sum(1)[..., None]                                                 # (N, S, 1)
        moved = (assign.transpose(1, 2) @ tokens) / mass.clamp_min(torch.finfo(tokens.dtype).tiny)
        # A centroid that no token chose any more stays where it was.
        centroids = torch.where(mass > 0, moved, centroids)
    cells = centroids.reshape(b, -1, gh * gw, c)
    nh, nw = (h + window[0] - 1) // window[0], (w + window[1] - 1) // window[1]
    grid_map = cells.reshape(b, nh, nw, gh, gw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * gh, nw * gw, c)
    out_h, out_w = clustered_size((h, w), window, grid)
    return grid_map[:, :out_h, :out_w].to(x.dtype)


def _token_reconstruct(clusters: torch.Tensor, features: torch.Tensor, centroids: torch.Tensor,
                       window: Sequence[int], grid: Sequence[int], k: int, temperature: float,
                       norm: str, residual: bool) -> torch.Tensor:
    b, h, w, c = features.shape
    if residual and not clusters.shape[-1] == centroids.shape[-1] == c:
        raise ValueError(f"a residual reconstruction needs clusters ({clusters.shape[-1]}), centroids "
                         f"({centroids.shape[-1]}) and features ({c}) of one width")
    dtype = _compute_dtype(clusters.dtype)
    windows, padded = partition_windows(features.to(dtype), window)
    tokens = windows.reshape(windows.shape[0], -1, c)                                   # (N, T, C)
    cell_size = centroids.shape[1:3]
    centre_windows, _ = partition_windows(centroids.to(dtype), grid)
    centres = centre_windows.reshape(centre_windows.shape[0], -1, c)                    # (N, S, C)
    value_windows, _ = partition_windows((clusters - centroids if residual else clusters).to(dtype), grid)
    values = value_windows.reshape(value_windows.shape[0], -1, clusters.shape[-1])      # (N, S, C')
    occupied = _valid(cell_size, grid, b, features.device)[:, None, :]                  # (N, 1, S)
    logits = (-temperature * _squared_distances(tokens, centres)).masked_fill(~occupied, float("-inf"))
    # exp(-t d) / |exp(-t d)| is unchanged by a common factor: shifting by the
    # nearest centroid keeps far tokens from underflowing to a zero weight.
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    kth = weights.topk(min(k, weights.shape[-1]), dim=-1).values[..., -1:]
    weights = torch.where(weights >= kth, weights, torch.zeros_like(weights))
    weights = weights / _weight_norm(weights, norm)
    rebuilt = weights @ values
    rebuilt = (tokens + rebuilt if residual else rebuilt).reshape(-1, window[0], window[1], clusters.shape[-1])
    return unpartition_windows(rebuilt, window, padded, (h, w)).to(clusters.dtype)


NORMS = ("l2", "sum")


def _weight_norm(weights: torch.Tensor, norm: str) -> torch.Tensor:
    """What each token's weights are divided by: their L2 norm (Expedit-SAM) or their sum."""
    if norm == "l2":
        return weights.norm(dim=-1, keepdim=True)
    if norm == "sum":
        return weights.sum(-1, keepdim=True)
    raise ValueError(f"norm is one of {NORMS}, not {norm!r}")


_LIBRARY = torch.library.Library(_NAMESPACE, "FRAGMENT")
_LIBRARY.define(
    "token_cluster(Tensor x, int[2] window, int[2] grid, int iterations, float temperature, int neighbourhood) -> Tensor"
)
_LIBRARY.define(
    "token_reconstruct(Tensor clusters, Tensor features, Tensor centroids, int[2] window, int[2] grid, int k, "
    "float temperature, str norm, bool residual) -> Tensor"
)
# Composite: every tracer (torch.compile, torch.export, ONNX) sees the standard ops inside.
_LIBRARY.impl("token_cluster", _token_cluster, "CompositeImplicitAutograd")
_LIBRARY.impl("token_reconstruct", _token_reconstruct, "CompositeImplicitAutograd")


def token_cluster(x: torch.Tensor, window: Sequence[int], grid: Sequence[int], iterations: int = 5,
                  temperature: float = 0.01, neighbourhood: int = 2) -> torch.Tensor:
    """Cluster the tokens of each window of a ``(B, H, W, C)`` map.

    Args:
        x: the token map.
        window: ``(wh, ww)`` window the tokens are clustered in (the encoder's windows).
        grid: ``(gh, gw)`` clusters per window, at most ``window``.
        iterations: soft k-means iterations (0: the cell means).
        temperature: multiplies the squared distances in the assignment softmax.
        neighbourhood: a token may join clusters up to this many cells away from
            its own, per axis (Expedit-SAM's 5x5 neighbourhood is 2).

    Returns:
        The centroids as a map of :func:`clustered_size`.
    """
    return torch.ops.samfx.token_cluster(x, list(window), list(grid), iterations, temperature, neighbourhood)


def token_reconstruct(clusters: torch.Tensor, features: torch.Tensor, centroids: torch.Tensor,
                      window: Sequence[int], grid: Sequence[int], k: int = 20,
                      temperature: float = 0.01, norm: str = "l2", residual: bool = False) -> torch.Tensor:
    """Rebuild the full token map from processed clusters.

    Args:
        clusters: the cluster map after the blocks that ran on it (any width).
        features: the ``(B, H, W, C)`` map that was clustered.
        centroids: what :func:`token_cluster` returned for ``features``.
        window, grid: as given to :func:`token_cluster`.
        k: clusters each token is rebuilt from (the nearest ones).
        temperature: multiplies the squared distances in the weights.
        norm: ``"l2"`` divides each token's weights by their L2 norm, as
            Expedit-SAM does; ``"sum"`` by their sum, so that a token is a
            weighted mean of clusters. L2 weights sum to up to ``sqrt(k)``:
            where distances are small against ``1 / temperature`` they scale
            the rebuilt tokens up by as much.
        residual: rebuild each token as its own ``features`` plus the weighted
            change of its clusters (``clusters - centroids``) instead of the
            weighted clusters themselves (Expedit-SAM), which keeps the detail
            that clustering averaged away. All three maps need one width.

    Returns:
        ``(B, H, W, clusters.shape[-1])``.
    """
    return torch.ops.samfx.token_reconstruct(clusters, features, centroids, list(window), list(grid), k,
                                             temperature, norm, residual)


# -- references -------------------------------------------------------------------

def _window_slices(size: Sequence[int], window: Sequence[int]) -> list[tuple[slice, slice]]:
    (h, w), (wh, ww) = size, window
    return [(slice(i, min(i + wh, h)), slice(j, min(j + ww, w))) for i in range(0, h, wh) for j in range(0, w, ww)]


def _reference_cells(rows: int, cols: int, window: Sequence[int], grid: Sequence[int]) -> list[tuple[int, int]]:
    """Cell of each real token of a window (row-major) that holds ``rows x cols`` tokens."""
    return [(r * grid[0] // window[0], q * grid[1] // window[1]) for r in range(rows) for q in range(cols)]


def reference_token_cluster(x: torch.Tensor, window: Sequence[int], grid: Sequence[int], iterations: int = 5,
                            temperature: float = 0.01, neighbourhood: int = 2) -> torch.Tensor:
    """Straightforward float64 version of :func:`token_cluster`: one window at a
    time, real tokens only, the cell grid built from lists."""
    b, h, w, c = x.shape
    out_rows = []
    for image in x.double():
        window_maps = []
        for rows, cols in _window_slices((h, w), window):
            tokens = image[rows, cols].reshape(-1, c)
            cells = _reference_cells(rows.stop - rows.start, cols.stop - cols.start, window, grid)
            present = sorted(set(cells))
            centroids = torch.stack([tokens[[i for i, cell in enumerate(cells) if cell == p]].mean(0) for p in present])
            allowed = torch.tensor([[max(abs(t[0] - p[0]), abs(t[1] - p[1])) <= neighbourhood for p in present]
                                    for t in cells])
            for _ in range(iterations):
                distances = torch.cdist(tokens, centroids) ** 2
                logits = torch.where(allowed, -temperature * distances, torch.tensor(float("-inf"), dtype=torch.double))
                assign = torch.softmax(logits, dim=1)
                mass = assign.sum(0)
                moved = (assign.T @ tokens) / mass.clamp_min(1e-300)[:, None]
                centroids = torch.where(mass[:, None] > 0, moved, centroids)
            gh, gw = max(p[0] for p in present) + 1, max(p[1] for p in present) + 1
            window_maps.append((rows.start, cols.start, centroids.reshape(gh, gw, c)))
        bands = {}
        for top, _, cells in window_maps:
            bands.setdefault(top, []).append(cells)
        out_rows.append(torch.cat([torch.cat(band, dim=1) for _, band in sorted(bands.items())], dim=0))
    return torch.stack(out_rows).to(x.dtype)


def reference_token_reconstruct(clusters: torch.Tensor, features: torch.Tensor, centroids: torch.Tensor,
                                window: Sequence[int], grid: Sequence[int], k: int = 20,
                                temperature: float = 0.01, norm: str = "l2", residual: bool = False) -> torch.Tensor:
    """Straightforward float64 version of :func:`token_reconstruct`: weights
    ``exp(-t |f - c|^2)`` as written, top ``k`` per token, normalised."""
    b, h, w, _ = features.shape
    out = torch.zeros(b, h, w, clusters.shape[-1], dtype=torch.double)
    cell_slices = _window_slices(centroids.shape[1:3], grid)
    for n in range(b):
        for (rows, cols), (cell_rows, cell_cols) in zip(_window_slices((h, w), window), cell_slices):
            f = features[n, rows, cols].double().reshape(-1, features.shape[-1])
            cents = centroids[n, cell_rows, cell_cols].double().reshape(-1, centroids.shape[-1])
            values = clusters[n, cell_rows, cell_cols].double().reshape(-1, clusters.shape[-1])
            weights = torch.exp(-temperature * torch.cdist(f, cents) ** 2)
            top = weights.topk(min(k, weights.shape[1]), dim=1)
            kept = torch.zeros_like(weights).scatter(1, top.indices, top.values)
            kept = kept / (kept.norm(dim=1, keepdim=True) if norm == "l2" else kept.sum(dim=1, keepdim=True))
            rebuilt = f + kept @ (values - cents) if residual else kept @ values
            out[n, rows, cols] = rebuilt.reshape(rows.stop - rows.start, cols.stop - cols.start, -1)
    return out.to(clusters.dtype)
