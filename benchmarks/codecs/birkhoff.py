"""Birkhoff's Hyper-Compression codec, reimplemented to measure samfx against.

A faithful, vectorised reimplementation of ``compress_params`` of
Birkhoff-Model-Compression (``utils/model_encode.py``) with its defaults:

* pairs: a Linear weight is paired along its rows (an odd row gets one extra
  column, the mean of the second coordinates); any other parameter is
  flattened (an odd count gets the same mean appended);
* a square of side ``rect_l`` centred on the mean pair ``c``, sampled by the
  rational winding ``P(n) = ((n·(rect_l/m², rect_l/m)) mod rect_l) + c - rect_l/2``,
  ``m = ceil(sqrt(U))``: a sheared ``m x m`` grid;
* pairs outside the square fall into ``K`` rings up to the farthest pair, are
  scaled radially into the square, quantized there and scaled back; the code is
  ``θ = n + U·k``;
* ``U`` from ``(1225, 1600)`` and ``K`` from 1 to 3 are searched against a mean
  absolute error of 0.001; a tensor whose error stays above 0.006 is kept raw,
  as are tensors under 10 elements and buffers;
* codes are bit-packed at ``bit_length(max θ)`` bits.

The nearest grid point is found in closed form among a 3x3 neighbourhood of
the grid's rounded coordinates and checked against the float32 grid points,
where Birkhoff computes a chunked ``cdist`` against all ``U`` points; the
search, rings and error rule are the same. :func:`file_size` lays the codes out
with Birkhoff's safetensors keys and bit-packing, so the size is theirs.

Example::

    >>> import torch
    >>> from benchmarks.codecs.birkhoff import encode
    >>> code = encode(torch.randn(64, 256) * 0.02, linear=True)
    >>> code.bits, round(float((code.decode() - code.original).abs().mean()), 4) <= 0.001
    (12, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["BirkhoffCode", "encode", "file_size"]

RECT_L = 0.1
NUM_INNER = (1225, 1600)
CLASS_MAX = 3
LOSS_HOPE = 0.001
LOSS_MAX = 0.001
RAW_ABOVE = 0.006
MIN_NUMEL = 10


@dataclass
class BirkhoffCode:
    """One tensor coded by Birkhoff's codec (``theta is None``: kept raw)."""

    original: torch.Tensor
    theta: torch.Tensor | None = None
    center: torch.Tensor = field(default_factory=lambda: torch.zeros(2))
    farthest: torch.Tensor = field(default_factory=lambda: torch.zeros(2))
    inner: int = 0
    rings: int = 0
    padded: bool = False
    linear: bool = False
    decoded: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        if self.theta is None:
            return 32
        return max(1, int(self.theta.max()).bit_length())

    def packed_bytes(self) -> int:
        return 0 if self.theta is None else -(-self.theta.numel() * self.bits // 8)

    def decode(self) -> torch.Tensor:
        return self.original if self.decoded is None else self.decoded


def _grid(count: int, origin: torch.Tensor) -> torch.Tensor:
    """The U codebook points, computed as Birkhoff does (float32)."""
    m = math.ceil(math.sqrt(count))
    jump = torch.tensor([RECT_L / m ** 2, RECT_L / m], dtype=torch.float32)
    n = torch.arange(count, dtype=torch.float32)[:, None]
    return (n * jump) % RECT_L + origin


def _nearest(points: torch.Tensor, grid: torch.Tensor, count: int, origin: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid point (as ``argmin(cdist)`` would find it).

    Point ``q*m + r`` sits at ``δ(q + r/m, r)``: rows ``δ`` apart, so the nearest
    point lies in the row just below or just above, next to the rounded ``q``.
    Float32 ``mod`` moves a few points of the bottom row to the top edge; those
    form an extra row, searched by x.
    """
    m = math.ceil(math.sqrt(count))
    delta = RECT_L / m
    rel = (points - origin) / delta
    n_all = torch.arange(count)
    ideal = torch.stack([delta * (n_all // m + (n_all % m) / m), delta * (n_all % m)], 1) + origin
    moved = n_all[((grid - ideal).abs() > delta / 4).any(1)]
    moved = moved[torch.argsort(grid[moved, 0])]
    candidates = []
    below = torch.floor(rel[:, 1]).long()
    for dr in (0, 1):
        r = (below + dr).clamp(0, m - 1)
        q = torch.round(rel[:, 0] - r / m).long()
        candidates += [((q + dq).clamp(0, m - 1) * m + r).clamp(max=count - 1) for dq in (-1, 0, 1)]
    if moved.numel():
        right = torch.searchsorted(grid[moved, 0].contiguous(), points[:, 0].contiguous()).clamp(max=moved.numel() - 1)
        candidates += [moved[right], moved[(right - 1).clamp(min=0)]]
    best = torch.full((points.shape[0],), float("inf"))
    index = torch.zeros(points.shape[0], dtype=torch.int64)
    for n in candidates:
        distance = (points - grid[n]).square().sum(1)
        closer = (distance < best) | ((distance == best) & (n < index))
        best = torch.where(closer, distance, best)
        index = torch.where(closer, n, index)
    return index


def _rings(points: torch.Tensor, center: torch.Tensor, far: float, rings: int, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring of each pair (0 inside the square) and its radial scale factor."""
    step = (far - RECT_L / 2) / rings
    radii = torch.arange(rings + 1, dtype=torch.float32) * step + RECT_L / 2
    radii[-1] = far
    distance = (points - center).norm(dim=1, keepdim=True)
    ring = (distance <= radii).int().argmax(1)
    ring[inside] = 0
    return ring, (RECT_L / 2) / radii[ring]


def _code(points: torch.Tensor, center: torch.Tensor, far: float, rings: int, inside: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    origin = center - RECT_L / 2
    grid = _grid(count, origin)
    if rings == 0:
        index = _nearest(points, grid, count, origin)
        return index, grid[index]
    ring, factor = _rings(points, center, far, rings, inside)
    index = _nearest(center + (points - center) * factor[:, None], grid, count, origin)
    decoded = center + (grid[index] - center) / factor[:, None]
    return index + count * ring, decoded


def encode(tensor: torch.Tensor, linear: bool) -> BirkhoffCode:
    """Code one parameter as Birkhoff does (``linear``: an ``nn.Linear`` weight)."""
    original = tensor.detach().float().cpu()
    if original.numel() < MIN_NUMEL:
        return BirkhoffCode(original)
    if linear and original.dim() == 2:
        rows, cols = original.shape
        values = original
        padded = cols % 2 == 1
        if padded:
            mean = original[:, :-1].reshape(-1, 2)[:, 1].mean()
            values = torch.cat([original, mean.expand(rows, 1)], 1)
        points = values.reshape(-1, 2)
    else:
        flat = original.reshape(-1)
        padded = flat.numel() % 2 == 1
        if padded:
            flat = torch.cat([flat, flat[:-1].reshape(-1, 2)[:, 1].mean()[None]])
        points = flat.reshape(-1, 2)
    center = points.mean(0)
    distance = (points - center).norm(dim=1)
    far = float(distance.max())
    farthest = points[int(distance.argmax())]
    inside = ((points - center).abs() <= RECT_L / 2).all(1)
    for position, count in enumerate(NUM_INNER):
        if inside.all():
            rings = 0
            _, decoded = _code(points, center, far, 0, inside, count)
            best = float((decoded - points).abs().mean())
        else:
            best, rings = float("inf"), 0
            for k in range(1, CLASS_MAX + 1):
                _, decoded = _code(points, center, far, k, inside, count)
                loss = float((decoded - points).abs().mean())
                if loss <= best:
                    best, rings = loss, k
                if loss <= LOSS_HOPE:
                    break
        if best <= LOSS_MAX or position == len(NUM_INNER) - 1:
            break
    theta, decoded = _code(points, center, far, rings, inside, count)
    if float((decoded - points).abs().mean()) > RAW_ABOVE:
        return BirkhoffCode(original)
    if linear and original.dim() == 2:
        back = decoded.reshape(original.shape[0], -1)[:, :original.shape[1]]
    else:
        back = decoded.reshape(-1)[:original.numel()].reshape(original.shape)
    return BirkhoffCode(original, theta, center, farthest, count, rings, padded, linear, back.contiguous())


def file_size(codes: dict[str, BirkhoffCode], path: str) -> int:
    """Size of Birkhoff's ``hyper_model.safetensors`` for ``codes`` (written to
    ``path`` with the codec's keys; packed streams are written as zero bytes of
    their exact length, which is all the size depends on)."""
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {"rect_l": torch.tensor(RECT_L, dtype=torch.float32),
               "num_inner_list": torch.tensor(NUM_INNER, dtype=torch.int64)}
    for name, code in codes.items():
        if code.theta is None:
            tensors[f"{name}.load_type"] = torch.tensor([0], dtype=torch.uint8)
            tensors[f"{name}.origin_param"] = code.original.contiguous()
            continue
        tensors.update({
            f"{name}.load_type": torch.tensor(2 if code.linear else 1, dtype=torch.uint8),
            f"{name}.encoded_index": torch.zeros(code.packed_bytes(), dtype=torch.uint8),
            f"{name}.if_padding": torch.tensor(int(code.padded), dtype=torch.uint8),
            f"{name}.center_node": code.center.float(),
            f"{name}.farthest_node": code.farthest.float(),
            f"{name}.U": torch.tensor(NUM_INNER.index(code.inner), dtype=torch.uint8),
            f"{name}.K": torch.tensor(code.rings, dtype=torch.uint8),
            f"{name}.original_shape": torch.tensor(list(code.original.shape), dtype=torch.int64),
            f"{name}.padding_bits": torch.tensor((-code.theta.numel() * code.bits) % 8, dtype=torch.uint8),
            f"{name}.uint_i": torch.tensor(code.bits, dtype=torch.uint8),
        })
    save_file(tensors, path)
    return Path(path).stat().st_size
