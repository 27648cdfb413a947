"""Custom ops that passes rewrite graphs to, each with a plain-PyTorch reference.

Importing this package registers the attention op with ``torch.library`` (so
that ``torch.compile`` and ``torch.export`` see through it); other ops register
when their module is imported. CPU (numba) and GPU (Triton) kernels load
lazily, the first time an op runs on that device.

Example::

    >>> import torch
    >>> from samfx.kernels import rel_pos_attention, rel_pos_attention_reference
    >>> q, k, v = (torch.randn(2, 16, 8) for _ in range(3))
    >>> rel_h, rel_w = torch.randn(2, 16, 4), torch.randn(2, 16, 4)
    >>> out = rel_pos_attention(q, k, v, rel_h, rel_w, 8 ** -0.5)
    >>> torch.allclose(out, rel_pos_attention_reference(q, k, v, rel_h, rel_w, 8 ** -0.5), atol=1e-6)
    True
"""

from .rel_pos import rel_pos_attention, rel_pos_attention_reference

__all__ = ["rel_pos_attention", "rel_pos_attention_reference"]
