"""Int8 ops: W8A8 linear layers, convolutions and activation matmuls.

Each op quantizes its float input at run time with calibrated (static) or
per-token (dynamic) parameters, multiplies in int8 with int32 accumulation and
returns float32, so it drops in where the float layer was:

* ``samfx::quantized_linear``: activations asymmetric uint8 with a calibrated
  scale and zero point, weights symmetric int8 per output channel.
* ``samfx::dynamic_quantized_linear``: activations symmetric int8 per token,
  scales computed at run time (no calibration).
* ``samfx::quantized_conv2d``: like ``quantized_linear`` for ``Conv2d``.
* ``samfx::quantized_matmul``: ``a @ b`` of two activations (attention's
  ``q @ k^T`` and ``p @ v``), ``a`` uint8 and ``b`` int8, both per tensor.

On the CPU they run oneDNN's int8 kernels (the ones inductor lowers PT2E
graphs to); on CUDA the linear ops use ``torch._int_mm``. Everything else
runs the plain-PyTorch references (``*_reference``), which compute the same
integer arithmetic in float and are the oracles of the tests.

**Saturation on CPUs without VNNI.** AVX2 int8 kernels (oneDNN's and
onnxruntime's) multiply uint8 by int8 with ``vpmaddubsw``, which adds pairs of
products in int16: ``255 * 127 * 2`` overflows it. Weights in ``[-64, 64]``
(``weight_qmax(reduce_range=True)``, the analogue of onnxruntime's
``reduce_range``) cannot overflow. A weight with a wider range is still
computed correctly on such a CPU, but by the reference (slowly), with a warning.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATION_QMAX",
    "activation_qparams",
    "dequantize_weight",
    "dynamic_quantized_linear",
    "dynamic_quantized_linear_reference",
    "fake_quantize_activation",
    "int8_cpu_kernels",
    "quantize_weight",
    "quantized_conv2d",
    "quantized_conv2d_reference",
    "quantized_linear",
    "quantized_linear_reference",
    "quantized_matmul",
    "quantized_matmul_reference",
    "register_flop_formulas",
    "weight_qmax",
]

#: Activations are uint8 codes.
ACTIVATION_QMAX = 255
#: Largest weight magnitude whose uint8 x int8 pair sums fit int16 (``2 * 255 * 64 < 2**15``).
_SAFE_WEIGHT_QMAX = 64
#: Per-token scales never go below this (an all-zero token quantizes to zeros).
_MIN_SCALE = 1e-8


# -- quantization arithmetic ----------------------------------------------------------------------

def weight_qmax(reduce_range: bool) -> int:
    """Largest int8 weight code: 63 when ``reduce_range`` (safe on every x86 CPU), else 127."""
    return 63 if reduce_range else 127


def quantize_weight(weight: Tensor, qmax: int = 127, axis: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric per-channel int8 quantization of a weight along ``axis``.

    Returns ``(codes, scale)``: int8 codes in ``[-qmax, qmax]`` and float32
    scales of shape ``(weight.shape[axis],)`` with ``weight ~ codes * scale``.

    Example::

        >>> w = torch.tensor([[0.5, -1.0], [0.02, 0.011]])
        >>> codes, scale = quantize_weight(w, qmax=127)
        >>> codes.tolist(), [round(s, 6) for s in scale.tolist()]
        ([[64, -127], [127, 70]], [0.007874, 0.000157])
    """
    dims = [d for d in range(weight.dim()) if d != axis]
    amax = weight.detach().float().abs().amax(dim=dims) if dims else weight.detach().float().abs()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    shape = [-1 if d == axis else 1 for d in range(weight.dim())]
    codes = torch.clamp(torch.round(weight.detach().float() / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return codes, scale.to(torch.float32)


def dequantize_weight(codes: Tensor, scale: Tensor, axis: int = 0) -> Tensor:
    """``codes * scale`` broadcast along ``axis``, in float32."""
    shape = [-1 if d == axis else 1 for d in range(codes.dim())]
    return codes.float() * scale.reshape(shape)


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of uint8 codes covering ``[low, high]``.

    The range is widened to contain 0, and the zero point is an integer, so
    that 0 (padding, ReLU and GELU outputs) is represented exactly.

    Example::

        >>> scale, zero_point = activation_qparams(-0.17, 4.93)
        >>> round(scale, 6), zero_point
        (0.02, 9)
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low < _MIN_SCALE:
        return 1.0, 0
    scale = (high - low) / ACTIVATION_QMAX
    zero_point = int(min(ACTIVATION_QMAX, max(0, round(-low / scale))))
    return float(torch.tensor(scale, dtype=torch.float32)), zero_point


def fake_quantize_activation(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """Round ``x`` to the uint8 grid of ``(scale, zero_point)`` and back (in float)."""
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, ACTIVATION_QMAX)
    return (codes - zero_point) * scale


# -- references ----------------------------------------------------------------------------------

def quantized_linear_reference(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor, input_zero_point: Tensor
) -> Tensor:
    """``quantized_linear``'s definition: the int8 product computed in float64."""
    xq = fake_quantize_activation(x.double(), float(input_scale), int(input_zero_point))
    out = xq @ dequantize_weight(weight, weight_scale).double().t()
    if bias is not None:
        out = out + bias.double()
    return out.float()


def _per_token_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes of each row of ``x`` (last dim) and their scales."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(_MIN_SCALE)
    return torch.clamp(torch.round(x / scale), -127, 127), scale


def dynamic_quantized_linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``dynamic_quantized_linear``'s definition, in float64."""
    codes, scale = _per_token_codes(x.double())
    out = (codes * scale) @ dequantize_weight(weight, weight_scale).double().t()
    if bias is not None:
        out = out + bias.double()
    return out.float()


def quantized_conv2d_reference(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
    input_zero_point: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    """``quantized_conv2d``'s definition, in float64."""
    xq = fake_quantize_activation(x.double(), float(input_scale), int(input_zero_point))
    w = dequantize_weight(weight, weight_scale).double()
    out = F.conv2d(xq, w, None if bias is None else bias.double(), stride, padding, dilation, groups)
    return out.float()


def quantized_matmul_reference(
    a: Tensor, b: Tensor, a_scale: Tensor, a_zero_point: Tensor, b_scale: Tensor, b_qmax: int
) -> Tensor:
    """``quantized_matmul``'s definition, in float64."""
    aq = fake_quantize_activation(a.double(), float(a_scale), int(a_zero_point))
    bq = torch.clamp(torch.round(b.double() / float(b_scale)), -b_qmax, b_qmax) * float(b_scale)
    return (aq @ bq).float()


# -- CPU kernels (oneDNN) --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def int8_cpu_kernels() -> dict[str, bool]:
    """What this CPU offers: oneDNN int8 kernels, and whether its int8 dot
    products avoid the int16 saturation of plain AVX2 (VNNI or AMX)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    exact = any(capabilities.get(k, False) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    return {"onednn": bool(onednn), "full_range_weights": exact}


class _PackCache:
    """oneDNN-packed weights, kept as long as the weight tensor lives and is unchanged.

    Keyed by the weight's identity; an in-place edit of the weight (a new
    ``_version``) or a different packing key repacks it.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, tuple, Tensor, bool]] = {}

    def get(self, weight: Tensor, key: tuple, pack) -> tuple[Tensor, bool]:
        entry = self._entries.get(id(weight))
        if entry is not None and entry[0]() is weight and entry[1] == weight._version and entry[2] == key:
            return entry[3], entry[4]
        packed = pack()
        safe = int(weight.abs().max()) <= _SAFE_WEIGHT_QMAX if weight.numel() else True
        self._entries[id(weight)] = (weakref.ref(weight, self._drop(id(weight))), weight._version, key, packed, safe)
        return packed, safe

    def _drop(self, ident: int):
        entries = self._entries

        def drop(_ref: weakref.ref) -> None:
            entries.pop(ident, None)

        return drop


_PACKED = _PackCache()


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


def _exact_on_this_cpu(safe: bool, op: str) -> bool:
    if safe or int8_cpu_kernels()["full_range_weights"]:
        return True
    warnings.warn(
        f"samfx::{op}: int8 weights beyond +-{_SAFE_WEIGHT_QMAX} would saturate this CPU's int8 kernels "
        "(no VNNI); computing with the reference instead. Quantize with reduce_range=True for speed here.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def _uint8_codes(x: Tensor, scale: float, zero_point: int) -> Tensor:
    if hasattr(torch, "quantize_per_tensor"):
        # One vectorised pass, 3x faster than round/clamp/cast (measured). The quantized
        # dtype is deprecated as a tensor type, not needed here beyond this line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.quantize_per_tensor(x.contiguous(), scale, zero_point, torch.quint8).int_repr()
    return torch.clamp(torch.round(x / scale) + zero_point, 0, ACTIVATION_QMAX).to(torch.uint8)


def _cpu_linear(x2: Tensor, scale: float, zero_point: int, weight: Tensor, weight_scale: Tensor,
                bias: Tensor | None) -> Tensor | None:
    """oneDNN int8 linear of float rows ``x2``; ``None`` where it would not be exact."""
    packed, safe = _PACKED.get(weight, ("linear",), lambda: torch.ops.onednn.qlinear_prepack(weight, None))
    if not _exact_on_this_cpu(safe, "quantized_linear"):
        return None
    codes = _uint8_codes(x2, scale, zero_point)
    return torch.ops.onednn.qlinear_pointwise(
        codes, scale, zero_point, packed, weight_scale, _zeros(weight.shape[0]), bias,
        1.0, 0, torch.float32, "none", [], "",
    )


# -- ops -------------------------------------------------------------------------------------------

def _check_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"quantized linear: weight must be 2-D int8, got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if weight_scale.shape != (weight.shape[0],) or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"quantized linear: weight_scale/bias must have shape ({weight.shape[0]},)")


@torch.library.custom_op("samfx::quantized_linear", mutates_args=())
def quantized_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor, input_zero_point: Tensor
) -> Tensor:
    """W8A8 linear with static activation parameters.

    Args:
        x: float input ``(..., in)``.
        weight: int8 codes ``(out, in)``; ``weight_scale``: float32 ``(out,)``.
        bias: float32 ``(out,)`` or ``None``.
        input_scale, input_zero_point: 0-dim float32 and uint8 tensors, the
            activation's uint8 grid (from calibration).

    Example::

        >>> import torch
        >>> from samfx.kernels.quantized import quantize_weight, quantized_linear, quantized_linear_reference
        >>> w, s = quantize_weight(torch.randn(8, 16), qmax=63)
        >>> x = torch.randn(4, 16)
        >>> args = (x, w, s, None, torch.tensor(0.03), torch.tensor(128, dtype=torch.uint8))
        >>> torch.allclose(quantized_linear(*args), quantized_linear_reference(*args), atol=1e-4)
        True
    """
    _check_linear(x, weight, weight_scale, bias)
    if x.device.type == "cpu" and int8_cpu_kernels()["onednn"]:
        x2 = x.reshape(-1, x.shape[-1]).float()
        out = _cpu_linear(x2, float(input_scale), int(input_zero_point), weight, weight_scale,
                          None if bias is None else bias.float())
        if out is not None:
            return out.reshape(*x.shape[:-1], weight.shape[0])
    elif x.device.type == "cuda":
        codes = torch.clamp(torch.round(x.reshape(-1, x.shape[-1]).float() / input_scale) + input_zero_point.float(), 0, 255)
        return _cuda_int_mm(codes - 128, weight, (float(input_zero_point) - 128), input_scale, weight_scale, bias, x.shape)
    return quantized_linear_reference(x, weight, weight_scale, bias, input_scale, input_zero_point)


@quantized_linear.register_fake
def _(x, weight, weight_scale, bias, input_scale, input_zero_point):
    _check_linear(x, weight, weight_scale, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def _cuda_int_mm(codes: Tensor, weight: Tensor, zero_point: float, scale: Tensor | float, weight_scale: Tensor,
                 bias: Tensor | None, shape: torch.Size) -> Tensor:
    """``(codes - zero_point) @ weight^T`` with int8 ``codes``, by ``torch._int_mm``
    (which needs at least 17 rows and multiples of 8)."""
    rows = codes.shape[0]
    padded = max(17, -(-rows // 8) * 8)
    a = F.pad(codes, (0, 0, 0, padded - rows)).to(torch.int8)
    acc = torch._int_mm(a, weight.t().contiguous())[:rows].float()
    if zero_point:
        acc = acc - zero_point * weight.float().sum(dim=1)
    out = acc * (scale * weight_scale)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], weight.shape[0])


@torch.library.custom_op("samfx::dynamic_quantized_linear", mutates_args=())
def dynamic_quantized_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 linear with per-token activation scales computed at run time.

    Example::

        >>> import torch
        >>> from samfx.kernels.quantized import dynamic_quantized_linear, dynamic_quantized_linear_reference, quantize_weight
        >>> w, s = quantize_weight(torch.randn(8, 16), qmax=63)
        >>> x = torch.randn(2, 3, 16)
        >>> torch.allclose(dynamic_quantized_linear(x, w, s, None), dynamic_quantized_linear_reference(x, w, s, None), atol=1e-4)
        True
    """
    _check_linear(x, weight, weight_scale, bias)
    if x.device.type == "cpu" and int8_cpu_kernels()["onednn"]:
        packed, safe = _PACKED.get(weight, ("linear",), lambda: torch.ops.onednn.qlinear_prepack(weight, None))
        if _exact_on_this_cpu(safe, "dynamic_quantized_linear"):
            codes, scale = _per_token_codes(x.reshape(-1, x.shape[-1]).float())
            out = torch.ops.onednn.qlinear_pointwise(
                codes.to(torch.int8), 1.0, 0, packed, weight_scale, _zeros(weight.shape[0]), None,
                1.0, 0, torch.float32, "none", [], "",
            )
            out = out.mul_(scale)
            if bias is not None:
                out = out.add_(bias)
            return out.reshape(*x.shape[:-1], weight.shape[0])
    elif x.device.type == "cuda":
        codes, scale = _per_token_codes(x.reshape(-1, x.shape[-1]).float())
        out = _cuda_int_mm(codes, weight, 0.0, 1.0, weight_scale, None, x.shape).reshape(-1, weight.shape[0]) * scale
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], weight.shape[0])
    return dynamic_quantized_linear_reference(x, weight, weight_scale, bias)


@dynamic_quantized_linear.register_fake
def _(x, weight, weight_scale, bias):
    _check_linear(x, weight, weight_scale, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def _conv_out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, ...]:
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, weight.shape[0], oh, ow)


def _check_conv(x: Tensor, weight: Tensor, weight_scale: Tensor, groups: int) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 4 or x.dim() != 4:
        raise ValueError(f"quantized_conv2d: needs a 4-D input and 4-D int8 weight, got {tuple(x.shape)}, "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1] * groups or weight_scale.shape != (weight.shape[0],):
        raise ValueError(f"quantized_conv2d: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         f"with {groups} groups")


@torch.library.custom_op("samfx::quantized_conv2d", mutates_args=())
def quantized_conv2d(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
    input_zero_point: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    """W8A8 ``conv2d`` with static activation parameters (see :func:`quantized_linear`)."""
    _check_conv(x, weight, weight_scale, groups)
    args = (x, weight, weight_scale, bias, input_scale, input_zero_point, stride, padding, dilation, groups)
    if x.device.type != "cpu" or not int8_cpu_kernels()["onednn"]:
        return quantized_conv2d_reference(*args)
    scale, zero_point = float(input_scale), int(input_zero_point)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    key = ("conv", scale, zero_point, tuple(stride), tuple(padding), tuple(dilation), groups)
    packed, safe = _PACKED.get(weight, key, lambda: torch.ops.onednn.qconv_prepack(
        weight, weight_scale, scale, zero_point, stride, padding, dilation, groups, None))
    if not _exact_on_this_cpu(safe, "quantized_conv2d"):
        return quantized_conv2d_reference(*args)
    codes = _uint8_codes(x.float(), scale, zero_point)
    out = torch.ops.onednn.qconv2d_pointwise(
        codes, scale, zero_point, packed, weight_scale, _zeros(weight.shape[0]),
        None if bias is None else bias.float(), stride, padding, dilation, groups,
        1.0, 0, torch.float32, "none", [], "",
    )
    # oneDNN answers channels-last; the op's contract (and its fake) is a contiguous tensor.
    return out.contiguous()


@quantized_conv2d.register_fake
def _(x, weight, weight_scale, bias, input_scale, input_zero_point, stride, padding, dilation, groups):
    _check_conv(x, weight, weight_scale, groups)
    return x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation), dtype=torch.float32)


def _check_matmul(a: Tensor, b: Tensor) -> None:
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"quantized_matmul: cannot multiply {tuple(a.shape)} by {tuple(b.shape)} "
                         "(leading dims must match exactly)")


@torch.library.custom_op("samfx::quantized_matmul", mutates_args=())
def quantized_matmul(a: Tensor, b: Tensor, a_scale: Tensor, a_zero_point: Tensor, b_scale: Tensor, b_qmax: int) -> Tensor:
    """``a @ b`` of two activations in int8: ``a`` on a uint8 grid
    ``(a_scale, a_zero_point)``, ``b`` symmetric int8 in ``[-b_qmax, b_qmax]``
    with ``b_scale``. Leading (batch) dims of ``a`` and ``b`` must be equal."""
    _check_matmul(a, b)
    if a.device.type != "cpu" or not int8_cpu_kernels()["onednn"] or (
        b_qmax > _SAFE_WEIGHT_QMAX and not int8_cpu_kernels()["full_range_weights"]
    ):
        return quantized_matmul_reference(a, b, a_scale, a_zero_point, b_scale, b_qmax)
    scale, zero_point, bs = float(a_scale), int(a_zero_point), float(b_scale)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    a3 = _uint8_codes(a.reshape(-1, m, k).float(), scale, zero_point)
    # b^T is the "weight" (out = n, in = k) of each product.
    b3 = torch.clamp(torch.round(b.reshape(-1, k, n).float().transpose(1, 2) / bs), -b_qmax, b_qmax)
    b3 = b3.to(torch.int8).contiguous()
    column_scale = torch.full((n,), bs, dtype=torch.float32)
    out = torch.empty(a3.shape[0], m, n, dtype=torch.float32)
    for i in range(a3.shape[0]):
        packed = torch.ops.onednn.qlinear_prepack(b3[i], None)
        out[i] = torch.ops.onednn.qlinear_pointwise(
            a3[i], scale, zero_point, packed, column_scale, _zeros(n), None, 1.0, 0, torch.float32, "none", [], "",
        )
    return out.reshape(*a.shape[:-1], n)


@quantized_matmul.register_fake
def _(a, b, a_scale, a_zero_point, b_scale, b_qmax):
    _check_matmul(a, b)
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)


# -- FLOP counting -------------------------------------------------------------------------------

_flops_registered = False


def register_flop_formulas() -> None:
    """Count the int8 ops' multiply-adds in ``torch.utils.flop_counter`` (as
    their float counterparts would be), so MACs stay honest after quantization.
    Called by :func:`samfx.kernels.flops.register_flop_formulas`; ``flop_counter`` imports
    Triton, so this is not done at import."""
    global _flops_registered
    if _flops_registered:
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula([torch.ops.samfx.quantized_linear, torch.ops.samfx.dynamic_quantized_linear])
    def _linear(x_shape, w_shape, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]

    @register_flop_formula(torch.ops.samfx.quantized_matmul)
    def _matmul(a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * math.prod(a_shape) * b_shape[-1]

    @register_flop_formula(torch.ops.samfx.quantized_conv2d)
    def _conv(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * math.prod(w_shape[1:])

    _flops_registered = True
