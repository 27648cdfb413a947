"""Every samfx op has a way into ONNX, and the emitter uses the registered routes."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import onnx
import onnxruntime
import torch

import samfx.kernels
from samfx.kernels import onnx_translations


def _samfx_ops() -> list[str]:
    for module in pkgutil.iter_modules(samfx.kernels.__path__):
        importlib.import_module(f"samfx.kernels.{module.name}")
    return sorted({name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                   if name.startswith("samfx::")})


def test_every_samfx_op_has_a_route_to_onnx() -> None:
    ops = _samfx_ops()
    assert "rel_pos_attention" in ops
    routed = {op.name().split("::")[1] for op in (*onnx_translations.DECOMPOSITIONS, *onnx_translations.TRANSLATIONS)}
    for op in ops:
        composite = torch._C._dispatch_has_kernel_for_dispatch_key(f"samfx::{op}", "CompositeImplicitAutograd")
        assert composite or op in routed, f"samfx::{op} has no decomposition, translation or composite kernel"


def test_registered_decompositions_and_translations_reach_the_exported_graph(tmp_path, monkeypatch) -> None:
    """A samfx op with a translation (rel_pos_attention), and test ops with a
    translation and a decomposition, exported and run in onnxruntime."""
    from onnxscript import opset18 as op

    from samfx.emit.onnx import _to_onnx

    @torch.library.custom_op("samfx_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    @torch.library.custom_op("samfx_test::negate", mutates_args=())
    def negate(x: torch.Tensor) -> torch.Tensor:
        return -x

    @negate.register_fake
    def _(x):
        return torch.empty_like(x)

    def onnx_double(x):
        return op.Add(x, x)

    monkeypatch.setitem(onnx_translations.TRANSLATIONS, torch.ops.samfx_test.double.default, onnx_double)
    monkeypatch.setitem(onnx_translations.DECOMPOSITIONS, torch.ops.samfx_test.negate.default, lambda x: 0 - x)

    class Model(torch.nn.Module):
        def forward(self, q, k, v, rel_h, rel_w):
            return negate(double(torch.ops.samfx.rel_pos_attention(q, k, v, rel_h, rel_w, 0.5)))

    torch.manual_seed(0)
    # (batch, heads, tokens, dim) with a 3 x 3 key grid
    args = (torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 3),
            torch.randn(1, 2, 9, 3))
    path = tmp_path / "model.onnx"
    _to_onnx(Model(), args, ["q", "k", "v", "rel_h", "rel_w"], ["out"], None, path, 18, None)
    graph_ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Softmax" in graph_ops and not any("samfx" in o for o in graph_ops)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {n: a.numpy() for n, a in zip(["q", "k", "v", "rel_h", "rel_w"], args)})
    np.testing.assert_allclose(out, Model()(*args).numpy(), rtol=1e-5, atol=1e-5)
