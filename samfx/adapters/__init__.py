"""Model-family adapters: where components are, how to trace and run them.

Adapters are registered by name and matched against a model by class name, so
that recognising a model never imports another family's package.

Example::

    >>> import samfx
    >>> [a.name for a in samfx.adapters.list_adapters()][:2]
    ['sam', 'sam_hq']
"""

from __future__ import annotations

from torch import nn

from .base import (PRESENT, Adapter, AttentionSite, ComponentSpec, Predictor, PromptError, QKVLayout, QKVSite,
                   ShapeCondition, TokenStage, TraceRecipe, UnsupportedModelError, class_name)

__all__ = [
    "PRESENT",
    "Adapter",
    "AttentionSite",
    "ComponentSpec",
    "Predictor",
    "PromptError",
    "QKVLayout",
    "QKVSite",
    "ShapeCondition",
    "TokenStage",
    "TraceRecipe",
    "UnsupportedModelError",
    "class_name",
    "find_adapter",
    "get_adapter",
    "list_adapters",
    "register_adapter",
]

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter instance under ``adapter.name`` (last one wins)."""
    if not adapter.name:
        raise ValueError("an adapter needs a name")
    _REGISTRY[adapter.name] = adapter
    return adapter


def list_adapters() -> list[Adapter]:
    return list(_REGISTRY.values())


def get_adapter(name: str) -> Adapter:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no adapter named {name!r}; known: {sorted(_REGISTRY)}") from None


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (captured models are recognised too); when
    several match, the one for the most derived class."""
    depths = [(depth, adapter) for adapter in _REGISTRY.values() if (depth := adapter.match_depth(model)) is not None]
    if depths:
        return min(depths, key=lambda pair: pair[0])[1]
    raise UnsupportedModelError(
        f"samfx does not know how to handle {class_name(model)}. Supported families: "
        + ", ".join(f"{a.name} ({', '.join(c.rsplit('.', 1)[-1] for c in a.model_classes)})" for a in _REGISTRY.values())
        + ". Register an adapter with samfx.adapters.register_adapter()."
    )


def _register_builtin() -> None:
    from . import hf, hf_sam2, hf_video, sam, sam2, sam2_video  # noqa: F401  (each module registers its adapters)


_register_builtin()
