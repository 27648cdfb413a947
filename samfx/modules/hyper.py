"""Runtime modules of the ``hyper`` pass: layers whose weights stay lattice codes.

What a hyper-compressed model runs (:func:`samfx.passes.hyper.hyper` installs
them). Each keeps ``codes`` and ``row_params`` buffers (:mod:`samfx.codecs.lattice`)
and decodes inside ``forward``: a fused kernel for Linears
(``samfx::hyper_linear``; Triton on CUDA, numba on the CPU), one layer at a
time for the rest, the plain-PyTorch reference while an exporter traces.

Example::

    >>> import torch
    >>> from samfx.codecs.lattice import encode
    >>> from samfx.modules.hyper import HyperLinear
    >>> linear = torch.nn.Linear(64, 32)
    >>> layer = HyperLinear(encode(linear.weight, rel_error=0.01), linear.bias)
    >>> x = torch.randn(5, 64)
    >>> bool(((layer(x) - linear(x)).norm() / linear(x).norm()) < 0.02)
    True
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..codecs.lattice import CODES, LatticeCode, decode_rows
from ..codecs.lattice_layout import code_shape, layout_of
from ..kernels import hyper as hyper_ops

__all__ = ["HyperCoded", "HyperConv", "HyperLinear", "HyperTensor"]


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def _eager_cpu(tensor: torch.Tensor) -> bool:
    """A plain CPU tensor outside compilation and dispatch modes: the kernels can be
    called directly, saving the dispatcher's tens of microseconds per layer (the
    mask decoder runs ~50 small layers per prompt)."""
    return (type(tensor) is torch.Tensor and tensor.device.type == "cpu" and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


_CPU: list[Any] = []
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cpu_kernels() -> Any:
    """:mod:`samfx.kernels.hyper_cpu`, imported on first use (it loads numba)."""
    if not _CPU:
        from ..kernels import hyper_cpu

        _CPU.append(hyper_cpu)
    return _CPU[0]


class HyperCoded(nn.Module):
    """A tensor held as lattice codes (``codes``, ``row_params`` buffers).

    ``decode()`` gives the dense float32 tensor; the checkpoint stores
    ``codes`` entropy-coded (:meth:`samfx_tensor_codecs`).
    """

    def __init__(self, code: LatticeCode) -> None:
        super().__init__()
        self.register_buffer("codes", code.codes)
        self.register_buffer("row_params", code.row_params)
        self.cols, self.bits, self.nx, self.i0, self.j0 = code.cols, code.bits, code.nx, code.i0, code.j0
        self.coded_shape = tuple(code.shape)

    @staticmethod
    def empty_code(meta: dict[str, Any]) -> LatticeCode:
        """Zero codes of the layout ``meta`` (:meth:`LatticeCode.meta`) describes, to load a state dict into."""
        rows = meta["shape"][0]
        dtype = torch.int16 if meta["layout"] == "uint16" else torch.uint8
        codes = torch.zeros(code_shape(rows, meta["cols"], meta["bits"], meta["layout"]), dtype=dtype)
        return LatticeCode(codes, torch.zeros(rows, 2, dtype=torch.bfloat16), meta["cols"], meta["bits"],
                           meta["nx"], meta["i0"], meta["j0"], tuple(meta["shape"]))

    def code(self) -> LatticeCode:
        return LatticeCode(self.codes, self.row_params, self.cols, self.bits, self.nx, self.i0, self.j0, self.coded_shape)

    def _args(self) -> tuple[Any, ...]:
        return self.codes, self.row_params, self.cols, self.bits, self.nx, self.i0, self.j0

    def _prepared(self) -> Any:
        """The CPU kernels' view of the codes, rebuilt when a tensor is replaced or
        changed (kept outside the module, so copies of the module do not carry it)."""
        tensors = (self._buffers["codes"], self._buffers["row_params"], self._parameters.get("bias"))
        key = tuple((id(t), t._version) for t in tensors if t is not None)
        cached = _PREPARED.get(self)
        if cached is None or cached[0] != key:
            cached = (key, _cpu_kernels().prepare(*tensors[:2], self.bits, tensors[2]))
            _PREPARED[self] = cached
        return cached[1]

    def decode(self) -> torch.Tensor:
        """The dense float32 tensor. While an exporter traces, it is written in
        standard integer and float ops over the in-graph codes (ONNX-friendly)."""
        if _exporting():
            weight = decode_rows(*self._args())
        elif _eager_cpu(self.codes):
            weight = _cpu_kernels().decode(self._prepared(), self.cols, self.nx, self.i0, self.j0)
        else:
            weight = hyper_ops.decode(*self._args())
        return weight.reshape(self.coded_shape)

    def samfx_tensor_codecs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        return {"codes": (CODES.name, {"cols": self.cols, "bits": self.bits, "nx": self.nx})}

    def samfx_coded_numel(self) -> int:
        return math.prod(self.coded_shape)

    def extra_repr(self) -> str:
        return f"shape={self.coded_shape}, bits={self.bits}/pair, layout={layout_of(self.codes)}"


class HyperLinear(HyperCoded):
    """Drop-in ``nn.Linear`` whose weight is kept as lattice codes.

    ``weight`` decodes on access, for upstream code that reads it.
    """

    def __init__(self, code: LatticeCode, bias: torch.Tensor | None) -> None:
        super().__init__(code)
        self.out_features, self.in_features = self.coded_shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.decode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return F.linear(x, self.decode().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if _eager_cpu(x) and x.shape[-1] == self.cols:
            return _cpu_kernels().linear(x, self._prepared(), self.cols, self.nx, self.i0, self.j0, hyper_ops.FEW_TOKENS)
        return hyper_ops.linear(x, *self._args()[:2], self.bias, *self._args()[2:])


class HyperConv(HyperCoded):
    """Drop-in ``nn.Conv2d`` / ``nn.ConvTranspose2d`` with a coded weight,
    decoded once per call."""

    def __init__(self, code: LatticeCode, conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
        super().__init__(code)
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        # the attributes upstream code reads from a convolution
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "output_padding", "padding_mode"):
            setattr(self, name, getattr(conv, name))
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.decode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.decode().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.transposed:
            return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                      self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class HyperTensor(HyperCoded):
    """A coded parameter; calling it returns the decoded tensor."""

    def __init__(self, code: LatticeCode, dtype: torch.dtype) -> None:
        super().__init__(code)
        self.dtype = dtype

    def forward(self) -> torch.Tensor:
        return self.decode().to(self.dtype)
