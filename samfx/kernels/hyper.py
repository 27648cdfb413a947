"""Custom ops for lattice-coded weights (:mod:`samfx.codecs.lattice`).

* ``samfx::hyper_linear(x, codes, row_params, bias, cols, bits, nx, i0, j0)``:
  ``x @ W.T + bias`` with ``W`` decoded on the fly;
* ``samfx::hyper_decode(codes, row_params, cols, bits, nx, i0, j0)``: the dense
  ``float32 [rows, cols]`` weight.

The integers are the per-layer code parameters; they are run-time arguments of
every kernel, so one compiled kernel serves all layers. On the CPU, few tokens
(the mask decoder's prompt tokens) go through a fused numba kernel that never
materialises the weight; more tokens decode the layer once and use one GEMM.
On CUDA, the Triton kernel decodes in registers. Other devices use the
reference, :func:`samfx.codecs.lattice.decode_rows`.

Both ops have fake implementations, so ``torch.compile`` and ``torch.export``
see through them. For ONNX, ``HyperLinear`` decodes with the reference (plain
integer and float ops over the in-graph codes) while an exporter traces it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..codecs.lattice import decode_rows

__all__ = ["FEW_TOKENS", "decode", "linear", "register_flop_formula"]

#: On the CPU, up to this many tokens use the fused kernel; more decode the layer and run one GEMM.
FEW_TOKENS = 16


@torch.library.custom_op("samfx::hyper_decode", mutates_args=())
def decode(codes: torch.Tensor, row_params: torch.Tensor, cols: int, bits: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """Dense ``float32 [rows, cols]`` weight from lattice codes."""
    if codes.device.type == "cpu":
        from . import hyper_cpu

        return hyper_cpu.decode(hyper_cpu.prepare(codes, row_params, bits), cols, nx, i0, j0)
    if codes.device.type == "cuda":
        from . import hyper_triton

        return hyper_triton.decode(codes, row_params, cols, bits, nx, i0, j0)
    return decode_rows(codes, row_params, cols, bits, nx, i0, j0)


@decode.register_fake
def _decode_fake(codes, row_params, cols, bits, nx, i0, j0):
    return codes.new_empty(codes.shape[0], cols, dtype=torch.float32)


@torch.library.custom_op("samfx::hyper_linear", mutates_args=())
def linear(x: torch.Tensor, codes: torch.Tensor, row_params: torch.Tensor, bias: Optional[torch.Tensor],
           cols: int, bits: int, nx: int, i0: int, j0: int) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[..., cols]``, ``W`` given by lattice codes."""
    if x.shape[-1] != cols:
        raise ValueError(f"hyper_linear expects inputs with {cols} features, got shape {tuple(x.shape)}")
    if x.device.type == "cpu":
        from . import hyper_cpu

        return hyper_cpu.linear(x, hyper_cpu.prepare(codes, row_params, bits, bias), cols, nx, i0, j0, FEW_TOKENS)
    flat = x.reshape(-1, cols)
    if x.device.type == "cuda":
        from . import hyper_triton

        out = hyper_triton.linear(flat, codes, row_params, bias, cols, bits, nx, i0, j0)
    else:
        weight = decode_rows(codes, row_params, cols, bits, nx, i0, j0).to(x.dtype)
        out = F.linear(flat, weight, bias.to(x.dtype) if bias is not None else None)
    return out.reshape(*x.shape[:-1], codes.shape[0])


@linear.register_fake
def _linear_fake(x, codes, row_params, bias, cols, bits, nx, i0, j0):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def register_flop_formula() -> None:
    """Count ``hyper_linear`` like the matmul it replaces (idempotent)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula as register

    if torch.ops.samfx.hyper_linear in flop_registry:
        return

    @register(torch.ops.samfx.hyper_linear)
    def _flops(x_shape, codes_shape, *args, out_shape=None, **kwargs) -> int:
        tokens = 1
        for size in x_shape[:-1]:
            tokens *= size
        return 2 * tokens * x_shape[-1] * codes_shape[0]
