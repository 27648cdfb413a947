"""The lattice codec: nearest points, error targets, layouts, lossless checkpoint coding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samfx.codecs.lattice import (
    A2_RMS,
    CODES,
    SQRT3_2,
    encode,
    entropy_bits,
    nearest_a2,
    pack_codes,
    unpack_codes,
)
from samfx.kernels import hyper_cpu


def _point(i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return i + 0.5 * (j % 2), SQRT3_2 * j


def test_nearest_a2_is_the_nearest_lattice_point() -> None:
    u, v = (torch.rand(2, 4000, dtype=torch.float64) * 60 - 30).unbind()
    i, j = nearest_a2(u, v)
    x, y = _point(i.double(), j.double())
    best = (x - u) ** 2 + (y - v) ** 2
    for di in range(-2, 3):
        for dj in range(-3, 4):
            cx, cy = _point((i + di).double(), (j + dj).double())
            assert ((cx - u) ** 2 + (cy - v) ** 2 >= best - 1e-12).all()
    # The A2 quantizer's per-coordinate RMS error at unit spacing is sqrt(5/72).
    assert abs(math.sqrt(best.mean().item() / 2) - A2_RMS) < 0.01


def test_numba_quantizer_matches_the_reference() -> None:
    w = torch.randn(37, 301) * 0.05
    center, inv_step = w.mean(1).double(), 1 / (w.std(1).double() * 0.07)
    i, j, bounds = hyper_cpu.quantize(w, center, inv_step)
    pairs = 151
    padded = torch.cat([w, center[:, None].float()], 1).double()
    ri, rj = nearest_a2((padded[:, :pairs] - center[:, None]) * inv_step[:, None],
                        (padded[:, pairs:] - center[:, None]) * inv_step[:, None])
    assert torch.equal(i.long(), ri) and torch.equal(j.long(), rj)
    assert torch.equal(bounds, torch.stack([ri.amin(1), ri.amax(1), rj.amin(1), rj.amax(1)], 1).int())


@pytest.mark.parametrize("target", [0.01, 0.02, 0.05])
def test_each_row_meets_its_relative_error(target: float) -> None:
    scales = torch.logspace(-3, 0, 48)[:, None]
    w = torch.randn(48, 512) * scales + 0.3 * scales
    code = encode(w, target)
    per_row = (code.decode() - w).norm(dim=1) / (w - w.mean(1, keepdim=True)).norm(dim=1)
    assert abs(per_row.median() / target - 1) < 0.05 and per_row.min() > target * 0.8
    # rows whose range would widen the runtime code get a coarser step, within the tensor's slack
    assert per_row.max() < target * 1.5
    assert per_row.square().mean().sqrt() < target * math.sqrt(1.05) * 1.03
    assert code.bits <= 16


def test_layouts_round_trip_and_agree() -> None:
    w = torch.randn(19, 77)
    packed = encode(w, 0.03)
    wide = encode(w, 0.03, layout="uint16")
    assert packed.codes.dtype == torch.uint8 and wide.codes.dtype == torch.int16
    assert packed.codes.shape == (19, 40 // 8 * 8 // 8 * packed.bits) or packed.codes.numel() * 8 == 19 * 40 * packed.bits
    theta = packed.theta()
    assert torch.equal(wide.theta(), theta)
    assert torch.equal(pack_codes(theta, packed.bits), packed.codes)
    assert torch.equal(unpack_codes(packed.codes, packed.pairs, packed.bits), theta)
    assert torch.equal(hyper_cpu.theta(packed.codes, packed.pairs, packed.bits).long(), theta)
    assert torch.equal(packed.to_layout("uint16").codes, wide.codes)
    assert torch.equal(packed.decode(), wide.decode())
    assert packed.decode().shape == w.shape


@pytest.mark.parametrize("bits", range(1, 17))
def test_bit_planes_hold_every_width(bits: int) -> None:
    theta = torch.randint(0, 2 ** bits, (3, 29))
    codes = pack_codes(theta, bits)
    assert codes.numel() == 3 * 32 * bits // 8
    assert torch.equal(unpack_codes(codes, 29, bits), theta)
    assert torch.equal(hyper_cpu.theta(codes, 29, bits).long(), theta)


def test_constant_rows_are_exact() -> None:
    w = torch.zeros(3, 64)
    w[1] = 1.0
    w[2] = -0.375
    assert torch.equal(encode(w).decode(), w)


def _error(code, w: torch.Tensor) -> float:
    return float((code.decode() - w).norm() / (w - w.mean(1, keepdim=True)).norm())


def test_outlier_rows_take_a_coarser_step_within_the_slack() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    w[7, 3] = 0.3  # 15 standard deviations: a code wide enough for it costs 2 more bits
    free = encode(w, 0.02, range_slack=1.0)
    tight = encode(w, 0.02, range_slack=1.05)
    assert tight.bits < free.bits
    assert _error(tight, w) < 0.02 * math.sqrt(1.05) * 1.02
    step = tight.row_params[:, 0].float()
    assert step[7] > 1.3 * step.median()
    w[7, 3] = 2.0  # 100 standard deviations: the width limit wins over the slack
    assert encode(w, 0.02, max_bits=14).bits <= 14


def test_checkpoint_codec_is_lossless_and_close_to_the_entropy() -> None:
    w = torch.randn(512, 768) * 0.02
    for layout in ("packed", "uint16"):
        code = encode(w, layout=layout)
        data = CODES.encode(code.codes, code.meta())
        assert torch.equal(CODES.decode(data, code.meta(), code.codes.dtype, tuple(code.codes.shape)), code.codes)
        assert len(data) * 8 < 1.03 * entropy_bits(code) + 2048
        assert len(data) * 8 < code.codes.numel() * code.codes.element_size() * 8


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="nan"):
        encode(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="empty"):
        encode(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="rel_error"):
        encode(torch.zeros(2, 4), rel_error=0)
    with pytest.raises(ValueError, match="layout"):
        encode(torch.zeros(2, 4), layout="int4")
    assert np.isfinite(entropy_bits(encode(torch.ones(2, 4))))
