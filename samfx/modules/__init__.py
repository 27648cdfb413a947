"""Runtime modules: the layers an optimized model runs.

Passes install them (``quantize``: :mod:`samfx.modules.quantized`; ``hyper``:
:mod:`samfx.modules.hyper`); loading, exporting and running an optimized model
needs these modules and the kernels below them, never a pass. They sit between
:mod:`samfx.kernels` (the custom ops they call) and :mod:`samfx.passes`.

Example::

    >>> from samfx.modules import HyperLinear, QuantizedLinear
    >>> HyperLinear.__module__, QuantizedLinear.__module__
    ('samfx.modules.hyper', 'samfx.modules.quantized')
"""

from .hyper import HyperCoded, HyperConv, HyperLinear, HyperTensor
from .quantized import (FLOAT32_KERNELS, DynamicQuantizedLinear, MatMul, QuantizedConv2d, QuantizedLinear,
                        QuantizedMatMul, WeightOnlyLinear)

__all__ = [
    "FLOAT32_KERNELS",
    "DynamicQuantizedLinear",
    "HyperCoded",
    "HyperConv",
    "HyperLinear",
    "HyperTensor",
    "MatMul",
    "QuantizedConv2d",
    "QuantizedLinear",
    "QuantizedMatMul",
    "WeightOnlyLinear",
]
