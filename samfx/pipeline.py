"""``samfx.optimize``: capture a model, run passes in a checked order, report."""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, find_adapter
from .capture import capture
from .data import DEFAULT_IMAGES
from .fidelity import compare
from .models import first_nonfinite
from .passes.base import PassConfig, PassContext, PassError, get_pass
from .report import OptimizeReport
from .stats import model_stats

__all__ = ["history_of", "optimize", "report_of", "resolve_passes", "structure_digest"]

PassSpec = str | PassConfig


def resolve_passes(passes: Iterable[PassSpec] | PassSpec) -> tuple[list[PassConfig], list[str]]:
    """Turn names and configs into configs, add required passes, check order.

    Returns:
        The configs to run and notes on what was added.

    Raises:
        PassError: an unknown pass, a duplicate, or an order that breaks a
            declared constraint (the message names the order to use).
    """
    if isinstance(passes, (str, PassConfig)):
        passes = [passes]  # one pass, not a sequence of one-letter names
    configs: list[PassConfig] = []
    for item in passes:
        if isinstance(item, str):
            configs.append(get_pass(item).config_cls())
        elif isinstance(item, PassConfig):
            get_pass(item.name)
            configs.append(item)
        else:
            raise PassError(f"a pass is a name or a PassConfig, not {type(item).__name__}: {item!r}")
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PassError(f"passes listed twice: {duplicates}")
    notes: list[str] = []
    index = 0
    while index < len(configs):
        for required in get_pass(configs[index].name).requires:
            if required not in [c.name for c in configs]:
                configs.insert(index, get_pass(required).config_cls())
                notes.append(f"added {required} (required by {configs[index + 1].name})")
                index -= 1
                break
        index += 1
    names = [c.name for c in configs]
    for position, config in enumerate(configs):
        info = get_pass(config.name)
        for earlier in info.requires + info.after:
            if earlier in names and names.index(earlier) > position:
                raise PassError(f"{config.name} must run after {earlier}; got the order {names}")
    return configs, notes


def optimize(
    model: nn.Module,
    passes: Sequence[PassSpec] | PassSpec = ("split_qkv",),
    *,
    adapter: Adapter | None = None,
    fidelity: bool | Iterable[str] = False,
    calibration_images: Sequence[np.ndarray] = (),
    seed: int = 0,
    progress: bool = False,
    model_name: str | None = None,
    replays: Sequence[dict] | None = None,
) -> nn.Module:
    """Return an optimized copy of a SAM-family model; the input is not touched.

    The copy is a drop-in replacement: same class, same forward signatures and
    attributes, so ``SamPredictor``, ``SAM2ImagePredictor`` and Hugging Face
    ``SamModel`` code keep working. Its report is ``optimized.samfx_report``
    (:class:`samfx.report.OptimizeReport`).

    Args:
        model: a model of a supported family (``samfx.adapters.list_adapters()``).
        passes: pass names or configs, e.g. ``["split_qkv"]`` or
            ``[samfx.passes.SplitQKVConfig()]``. Required passes are added and
            the order is checked before anything runs.
        adapter: force a family adapter.
        fidelity: compare against the original on package images (``True`` for
            the defaults, or a list of image names).
        calibration_images: unlabeled images for data-driven passes.
        seed: for passes that sample.
        progress: show progress bars on long steps.
        model_name: the name to put in the report.
        replays: per pass, the replay data of an earlier run (used by :func:`samfx.load`).

    Optimizing an optimized model continues its history: the result carries
    every call's passes (``optimized.samfx_history``), which :func:`samfx.save`
    records and :func:`samfx.load` replays in order. A float16/bfloat16 model is
    optimized as a float32 copy (noted in the report; the ``bf16`` pass lowers
    precision where it is safe).

    Raises:
        PassError: unknown pass or bad order, or weights that are NaN or
            infinite (the tensor is named). CaptureError: the model cannot be
            captured. Any error inside a pass propagates; the input is unchanged.

    Example::

        >>> import samfx
        >>> sam = samfx.models.build("sam_vit_b", small=True)
        >>> fast = samfx.optimize(sam, ["split_qkv"])
        >>> print(fast.samfx_report.passes[0].summary)
        image_encoder: 2 fused qkv -> q, k, v
    """
    configs, notes = resolve_passes(passes)
    if replays is not None and len(replays) != len(configs):
        raise PassError(f"{len(replays)} replay records for {len(configs)} passes")
    if not isinstance(model, nn.Module):
        raise PassError(f"optimize takes a SAM-family nn.Module, not {type(model).__name__}")
    bad = first_nonfinite(model.state_dict())
    if bad:
        raise PassError(f"the model's weights are not finite: {bad}; samfx optimizes only finite weights")
    history = list(getattr(model, "samfx_history", ()))
    low = sorted({str(t.dtype).removeprefix("torch.") for t in model.state_dict().values()
                  if t.is_floating_point() and t.dtype != torch.float32})
    if low and not history:
        # Shape propagation and MAC counting feed float32 example inputs; a float32 copy
        # is what the passes (and bf16, for low precision) expect.
        model = copy.deepcopy(model).float()
        notes.append(f"the input model is in {', '.join(low)}: optimized a float32 copy")
    adapter = adapter or find_adapter(model)
    before = model_stats(model, adapter)
    start = time.perf_counter()
    captured = capture(model, adapter=adapter)
    capture_time = time.perf_counter() - start
    context = PassContext(calibration_images=list(calibration_images), seed=seed, progress=progress)
    from tqdm.auto import tqdm

    reports = []
    for index, config in enumerate(tqdm(configs, desc="passes", unit="pass", disable=not progress)):
        context.replay = replays[index] if replays is not None else None
        start = time.perf_counter()
        result = get_pass(config.name).run(captured, config, context)
        captured = result.model
        captured.recompile()
        result.report.time_s = time.perf_counter() - start
        reports.append(result.report)
    optimized = captured.model
    report = OptimizeReport(
        model=model_name or getattr(model, "samfx_zoo", {}).get("name") or type(model).__name__,
        family=adapter.name,
        passes=reports,
        before=before,
        after=model_stats(optimized, adapter),
        capture_time_s=capture_time,
        notes=notes,
    )
    if fidelity:
        images = DEFAULT_IMAGES if fidelity is True else tuple(fidelity)
        report.fidelity = compare(model, optimized, images, adapter=adapter, progress=progress)
    optimized.samfx_report = report
    optimized.samfx_history = [*history, {
        "passes": [{"config": r.config, "replay": r.replay} for r in reports],
        "input": structure_digest(model),
        "output": structure_digest(optimized),
    }]
    return optimized


def structure_digest(model: nn.Module) -> str:
    """A short SHA-256 of a model's state-dict names, shapes and dtypes: equal
    digests mean the same tensors could be loaded into either."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def history_of(model: nn.Module) -> list[dict[str, Any]]:
    """The passes of every :func:`optimize` call that made ``model``, oldest first."""
    report_of(model)
    return list(model.samfx_history)


def report_of(model: nn.Module) -> OptimizeReport:
    """The report :func:`optimize` attached to ``model``."""
    try:
        return model.samfx_report
    except AttributeError:
        raise PassError("this model did not come from samfx.optimize") from None
