"""Size and cost of a model: parameters, weight bytes, MACs per component.

MACs are counted by ``torch.utils.flop_counter`` on fake tensors, so even
SAM ViT-H is measured without computing anything. They include the attention
matmuls, as TinySAM's and EfficientViT's tables do (SlimSAM's 372 G for SAM-B
leaves part of them out).

Example::

    >>> import samfx
    >>> stats = samfx.stats.model_stats(samfx.models.build("sam_vit_b", small=True))
    >>> stats.params > 0 and stats.macs["image_encoder"] > 0
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from .adapters import Adapter, find_adapter
from .adapters.base import ComponentSpec
from .capture import fake_run

__all__ = ["ModelStats", "component_macs", "model_stats", "parameter_count", "weight_bytes"]


@dataclass
class ModelStats:
    """Parameters, bytes of weights, and MACs of one call of each component
    (one image through the encoder, one prompt through the decoder)."""

    params: int
    weight_bytes: int
    macs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    persistent = set(model.state_dict(keep_vars=True).keys())
    tensors = [t for _, t in model.named_parameters()]
    tensors += [t for name, t in model.named_buffers() if name in persistent]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen and storage.data_ptr() != 0:
            continue
        seen.add(storage.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _default_call(spec: ComponentSpec) -> dict[str, Any] | None:
    """Example inputs with each static argument at its last listed value
    (prompts given, single-mask output)."""
    from .adapters.base import PRESENT

    concrete = {n: values[-1] for n, values in spec.recipe.static_args.items() if values[-1] is not PRESENT}
    return spec.variant_example(concrete)


def component_macs(model: nn.Module, adapter: Adapter | None = None) -> dict[str, int]:
    """Multiply-accumulates of each component for the adapter's example call."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: keep it off `import samfx`

    from .kernels.flops import register_flop_formulas

    register_flop_formulas()

    adapter = adapter or find_adapter(model)
    macs: dict[str, int] = {}
    for spec in adapter.components(model):
        example = _default_call(spec)
        if example is None:
            continue
        root = model.get_submodule(spec.path) if spec.path else model
        try:
            with fake_run(root) as fakes, torch.no_grad(), FlopCounterMode(display=False) as counter:
                root(**fakes(example))
        except DynamicOutputShapeException:
            # Prompt code indexes with boolean masks; its example is tiny, run it for real
            # (impossible for a model on the meta device: then its MACs are left out).
            try:
                with FlopCounterMode(display=False) as counter, torch.no_grad():
                    root(**example)
            except NotImplementedError:
                continue
        macs[spec.role] = int(counter.get_total_flops() // 2)
    return macs


def model_stats(model: nn.Module, adapter: Adapter | None = None) -> ModelStats:
    return ModelStats(parameter_count(model), weight_bytes(model), component_macs(model, adapter))
