"""The ``samfx`` torch.compile backend: samfx's graph-local rewrites, then inductor.

Installed with samfx, the backend is found by name through the
``torch_dynamo_backends`` entry point, with no import::

    fast_encoder = torch.compile(sam.image_encoder, backend="samfx")
    fast_encoder = torch.compile(sam.image_encoder, backend="samfx",
                                 options={"rewrites": ["attention"], "inductor": {"freezing": True}})

For each graph Dynamo captures, the backend runs the rewrites of
:mod:`samfx.emit.rewrites` (by default every one registered as default: the
attention rewrite, which turns SAM's attention with its decomposed
relative-position bias into ``samfx::rel_pos_attention`` and plain attention into
fused SDPA), counts them in ``torch._dynamo.utils.counters["samfx"]``, and
lowers the graph with inductor (``compile_fx``). Structural passes (split_qkv,
prune, ...) change parameters, which a backend must not; run them with
:func:`samfx.optimize` first and compile the result.

Options (``torch.compile(..., options={...})``):

* ``rewrites``: names of the rewrites to run, in order (default: the registered
  defaults; ``[]`` for none).
* ``lower``: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph
  as Python, to debug a rewrite).
* ``inductor``: inductor config patches, e.g. ``{"freezing": True}``.

``mode="max-autotune"`` and the other torch.compile modes are passed to inductor.

Example::

    >>> import torch, samfx
    >>> from torch._dynamo.utils import counters
    >>> from samfx.emit.compile import samfx_backend
    >>> sam = samfx.models.build("sam_vit_b", small=True).eval()
    >>> encoder = torch.compile(sam.image_encoder, backend=samfx_backend, options={"lower": "eager"})
    >>> with torch.no_grad():
    ...     embedding = encoder(torch.randn(1, 3, 128, 128))
    >>> counters["samfx"]["attention"]        # a windowed and a global attention block
    2
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from .rewrites import RewriteContext, get_rewrite, list_rewrites

__all__ = ["BackendOptions", "samfx_backend"]

_LOG = logging.getLogger(__name__)
_LOWERINGS = ("inductor", "eager")


@dataclass(frozen=True)
class BackendOptions:
    """The backend's options; see the module documentation."""

    rewrites: tuple[str, ...] | None = None
    lower: str = "inductor"
    inductor: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        """Validate ``torch.compile``'s ``options`` dict; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown samfx backend options {unknown}; known: {sorted(known)}")
        rewrites = options.get("rewrites")
        if rewrites is not None:
            if isinstance(rewrites, str) or not isinstance(rewrites, Sequence):
                raise ValueError(f"samfx backend option 'rewrites' takes a list of names, not {rewrites!r}")
            rewrites = tuple(rewrites)
            for name in rewrites:
                get_rewrite(name)
        lower = options.get("lower", "inductor")
        if lower not in _LOWERINGS:
            raise ValueError(f"samfx backend option 'lower' must be one of {_LOWERINGS}, not {lower!r}")
        inductor = options.get("inductor")
        if inductor is not None and not isinstance(inductor, Mapping):
            raise ValueError(f"samfx backend option 'inductor' takes a dict of inductor settings, not {inductor!r}")
        return cls(rewrites, lower, inductor)

    def rewrite_names(self) -> tuple[str, ...]:
        if self.rewrites is not None:
            return self.rewrites
        return tuple(r.name for r in list_rewrites() if r.default)


def samfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None,
                  mode: str | None = None) -> Callable[..., Any]:
    """torch.compile backend: run samfx's graph rewrites on ``gm``, then lower it.

    Args:
        gm: the torch-level graph Dynamo captured.
        example_inputs: its inputs.
        options: see the module documentation.
        mode: a torch.compile mode, passed to inductor.
    """
    config = BackendOptions.parse(options)
    differentiable = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )
    context = RewriteContext(example_inputs, differentiable)
    from torch._dynamo.utils import counters

    for name in config.rewrite_names():
        count = get_rewrite(name).run(gm, context)
        counters["samfx"][name] += count
        _LOG.info("samfx backend: %s rewrote %d site(s)", name, count)
    if config.lower == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **(config.inductor or {})}
    return compile_fx(gm, example_inputs, config_patches=patches or None)
