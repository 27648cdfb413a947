"""samfx::sdpa_rel_pos against the upstream formula."""

from __future__ import annotations

import pytest
import torch

from samfx.kernels import sdpa_rel_pos as kernel


def _inputs(n: int, q_grid: tuple[int, int], k_grid: tuple[int, int], dim: int = 8, value_dim: int = 8):
    torch.manual_seed(0)
    (qh, qw), (kh, kw) = q_grid, k_grid
    return (torch.randn(n, qh * qw, dim), torch.randn(n, kh * kw, dim), torch.randn(n, kh * kw, value_dim),
            torch.randn(n, qh, qw, kh), torch.randn(n, qh, qw, kw))


@pytest.mark.parametrize("band_bytes", [1, 3000, 1 << 30], ids=["one-row-bands", "uneven-bands", "one-band"])
@pytest.mark.parametrize("q_grid,k_grid", [((4, 4), (4, 4)), ((5, 3), (2, 7))])
def test_matches_the_upstream_formula(monkeypatch, band_bytes: int, q_grid, k_grid) -> None:
    monkeypatch.setattr(kernel, "BAND_BYTES", band_bytes)
    args = _inputs(3, q_grid, k_grid, value_dim=6)
    out = kernel.sdpa_rel_pos(*args, scale=0.3)
    torch.testing.assert_close(out, kernel.reference_sdpa_rel_pos(*args, 0.3), rtol=1e-5, atol=1e-5)


def test_fake_implementation_and_schema() -> None:
    torch.library.opcheck(torch.ops.samfx.sdpa_rel_pos.default, (*_inputs(2, (3, 3), (3, 3)), 0.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_shapes_that_do_not_fit_a_grid_are_refused() -> None:
    q, k, v, rel_h, rel_w = _inputs(2, (4, 4), (4, 4))
    with pytest.raises(ValueError, match="query grid"):
        kernel.sdpa_rel_pos(q[:, :15], k, v, rel_h, rel_w, 0.5)
