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
from .capture import CapturedModel, capture
from .data import DEFAULT_IMAGES
from .fidelity import compare
from .models import first_nonfinite
from .passes.base import (FidelityFloorError, PassConfig, PassContext, PassError, PassFailed, PassInfo, PassReport,
                          get_pass)
from .report import OptimizeReport
from .stats import model_stats

__all__ = ["DEFAULT_MIN_BOX_IOU", "MAX_ATTEMPTS", "FidelityFloor", "history_of", "optimize", "report_of",
           "resolve_passes", "run_passes", "structure_digest"]

PassSpec = str | PassConfig

#: the default fidelity floor: box-prompt mask IoU against the original on held-out images
DEFAULT_MIN_BOX_IOU = 0.97
#: configs one lossy pass may try against the floor (the first and its back-offs)
MAX_ATTEMPTS = 6


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


class FidelityFloor:
    """Box-prompt mask IoU of a model against the original, on held-out images.

    The original's masks are computed once per image (a
    :class:`samfx.fidelity.CachedPredictor`); each measurement runs the
    candidate's encoder once per image and its boxes in batches
    (:func:`samfx.fidelity.box_masks`, as :func:`samfx.evaluate` does). Box prompts are the kind every SAM family was
    trained with (LiteMedSAM with boxes only).

    Example::

        >>> import samfx
        >>> sam = samfx.models.build("sam_vit_b", small=True)
        >>> floor = FidelityFloor(sam, ["coffee"], min_box_iou=0.97)
        >>> floor.measure(samfx.optimize(sam, ["split_qkv"]))["box_iou"]
        1.0
    """

    def __init__(self, original: nn.Module, images: Sequence[Any], min_box_iou: float,
                 adapter: Adapter | None = None) -> None:
        from .data import ImageSample, image_sample
        from .fidelity import CachedPredictor

        self.min_box_iou = min_box_iou
        self.adapter = adapter or find_adapter(original)
        self.samples = [item if isinstance(item, ImageSample) else image_sample(item) for item in images]
        self.reference = CachedPredictor(self.adapter.predictor(original))

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """``box_iou`` (mean over boxes) and ``box_iou_min`` against the
        original, ``gt_miou`` (and the original's) where the images have ground
        truth, ``boxes``."""
        from .fidelity import box_masks, mask_ious

        candidate = self.adapter.predictor(model)
        ious: list[np.ndarray] = []
        truths: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        with torch.no_grad():
            for sample in self.samples:
                prompts = [p for p in sample.prompts if p.kind == "box"]
                if not prompts:
                    continue
                boxes = np.array([p.coords for p in prompts], np.float32)
                pixels = sample.image.shape[0] * sample.image.shape[1]
                masks = []
                for predictor in (self.reference, candidate):
                    predictor.set_image(sample.image)
                    masks.append(box_masks(predictor, boxes, pixels))
                ious.append(mask_ious(masks[1], masks[0]))
                if sample.has_ground_truth:
                    truth = np.stack([sample.objects[p.object_index] for p in prompts])
                    truths[0].append(mask_ious(masks[1], truth))
                    truths[1].append(mask_ious(masks[0], truth))
        if not ious:
            raise PassError(f"the held-out images {[s.name for s in self.samples]} give no box prompt to measure")
        every = np.concatenate(ious)
        gt = [float(np.concatenate(t).mean()) if t else None for t in truths]
        return {"box_iou": float(every.mean()), "box_iou_min": float(every.min()), "gt_miou": gt[0],
                "gt_miou_original": gt[1], "boxes": len(every)}

    def record(self) -> dict[str, Any]:
        return {"min_box_iou": self.min_box_iou, "images": [s.name for s in self.samples]}


def _restore(captured: CapturedModel, state: CapturedModel) -> None:
    """Make ``captured`` the model ``state`` holds (the caller keeps ``captured``)."""
    vars(captured).update(vars(copy.deepcopy(state)))


def _run_one(captured: CapturedModel, info: PassInfo, config: PassConfig, context: PassContext) -> PassReport:
    """One pass on ``captured`` with the pipeline's checks; what it reported."""
    result = info.run(captured, config, context)
    if result.model is not captured:
        raise TypeError("it returned another model (a pass rewrites the captured model in place)")
    for component in captured.components.values():
        component.check()
    if info.ensures is not None:
        info.ensures(captured, config)
    return result.report


def _options(config: PassConfig, tried: Sequence[PassConfig]) -> str:
    """The options of ``config`` that vary among the configs ``tried``."""
    options = [c.to_dict()["options"] for c in tried]
    varying = [k for k in options[0] if any(o[k] != options[0][k] for o in options)]
    mine = config.to_dict()["options"]
    return ", ".join(f"{k}={mine[k]}" for k in varying) or "as given"


def _guarded(captured: CapturedModel, info: PassInfo, config: PassConfig, context: PassContext,
             floor: FidelityFloor, earlier: list[str]) -> PassReport:
    """Run a lossy pass, backing off until the floor holds; ``captured`` is left
    as before the pass if it never does.

    Raises:
        FidelityFloorError: below the floor with every config the back-off offered.
        PassFailed: an error inside the pass.
    """
    before = copy.deepcopy(captured)
    attempts: list[dict[str, Any]] = []
    tried: list[PassConfig] = []
    current = config
    while True:
        tried.append(current)
        start = time.perf_counter()
        try:
            report = _run_one(captured, info, current, context)
        except Exception as err:
            _restore(captured, before)
            raise PassFailed(f"pass {current.name} failed after {earlier}: {err}") from err
        attempt = {"options": current.to_dict()["options"], "changed": report.changed}
        if report.changed:
            attempt.update(floor.measure(captured.model))
        attempt["time_s"] = time.perf_counter() - start
        attempts.append(attempt)
        if report.changed and attempt["box_iou"] >= floor.min_box_iou:
            break
        if not report.changed and len(attempts) == 1:
            break  # the pass found nothing to do: nothing to guard
        weaker = (info.backoff(current) if info.backoff is not None and report.changed
                  and len(attempts) < MAX_ATTEMPTS else None)
        _restore(captured, before)
        if weaker is None:
            raise FidelityFloorError(_refusal(info, tried, attempts, floor), info.name, floor.min_box_iou, attempts)
        current = weaker
    report.config = current.to_dict()
    report.fidelity_floor = {**floor.record(), "boxes": attempts[-1].get("boxes"), "attempts": attempts,
                             "backed_off": len(attempts) > 1}
    return report


def _refusal(info: PassInfo, tried: list[PassConfig], attempts: list[dict[str, Any]], floor: FidelityFloor) -> str:
    measured = [(c, a) for c, a in zip(tried, attempts) if "box_iou" in a]
    best = max((a for _, a in measured), key=lambda a: a["box_iou"])
    tried_text = "; ".join(f"{_options(c, tried)}: {a['box_iou']:.4f}" for c, a in measured)
    ended = ("the last weaker config changed nothing" if not attempts[-1]["changed"] else
             f"{MAX_ATTEMPTS} configs tried" if len(attempts) == MAX_ATTEMPTS else
             "nothing weaker is left" if info.backoff is not None else "the pass has no weaker config")
    return (f"{info.name} keeps a box-prompt mask IoU of at most {best['box_iou']:.4f} against the original on "
            f"{len(floor.samples)} held-out images ({best['boxes']} boxes), below the floor {floor.min_box_iou} "
            f"(tried {tried_text}; {ended}). Try a gentler config of {info.name}, samfx.distill to recover the "
            "masks after it, or min_box_iou=None (CLI: --min-box-iou none) to accept the loss")


def run_passes(
    captured: CapturedModel,
    configs: Sequence[PassConfig],
    context: PassContext | None = None,
    *,
    replays: Sequence[dict] | None = None,
    progress: bool = False,
    original: nn.Module | None = None,
) -> list[PassReport]:
    """Run resolved passes in order on ``captured`` (which they rewrite in place).

    Each pass's report gets its name, config and wall time. After each pass the
    model is checked: every graph of every component is linted and run on the
    meta device (no computation), then the pass's own ``ensures`` runs.

    With ``context.min_box_iou`` set (and no ``replays``), every lossy pass
    (:attr:`PassInfo.guarded`) is then held to the fidelity floor: its
    output's box-prompt mask IoU against ``original`` (default: the model as
    it was before the first lossy pass) on ``context.held_out_set()`` must
    reach ``min_box_iou``. Below it, the pass is re-run from the model before
    it with its back-off's next weaker config (:attr:`PassInfo.backoff`),
    until the floor holds (at most :data:`MAX_ATTEMPTS` configs); the config
    kept and every attempt are in the report (``config``, ``fidelity_floor``).

    Raises:
        PassFailed: a pass raised or left a model that fails a check; the message
            names the pass and the passes before it, the original error is the cause.
        FidelityFloorError: a lossy pass stayed below the floor with every
            config tried; ``captured`` is as it was before that pass.

    Example::

        >>> import samfx
        >>> from samfx.pipeline import resolve_passes, run_passes
        >>> captured = samfx.capture(samfx.models.build("sam_vit_b", small=True))
        >>> configs, _ = resolve_passes(["fuse_attention"])
        >>> [(r.name, r.changed) for r in run_passes(captured, configs)]
        [('fuse_attention', True)]
    """
    context = context or PassContext()
    from tqdm.auto import tqdm

    guard = context.min_box_iou is not None and replays is None
    floor: FidelityFloor | None = None
    reports: list[PassReport] = []
    for index, config in enumerate(tqdm(configs, desc="passes", unit="pass", disable=not progress)):
        info = get_pass(config.name)
        context.replay = replays[index] if replays is not None else None
        earlier = [r.name for r in reports]
        start = time.perf_counter()
        if guard and info.guarded:
            if floor is None:
                if not {"prompt_encoder", "mask_decoder"} <= set(captured.components):
                    raise PassError(f"{info.name} is lossy and the fidelity floor measures box masks, but this "
                                    f"{captured.adapter.name} model has only {sorted(captured.components)}; "
                                    "optimize the whole model, or pass min_box_iou=None to run it unguarded")
                held_out = context.held_out_set()
                # Without calibration images, data-driven passes calibrate on their own package photos.
                own = {name for c in configs if get_pass(c.name).data_driven and not context.calibration_images
                       for name in getattr(c, "images", ())}
                overlap = [item for item in held_out if isinstance(item, str) and item in own]
                if overlap:
                    raise PassError(f"the held-out images {overlap} are calibration photos of the passes: the "
                                    "fidelity floor is measured on images no pass calibrates on; give others")
                floor = FidelityFloor(original if original is not None else copy.deepcopy(captured.model),
                                      held_out, context.min_box_iou, captured.adapter)
            report = _guarded(captured, info, config, context, floor, earlier)
        else:
            try:
                report = _run_one(captured, info, config, context)
            except Exception as err:  # any error inside a pass: name the pass and what ran before it
                raise PassFailed(f"pass {config.name} failed after {earlier}: {err}") from err
            report.config = config.to_dict()
        report.name, report.time_s = config.name, time.perf_counter() - start
        reports.append(report)
    return reports


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
    min_box_iou: float | None = DEFAULT_MIN_BOX_IOU,
    held_out_images: Sequence[Any] | None = None,
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
        min_box_iou: the fidelity floor every lossy pass is held to: box-prompt
            mask IoU of the result against ``model`` on held-out images (see
            :func:`run_passes`; a pass below it backs off to a weaker config, or
            the call refuses). ``None`` runs lossy passes unguarded.
        held_out_images: images the floor is measured on (names, files,
            directories, globs, arrays, or :class:`samfx.data.ImageSample`);
            never calibration images. Default: the package's fidelity photos
            that are not calibration images.

    Optimizing an optimized model continues its history: the result carries
    every call's passes (``optimized.samfx_history``), which :func:`samfx.save`
    records and :func:`samfx.load` replays in order. A float16/bfloat16 model is
    optimized as a float32 copy (noted in the report; the ``bf16`` pass lowers
    precision where it is safe).

    Raises:
        PassError: unknown pass or bad order, or weights that are NaN or
            infinite (the tensor is named). CaptureError: the model cannot be
            captured. PassFailed: an error inside a pass (see :func:`run_passes`);
            the input is unchanged. FidelityFloorError: a lossy pass stayed
            below ``min_box_iou`` with every weaker config it offered.

    Example::

        >>> import samfx
        >>> sam = samfx.models.build("sam_vit_b", small=True)
        >>> fast = samfx.optimize(sam, ["split_qkv"])
        >>> print(fast.samfx_report.passes[0].summary)
        image_encoder: 2 fused qkv -> q, k, v
    """
    configs, notes = resolve_passes(passes)
    if min_box_iou is not None and (isinstance(min_box_iou, bool) or not isinstance(min_box_iou, (int, float))
                                    or not 0 < min_box_iou <= 1):
        raise PassError(f"min_box_iou is a mask IoU in (0, 1], or None for no floor; got {min_box_iou!r}")
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
    from .data import ImageSample, expand_images

    held_out: list[Any] = []
    for item in held_out_images or ():
        held_out += [item] if isinstance(item, ImageSample) else expand_images([item], "held-out images")
    context = PassContext(calibration_images=list(calibration_images), seed=seed, progress=progress,
                          min_box_iou=None if replays is not None else min_box_iou, held_out_images=held_out)
    reports = run_passes(captured, configs, context, replays=replays, progress=progress, original=model)
    if min_box_iou is None and replays is None and any(r.changed and get_pass(r.name).guarded for r in reports):
        notes.append("no fidelity floor (min_box_iou=None): the lossy passes ran unguarded")
    optimized = captured.model
    report = OptimizeReport(
        model=model_name or getattr(model, "samfx_zoo", {}).get("name") or type(model).__name__,
        family=adapter.name,
        passes=reports,
        before=before,
        after=model_stats(optimized, adapter),
        capture_time_s=capture_time,
        notes=notes,
        min_box_iou=context.min_box_iou,
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
