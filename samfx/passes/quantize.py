"""``quantize``: post-training int8 quantization on real int8 kernels (W8A8, Q-TinySAM).

What it does to each component it is given (image encoder and mask decoder by
default; the prompt encoder's coordinate and label inputs are never touched):

* ``Linear`` and ``Conv2d`` (``groups == 1``) layers become int8 layers
  (``samfx::quantized_linear`` / ``quantized_conv2d``): weights symmetric int8
  per output channel, activations uint8 with a calibrated scale and zero point.
  A ``BatchNorm2d`` right after a convolution is folded into it first.
* Optionally (``attention_matmuls``) the attention products ``q @ k^T`` and
  ``p @ v`` become ``samfx::quantized_matmul`` (both operands int8, as in
  Q-TinySAM).
* LayerNorm, softmax, GELU, positional encodings and every integer tensor stay
  as they are.

Activation ranges come from calibration on unlabeled images, prompted with
clicks and boxes the way users prompt (:mod:`samfx.calibration`): per input,
the mean over calibration calls of each call's minimum and maximum
(``activation_range="mean_minmax"``, NNCF's estimator; ``"mse"``, ``"minmax"``
and ``"percentile"`` are there too). Weights use the full int8 range where the
CPU's int8 dot products have VNNI/AMX, ``[-63, 63]`` elsewhere
(``reduce_range``): on LiteMedSAM the 7-bit weights alone cost 0.02 of
embedding cosine (docs/quantization.md). ``bias_correction`` adds NNCF's fast
bias correction.
One affine uint8 grid per tensor is what int8 kernels take: Q-TinySAM's
twin-uniform grids after GELU and softmax need two products per layer, so
here a post-GELU input gets an asymmetric grid whose zero point makes room for
GELU's negative lobe, and post-softmax probabilities a grid starting at 0.

Mixed precision: with ``min_mask_iou`` set, the pass measures how far the
quantized model's masks move from the float model's on the calibration
prompts; below the floor it ranks the quantized layers by sensitivity (the
relative error of their component's output when only that layer is
quantized, on the first calibration image) and returns the most sensitive
ones to float until the floor is met.

Other modes: ``w8a8_dynamic`` (per-token activation scales at run time, no
calibration), ``w8`` and ``w4`` (weight-only int8 / group-wise int4 storage,
dequantized to float for the product: smaller, not faster on CPUs without a
fast weight-only kernel).

The recipe (seed, image names or digests, every prompt, and every activation
grid) goes into ``PassReport.replay``, so :func:`samfx.load` rebuilds the
model without data.

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> q = samfx.optimize(sam, [samfx.QuantizeConfig(images=("chelsea",), prompts_per_image=1)],
    ...                    min_box_iou=None)  # random weights: no fidelity floor
    >>> q.samfx_report.passes[0].details["quantized"]["image_encoder"]["linear"]
    8
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from ..calibration import DEFAULT_CALIBRATION_IMAGES, CalibrationSet
from ..capture import CapturedModel, Component
from ..graph import follows_softmax, module_path, op_name
from ..kernels import quantized as qk
from ..modules.quantized import (DynamicQuantizedLinear, MatMul, QuantizedConv2d, QuantizedLinear, QuantizedMatMul,
                                 WeightOnlyLinear)
from .base import PassConfig, PassContext, PassError, PassReport, PassResult, register_pass

__all__ = ["QuantizeConfig", "quantize", "weaker"]

_MODES = ("w8a8", "w8a8_dynamic", "w8", "w4")
_RANGES = ("mean_minmax", "mse", "minmax", "percentile")
#: Values kept per observed call, and in all, for the range search (deterministic random subsets).
_SAMPLE_PER_CALL = 1 << 14
_SAMPLE_TOTAL = 1 << 16
_PERCENTILE = 1e-4


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Options of :func:`quantize`.

    Attributes:
        mode: ``w8a8`` (static activation grids from calibration),
            ``w8a8_dynamic`` (per-token scales at run time), ``w8`` / ``w4``
            (weight-only int8 / int4).
        roles: components to quantize.
        convs: quantize ``Conv2d`` layers (``groups == 1``) too.
        attention_matmuls: quantize attention's ``q @ k^T`` and ``p @ v`` (``w8a8`` only).
        activation_range: how calibration picks each activation's range:
            ``mean_minmax`` (the mean over calibration calls of each call's
            minimum and maximum, as NNCF does), ``mse`` (least quantization
            error over the pooled values), ``minmax`` or ``percentile`` (0.01%
            clipped on each side).
        reduce_range: weights in ``[-63, 63]`` so that int8 kernels cannot
            saturate on CPUs without VNNI (see :mod:`samfx.kernels.quantized`).
            ``None`` (default): only where this CPU's int8 kernels lack
            VNNI/AMX; the choice is recorded in the recipe.
        bias_correction: shift each quantized layer's bias by its mean output
            error per channel, measured on its float inputs over the
            calibration prompts (NNCF's fast bias correction; ``w8a8`` only).
            Off by default: on LiteMedSAM it raises the embedding cosine but
            lowers box-mask IoU and ground-truth mIoU (docs/quantization.md).
        images: package images to calibrate on when the caller gives none
            (``optimize(..., calibration_images=...)`` takes precedence).
        prompts_per_image: clicks per image; each also gives a box prompt.
        min_mask_iou: fidelity floor: the mean mask IoU against the float
            model on the calibration prompts below which sensitive layers are
            returned to float. ``None``: no mixed-precision search.
        keep_float: ``fnmatch`` patterns of layers to leave in float, matched
            against ``"role/path"`` (e.g. ``"mask_decoder/iou_prediction_head.*"``).
        group_size: input channels per scale for ``w4``.
    """

    mode: str = "w8a8"
    roles: tuple[str, ...] = ("image_encoder", "mask_decoder")
    convs: bool = True
    attention_matmuls: bool = False
    activation_range: str = "mean_minmax"
    reduce_range: bool | None = None
    bias_correction: bool = False
    images: tuple[str, ...] = DEFAULT_CALIBRATION_IMAGES
    prompts_per_image: int = 8
    min_mask_iou: float | None = None
    keep_float: tuple[str, ...] = ()
    group_size: int = 32

    def validate(self) -> None:
        if self.mode not in _MODES:
            raise PassError(f"quantize: mode must be one of {_MODES}, got {self.mode!r}")
        if self.activation_range not in _RANGES:
            raise PassError(f"quantize: activation_range must be one of {_RANGES}, got {self.activation_range!r}")
        if self.attention_matmuls and self.mode != "w8a8":
            raise PassError("quantize: attention_matmuls needs mode='w8a8' (static activation grids)")
        if self.min_mask_iou is not None and not 0.0 < self.min_mask_iou <= 1.0:
            raise PassError(f"quantize: min_mask_iou must be in (0, 1], got {self.min_mask_iou}")
        if self.prompts_per_image < 1:
            raise PassError("quantize: prompts_per_image must be at least 1")
        if self.group_size < 2 or self.group_size % 2:
            raise PassError(f"quantize: group_size must be an even number >= 2, got {self.group_size}")


# -- sites -----------------------------------------------------------------------------------------

@dataclass
class _Site:
    """One layer to quantize: a module of a component (Linear, Conv2d, MatMul)."""

    role: str
    path: str
    kind: str  # linear | conv | matmul
    float_module: nn.Module
    after_softmax: bool = False
    observers: list["_Observer"] = field(default_factory=list)
    grids: dict[str, Any] = field(default_factory=dict)
    sensitivity: float | None = None
    weight_qmax: int = 127
    #: added to the quantized layer's bias (bias correction); zeros on replay, the saved weights fill them
    bias_shift: Tensor | None = None

    @property
    def name(self) -> str:
        return f"{self.role}/{self.path}"


def _floating(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def _fold_batchnorms(component: Component) -> int:
    """Fold each eval-mode ``BatchNorm2d`` that only follows a ``Conv2d`` into it.

    Done only where every call of the convolution feeds that one BatchNorm, in
    every graph; the rewrite is exact up to float rounding.
    """
    root = component.root
    calls: dict[str, list[fx.Node]] = {}
    for _, node in component.nodes():
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    folded = 0
    for path, nodes in calls.items():
        conv = root.get_submodule(path)
        if not isinstance(conv, nn.Conv2d):
            continue
        users = [list(n.users) for n in nodes]
        if not all(len(u) == 1 and u[0].op == "call_module" for u in users):
            continue
        bn_paths = {u[0].target for u in users}
        if len(bn_paths) != 1:
            continue
        bn_path = bn_paths.pop()
        bn = root.get_submodule(bn_path)
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_var is None:
            continue
        if len(calls.get(bn_path, [])) != len(nodes):
            continue  # the BatchNorm also normalises something else
        _fold(conv, bn)
        for node in nodes:
            (bn_node,) = node.users
            bn_node.replace_all_uses_with(node)
            node.graph.erase_node(bn_node)
        component.mark_replaced(bn_path)
        folded += 1
    return folded


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    factor = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * factor + shift, requires_grad=conv.weight.requires_grad)


def _matmul_sites(component: Component, role: str, attention_paths: set[str]) -> tuple[list[_Site], list[str]]:
    """Make attention products ``call_module``s to :class:`MatMul` modules."""
    sites, skipped = [], []
    counters: dict[str, int] = {}
    for _, graph in component.graphs.items():
        counters.clear()
        for node in list(graph.nodes):
            owner = module_path(node)
            if op_name(node) != "matmul" or owner not in attention_paths:
                continue
            a, b = node.args[:2]
            if not (_floating(a) and _floating(b)) or node.kwargs:
                skipped.append(f"{role}: a product in {owner} with non-float or keyword operands stays float")
                continue
            index = counters.get(owner, 0)
            counters[owner] = index + 1
            target = f"{owner}.samfx_matmul{index}"
            with graph.inserting_before(node):
                call = graph.call_module(target, (a, b))
            call.meta = dict(node.meta)
            call.meta["nn_module_stack"] = {**node.meta.get("nn_module_stack", {}), target: MatMul}
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            if not any(s.path == target for s in sites):
                component.set_submodule(target, MatMul())
                sites.append(_Site(role, target, "matmul", component.root.get_submodule(target),
                                   after_softmax=follows_softmax(a, component.root)))
    return sites, skipped


def _find_sites(captured: CapturedModel, config: QuantizeConfig) -> tuple[list[_Site], list[str], dict[str, int]]:
    sites: list[_Site] = []
    skipped: list[str] = []
    folded: dict[str, int] = {}
    for role in config.roles:
        component = captured.components.get(role)
        if component is None:
            skipped.append(f"{role}: the {captured.adapter.name} model has no captured {role}")
            continue
        component.propagate_shapes()
        if config.convs and config.mode in ("w8a8",):
            folded[role] = _fold_batchnorms(component)
        if config.attention_matmuls:
            paths = {s.path for s in captured.adapter.attention_sites(component.root)}
            matmuls, why = _matmul_sites(component, role, paths)
            sites += matmuls
            skipped += why
        component.recompile()  # calibration runs the rewritten graphs
        seen: set[str] = set()
        for _, node in component.nodes():
            if node.op != "call_module" or node.target in seen:
                continue
            module = component.root.get_submodule(node.target)
            kind = "linear" if isinstance(module, nn.Linear) else "conv" if isinstance(module, nn.Conv2d) else None
            if kind is None:
                continue
            seen.add(node.target)
            if not _floating(node.args[0]):
                skipped.append(f"{role}/{node.target}: its input is not a float tensor; left as is")
            elif kind == "conv" and not (config.convs and config.mode == "w8a8"):
                continue
            elif kind == "conv" and module.groups != 1:
                skipped.append(f"{role}/{node.target}: grouped/depthwise convolution stays float "
                               "(no speed-up from int8 here)")
            elif kind == "conv" and module.padding_mode != "zeros":
                skipped.append(f"{role}/{node.target}: padding mode {module.padding_mode!r} stays float")
            elif config.mode == "w4" and module.in_features % config.group_size:
                skipped.append(f"{role}/{node.target}: {module.in_features} inputs are not groups of {config.group_size}")
            else:
                sites.append(_Site(role, node.target, kind, module))
    return sites, skipped, folded


# -- calibration -----------------------------------------------------------------------------------

class _Observer:
    """Range, each call's range and a deterministic random sample of the values one input takes."""

    def __init__(self, generator: torch.Generator) -> None:
        self.low, self.high = math.inf, -math.inf
        self.call_ranges: list[tuple[float, float]] = []
        self.samples: list[Tensor] = []
        self.generator = generator

    def observe(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if not flat.numel():
            return
        low, high = float(flat.min()), float(flat.max())
        self.call_ranges.append((low, high))
        self.low, self.high = min(self.low, low), max(self.high, high)
        if flat.numel() > _SAMPLE_PER_CALL:
            flat = flat[torch.randint(flat.numel(), (_SAMPLE_PER_CALL,), generator=self.generator)]
        self.samples.append(flat.cpu().clone())

    def values(self) -> Tensor:
        if not self.samples:
            raise PassError("quantize: a layer was never called during calibration")
        values = torch.cat(self.samples)
        if values.numel() > _SAMPLE_TOTAL:
            values = values[torch.randperm(values.numel(), generator=self.generator)[:_SAMPLE_TOTAL]]
        return values


def _uint8_error(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """MSE of ``values`` on the uint8 grid of each ``(low[i], high[i])``."""
    scale = (high - low).clamp_min(1e-12) / qk.ACTIVATION_QMAX
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(values[None] / scale[:, None]) + zero[:, None], 0, qk.ACTIVATION_QMAX)
    return ((codes - zero[:, None]) * scale[:, None] - values[None]).pow(2).mean(dim=1)


def _activation_grid(observer: _Observer, method: str, nonnegative: bool = False) -> tuple[float, int]:
    """The uint8 grid of one activation, by ``method`` (see :class:`QuantizeConfig`)."""
    low, high = min(observer.low, 0.0), max(observer.high, 0.0)
    if nonnegative:
        low = 0.0
    if method == "mean_minmax":
        low = 0.0 if nonnegative else min(float(np.mean([r[0] for r in observer.call_ranges])), 0.0)
        high = max(float(np.mean([r[1] for r in observer.call_ranges])), 0.0)
    elif method == "percentile":
        values = observer.values()
        low = min(float(torch.quantile(values, _PERCENTILE)), 0.0) if not nonnegative else 0.0
        high = max(float(torch.quantile(values, 1 - _PERCENTILE)), 0.0)
    elif method == "mse":
        values = observer.values()
        fractions = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)
        values = values.double()
        best_low, best_high = low, high
        for _ in range(2):  # coordinate descent: the upper end, then the lower, then the upper again
            errors = _uint8_error(values, torch.full_like(fractions, best_low), fractions * high)
            best_high = float(fractions[int(torch.argmin(errors))] * high)
            if low < 0:
                errors = _uint8_error(values, fractions * low, torch.full_like(fractions, best_high))
                best_low = float(fractions[int(torch.argmin(errors))] * low)
        low, high = best_low, best_high
    return qk.activation_qparams(low, high)


def _symmetric_scale(observer: _Observer, qmax: int, method: str) -> float:
    """Scale of a symmetric int8 grid ``[-qmax, qmax]`` for a matmul's right operand."""
    amax = max(abs(observer.low), abs(observer.high), 1e-12)
    if method == "minmax":
        return amax / qmax
    if method == "mean_minmax":
        return max(float(np.mean([max(-r[0], r[1]) for r in observer.call_ranges])), 1e-12) / qmax
    values = observer.values().double()
    if method == "percentile":
        return max(float(torch.quantile(values.abs(), 1 - _PERCENTILE)), 1e-12) / qmax
    scales = torch.linspace(0.05, 1.0, 96, dtype=torch.float64) * amax / qmax
    codes = torch.clamp(torch.round(values[None] / scales[:, None]), -qmax, qmax)
    errors = (codes * scales[:, None] - values[None]).pow(2).mean(dim=1)
    return float(scales[int(torch.argmin(errors))])


def _observe(sites: list[_Site], seed: int) -> Callable[[], None]:
    """Attach observers to every site's float module; returns the detach function."""
    handles = []
    for index, site in enumerate(sites):
        count = 2 if site.kind == "matmul" else 1
        site.observers = [_Observer(torch.Generator().manual_seed(seed * 100_003 + 2 * index + i)) for i in range(count)]

        def hook(module: nn.Module, args: tuple[Any, ...], site: _Site = site) -> None:
            for observer, value in zip(site.observers, args):
                observer.observe(value)

        handles.append(site.float_module.register_forward_pre_hook(hook))

    def detach() -> None:
        for handle in handles:
            handle.remove()

    return detach


def _choose_grids(sites: list[_Site], config: QuantizeConfig, b_qmax: int) -> None:
    for site in sites:
        if not site.observers[0].call_ranges:
            # Never run while calibrating (a video model's memory components under
            # the image predictor): no grid, the site stays float.
            site.observers = []
            continue
        if site.kind == "matmul":
            site.grids = {"a": list(_activation_grid(site.observers[0], config.activation_range, site.after_softmax)),
                          "b_scale": _symmetric_scale(site.observers[1], b_qmax, config.activation_range)}
        else:
            site.grids = {"input": list(_activation_grid(site.observers[0], config.activation_range))}
        site.observers = []


# -- installing ------------------------------------------------------------------------------------

def _quantized_module(site: _Site, config: QuantizeConfig) -> nn.Module:
    weight_qmax = site.weight_qmax
    if site.kind == "matmul":
        return QuantizedMatMul.from_grids(tuple(site.grids["a"]), site.grids["b_scale"], weight_qmax)
    if site.kind == "conv" or config.mode == "w8a8":
        kind = QuantizedConv2d if site.kind == "conv" else QuantizedLinear
        module = kind.from_float(site.float_module, weight_qmax, tuple(site.grids["input"]))
        if site.bias_shift is not None:
            module.bias = site.bias_shift.clone() if module.bias is None else module.bias + site.bias_shift
        return module
    if config.mode == "w8a8_dynamic":
        return DynamicQuantizedLinear.from_float(site.float_module, weight_qmax)
    return WeightOnlyLinear.from_float(site.float_module, 8 if config.mode == "w8" else 4, config.group_size)


def _correct_biases(captured: CapturedModel, sites: list[_Site], config: QuantizeConfig,
                    calibration: CalibrationSet) -> None:
    """Fast bias correction: each layer's mean output error per channel when
    quantized, on the float model's inputs to it over every calibration prompt,
    becomes its ``bias_shift``. Layers are measured independently, in one run."""
    layers = {id(s.float_module): (s, _quantized_module(s, config)) for s in sites if s.kind != "matmul"}
    totals: dict[int, list] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        site, quantized = layers[id(module)]
        error = (output - quantized(args[0])).double()
        channel = 1 if site.kind == "conv" else error.dim() - 1
        dims = [d for d in range(error.dim()) if d != channel]
        total = totals.setdefault(id(module), [0.0, 0])
        total[0] = total[0] + error.sum(dim=dims)
        total[1] += error.numel() // error.shape[channel]

    handles = [s.float_module.register_forward_hook(hook) for s in sites if id(s.float_module) in layers]
    try:
        with torch.no_grad():
            calibration.run(captured.adapter.predictor(captured.model))
    finally:
        for handle in handles:
            handle.remove()
    for key, (site, _) in layers.items():
        if key in totals and totals[key][1]:
            site.bias_shift = (totals[key][0] / totals[key][1]).float()


def _set(captured: CapturedModel, site: _Site, module: nn.Module) -> None:
    captured.components[site.role].set_submodule(site.path, module)


def _agreement(captured: CapturedModel, calibration: CalibrationSet) -> float:
    """Mean mask IoU of the current model against the calibration set's reference masks."""
    with torch.no_grad():
        return calibration.agreement(captured.adapter.predictor(captured.model))


def _component_calls(component: Component, calibration: CalibrationSet, captured: CapturedModel) -> list[tuple]:
    """The arguments of every call of ``component`` on the first calibration image."""
    calls: list[tuple] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))

    handle = component.root.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            calibration.subset(1).run(captured.adapter.predictor(captured.model))
    finally:
        handle.remove()
    return calls


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.float()] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return _tensors(value.to_tuple())
    return []


def _relative_error(reference: list[Tensor], output: list[Tensor]) -> float:
    num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(reference, output))
    den = sum(float(a.double().pow(2).sum()) for a in reference)
    return num / max(den, 1e-30)


def _sensitivities(captured: CapturedModel, sites: list[_Site], config: QuantizeConfig,
                   calibration: CalibrationSet) -> None:
    """Each site's damage alone: its component's relative output error when only it is quantized."""
    for role in {s.role for s in sites}:
        component = captured.components[role]
        calls = _component_calls(component, calibration, captured)
        with torch.no_grad():
            reference = [_tensors(component.root(*a, **k)) for a, k in calls]
            for site in (s for s in sites if s.role == role):
                _set(captured, site, _quantized_module(site, config))
                outputs = [_tensors(component.root(*a, **k)) for a, k in calls]
                _set(captured, site, site.float_module)
                site.sensitivity = float(np.mean([_relative_error(r, o) for r, o in zip(reference, outputs)]))


def _mixed_precision(captured: CapturedModel, sites: list[_Site], config: QuantizeConfig,
                     calibration: CalibrationSet) -> tuple[list[_Site], list[dict[str, Any]]]:
    """Return sensitive sites to float until the calibration agreement reaches the floor.

    Sites move in growing steps (1, 1, 2, 4, ...), most sensitive first; each
    step is checked on the whole calibration set.
    """
    history = [{"float": 0, "mask_iou": _agreement(captured, calibration)}]
    if history[-1]["mask_iou"] >= config.min_mask_iou:
        return [], history
    _sensitivities(captured, sites, config, calibration)
    ranked = sorted(sites, key=lambda s: -s.sensitivity)
    kept: list[_Site] = []
    step = 1
    while history[-1]["mask_iou"] < config.min_mask_iou and len(kept) < len(ranked):
        batch = ranked[len(kept): len(kept) + step]
        for site in batch:
            _set(captured, site, site.float_module)
        kept += batch
        history.append({"float": len(kept), "mask_iou": _agreement(captured, calibration)})
        step = step if len(kept) < 2 else 2 * step
    return kept, history


def _keep_float(site: _Site, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(site.name, p) or fnmatch.fnmatchcase(site.path, p) for p in patterns)


# -- the pass --------------------------------------------------------------------------------------

def _replayed_grids(sites: list[_Site], replay: dict[str, Any], reduce_range: bool | None) -> set[str]:
    """Put the recorded grids on ``sites``; the names recorded as float."""
    recorded = {s["name"]: s for s in replay.get("sites", [])}
    names = {s.name for s in sites}
    if set(recorded) != names:
        missing, extra = sorted(names - set(recorded)), sorted(set(recorded) - names)
        raise PassError(f"quantize: the recorded recipe does not fit this model (not recorded: {missing[:5]}, "
                        f"recorded but absent: {extra[:5]})")
    # Recipes from before it was recorded: reduce_range was a bool, True by default.
    weight_qmax = replay.get("weight_qmax", qk.weight_qmax(reduce_range is not False))
    for site in sites:
        site.grids = recorded[site.name].get("grids", {})
        site.weight_qmax = weight_qmax
        if recorded[site.name].get("bias_corrected"):
            site.bias_shift = torch.zeros(site.float_module.weight.shape[0])
    return {name for name, s in recorded.items() if not s["quantized"]}


#: the mixed-precision floors the fidelity floor's back-off steps through
_BACKOFF_FLOORS = (0.98, 0.99, 0.995, 0.999)


def weaker(config: QuantizeConfig) -> QuantizeConfig | None:
    """The fidelity floor's back-off: more layers kept float, by raising the
    mixed-precision floor ``min_mask_iou`` on the calibration prompts through
    0.98, 0.99, 0.995 and 0.999; ``None`` after that.

    Example::

        >>> [weaker(QuantizeConfig()).min_mask_iou, weaker(QuantizeConfig(min_mask_iou=0.999))]
        [0.98, None]
    """
    current = config.min_mask_iou or 0.0
    higher = [floor for floor in _BACKOFF_FLOORS if floor > current]
    return dataclasses.replace(config, min_mask_iou=higher[0]) if higher else None


@register_pass("quantize", QuantizeConfig, after=("split_qkv", "prune", "token_cluster", "fuse_attention"),
               data_driven=True, backoff=weaker)
def quantize(captured: CapturedModel, config: QuantizeConfig, context: PassContext) -> PassResult:
    """Post-training int8 quantization (W8A8 on int8 kernels; Q-TinySAM) with calibration."""
    sites, skipped, folded = _find_sites(captured, config)
    needs_grids = config.mode == "w8a8"
    needs_data = needs_grids or config.min_mask_iou is not None
    calibration: CalibrationSet | None = None
    history: list[dict[str, Any]] = []
    reduce_range = config.reduce_range
    if reduce_range is None:
        reduce_range = not qk.int8_cpu_kernels()["full_range_weights"]
    weight_qmax = qk.weight_qmax(reduce_range)
    for site in sites:
        site.weight_qmax = weight_qmax
    if context.replay is not None:
        floats = _replayed_grids(sites, context.replay, config.reduce_range)
        kept = [s for s in sites if s.name in floats]
    elif needs_data and sites:
        if not {"mask_decoder", "prompt_encoder"} <= set(captured.components):
            raise PassError(f"quantize: calibration prompts the model through its predictor; this "
                            f"{captured.adapter.name} model has only {sorted(captured.components)}. "
                            "Use mode='w8a8_dynamic', 'w8' or 'w4', which need no calibration.")
        images = context.calibration_set(config.images)
        detach = _observe(sites, context.seed) if needs_grids else (lambda: None)
        try:
            with torch.no_grad():
                calibration = CalibrationSet.build(captured.model, images, prompts_per_image=config.prompts_per_image,
                                                   seed=context.seed, adapter=captured.adapter)
        finally:
            detach()
        if needs_grids:
            _choose_grids(sites, config, weight_qmax)
        # Sites calibration never reached stay float.
        kept = [s for s in sites if needs_grids and not s.grids]
        if needs_grids and config.bias_correction:
            _correct_biases(captured, [s for s in sites if s not in kept], config, calibration)
    else:
        kept = []
    chosen = [s for s in sites if _keep_float(s, config.keep_float)]
    for site in sites:
        if site not in kept and site not in chosen:
            _set(captured, site, _quantized_module(site, config))
    if context.replay is None and config.min_mask_iou is not None and calibration is not None:
        unreached = kept
        kept, history = _mixed_precision(captured, [s for s in sites if s not in chosen and s not in unreached],
                                         config, calibration)
        kept += unreached
    kept = kept + [s for s in chosen if s not in kept]
    for role in {s.role for s in sites} | set(folded):
        component = captured.components[role]
        component.delete_unused_submodules()
        component.recompile()
    quantized = [s for s in sites if s not in kept]
    counts: dict[str, dict[str, int]] = {}
    for site in quantized:
        counts.setdefault(site.role, {}).setdefault(site.kind, 0)
        counts[site.role][site.kind] += 1
    skipped += [f"{s.name}: kept in float ({_why_float(s, config)})" for s in kept]
    details: dict[str, Any] = {"mode": config.mode, "quantized": counts, "kept_float": [s.name for s in kept],
                               "folded_batchnorms": folded}
    if history:
        details["mixed_precision"] = history
        details["sensitivity"] = {s.name: s.sensitivity for s in sorted(sites, key=lambda s: -(s.sensitivity or 0))[:10]
                                  if s.sensitivity is not None}
    replay = {
        "sites": [{"name": s.name, "kind": s.kind, "quantized": s not in kept, "grids": s.grids,
                   "bias_corrected": s.bias_shift is not None} for s in sites],
        "weight_qmax": sites[0].weight_qmax if sites else weight_qmax,
        "calibration": calibration.recipe() if calibration is not None else (context.replay or {}).get("calibration"),
    }
    total = sum(sum(c.values()) for c in counts.values())
    summary = "; ".join(f"{role}: " + ", ".join(f"{n} {kind}" for kind, n in c.items()) for role, c in counts.items())
    summary = f"{config.mode}: {summary}" if total else "nothing quantized"
    if kept:
        summary += f"; {len(kept)} kept in float"
    report = PassReport(total > 0, summary, details, skipped, replay)
    return PassResult(captured, report)


def _why_float(site: _Site, config: QuantizeConfig) -> str:
    if _keep_float(site, config.keep_float):
        return "keep_float"
    if config.mode == "w8a8" and not site.grids:
        return "calibration through the predictor never ran it, so it has no activation range"
    if site.sensitivity is not None:
        return f"sensitivity {site.sensitivity:.2e}, below the mask IoU floor {config.min_mask_iou} otherwise"
    return "recorded as float in the recipe"
