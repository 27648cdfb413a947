"""Applying ``prune``'s edits and replaying them (what :func:`samfx.load` redoes
without data): torch-pruning's per-layer pruning functions remove the indices,
the family adapter updates head counts and width attributes, graph literals read
from changed attributes are rewritten, and FLAP's bias compensation is added.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...adapters.base import AttentionSite
from ...capture import CaptureError, CapturedModel, Component, literal_source
from ...graph import module_path
from ..base import PassError
from .depgraph import attention_projections
from .importance import reads_channels
from .selection import Edit

__all__ = ["add_deltas", "apply_edits", "compensation", "decode_replay", "encode_replay"]


def compensation(root: nn.Module, edits: list[Edit],
                  statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per layer, the bias change that stands for its removed inputs at their mean
    (computed on the unpruned weights, over the full output width)."""
    deltas: dict[str, torch.Tensor] = {}
    for target, dim, removed in edits:
        if dim != "in" or target not in statistics:
            continue
        layer = root.get_submodule(target)
        weight = layer.weight.detach()
        columns = weight[:, removed] if weight.dim() == 2 else weight[:, removed].sum((2, 3))
        delta = columns @ statistics[target][0][removed].to(weight)
        deltas[target] = deltas.get(target, 0) + delta
    return deltas


def _edit(root: nn.Module, target: str, dim: Any, removed: list[int]) -> None:
    """Remove indices ``removed`` along one dimension of a layer or parameter, with
    torch-pruning's per-layer pruning functions (``dim == "bias"``: give a layer
    without bias a zero one, for compensation)."""
    from torch_pruning import ops
    from torch_pruning.pruner import function

    parent_path, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if dim == "bias":
        layer = getattr(parent, name)
        if not reads_channels(layer) or layer.bias is not None:
            raise PassError(f"prune: cannot add a bias to {target}")
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device))
        return
    if isinstance(dim, int):
        param = getattr(parent, name)
        if not isinstance(param, nn.Parameter) or not 0 <= dim < param.dim() or max(removed) >= param.shape[dim]:
            raise PassError(f"prune: cannot remove indices along dim {dim} of {target}")
        setattr(parent, name, function.ParameterPruner(pruning_dim=dim).prune_out_channels(param, removed))
        return
    module = getattr(parent, name)
    pruner = function.PrunerBox.get(ops.module2type(module))
    if pruner is None or dim not in ("out", "in"):
        raise PassError(f"prune: no pruning function for {target} ({type(module).__name__}, {dim})")
    width = pruner.get_out_channels(module) if dim == "out" else pruner.get_in_channels(module)
    if max(removed) >= width:
        raise PassError(f"prune: {target} has {width} {dim}put channels, cannot remove index {max(removed)}")
    (pruner.prune_out_channels if dim == "out" else pruner.prune_in_channels)(module, removed)


def _head_layout(kept: list[int], head_dim: int, where: str) -> tuple[list[int], list[int]]:
    """Kept heads and the dims every kept head keeps, from kept projection rows."""
    heads: dict[int, list[int]] = {}
    for row in kept:
        heads.setdefault(row // head_dim, []).append(row % head_dim)
    layouts = {tuple(dims) for dims in heads.values()}
    if len(layouts) != 1:
        raise PassError(f"prune: {where} keeps different dims in different heads")
    return sorted(heads), list(next(iter(layouts)))


def _pin_attention_scale(component: Component, site: AttentionSite) -> int:
    """Give ``scaled_dot_product_attention`` calls of ``site`` the scale they used
    implicitly (1/sqrt of the original head width), which narrower heads would change."""
    pinned = 0
    for _, node in component.nodes():
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention \
                and module_path(node) == site.path and len(node.args) < 7 and node.kwargs.get("scale") is None:
            node.kwargs = {**node.kwargs, "scale": site.head_dim ** -0.5}
            pinned += 1
    return pinned


def _check_runs(component: Component) -> None:
    """Every graph of the component still runs (on the meta device): a width the
    pass did not reconcile fails here (the pipeline then discards its private copy)."""
    try:
        component.check()
    except CaptureError as err:
        raise PassError(f"prune: the pruned {component.role} is inconsistent: {err}") from err


def _width_attributes(root: nn.Module) -> dict[tuple[str, str], Any]:
    return {(path, name): value for path, module in root.named_modules()
            for name, value in vars(module).items() if type(value) in (int, float)}


def _rewrite_literals(component: Component, changed: dict[tuple[str, str], Any]) -> int:
    """Replace graph literals read from attributes that changed."""
    count = 0

    def rewrite(value: Any) -> Any:
        nonlocal count
        source = literal_source(value)
        if source in changed:
            count += 1
            return type(value)(changed[source], source)
        return value

    for _, node in component.nodes():
        node.args = fx.node.map_aggregate(node.args, rewrite)
        node.kwargs = fx.node.map_aggregate(node.kwargs, rewrite)
    return count


def apply_edits(captured: CapturedModel, component: Component, sites: list[AttentionSite],
           edits: list[Edit]) -> dict[str, Any]:
    """Apply ``edits`` and make the component consistent with them."""
    root = component.root
    before = _width_attributes(root)
    projections = {s.path: attention_projections(component, s) for s in sites}
    removed_out = {target: removed for target, dim, removed in edits if dim == "out"}
    for target, dim, removed in edits:
        _edit(root, target, dim, removed)
    attention = {}
    for site in sites:
        qkv = projections[site.path]
        if not qkv or qkv[0] not in removed_out:
            continue
        width = site.num_heads * site.head_dim
        kept = sorted(set(range(width)) - set(removed_out[qkv[0]]))
        kept_heads, kept_dims = _head_layout(kept, site.head_dim, site.path)
        captured.adapter.resize_attention(root.get_submodule(site.path), kept_heads, kept_dims)
        if len(kept_dims) != site.head_dim:
            _pin_attention_scale(component, site)
        attention[site.path] = {"heads": [site.num_heads, len(kept_heads)], "head_dim": [site.head_dim, len(kept_dims)]}
    captured.adapter.sync_width_attributes(root)
    changed = {k: v for k, v in _width_attributes(root).items() if k in before and before[k] != v}
    literals = _rewrite_literals(component, changed)
    component.recompile()
    _check_runs(component)
    layers = {path for path, module in root.named_modules() if module is not root and not list(module.children())
              and any(True for _ in module.parameters(recurse=False))}
    attributes = {f"{p}.{a}" if p else a: v for (p, a), v in changed.items() if p not in layers}
    return {"attention": attention, "attributes": attributes, "literals_rewritten": literals}


def add_deltas(root: nn.Module, deltas: dict[str, torch.Tensor], edits: list[Edit]) -> None:
    """Add compensation to the (pruned) layers' biases, at their kept outputs."""
    removed_out = {target: removed for target, dim, removed in edits if dim == "out"}
    with torch.no_grad():
        for target, delta in deltas.items():
            layer = root.get_submodule(target)
            kept = sorted(set(range(len(delta))) - set(removed_out.get(target, [])))
            layer.bias += delta[kept].to(layer.bias)


def encode_replay(edits: list[Edit]) -> dict[str, Any]:
    """Replay data: index lists stored once (a group removes the same indices
    from many layers)."""
    indices: list[list[int]] = []
    ids: dict[tuple[int, ...], int] = {}
    rows = []
    for target, dim, removed in edits:
        key = tuple(removed)
        if key not in ids:
            ids[key] = len(indices)
            indices.append(list(removed))
        rows.append([target, dim, ids[key]])
    return {"edits": rows, "indices": indices}


def decode_replay(replay: Any, role: str) -> list[Edit]:
    try:
        return [(str(t), d, [int(i) for i in replay["indices"][k]]) for t, d, k in replay["edits"]]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise PassError(f"prune: the saved replay data of {role} is malformed ({err})") from err
