"""``hyper``: Hyper-Compression of weights into lattice codes (after Birkhoff).

Every Linear and convolution weight (and, in the captured graphs, large
parameters read directly, such as ViT's ``pos_embed`` and ``rel_pos``) is coded
by :mod:`samfx.codecs.lattice`: pairs of weights become one integer code on the
hexagonal lattice, each row with its own centre and step, at a target relative
error. The module is swapped for :class:`HyperLinear`, :class:`HyperConv` or
:class:`~samfx.modules.hyper.HyperTensor` (:mod:`samfx.modules.hyper`), which keep only the fixed-width codes in memory and decode
inside ``forward``: a fused kernel for Linears (``samfx::hyper_linear``; Triton
on CUDA, numba on the CPU), one layer at a time for the rest. ``samfx.save``
entropy-codes the codes in the checkpoint.

The pass is data-free. It walks the whole model (also modules outside the
captured components, such as SAM 2's memory attention); modules keep their path,
so the graphs' ``call_module`` nodes need no edit, and a coded parameter read by
a ``get_attr`` node becomes a ``call_module`` of the :class:`HyperTensor` that
replaces it, under the same name.

Example::

    >>> import samfx
    >>> model = samfx.models.build("sam_vit_b", small=True)
    >>> small = samfx.optimize(model, [samfx.HyperConfig(rel_error=0.02)], min_box_iou=None)  # random weights
    >>> print(small.samfx_report.passes[0].summary)  # doctest: +ELLIPSIS
    coded ... tensors (...% of weights): ... bits/weight in the file, ... in memory, error ...
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import CapturedModel, OpaqueMethodCall
from ..codecs.lattice import LAYOUTS, LatticeCode, encode, entropy_bits
from ..kernels import hyper as hyper_ops
from ..modules.hyper import HyperCoded, HyperConv, HyperLinear, HyperTensor
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass

__all__ = ["HyperConfig", "hyper", "weaker"]


@dataclass(frozen=True)
class HyperConfig(PassConfig):
    """Options of :func:`hyper`.

    Attributes:
        rel_error: target RMS error of every row of a coded tensor, relative to
            the row's standard deviation (0.02 keeps LiteMedSAM's box masks at
            IoU 0.97 with the original).
        overrides: ``(pattern, rel_error)`` pairs; the first ``fnmatch`` pattern
            that matches a tensor's path (``image_encoder.blocks.0.attn.qkv``,
            ``image_encoder.pos_embed``) sets its target; 0 keeps it uncoded.
        max_bits: widest runtime code per pair of weights (2..16).
        range_slack: how much a tensor's squared error may grow so that rows
            with outliers fit a narrower runtime code.
        layout: runtime codes ``"packed"`` (``max_bits`` or fewer bits per pair,
            least memory) or ``"uint16"`` (16-bit aligned; Birkhoff's layout).
        min_numel: tensors with fewer weights stay uncoded.
        min_cols: tensors with shorter rows stay uncoded (a row's centre and
            step cost 32 bits).
        tensors: also code large parameters the graphs read directly (``pos_embed``).
    """

    rel_error: float = 0.02
    overrides: tuple[tuple[str, float], ...] = ()
    max_bits: int = 16
    range_slack: float = 1.05
    layout: str = "packed"
    min_numel: int = 4096
    min_cols: int = 32
    tensors: bool = True

    def validate(self) -> None:
        if not 0 < self.rel_error < 1:
            raise PassError(f"hyper: rel_error must be in (0, 1), got {self.rel_error}")
        for entry in self.overrides:
            if len(entry) != 2 or not isinstance(entry[0], str) or not 0 <= entry[1] < 1:
                raise PassError(f"hyper: an override is (pattern, rel_error in [0, 1)), got {entry!r}")
        if not 2 <= self.max_bits <= 16:
            raise PassError(f"hyper: max_bits must be in [2, 16], got {self.max_bits}")
        if self.range_slack < 1:
            raise PassError(f"hyper: range_slack must be >= 1, got {self.range_slack}")
        if self.layout not in LAYOUTS:
            raise PassError(f"hyper: layout must be one of {LAYOUTS}, got {self.layout!r}")

    def target_for(self, path: str) -> float:
        for pattern, rel_error in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                return rel_error
        return self.rel_error


_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def _graph_tensors(captured: CapturedModel) -> tuple[dict[str, str], dict[str, str]]:
    """Parameters the graphs read with ``get_attr`` that only the graphs read.

    Returns ``{model path: component role}`` for those, and the reason for the others.
    """
    eligible: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for role, component in captured.components.items():
        prefix = f"{component.path}." if component.path else ""
        # Methods behind opaque calls run upstream code that may read parameters directly.
        opaque = [path for path, module in component.root.named_modules()
                  if isinstance(module, OpaqueMethodCall)]
        owners = {path.rpartition(".")[0] for path in opaque}
        params = dict(component.root.named_parameters())
        for _, node in component.nodes():
            if node.op != "get_attr" or node.target not in params:
                continue
            path = prefix + node.target
            if any(node.target.startswith(f"{owner}.") or owner == "" for owner in owners):
                reasons[path] = "its module also runs upstream code outside the graph"
            else:
                eligible[path] = role
    return eligible, reasons


@dataclass
class _Target:
    path: str
    kind: str  # "linear" | "conv" | "tensor"
    tensor: torch.Tensor
    role: str | None = None


def _targets(captured: CapturedModel, config: HyperConfig, skipped: list[str]) -> list[_Target]:
    model = captured.model
    targets: list[_Target] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            targets.append(_Target(path, "linear", module.weight))
        elif isinstance(module, _CONVS):
            if module.padding_mode != "zeros":
                skipped.append(f"{path}: kept (padding_mode {module.padding_mode!r})")
            else:
                targets.append(_Target(path, "conv", module.weight))
    if config.tensors:
        modules = {t.path for t in targets}
        tensors, reasons = _graph_tensors(captured)
        for path, role in tensors.items():
            if path.rpartition(".")[0] not in modules:  # a Linear's weight read directly goes with its module
                targets.append(_Target(path, "tensor", model.get_parameter(path), role))
        skipped += [f"{path}: kept ({why})" for path, why in sorted(reasons.items())
                    if model.get_parameter(path).numel() >= config.min_numel]
    small = 0
    chosen = []
    for target in targets:
        weight = target.tensor
        cols = weight[0].numel() if weight.dim() else 0
        if not weight.is_floating_point() or weight.device.type == "meta":
            skipped.append(f"{target.path}: kept ({weight.dtype} on {weight.device.type})")
        elif weight.numel() < config.min_numel or cols < config.min_cols:
            small += 1
        elif config.target_for(target.path) == 0:
            skipped.append(f"{target.path}: kept (override)")
        else:
            chosen.append(target)
    if small:
        skipped.append(f"{small} tensors kept: under {config.min_numel} weights or rows under {config.min_cols}")
    return chosen


def _install(captured: CapturedModel, target: _Target, code: LatticeCode) -> None:
    model = captured.model
    owner, name = _owner(model, target.path)
    if target.kind == "linear":
        linear = owner.get_submodule(name)
        setattr(owner, name, HyperLinear(code, linear.bias))
    elif target.kind == "conv":
        setattr(owner, name, HyperConv(code, owner.get_submodule(name)))
    else:
        dtype = target.tensor.dtype
        delattr(owner, name)
        setattr(owner, name, HyperTensor(code, dtype))
        component = captured.components[target.role]
        local = target.path[len(component.path) + 1:] if component.path else target.path
        for _, node in list(component.nodes()):
            if node.op == "get_attr" and node.target == local:
                node.op = "call_module"
                node.meta["nn_module_stack"] = {local: (local, HyperTensor)}


def _rel_error(code: LatticeCode, weight: torch.Tensor) -> float:
    original = weight.detach().float().reshape(weight.shape[0], -1)
    decoded = hyper_ops.decode(code.codes, code.row_params, code.cols, code.bits, code.nx, code.i0, code.j0)
    return float((decoded - original).norm() / original.norm().clamp_min(1e-30))


def weaker(config: HyperConfig) -> HyperConfig | None:
    """The fidelity floor's back-off: every error target halved; ``None`` below 0.2%.

    Example::

        >>> weaker(HyperConfig()).rel_error, weaker(HyperConfig(rel_error=0.003))
        (0.01, None)
    """
    if config.rel_error / 2 < 0.002:
        return None
    overrides = tuple((pattern, rel_error / 2) for pattern, rel_error in config.overrides)
    return dataclasses.replace(config, rel_error=config.rel_error / 2, overrides=overrides)


@register_pass("hyper", HyperConfig, after=("split_qkv", "prune"), backoff=weaker)
def hyper(captured: CapturedModel, config: HyperConfig, context: PassContext) -> PassResult:
    """Code weights as pairs on the hexagonal lattice; decode-matmul kernels (Birkhoff)."""
    skipped: list[str] = []
    details: dict[str, Any] = {}
    replay: dict[str, Any] = {"coded": {}}
    if context.replay is not None:
        coded = context.replay.get("coded", {})
        targets = {t.path: t for t in _targets(captured, config, [])}
        for path, meta in coded.items():
            if path not in targets or targets[path].kind != meta["kind"]:
                raise PassError(f"hyper: the recorded model has a coded {meta['kind']} at {path}; this one does not")
            _install(captured, targets[path], HyperCoded.empty_code(meta))
        replay["coded"] = coded
        details = dict(context.replay.get("details", {}))
    else:
        targets = _targets(captured, config, skipped)
        total = sum(p.numel() for p in captured.model.parameters())
        weights = entropy = runtime = squared = 0.0
        for target in targets:
            rel_error = config.target_for(target.path)
            code = encode(target.tensor, rel_error, max_bits=config.max_bits, range_slack=config.range_slack,
                          layout=config.layout)
            error = _rel_error(code, target.tensor)
            n = target.tensor.numel()
            bits = entropy_bits(code)
            details[target.path] = {"shape": list(code.shape), "bits": code.bits, "rel_error": round(error, 5),
                                    "entropy_bits_per_weight": round(bits / n, 3)}
            weights += n
            entropy += bits
            runtime += 8 * code.runtime_bytes()
            squared += error ** 2 * n
            replay["coded"][target.path] = {"kind": target.kind, **code.meta()}
            _install(captured, target, code)
        details = {"tensors": details, "coded_weights": int(weights), "total_weights": total,
                   "entropy_bits_per_weight": entropy / max(weights, 1),
                   "runtime_bits_per_weight": runtime / max(weights, 1),
                   "rms_rel_error": math.sqrt(squared / max(weights, 1))}
        replay["details"] = {k: v for k, v in details.items() if k != "tensors"}
    for component in captured.components.values():
        component.recompile()
    count = len(replay["coded"])
    if count:
        summary = (f"coded {count} tensors ({100 * details['coded_weights'] / max(details['total_weights'], 1):.1f}% "
                   f"of weights): {details['entropy_bits_per_weight']:.2f} bits/weight in the file, "
                   f"{details['runtime_bits_per_weight']:.2f} in memory, error {details['rms_rel_error']:.4f}")
    else:
        summary = "nothing to code"
    return PassResult(captured, PassReport(count > 0, summary, details, skipped, replay))
