"""Custom ops and their kernels. Each op has a plain-PyTorch reference that the
tests use as the oracle; CPU (numba) and GPU (Triton) kernels load lazily, the
first time an op runs on that device.

Example::

    >>> import torch
    >>> from samfx.codecs.lattice import encode
    >>> from samfx.kernels import hyper
    >>> code = encode(torch.randn(32, 64))
    >>> x = torch.randn(5, 64)
    >>> y = hyper.linear(x, code.codes, code.row_params, None, code.cols, code.bits, code.nx, code.i0, code.j0)
    >>> torch.allclose(y, x @ code.decode().T, atol=1e-4)
    True
"""

from __future__ import annotations

__all__ = ["register_flop_formulas"]


def register_flop_formulas() -> None:
    """Teach ``torch.utils.flop_counter`` the cost of samfx's custom ops (it
    imports triton, so this runs when counting starts, not at ``import samfx``)."""
    from . import hyper

    hyper.register_flop_formula()
