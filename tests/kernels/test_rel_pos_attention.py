"""samfx::rel_pos_attention: the chunked path and the Triton kernel against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samfx.kernels.rel_pos as kernel_module
from samfx.kernels import rel_pos_attention, rel_pos_attention_reference


def _inputs(lead, side_q, side_k, d, dv, dtype=torch.float64, rel_lead=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nq, nk = side_q[0] * side_q[1], side_k[0] * side_k[1]
    q = torch.randn(*lead, nq, d, generator=gen)
    k = torch.randn(*lead, nk, d, generator=gen)
    v = torch.randn(*lead, nk, dv, generator=gen)
    rel_lead = rel_lead or lead
    rel_h = torch.randn(*rel_lead, nq, side_k[0], generator=gen)
    rel_w = torch.randn(*rel_lead, nq, side_k[1], generator=gen)
    return tuple(t.to(dtype) for t in (q, k, v, rel_h, rel_w))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize(
    "lead, side_q, side_k, d, dv, rel_lead",
    [
        ((6,), (4, 4), (4, 4), 8, 8, None),          # SAM windows: (B * heads, N, C)
        ((2, 3), (5, 7), (5, 7), 16, 4, (6,)),       # HF layout (B, heads) with (B * heads) terms, non-square
        ((1, 2), (3, 3), (2, 5), 8, 8, None),        # queries and keys on different maps
    ],
)
def test_matches_reference_in_float64(lead, side_q, side_k, d, dv, rel_lead) -> None:
    q, k, v, rel_h, rel_w = _inputs(lead, side_q, side_k, d, dv, rel_lead=rel_lead)
    out = rel_pos_attention(q, k, v, rel_h, rel_w, 0.3)
    ref = rel_pos_attention_reference(q, k, v, rel_h, rel_w, 0.3)
    assert out.shape == (*lead, q.shape[-2], dv)
    assert _rel_err(out, ref) < 1e-12


def test_chunks_over_heads_and_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small budget forces several head and query chunks, with ragged last ones."""
    q, k, v, rel_h, rel_w = _inputs((7,), (10, 13), (10, 13), 8, 8, dtype=torch.float32)
    ref = rel_pos_attention_reference(q, k, v, rel_h, rel_w, 0.25)
    monkeypatch.setattr(kernel_module, "CHUNK_BYTES", 3 * 64 * 130 * 4)
    out = rel_pos_attention(q, k, v, rel_h, rel_w, 0.25)
    assert _rel_err(out, ref) < 1e-6


def test_non_contiguous_inputs() -> None:
    q, k, v, rel_h, rel_w = _inputs((2, 3), (4, 4), (4, 4), 8, 8)
    q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    assert not q.is_contiguous()
    torch.testing.assert_close(rel_pos_attention(q, k, v, rel_h, rel_w, 0.5),
                               rel_pos_attention_reference(q, k, v, rel_h, rel_w, 0.5))


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype, tolerance: float) -> None:
    inputs = _inputs((4,), (6, 6), (6, 6), 16, 16)
    ref = rel_pos_attention_reference(*inputs, 0.25)
    out = rel_pos_attention(*(t.to(dtype) for t in inputs), 0.25)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < tolerance


def test_rejects_inconsistent_shapes() -> None:
    q, k, v, rel_h, rel_w = _inputs((2,), (4, 4), (4, 4), 8, 8)
    with pytest.raises(ValueError, match="rel_h's 3 rows x rel_w's 4 columns != 16 keys"):
        rel_pos_attention(q, k, v, rel_h[..., :3], rel_w, 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        rel_pos_attention(q, k, v.float(), rel_h, rel_w, 1.0)
    with pytest.raises(ValueError, match="rel_w"):
        rel_pos_attention(q, k, v, rel_h, rel_w[:, :5], 1.0)


def test_op_registration_is_consistent() -> None:
    """Schema, fake (meta) implementation and dispatch agree (torch.compile/export rely on them)."""
    inputs = _inputs((2, 2), (3, 3), (3, 3), 8, 4, dtype=torch.float32)
    torch.library.opcheck(torch.ops.samfx.rel_pos_attention.default, (*inputs, 0.5),
                          test_utils=("test_schema", "test_faketensor"))


_TRITON_CASES = [
    # lead, query map, key map, d, dv, dtype, tolerance
    ((3,), (5, 5), (5, 5), 8, 8, "float32", 1e-6),      # 25 queries in blocks of 16, key rows of 5 padded to 16
    ((2,), (6, 3), (6, 3), 20, 12, "float32", 1e-6),    # head dims padded to powers of two (ViT-H's 80 -> 128)
    ((1,), (3, 20), (2, 17), 16, 16, "float32", 1e-6),  # queries and keys on different maps
    ((2,), (4, 4), (4, 4), 16, 32, "float16", 2e-3),
    # bfloat16 dot products are not supported by Triton's CPU interpreter; the GPU
    # benchmark (benchmarks/attention.py --device cuda) checks them against float32.
]

_TRITON_CHILD = """
import json, sys, torch
from samfx.kernels import rel_pos_attention_reference, rel_pos_triton
from tests.kernels.test_rel_pos_attention import _TRITON_CASES, _inputs, _rel_err
errors = []
for lead, side_q, side_k, d, dv, dtype, _ in _TRITON_CASES:
    q, k, v, rel_h, rel_w = _inputs(lead, side_q, side_k, d, dv)
    ref = rel_pos_attention_reference(q, k, v, rel_h, rel_w, d ** -0.5)
    dtype = getattr(torch, dtype)
    out = rel_pos_triton.rel_pos_attention(*(t.to(dtype) for t in (q, k, v, rel_h, rel_w)), d ** -0.5)
    assert out.dtype == dtype and out.shape == ref.shape
    errors.append(_rel_err(out, ref))
print(json.dumps(errors))
"""


def test_triton_kernel_matches_reference_in_the_interpreter() -> None:
    """The Triton kernel on CPU tensors under ``TRITON_INTERPRET=1`` (which must be
    set before Triton is first imported, hence a fresh process)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _TRITON_CHILD], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(errors) == len(_TRITON_CASES)
    for case, error in zip(_TRITON_CASES, errors):
        assert error < case[-1], (case, error)
