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

import contextlib
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .adapters import Adapter, find_adapter
from .adapters.base import ComponentSpec
from .capture import Component, fake_run

__all__ = [
    "ModelStats",
    "activation_peak_bytes",
    "component_macs",
    "graph_macs",
    "model_stats",
    "parameter_count",
    "weight_bytes",
]


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
    """Parameters, counting weights a module keeps in coded form
    (``module.samfx_coded_numel()``) as the parameters they stand for."""
    coded = sum(m.samfx_coded_numel() for m in model.modules() if callable(getattr(m, "samfx_coded_numel", None)))
    return sum(p.numel() for p in model.parameters()) + coded


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
            with _no_parameter_grads(root), fake_run(root) as fakes, torch.no_grad(), \
                    FlopCounterMode(display=False) as counter:
                root(**fakes(example))
        except DynamicOutputShapeException:
            # Prompt code indexes with boolean masks; its example is tiny, run it for real
            # (impossible for a model on the meta device: then its MACs are left out).
            try:
                with _no_parameter_grads(root), FlopCounterMode(display=False) as counter, torch.no_grad():
                    root(**example)
            except NotImplementedError:
                continue
        macs[spec.role] = int(counter.get_total_flops() // 2)
    return macs


@contextlib.contextmanager
def _no_parameter_grads(root: nn.Module) -> Iterator[None]:
    """No parameter of ``root`` requires grad for the duration. FlopCounterMode hooks
    every module input that requires grad, and rejects a view of a parameter taken
    under ``no_grad`` (it requires grad but has no grad function), such as EdgeTAM's
    perceiver latents."""
    flags = [(p, p.requires_grad) for p in root.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


class _AttributingInterpreter(fx.Interpreter):
    """Runs a graph and adds each node's FLOPs to the total of its group."""

    def __init__(self, root: nn.Module, graph: fx.Graph, counter: Any, group: Callable[[fx.Node], str]) -> None:
        super().__init__(root, graph=graph)
        self.counter, self.group = counter, group
        self.flops: dict[str, int] = defaultdict(int)

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        value = super().run_node(n)
        self.flops[self.group(n)] += self.counter.get_total_flops() - before
        return value


def graph_macs(component: Component, group: Callable[[fx.Node], str], key: Any = None) -> dict[str, int]:
    """MACs of one graph of a captured component, summed per group of nodes
    (``group(node)`` names it, e.g. the block a node belongs to), counted on
    fake tensors from the adapter's example inputs.

    Example::

        >>> import samfx
        >>> encoder = samfx.capture(samfx.models.build("sam_vit_b", small=True)).component("image_encoder")
        >>> macs = graph_macs(encoder, lambda n: "blocks" if "blocks.0" in n.meta.get("nn_module_stack", {}) else "")
        >>> macs["blocks"] > 0 and macs[""] > 0
        True
    """
    from torch.utils.flop_counter import FlopCounterMode

    key = next(iter(component.graphs)) if key is None else key
    args = component.example_args(key)
    if args is None:
        raise ValueError(f"{component.role}: the adapter gave no example inputs to count MACs with")
    with fake_run(component.root) as fakes, torch.no_grad(), FlopCounterMode(display=False) as counter:
        interpreter = _AttributingInterpreter(component.root, component.graphs[key], counter, group)
        interpreter.run(*fakes(args))
    return {name: flops // 2 for name, flops in interpreter.flops.items()}


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors ops have made that are still referenced, and their peak.

    Each storage counts once (views share it) from the op that makes it until
    the last tensor on it is freed, as eager PyTorch frees memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._holders: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._holders:
                    self._holders[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._holders[key] += 1
                weakref.finalize(tensor, self._release, key, nbytes)
        return out


def activation_peak_bytes(model: nn.Module, adapter: Adapter | None = None, role: str = "image_encoder") -> int:
    """Peak bytes of activations while one component runs the adapter's example
    call (one image through the encoder): the most memory that tensors made
    during the call hold at once, weights and inputs excluded.

    Counted on fake tensors as eager PyTorch would allocate and free them, so
    SAM ViT-H is measured in seconds, without computing anything.

    Example::

        >>> import samfx
        >>> activation_peak_bytes(samfx.models.build("sam_vit_b", small=True)) > 0
        True
    """
    adapter = adapter or find_adapter(model)
    spec = next((s for s in adapter.components(model) if s.role == role), None)
    example = _default_call(spec) if spec is not None else None
    if example is None:
        raise ValueError(f"{adapter.name} models have no {role} with example inputs")
    root = model.get_submodule(spec.path) if spec.path else model
    with fake_run(root) as fakes, torch.no_grad(), _LiveBytes() as live:
        out = root(**fakes(example))
        del out
    return live.peak


def model_stats(model: nn.Module, adapter: Adapter | None = None) -> ModelStats:
    return ModelStats(parameter_count(model), weight_bytes(model), component_macs(model, adapter))
