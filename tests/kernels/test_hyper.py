"""samfx::hyper_linear / samfx::hyper_decode: CPU (numba) and Triton kernels
against the plain-PyTorch reference decode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from samfx.codecs.lattice import decode_rows, encode
from samfx.kernels import hyper, hyper_cpu


def _code(rows: int, cols: int, layout: str, seed: int = 0):
    torch.manual_seed(seed)
    return encode(torch.randn(rows, cols) * 0.05, 0.02, layout=layout)


@pytest.mark.parametrize("layout", ["packed", "uint16"])
@pytest.mark.parametrize("rows, cols", [(96, 77), (300, 512), (8, 33)])
def test_cpu_decode_matches_the_reference(layout: str, rows: int, cols: int) -> None:
    code = _code(rows, cols, layout)
    reference = decode_rows(code.codes, code.row_params, cols, code.bits, code.nx, code.i0, code.j0)
    decoded = hyper.decode(code.codes, code.row_params, cols, code.bits, code.nx, code.i0, code.j0)
    torch.testing.assert_close(decoded, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["packed", "uint16"])
@pytest.mark.parametrize("tokens", [1, 7, 16, 17, 300])
@pytest.mark.parametrize("rows, cols", [(200, 77), (600, 256)])
def test_cpu_linear_matches_the_reference(layout: str, tokens: int, rows: int, cols: int) -> None:
    code = _code(rows, cols, layout)
    x = torch.randn(2, tokens, cols)
    bias = torch.randn(rows)
    expected = F.linear(x, code.decode(), bias)
    args = (code.codes, code.row_params, bias, cols, code.bits, code.nx, code.i0, code.j0)
    torch.testing.assert_close(hyper.linear(x, *args), expected, rtol=1e-4, atol=1e-4)
    prepared = hyper_cpu.prepare(code.codes, code.row_params, code.bits, None)
    no_bias = hyper_cpu.linear(x, prepared, cols, code.nx, code.i0, code.j0)
    torch.testing.assert_close(no_bias, expected - bias, rtol=1e-4, atol=1e-4)
    half = hyper.linear(x.bfloat16(), *args)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=3e-2, atol=3e-2)


def test_ops_pass_opcheck_and_run_on_fake_tensors() -> None:
    code = _code(40, 64, "packed")
    x = torch.randn(3, 64)
    linear_args = (x, code.codes, code.row_params, torch.randn(40), 64, code.bits, code.nx, code.i0, code.j0)
    torch.library.opcheck(torch.ops.samfx.hyper_linear.default, linear_args)
    torch.library.opcheck(torch.ops.samfx.hyper_decode.default,
                          (code.codes, code.row_params, 64, code.bits, code.nx, code.i0, code.j0))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.samfx.hyper_linear(torch.empty(5, 7, 64), *linear_args[1:])
    assert out.shape == (5, 7, 40)


def test_wrong_width_is_refused() -> None:
    code = _code(8, 64, "packed")
    with pytest.raises(ValueError, match="64 features"):
        hyper.linear(torch.randn(2, 63), code.codes, code.row_params, None, 64, code.bits, code.nx, code.i0, code.j0)


_TRITON_CHECK = textwrap.dedent("""
    import torch
    from samfx.codecs.lattice import encode
    from samfx.kernels import hyper_triton
    torch.manual_seed(0)
    cases = [((40, 77), 5, torch.float32, 1e-6), ((70, 130), 33, torch.bfloat16, 1e-2), ((24, 64), 3, torch.float16, 2e-3)]
    for (rows, cols), tokens, dtype, tolerance in cases:
        for layout in ("packed", "uint16"):
            code = encode(torch.randn(rows, cols) * 0.05, 0.02, layout=layout)
            args = (code.codes, code.row_params, cols, code.bits, code.nx, code.i0, code.j0)
            reference = code.decode()
            assert torch.equal(hyper_triton.decode(*args), reference), (layout, "decode")
            x = torch.randn(tokens, cols).to(dtype)
            bias = torch.randn(rows)
            for config in (None, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_P": 16, "GROUP_N": 2,
                                  "num_warps": 1, "num_stages": 1}):
                out = hyper_triton.linear(x, args[0], args[1], bias, *args[2:], config=config)
                expected = x.double() @ reference.double().T + bias.double()
                error = float((out.double() - expected).norm() / expected.norm())
                assert out.dtype == dtype and error < tolerance, (layout, dtype, config, error)
    print("ok")
""")


def test_triton_kernels_match_the_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
