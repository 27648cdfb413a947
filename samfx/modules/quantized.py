"""Runtime modules of the ``quantize`` pass: int8 layers on samfx's int8 kernels.

What a quantized model runs (:func:`samfx.passes.quantize.quantize` installs
them; loading and exporting a quantized model need only this module). Buffers
hold the int8 weights, per-channel scales and calibrated activation grids, so a
state dict carries everything (``weight``, ``weight_scale``, ``bias``,
``input_scale``, ``input_zero_point``; ``a_scale``, ``a_zero_point``,
``b_scale`` for products).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from samfx.modules.quantized import QuantizedLinear
    >>> linear = nn.Linear(64, 32)
    >>> q = QuantizedLinear.from_float(linear, weight_qmax=127, input_grid=(4 / 255, 128))
    >>> x = torch.rand(3, 64) * 4 - 2
    >>> bool(torch.nn.functional.cosine_similarity(q(x), linear(x)).min() > 0.99)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import quantized as qk

__all__ = [
    "FLOAT32_KERNELS",
    "DynamicQuantizedLinear",
    "MatMul",
    "QuantizedConv2d",
    "QuantizedLinear",
    "QuantizedMatMul",
    "WeightOnlyLinear",
]


def _scalar(value: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=dtype)


class _Int8Linear(nn.Module):
    """The int8 weight (per output channel), its scales and the float bias of a ``Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def _take_weights(self, linear: nn.Linear, weight_qmax: int) -> None:
        self.weight, self.weight_scale = qk.quantize_weight(linear.weight, weight_qmax)
        if linear.bias is not None:
            self.bias = linear.bias.detach().float().clone()


class QuantizedLinear(_Int8Linear):
    """W8A8 ``Linear``: int8 weight per output channel, uint8 input grid from calibration."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("input_scale", _scalar(1.0, torch.float32))
        self.register_buffer("input_zero_point", _scalar(0, torch.uint8))

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_qmax: int, input_grid: tuple[float, int]) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module._take_weights(linear, weight_qmax)
        module.input_scale = _scalar(input_grid[0], torch.float32)
        module.input_zero_point = _scalar(input_grid[1], torch.uint8)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.samfx.quantized_linear(
            x, self.weight, self.weight_scale, self.bias, self.input_scale, self.input_zero_point
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input_scale={float(self.input_scale):.4g}, input_zero_point={int(self.input_zero_point)}")


class DynamicQuantizedLinear(_Int8Linear):
    """W8A8 ``Linear`` with per-token activation scales computed at run time."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_qmax: int) -> "DynamicQuantizedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module._take_weights(linear, weight_qmax)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.samfx.dynamic_quantized_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per-token"


class QuantizedConv2d(nn.Module):
    """W8A8 ``Conv2d`` (see :class:`QuantizedLinear`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.register_buffer("weight", torch.zeros(conv.weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(conv.out_channels))
        self.register_buffer("bias", torch.zeros(conv.out_channels) if conv.bias is not None else None)
        self.register_buffer("input_scale", _scalar(1.0, torch.float32))
        self.register_buffer("input_zero_point", _scalar(0, torch.uint8))

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_qmax: int, input_grid: tuple[float, int]) -> "QuantizedConv2d":
        module = cls(conv)
        module.weight, module.weight_scale = qk.quantize_weight(conv.weight, weight_qmax)
        if conv.bias is not None:
            module.bias = conv.bias.detach().float().clone()
        module.input_scale = _scalar(input_grid[0], torch.float32)
        module.input_zero_point = _scalar(input_grid[1], torch.uint8)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.samfx.quantized_conv2d(
            x, self.weight, self.weight_scale, self.bias, self.input_scale, self.input_zero_point,
            list(self.stride), list(self.padding), list(self.dilation), self.groups,
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"input_scale={float(self.input_scale):.4g}, input_zero_point={int(self.input_zero_point)}")


class MatMul(nn.Module):
    """``a @ b`` as a module: an attention product the pass can observe and swap."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b


class QuantizedMatMul(nn.Module):
    """``a @ b`` of two activations in int8: ``a`` on a calibrated uint8 grid, ``b``
    symmetric int8 with a calibrated scale."""

    def __init__(self, b_qmax: int) -> None:
        super().__init__()
        self.b_qmax = b_qmax
        self.register_buffer("a_scale", _scalar(1.0, torch.float32))
        self.register_buffer("a_zero_point", _scalar(0, torch.uint8))
        self.register_buffer("b_scale", _scalar(1.0, torch.float32))

    @classmethod
    def from_grids(cls, a_grid: tuple[float, int], b_scale: float, b_qmax: int) -> "QuantizedMatMul":
        module = cls(b_qmax)
        module.a_scale = _scalar(a_grid[0], torch.float32)
        module.a_zero_point = _scalar(a_grid[1], torch.uint8)
        module.b_scale = _scalar(b_scale, torch.float32)
        return module

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.ops.samfx.quantized_matmul(a, b, self.a_scale, self.a_zero_point, self.b_scale, self.b_qmax)

    def extra_repr(self) -> str:
        return f"a_scale={float(self.a_scale):.4g}, a_zero_point={int(self.a_zero_point)}, b_scale={float(self.b_scale):.4g}"


class WeightOnlyLinear(nn.Module):
    """``Linear`` with int8 (per output channel) or int4 (per group of input
    channels, two codes a byte) weights, dequantized to float for the product."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int) -> None:
        super().__init__()
        if bits not in (4, 8) or (bits == 4 and in_features % group_size):
            raise ValueError(f"WeightOnlyLinear: {bits} bits with {in_features} inputs and groups of {group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_features))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int) -> "WeightOnlyLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        weight = linear.weight.detach().float()
        if bits == 8:
            module.weight, module.weight_scale = qk.quantize_weight(weight, 127)
        else:
            groups = weight.reshape(linear.out_features, -1, group_size)
            amax = groups.abs().amax(dim=-1)
            scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
            codes = torch.clamp(torch.round(groups / scale[..., None]), -7, 7).to(torch.int16) + 8
            codes = codes.reshape(linear.out_features, -1, 2)
            module.weight = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
            module.weight_scale = scale
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def dequantized_weight(self) -> Tensor:
        if self.bits == 8:
            return qk.dequantize_weight(self.weight, self.weight_scale)
        packed = self.weight.to(torch.int16)
        codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(self.out_features, -1, self.group_size) - 8
        return (codes.float() * self.weight_scale[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


#: The layers whose int8 kernels take float32 activations and scales: a pass that lowers
#: a component's precision (``bf16``) keeps them, and their inputs, in float32.
FLOAT32_KERNELS = (QuantizedLinear, DynamicQuantizedLinear, QuantizedConv2d, QuantizedMatMul, WeightOnlyLinear)
