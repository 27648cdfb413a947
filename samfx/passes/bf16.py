"""``bf16``: run components in bfloat16 (or float16) with float32 islands.

Parameters and buffers of the chosen components are cast to the reduced
dtype, except inside the adapter's precision islands
(:meth:`samfx.adapters.Adapter.precision_islands`: normalisations, the
decoder's IoU head, positional encodings). The graphs then get explicit casts:
every floating-point tensor an op reads is cast to the op's compute dtype
(float32 inside islands and for softmaxes, the reduced dtype elsewhere), and
every output is cast back to its original dtype, so the component still takes
and returns float32 tensors and stays a drop-in replacement (predictors and
the prompt encoder, which keeps its float32 positional encoding, are untouched).
Attention accumulates its softmax in float32 in SDPA and in
``samfx::rel_pos_attention``; run ``fuse_attention`` first to get that.

Whether it is faster depends on the hardware: GPUs and CPUs with native
bfloat16 (AVX-512 BF16, AMX) run it several times faster; on CPUs without
them PyTorch emulates bfloat16 matmuls and the pass slows models down (the
report says which case applies).

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> half = samfx.optimize(sam, ["fuse_attention", "bf16"], min_box_iou=None)  # random weights
    >>> half.image_encoder.patch_embed.proj.weight.dtype
    torch.bfloat16
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..capture import CapturedModel, Component
from ..graph import module_paths, op_name
from ..modules import FLOAT32_KERNELS
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass

__all__ = ["BF16Config", "bf16", "weaker"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Ops that only read metadata: never cast their inputs.
_METADATA = {"size", "dim", "numel", "stride", "shape", "dtype", "device"}


@dataclass(frozen=True)
class BF16Config(PassConfig):
    """Options of :func:`bf16`.

    Attributes:
        dtype: ``"bfloat16"`` or ``"float16"``.
        roles: components to cast (the prompt encoder is tiny and is almost all
            positional encoding: it stays float32 unless listed).
    """

    dtype: str = "bfloat16"
    roles: tuple[str, ...] = ("image_encoder", "mask_decoder")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise PassError(f"bf16: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _in_island(node: fx.Node, islands: set[str]) -> bool:
    return any(path in islands for path in module_paths(node)) or op_name(node) == "softmax"


def _reads_metadata_only(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return True
    return node.op == "call_method" and str(node.target) in _METADATA


def _insert_casts(graph: fx.Graph, islands: set[str], low: torch.dtype) -> set[fx.Node]:
    """Cast every float tensor input to its reader's compute dtype and every
    float output back to its traced dtype; returns the cast nodes."""
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def cast(value: fx.Node, dtype: torch.dtype) -> fx.Node:
        key = (value, dtype)
        if key not in casts:
            with graph.inserting_after(value):
                node = graph.call_method("to", (value, dtype))
            node.meta.update({k: v for k, v in value.meta.items() if k == "nn_module_stack"})
            casts[key] = node
        return casts[key]

    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr") or _reads_metadata_only(node):
            continue
        if node.op == "output":
            def restore(a: Any) -> Any:
                if isinstance(a, fx.Node) and _is_float_tensor(a.meta.get("val")):
                    return cast(a, a.meta["val"].dtype)
                return a

            node.args = fx.node.map_arg(node.args, restore)
            continue
        dtype = torch.float32 if _in_island(node, islands) else low

        def to_compute(a: fx.Node) -> fx.Node:
            return cast(a, dtype) if _is_float_tensor(a.meta.get("val")) else a

        node.args = fx.node.map_arg(node.args, to_compute)
        node.kwargs = fx.node.map_arg(node.kwargs, to_compute)
    return set(casts.values())


def _drop_redundant_casts(graph: fx.Graph, casts: set[fx.Node]) -> int:
    """Remove the casts whose input already has the target dtype (known once
    shapes are propagated through the new graph)."""
    dropped = 0
    for node in casts:
        source = node.args[0].meta.get("val")
        if isinstance(source, torch.Tensor) and source.dtype == node.args[1]:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    return dropped


def _cast_tensors(component: Component, islands: set[str], low: torch.dtype) -> list[tuple[Any, str, torch.Tensor]]:
    """Cast float parameters and buffers outside islands; return what to restore."""
    originals = []
    for path, module in component.root.named_modules():
        if any(path == i or path.startswith(i + ".") for i in islands):
            continue
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == low:
                    continue
                originals.append((store, name, tensor))
                cast = tensor.detach().to(low)
                store[name] = torch.nn.Parameter(cast, tensor.requires_grad) if store is module._parameters else cast
    return originals


def _convert(component: Component, islands: set[str], low: torch.dtype) -> dict[str, int]:
    """Cast one component; on any error restore its tensors and graphs and re-raise."""
    component.propagate_shapes()  # traced dtypes, to restore at the outputs
    originals = _cast_tensors(component, islands, low)
    graphs = {key: _copy_graph(graph) for key, graph in component.graphs.items()}
    try:
        casts = {key: _insert_casts(graph, islands, low) for key, graph in component.graphs.items()}
        component.propagate_shapes()  # also checks that every op accepts its dtypes
        kept = sum(len(casts[key]) - _drop_redundant_casts(graph, casts[key])
                   for key, graph in component.graphs.items())
    except Exception:
        for store, name, tensor in originals:
            store[name] = tensor
        component.graphs.clear()
        component.graphs.update(graphs)
        raise
    component.recompile()
    return {"tensors_cast": len(originals), "casts": kept}


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy


def hardware_note(dtype: torch.dtype) -> str:
    """Whether this machine multiplies ``dtype`` natively (for the report)."""
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name()}"
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    native = {"avx512_bf16", "amx_bf16"} if dtype == torch.bfloat16 else {"avx512_fp16", "amx_fp16"}
    kind = "native" if flags & native else "emulated in software (expect a slowdown)"
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}): {str(dtype).replace('torch.', '')} matmuls {kind}"


def weaker(config: BF16Config) -> BF16Config | None:
    """The fidelity floor's back-off: the last listed component kept float32
    (the mask decoder first, by default); ``None`` when one is left.

    Example::

        >>> weaker(BF16Config()).roles, weaker(BF16Config(roles=("image_encoder",)))
        (('image_encoder',), None)
    """
    return dataclasses.replace(config, roles=config.roles[:-1]) if len(config.roles) > 1 else None


@register_pass("bf16", BF16Config, after=("split_qkv", "fuse_attention"), backoff=weaker)
def bf16(captured: CapturedModel, config: BF16Config, context: PassContext) -> PassResult:
    """Cast components to bfloat16/float16 with float32 islands (norms, IoU head, PE)."""
    low = DTYPES[config.dtype]
    details: dict[str, Any] = {"hardware": hardware_note(low)}
    skipped: list[str] = []
    done: list[str] = []
    for role in config.roles:
        component = captured.components.get(role)
        if component is None:
            skipped.append(f"{role}: not a captured component of this model")
            continue
        # int8 layers (after quantize) stay float32 around their integer kernels.
        islands = set(captured.adapter.precision_islands(component.root)) | {
            path for path, module in component.root.named_modules() if isinstance(module, FLOAT32_KERNELS)}
        try:
            details[role] = {**_convert(component, islands, low), "islands": len(islands)}
        except Exception as err:  # a dtype an op rejects: leave the component in float32
            skipped.append(f"{role}: left in float32 ({type(err).__name__}: {err})")
            continue
        done.append(role)
    summary = f"{', '.join(done)} in {config.dtype} with float32 islands" if done else "nothing cast"
    return PassResult(captured, PassReport(bool(done), summary, details, skipped))
