"""Int8 ops: each kernel against its float64 reference, and the reference against
the float product within the error that the grids allow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samfx.kernels import quantized as qk

torch.manual_seed(0)


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero_point = qk.activation_qparams(float(x.min()), float(x.max()))
    return torch.tensor(scale), torch.tensor(zero_point, dtype=torch.uint8)


def _close_to_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    # The kernels accumulate exactly in int32; they may round an input one code
    # differently from the reference at a tie (x / s versus x * (1 / s)), so allow
    # a few codes' worth against the output's magnitude.
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-3 * ref.abs().max().item() + 1e-5


def test_quantize_weight_is_per_channel_and_within_half_a_step() -> None:
    w = torch.randn(16, 24) * torch.logspace(-3, 1, 16)[:, None]
    codes, scale = qk.quantize_weight(w, qmax=63)
    assert codes.dtype == torch.int8 and codes.abs().max().item() == 63
    assert scale.shape == (16,)
    assert ((qk.dequantize_weight(codes, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_activation_qparams_represents_zero_exactly() -> None:
    scale, zero_point = qk.activation_qparams(-0.17, 4.93)
    assert qk.fake_quantize_activation(torch.zeros(1), scale, zero_point).item() == 0.0
    assert qk.activation_qparams(0.3, 2.0)[1] == 0  # widened to contain 0
    assert qk.activation_qparams(0.0, 0.0) == (1.0, 0)


@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_matches_reference_and_float(bias: bool) -> None:
    x = torch.randn(2, 37, 48) * 2 + 0.5
    w = torch.randn(32, 48) / 7
    b = torch.randn(32) if bias else None
    codes, scale = qk.quantize_weight(w, qk.weight_qmax(True))
    s, z = _grid(x)
    out = qk.quantized_linear(x, codes, scale, b, s, z)
    ref = qk.quantized_linear_reference(x, codes, scale, b, s, z)
    _close_to_reference(out, ref)
    # Against the float layer: every input within half an activation step, every
    # weight within half its channel's step, so the product moves at most this much.
    bound = (x.abs() @ (scale[:, None] / 2).expand_as(w).t() + float(s) / 2 * w.abs().sum(1)
             + float(s) * scale * w.shape[1] / 4)
    assert ((ref - F.linear(x, w, b)).abs() <= bound + 1e-5).all()


def test_dynamic_quantized_linear_matches_reference() -> None:
    x = torch.randn(3, 20, 64) * torch.logspace(-2, 2, 20)[:, None]  # tokens of very different sizes
    w = torch.randn(40, 64) / 8
    codes, scale = qk.quantize_weight(w, 63)
    out = qk.dynamic_quantized_linear(x, codes, scale, None)
    ref = qk.dynamic_quantized_linear_reference(x, codes, scale, None)
    _close_to_reference(out, ref)
    # per-token scales: small tokens keep their relative precision
    rel = (ref - F.linear(x, w)).norm(dim=-1) / F.linear(x, w).norm(dim=-1)
    assert rel.max().item() < 0.05


@pytest.mark.parametrize("stride,padding", [((1, 1), (1, 1)), ((2, 2), (0, 0))])
def test_quantized_conv2d_matches_reference(stride: tuple, padding: tuple) -> None:
    x = torch.randn(2, 8, 17, 17)
    w = torch.randn(16, 8, 3, 3) / 9
    b = torch.randn(16)
    codes, scale = qk.quantize_weight(w, 63)
    s, z = _grid(x)
    args = (x, codes, scale, b, s, z, stride, padding, (1, 1), 1)
    out, ref = qk.quantized_conv2d(*args), qk.quantized_conv2d_reference(*args)
    _close_to_reference(out, ref)
    expected = F.conv2d(x, w, b, stride, padding)
    assert ((ref - expected).norm() / expected.norm()).item() < 0.03


def test_quantized_matmul_matches_reference_on_attention_shapes() -> None:
    q = torch.randn(2, 4, 50, 16)
    k = torch.randn(2, 4, 16, 50)
    probs = (q @ k).softmax(-1)
    v = torch.randn(2, 4, 50, 16)
    for a, b, b_qmax in ((q, k, 63), (probs, v, 63)):
        s, z = _grid(a)
        b_scale = torch.tensor(float(b.abs().max()) / b_qmax)
        out = qk.quantized_matmul(a, b, s, z, b_scale, b_qmax)
        ref = qk.quantized_matmul_reference(a, b, s, z, b_scale, b_qmax)
        _close_to_reference(out, ref)
        assert ((ref - a @ b).norm() / (a @ b).norm()).item() < 0.05


def test_quantized_matmul_rejects_broadcasting() -> None:
    with pytest.raises(ValueError, match="leading dims"):
        qk.quantized_matmul(torch.randn(2, 3, 4), torch.randn(1, 4, 5), torch.tensor(0.1),
                            torch.tensor(0, dtype=torch.uint8), torch.tensor(0.1), 63)


def test_linear_rejects_wrong_weight() -> None:
    with pytest.raises(ValueError, match="int8"):
        qk.quantized_linear(torch.randn(2, 4), torch.randn(3, 4), torch.ones(3), None, torch.tensor(0.1),
                            torch.tensor(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="features"):
        qk.quantized_linear(torch.randn(2, 5), torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), None,
                            torch.tensor(0.1), torch.tensor(0, dtype=torch.uint8))


@pytest.mark.skipif(qk.int8_cpu_kernels()["full_range_weights"], reason="this CPU has VNNI/AMX: no saturation")
def test_full_range_weights_fall_back_to_the_exact_reference_without_vnni() -> None:
    x = torch.rand(8, 64) * 10
    codes = torch.full((4, 64), 127, dtype=torch.int8)  # worst case for vpmaddubsw's int16 pair sums
    scale = torch.ones(4)
    s, z = torch.tensor(10 / 255), torch.tensor(0, dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match="saturate"):
        out = qk.quantized_linear(x, codes, scale, None, s, z)
    assert torch.equal(out, qk.quantized_linear_reference(x, codes, scale, None, s, z))


@pytest.mark.skipif(not qk.int8_cpu_kernels()["onednn"], reason="no oneDNN int8 kernels in this build")
def test_cpu_kernel_runs_int8_not_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.ops.onednn.qlinear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].dtype)
            return real(*args)

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", Spy())
    codes, scale = qk.quantize_weight(torch.randn(8, 16), 63)
    qk.quantized_linear(torch.randn(4, 16), codes, scale, None, torch.tensor(0.02),
                        torch.tensor(128, dtype=torch.uint8))
    assert calls == [torch.uint8]


def test_ops_compile_and_export() -> None:
    codes, scale = qk.quantize_weight(torch.randn(8, 16), 63)

    class Layer(torch.nn.Module):
        def forward(self, x):
            y = torch.ops.samfx.quantized_linear(x, codes, scale, None, torch.tensor(0.03),
                                                 torch.tensor(128, dtype=torch.uint8))
            return torch.ops.samfx.quantized_matmul(y, y.transpose(-1, -2).contiguous(), torch.tensor(0.05),
                                                    torch.tensor(128, dtype=torch.uint8), torch.tensor(0.05), 63)

    x = torch.randn(2, 5, 16)
    eager = Layer()(x)
    compiled = torch.compile(Layer(), fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(eager, compiled, atol=1e-5)
    program = torch.export.export(Layer(), (x,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.samfx.quantized_linear.default in targets


def test_flop_formulas_count_int8_ops_like_float() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    qk.register_flop_formulas()
    codes, scale = qk.quantize_weight(torch.randn(8, 16), 63)
    with FlopCounterMode(display=False) as counter:
        qk.quantized_linear(torch.randn(4, 16), codes, scale, None, torch.tensor(0.1),
                            torch.tensor(0, dtype=torch.uint8))
    assert counter.get_total_flops() == 2 * 4 * 16 * 8


def test_ops_pass_opcheck() -> None:
    """Fake kernels agree with the real ones on shapes, strides and dtypes."""
    codes, scale = qk.quantize_weight(torch.randn(8, 4, 3, 3), 63)
    s, z = torch.tensor(0.03), torch.tensor(128, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.samfx.quantized_conv2d.default,
                          (torch.randn(1, 4, 9, 9), codes, scale, None, s, z, [1, 1], [1, 1], [1, 1], 1))
    lcodes, lscale = qk.quantize_weight(torch.randn(8, 16), 63)
    torch.library.opcheck(torch.ops.samfx.quantized_linear.default, (torch.randn(3, 16), lcodes, lscale, None, s, z))
    torch.library.opcheck(torch.ops.samfx.dynamic_quantized_linear.default, (torch.randn(3, 16), lcodes, lscale, None))
    torch.library.opcheck(torch.ops.samfx.quantized_matmul.default,
                          (torch.randn(2, 3, 16), torch.randn(2, 16, 5), s, z, torch.tensor(0.05), 63))
