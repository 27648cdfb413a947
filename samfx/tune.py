"""``samfx.tune``: the fastest (or smallest) recipe that keeps the user's masks,
found on the user's images, measured on the runtime it will run on.

The search, within a wall-clock budget:

1. **Reference.** The original model on the target runtime (exported for
   onnxruntime and OpenVINO): its latency is what every candidate is timed
   against, side by side in one :func:`samfx.bench.interleaved` call (so a
   ratio survives a machine whose load drifts), and its box masks in PyTorch
   are what fidelity is measured against.
2. **Known-good starts.** The exact passes together, the presets made for the
   model (:mod:`samfx.presets`), then each lossy pass at its usual setting on
   top of the exact ones (``quantize``; ``prune`` MLP 20% by fluctuation;
   ``hyper`` at 2% error; ``bf16`` where the CPU has it natively;
   ``token_cluster`` where the encoder has windowed token stages).
3. **Refinement.** From the fastest candidates first: a candidate that meets
   the floor is pushed one step further on each knob (a larger prune ratio,
   fewer quantize layers kept float, a larger hyper error, earlier and fewer
   token clusters), gets another lossy pass added, or an exact pass toggled; one
   below the floor backs off one step on each knob (or drops a lossy pass).
   Categorical options (prune importance, quantize roles and activation
   ranges) are tried as alternatives.

Each candidate is ``samfx.optimize``-d on the calibration images, exported
and loaded in the runtime, timed (encoder + all the boxes of an image in one
batched decoder call) and evaluated on held-out images (box-prompt mask IoU
against the original; ground-truth mIoU with annotations). Candidates that
cannot beat the front are not measured in full: one at least as aggressive
as a candidate below the floor is skipped, and one more aggressive than its
parent whose latency (or size) already loses to a front member at least as
faithful as that parent is not evaluated. A pass that changes nothing on the
model leaves the search. The budget is checked between the stages of a
candidate, so a search cut by it (or by Ctrl-C) returns its best so far (the
original model, at worst).

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> result = samfx.tune(sam, runtime="torch", min_box_iou=0.5, budget=5, images=["coins", "chelsea"])  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .bench import _checkpoint_bytes, interleaved, markdown_table, write_results
from .machine import cpu_isa
from .passes import PassConfig, format_value, get_pass, list_passes, parse_passes
from .pipeline import optimize

__all__ = ["OBJECTIVES", "RUNTIMES", "Floor", "TuneCandidate", "TuneError", "TuneResult", "format_passes",
           "pareto_front", "parse_budget", "read_recipe", "recipe_calibration", "tune"]

#: What the search minimises.
OBJECTIVES = ("latency", "size")
#: Where candidates are timed: torch eager, or an export loaded by :func:`samfx.runtime.load`.
RUNTIMES = ("torch", "onnxruntime", "openvino")
_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}
RECIPE_KIND = "samfx-tune-recipe"

#: Per lossy pass, the options the search steps along, each from mild to aggressive.
LADDERS: dict[str, dict[str, tuple[Any, ...]]] = {
    "prune": {"mlp": (0.1, 0.2, 0.3, 0.4, 0.5)},
    "quantize": {"min_mask_iou": (0.995, 0.99, 0.98, None)},  # None: every layer int8
    "hyper": {"rel_error": (0.01, 0.015, 0.02, 0.03, 0.05)},
    "bf16": {"roles": (("image_encoder",), ("image_encoder", "mask_decoder"))},
}
#: Categorical options, each value tried as an alternative.
CHOICES: dict[str, dict[str, tuple[Any, ...]]] = {
    "prune": {"importance": ("fluctuation", "taylor", "magnitude")},
    "quantize": {"roles": (("image_encoder", "mask_decoder"), ("image_encoder",)),
                 "activation_range": ("mean_minmax", "mse")},
}
#: Lossy passes that rewrite the same weights: never in one candidate.
_EXCLUSIVE = ({"hyper", "quantize"}, {"hyper", "bf16"})
_BUDGET_UNITS = {"s": 1, "m": 60, "h": 3600}
_LOSSY_ORDER = ("token_cluster", "prune", "hyper", "quantize", "bf16")
#: Which lossy pass to start from first, per objective (the likeliest gains first).
_START_ORDER = {"latency": ("quantize", "bf16", "prune", "token_cluster", "hyper"),
                "size": ("quantize", "hyper", "prune", "token_cluster")}


class TuneError(ValueError):
    """Bad tuning options, or a recipe file that cannot be replayed."""


class _OutOfTime(Exception):
    """The budget ran out between two stages of a candidate."""


def parse_budget(text: str | float | int) -> float:
    """Seconds in a budget written ``90``, ``90s``, ``20m``, ``1h30m`` or ``1.5h``.

    Example::

        >>> parse_budget("20m"), parse_budget("1h30m"), parse_budget(45)
        (1200.0, 5400.0, 45.0)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        spec = str(text).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh]?)", spec)
        if not spec or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", spec):
            raise TuneError(f"a budget is a duration like 90s, 20m or 1h30m, got {text!r}")
        seconds = sum(float(number) * _BUDGET_UNITS[unit or "s"] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise TuneError(f"the budget must be a positive duration, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Floor:
    """What a candidate must keep: box-prompt mask IoU against the original of at
    least ``min_box_iou`` (mean over the held-out boxes), or, with annotations,
    a ground-truth mIoU at most ``max_gt_miou_loss`` below the original's
    (a fraction: 0.01 is one point)."""

    min_box_iou: float | None = 0.97
    max_gt_miou_loss: float | None = None

    def __post_init__(self) -> None:
        if (self.min_box_iou is None) == (self.max_gt_miou_loss is None):
            raise TuneError("give one floor: min_box_iou, or max_gt_miou_loss (with annotations)")
        if self.min_box_iou is not None and not 0 < self.min_box_iou <= 1:
            raise TuneError(f"min_box_iou is a mask IoU in (0, 1], got {self.min_box_iou}")
        if self.max_gt_miou_loss is not None and not 0 <= self.max_gt_miou_loss < 1:
            raise TuneError(f"max_gt_miou_loss is a fraction of mIoU in [0, 1) (0.01: one point), "
                            f"got {self.max_gt_miou_loss}")

    @property
    def metric(self) -> str:
        """The fidelity figure the floor is on: ``box_iou`` or ``gt_miou``."""
        return "box_iou" if self.min_box_iou is not None else "gt_miou"

    def met(self, candidate: "TuneCandidate") -> bool:
        if self.min_box_iou is not None:
            return candidate.box_iou is not None and candidate.box_iou >= self.min_box_iou
        return (candidate.gt_miou is not None and candidate.gt_miou_original is not None
                and candidate.gt_miou_original - candidate.gt_miou <= self.max_gt_miou_loss)

    def describe(self) -> str:
        if self.min_box_iou is not None:
            return f"box IoU vs original >= {self.min_box_iou}"
        return f"GT mIoU loss <= {100 * self.max_gt_miou_loss:.2f} points"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_passes(configs: Sequence[PassConfig]) -> str:
    """A pass list in the option syntax of :func:`samfx.passes.parse_passes`,
    each option written only where it differs from the default.

    Example::

        >>> import samfx
        >>> format_passes([samfx.ShareImageSideConfig(), samfx.PruneConfig(mlp=0.3, importance="fluctuation")])
        'share_image_side,prune:mlp=0.3:importance=fluctuation'
    """
    items = []
    for config in configs:
        default = type(config)()
        options = [f"{f.name}={format_value(getattr(config, f.name))}" for f in dataclasses.fields(config)
                   if getattr(config, f.name) != getattr(default, f.name)]
        items.append(":".join([config.name, *options]))
    return ",".join(items)


@dataclass
class TuneCandidate:
    """One recipe the search tried, and what it measured.

    Attributes:
        index: order of trial (0: the original model).
        passes: the pass list in the option syntax (empty: the original).
        origin: why it was tried (``start``, ``preset NAME``, or the move from its parent).
        parent: the index of the candidate it was derived from.
        status: ``measured``, ``failed`` (an error, in ``note``), ``pruned``
            (cannot beat the front: ``note`` says why), ``no change`` (a pass
            changed nothing) or ``cut`` (the budget ran out).
        latency_s: median seconds of the encoder and all the boxes of the timing image.
        speedup: the original's latency over this one's, timed side by side.
        size_bytes: size on disk (the export, or ``samfx.save``'s checkpoint for torch).
        box_iou, box_iou_min: box-prompt mask IoU against the original (mean, worst).
        gt_miou, gt_miou_original: ground-truth mIoU of this candidate and of the original.
        meets_floor: whether it keeps the floor.
        started_s: when it started, in seconds from the start of the search.
        seconds: wall time spent on it; ``stages``: of which optimizing, deploying
            (export and load), timing and evaluating.
    """

    index: int
    passes: str
    origin: str
    parent: int | None = None
    status: str = "measured"
    latency_s: float | None = None
    speedup: float | None = None
    size_bytes: int | None = None
    box_iou: float | None = None
    box_iou_min: float | None = None
    gt_miou: float | None = None
    gt_miou_original: float | None = None
    meets_floor: bool = False
    note: str = ""
    started_s: float = 0.0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        candidates: every candidate tried, in order.
        front: the Pareto front (objective against fidelity) of the candidates
            that meet the floor, best objective first.
        best: the front member with the best objective.
        recipe: the best recipe as :meth:`save_recipe` writes it.
        best_model: the best candidate's optimized model (``None`` for the original).
        cut: whether the budget stopped the search (else it ran out of candidates).
    """

    candidates: list[TuneCandidate]
    front: list[TuneCandidate]
    best: TuneCandidate
    recipe: dict[str, Any]
    objective: str
    runtime: str
    floor: Floor
    budget_s: float
    elapsed_s: float
    cut: bool
    images: dict[str, Any]
    best_model: nn.Module | None = field(default=None, repr=False)

    def table(self) -> str:
        """The Pareto front as Markdown, with the machine and the budget."""
        columns = [("#", "index", "{}"), ("passes", lambda r: r["passes"] or "(original)", "{}"),
                   ("x original", "speedup", "{:.2f}x"), ("latency ms", lambda r: _scaled(r["latency_s"], 1e3),
                                                          "{:.1f}"),
                   ("MB", lambda r: _scaled(r["size_bytes"], 1e-6), "{:.1f}"),
                   ("box IoU vs original", "box_iou", "{:.4f}"), ("worst box", "box_iou_min", "{:.4f}"),
                   ("GT mIoU", lambda r: _scaled(r["gt_miou"], 100), "{:.1f}")]
        isa = self.recipe["isa"]
        tried = sum(c.status != "pruned" for c in self.candidates)
        return (markdown_table([c.to_dict() for c in self.front], columns)
                + f"\n\nPareto front of {len(self.front)} among {len(self.candidates)} candidates ({tried} run), "
                  f"{self.floor.describe()}, {self.objective} on {self.runtime}, {self.recipe['threads']} threads, "
                  f"{isa['summary']}; {self.elapsed_s:.0f} s of a {self.budget_s:.0f} s budget"
                  + (" (cut by the budget)" if self.cut else ""))

    def save_recipe(self, path: str | Path) -> Path:
        """Write the best recipe as JSON (replay: ``samfx optimize --recipe FILE``)."""
        return write_results(path, self.recipe)

    def save(self, path: str | Path) -> Path:
        """Write every candidate, the front and the recipe as JSON."""
        return write_results(path, {"recipe": self.recipe, "front": [c.index for c in self.front],
                                    "candidates": [c.to_dict() for c in self.candidates]})

    def plot(self, path: str | Path) -> Path:
        """Speed-up (or size) against fidelity: every candidate run, the front joined, the floor drawn."""
        from .pictures import _matplotlib

        Figure, FigureCanvasAgg = _matplotlib()
        metric = self.floor.metric
        measured = [c for c in self.candidates if c.status == "measured" and getattr(c, metric) is not None
                    and _objective(c, self.objective) is not None]
        fig = Figure(figsize=(7.5, 5.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)

        def x(c: TuneCandidate) -> float:
            return c.speedup if self.objective == "latency" else c.size_bytes / 1e6

        ax.scatter([x(c) for c in measured], [getattr(c, metric) for c in measured], s=30, color="0.7",
                   edgecolor="0.4", label="candidates")
        front = sorted(self.front, key=x)
        ax.plot([x(c) for c in front], [getattr(c, metric) for c in front], "o-", color="tab:blue", label="front")
        for c in front:
            ax.annotate(f"#{c.index}", (x(c), getattr(c, metric)), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        if self.floor.min_box_iou is not None:
            ax.axhline(self.floor.min_box_iou, color="tab:red", linestyle="--", linewidth=0.8, label="floor")
        ax.set_xlabel("speed-up vs original (x, side by side)" if self.objective == "latency" else "MB on disk")
        ax.set_ylabel("box mask IoU vs original" if metric == "box_iou" else "GT mIoU")
        ax.set_title(f"samfx tune: {self.objective} on {self.runtime}", fontsize=10)
        ax.grid(True, linewidth=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _objective(candidate: TuneCandidate, objective: str) -> float | None:
    """Lower is better: latency relative to the original's (side by side), or bytes."""
    if objective == "latency":
        return None if not candidate.speedup else 1.0 / candidate.speedup
    return None if candidate.size_bytes is None else float(candidate.size_bytes)


def _fidelity(candidate: TuneCandidate, floor: Floor) -> float | None:
    return getattr(candidate, floor.metric)


def pareto_front(candidates: Sequence[TuneCandidate], objective: str, floor: Floor) -> list[TuneCandidate]:
    """The candidates that meet the floor and that no other such candidate
    dominates (as good on objective and fidelity, better on one), best objective first."""
    feasible = [c for c in candidates if c.status == "measured" and c.meets_floor
                and _objective(c, objective) is not None and _fidelity(c, floor) is not None]

    def dominates(a: TuneCandidate, b: TuneCandidate) -> bool:
        oa, ob, fa, fb = _objective(a, objective), _objective(b, objective), _fidelity(a, floor), _fidelity(b, floor)
        return oa <= ob and fa >= fb and (oa < ob or fa > fb)

    front = [c for c in feasible if not any(dominates(o, c) for o in feasible if o is not c)]
    return sorted(front, key=lambda c: (_objective(c, objective), -_fidelity(c, floor), c.index))


class _ExportedBoxes:
    """An export in its runtime as :func:`samfx.evaluate` runs it: all boxes in one decoder call."""

    def __init__(self, predictor: Any, trained_prompts: Sequence[str]) -> None:
        self.predictor, self.trained_prompts = predictor, tuple(trained_prompts)

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks, scores, _ = self.predictor.predict(box=np.asarray(boxes, np.float32).reshape(-1, 4))
        return masks[:, 0], scores[:, 0]


def _order(configs: Sequence[PassConfig]) -> list[PassConfig]:
    """Configs in an order every pass's ``requires`` and ``after`` accept."""
    # Exact rewrites first, then the lossy ones from structural to numeric, as the presets run them.
    rank = {name: index for index, name in enumerate(_LOSSY_ORDER)}
    remaining = sorted(configs, key=lambda c: (not get_pass(c.name).exact, rank.get(c.name, len(rank))))
    ordered: list[PassConfig] = []
    while remaining:
        names = {c.name for c in remaining}
        ready = next((c for c in remaining
                      if not (set(get_pass(c.name).requires) | set(get_pass(c.name).after)) & (names - {c.name})),
                     remaining[0])
        ordered.append(ready)
        remaining.remove(ready)
    return ordered


def _aggressive_at_least(a: Sequence[PassConfig], b: Sequence[PassConfig]) -> bool:
    """Whether recipe ``a`` is at least as lossy as ``b`` on every knob the search steps:
    the same exact passes (``split_qkv`` changes what ``quantize`` calibrates), each
    lossy pass of ``b`` with the same other options, each ladder option as far or further."""
    mine = {c.name: c for c in a}
    if {c.name for c in a if get_pass(c.name).exact} != {c.name for c in b if get_pass(c.name).exact}:
        return False
    for config in b:
        if get_pass(config.name).exact:
            continue
        other = mine.get(config.name)
        if other is None:
            return False
        ladders = LADDERS.get(config.name, {})
        for option in dataclasses.fields(config):
            ours, theirs = getattr(other, option.name), getattr(config, option.name)
            if option.name in ladders:
                ladder = ladders[option.name]
                if ours not in ladder or theirs not in ladder or ladder.index(ours) < ladder.index(theirs):
                    return False
            elif ours != theirs:
                return False
    return True


@dataclass
class _Space:
    """The passes and knobs the search may use on this model and runtime."""

    exact: list[str]
    starts: dict[str, PassConfig]
    ladders: dict[str, dict[str, tuple[Any, ...]]]
    objective: str

    def neighbours(self, configs: list[PassConfig], feasible: bool) -> list[tuple[list[PassConfig], str, bool]]:
        """``(configs, move, bounded)``: recipes one move away; ``bounded`` when the
        move cannot raise fidelity (a step further, an added pass)."""
        out: list[tuple[list[PassConfig], str, bool]] = []
        names = {c.name for c in configs}

        def swap(old: PassConfig, new: PassConfig) -> list[PassConfig]:
            return [new if c is old else c for c in configs]

        for config in configs:
            for option, ladder in self.ladders.get(config.name, {}).items():
                value = getattr(config, option)
                if value not in ladder:
                    continue
                step = ladder.index(value) + (1 if feasible else -1)
                if 0 <= step < len(ladder):
                    new = dataclasses.replace(config, **{option: ladder[step]})
                    out.append((swap(config, new), f"{config.name} {option} {format_value(value)} -> "
                                                  f"{format_value(ladder[step])}", feasible))
            for option, choices in CHOICES.get(config.name, {}).items():
                for choice in choices:
                    if choice != getattr(config, option):
                        new = dataclasses.replace(config, **{option: choice})
                        out.append((swap(config, new), f"{config.name} {option} -> {format_value(choice)}", False))
        lossy = [c for c in configs if not get_pass(c.name).exact]
        if feasible:
            for name, start in self.starts.items():
                if name not in names and not any({name, other} <= pair for other in names for pair in _EXCLUSIVE):
                    out.append((_order([*configs, start]), f"+ {format_passes([start])}", True))
            for name in self.exact if self.objective == "latency" else ():
                if name not in names:
                    out.append((_order([*configs, get_pass(name).config_cls()]), f"+ {name}", True))
        elif len(lossy) > 1:
            for config in lossy:
                out.append(([c for c in configs if c is not config], f"- {config.name}", False))
        for config in configs:
            if config.name in self.exact and self.objective == "latency":
                out.append(([c for c in configs if c is not config], f"- {config.name}", False))
        return out


def _token_cluster_start(model: nn.Module, adapter: Any) -> tuple[PassConfig, dict[str, tuple[Any, ...]]] | None:
    """token_cluster's start and ladders from the encoder's windowed token stages (``None``: none)."""
    from .passes import TokenClusterConfig

    for spec in adapter.components(model):
        if spec.role != "image_encoder":
            continue
        root = model.get_submodule(spec.path) if spec.path else model
        stages = [s for s in adapter.token_stages(root) if s.layout == "map" and any(s.windows)]
        if not stages:
            return None
        stage = max(stages, key=lambda s: len(s.indices))
        window = max(stage.windows)
        indices = stage.indices
        locations = tuple(dict.fromkeys(indices[int(len(indices) * f)] for f in (0.75, 0.5, 0.25)))
        clusters = tuple(dict.fromkeys(c for c in ((3 * window // 4) ** 2, (window // 2) ** 2) if c >= 1))
        if not clusters or len(indices) < 2:
            return None
        start = TokenClusterConfig(location=locations[0], clusters=clusters[0])
        return start, {"location": locations, "clusters": clusters}
    return None


def _space(model: nn.Module, adapter: Any, runtime: str, objective: str) -> _Space:
    from .passes import BF16Config, HyperConfig, PruneConfig, QuantizeConfig

    exact = [info.name for info in list_passes() if info.exact]
    starts: dict[str, PassConfig] = {"quantize": QuantizeConfig(),
                                     "prune": PruneConfig(mlp=0.2, importance="fluctuation"),
                                     "hyper": HyperConfig(rel_error=0.02)}
    ladders = {name: dict(options) for name, options in LADDERS.items()}
    # bf16 only where it is native (emulated it is slower than float32); onnxruntime's CPU provider runs float32.
    if cpu_isa()["native_bf16"] and runtime != "onnxruntime":
        starts["bf16"] = BF16Config(roles=("image_encoder",))
    clustering = _token_cluster_start(model, adapter)
    if clustering is not None:
        starts["token_cluster"], ladders["token_cluster"] = clustering
    # bf16 is exported in float32 whatever its compute precision: no size to gain.
    starts = {name: starts[name] for name in _START_ORDER[objective] if name in starts}
    return _Space(exact, starts, ladders, objective)


def _images(images: Sequence[Any] | None, calibration: Sequence[Any] | None, annotations: str | Path | None,
            held_out: float, seed: int) -> tuple[list[np.ndarray], list[Any], dict[str, Any]]:
    """Calibration arrays, held-out evaluation samples, and the record of which image did what."""
    from .data import DEFAULT_IMAGES, image_digest, image_sample, separate_images, split_images
    from .distillation import DEFAULT_TRAINING_IMAGES

    if annotations is not None:
        from .annotations import read_annotations

        if images is not None and len(images) != 1:
            raise TuneError("with annotations, images is the one folder that holds the annotated image files")
        found = read_annotations(annotations, images[0] if images else None)
        items = list(found)
        if calibration:
            split = separate_images(calibration, [item.image for item in items])
        else:
            split = split_images([item.image for item in items], held_out=held_out, seed=seed)
        digests = [image_digest(item.image) for item in items]
        held = {image_digest(image) for image in split.evaluation}
        samples = [item for item, digest in zip(items, digests) if digest in held]
        names = dict(zip(digests, (item.name for item in items)))
        record = {**split.record(), "evaluation": [item.name for item in samples], "annotations": str(annotations),
                  "calibration": [names.get(image_digest(image), name)
                                  for image, name in zip(split.calibration, split.calibration_names)]}
        return split.calibration, samples, record
    if images is None and calibration is None:
        split = separate_images(list(DEFAULT_TRAINING_IMAGES), list(DEFAULT_IMAGES))
    elif calibration is not None:
        split = separate_images(calibration, images or list(DEFAULT_IMAGES))
    else:
        split = split_images(images, held_out=held_out, seed=seed)
    # By name where there is one: a package photo keeps its ground truth.
    samples = [image_sample(image if name.startswith("sha256:") else name)
               for image, name in zip(split.evaluation, split.evaluation_names)]
    return split.calibration, samples, split.record()


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed

    def check(self) -> None:
        if self.left <= 0:
            raise _OutOfTime

    def stamp(self) -> str:
        def mmss(s: float) -> str:
            return f"{int(s) // 60}:{int(s) % 60:02d}"
        return f"[{mmss(self.elapsed)}/{mmss(self.budget_s)}]"


def tune(
    model: nn.Module,
    *,
    objective: str = "latency",
    runtime: str = "openvino",
    min_box_iou: float | None = 0.97,
    max_gt_miou_loss: float | None = None,
    images: Sequence[Any] | None = None,
    calibration: Sequence[Any] | None = None,
    annotations: str | Path | None = None,
    held_out: float = 0.5,
    split_seed: int = 0,
    budget: float | str = "20m",
    threads: int | None = None,
    repeats: int = 3,
    model_name: str | None = None,
    small: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> TuneResult:
    """Search pass lists and their options for the best ``objective`` that keeps the floor.

    Args:
        model: a model of a supported family (not modified).
        objective: ``"latency"`` (encoder + all boxes of an image on ``runtime``) or ``"size"`` (bytes on disk).
        runtime: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        min_box_iou: the floor on box-prompt mask IoU against the original (held-out mean).
        max_gt_miou_loss: instead, with ``annotations``: the most ground-truth mIoU
            a recipe may lose (a fraction; give ``min_box_iou=None``).
        images: package names, files, directories or globs, split into calibration
            and held-out parts (``held_out``, ``split_seed``); default: the package
            photos the presets calibrate on, and coins, astronaut and coffee held out.
        calibration: calibration images given apart (``images`` then are all held out).
        annotations: COCO / SA-1B / MedSAM npz ground truth (``images``: their folder).
        budget: seconds, or a duration like ``"20m"``; checked between the stages of a candidate.
        threads: threads of torch and of the runtime (default: torch's current count).
        repeats: timed runs per candidate (medians, interleaved with the original).
        model_name, small: recorded in the recipe, so ``samfx optimize --recipe`` can rebuild the model.
        work_dir: where exports go (default: a temporary directory).
        progress: one line per candidate on stderr.

    Returns:
        A :class:`TuneResult`: every candidate, the Pareto front, the best recipe.

    Raises:
        TuneError: an unknown objective or runtime, a bad floor or budget.
    """
    from .adapters import find_adapter
    from .emit import runtime as exported_runtime
    from .emit.export import export
    from .evaluation import evaluate
    from .fidelity import CachedPredictor

    if objective not in OBJECTIVES:
        raise TuneError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if runtime not in RUNTIMES:
        raise TuneError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    floor = Floor(min_box_iou, max_gt_miou_loss)
    if floor.metric == "gt_miou" and annotations is None:
        raise TuneError("a floor on ground-truth mIoU needs annotations; without them, use min_box_iou")
    budget_s = parse_budget(budget)
    if repeats < 1:
        raise TuneError(f"repeats must be >= 1, got {repeats}")
    clock = _Clock(budget_s)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model_name = model_name or getattr(model, "samfx_zoo", {}).get("name")
    adapter = find_adapter(model)
    calibration_arrays, samples, image_record = _images(images, calibration, annotations, held_out, split_seed)
    timing_sample = max((s if hasattr(s, "prompts") else s.sample() for s in samples),
                        key=lambda s: sum(p.kind == "box" for p in s.prompts))
    timing_image = timing_sample.image
    timing_boxes = np.array([p.coords for p in timing_sample.prompts if p.kind == "box"], np.float32)
    reference = CachedPredictor(adapter.predictor(model))
    trained = getattr(reference, "trained_prompts", ("box",))
    scratch = tempfile.TemporaryDirectory(prefix="samfx-tune-") if work_dir is None else None
    root = Path(scratch.name if scratch else work_dir)
    root.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        if progress:
            print(f"tune {clock.stamp()} {text}", file=sys.stderr, flush=True)

    say(f"{objective} on {runtime}, {floor.describe()}; {len(calibration_arrays)} calibration images, "
        f"{len(samples)} held out ({', '.join(image_record['evaluation'][:6])}); timing on "
        f"{timing_sample.name} with {len(timing_boxes)} boxes, {threads} threads")

    def deployed(candidate_model: nn.Module, label: str) -> tuple[Callable[[], object], Any, int | None]:
        """(one timed unit of work, a predictor for evaluate, bytes on disk)."""
        if runtime == "torch":
            predictor = adapter.predictor(candidate_model)
            size = None
            if objective == "size":
                exports.append(root / f"{label}-torch")
                size = _checkpoint_bytes(candidate_model, exports[-1])

            def work() -> object:
                with torch.no_grad():
                    predictor.set_image(timing_image)
                    return predictor.predict_boxes(timing_boxes)
            return work, predictor, size
        directory = root / label
        exports.append(directory)
        result = export(candidate_model, directory, format=_FORMAT[runtime], adapter=adapter, multimask_output=False)
        clock.check()
        loaded = exported_runtime.load(directory, threads=threads)

        def run() -> object:
            loaded.set_image(timing_image)
            return loaded.predict(box=timing_boxes)
        return run, _ExportedBoxes(loaded, trained), sum(result.sizes.values())

    def fidelity(candidate: TuneCandidate, predictor: Any) -> None:
        report = evaluate(predictor, samples, against=reference, adapter=adapter, prompts=("box",))
        box = report.by_prompt["box"]
        candidate.box_iou, candidate.box_iou_min = report.vs_original_miou, box["vs_original_min"]
        candidate.gt_miou, candidate.gt_miou_original = report.gt_miou, report.gt_miou_original
        candidate.meets_floor = floor.met(candidate)

    exports: list[Path] = []  # a candidate's export is removed once it is loaded and measured
    candidates: list[TuneCandidate] = []
    models: dict[int, nn.Module] = {}
    configs_of: dict[int, list[PassConfig]] = {}
    # The original on the runtime: the reference every candidate is timed against.
    original = TuneCandidate(0, "", "the original model")
    start = time.perf_counter()
    stage = _Stages(original)
    reference_work, original_predictor, original_size = deployed(model, "original")
    original.size_bytes = original_size
    stage("deploy")
    # In PyTorch the original is the reference itself: measured once, its masks cached for every candidate.
    fidelity(original, reference if runtime == "torch" else original_predictor)
    stage("evaluate")
    if objective == "latency":
        timing = interleaved({"original": reference_work}, repeats=repeats, warmup=1)
        original.latency_s, original.speedup = timing["original"].median, 1.0
        stage("time")
    original.seconds = time.perf_counter() - start
    candidates.append(original)
    configs_of[0] = []
    say(f"#0 the original: {_line(original, floor)}")
    space = _space(model, adapter, runtime, objective)
    left_out: set[str] = set()  # passes that changed nothing on this model
    seen: set[str] = {""}
    queue: list[tuple[float, int, list[PassConfig], str, int | None, bool]] = []
    order = 0

    def push(priority: float, configs: list[PassConfig], origin: str, parent: int | None, bounded: bool) -> None:
        nonlocal order
        heapq.heappush(queue, (priority, order, configs, origin, parent, bounded))
        order += 1

    # Exact passes change no weight: they matter to latency only.
    exact_all = _order([get_pass(name).config_cls() for name in space.exact]) if objective == "latency" else []
    if exact_all:
        push(-3.0, exact_all, "the exact passes", 0, True)
    from .presets import PRESETS

    for preset in PRESETS.values():
        if model_name and preset.name.startswith(model_name):
            push(-2.0, _order(list(preset.passes)), f"preset {preset.name}", 0, False)
    for name, start_config in space.starts.items():
        push(-1.0, _order([*exact_all, start_config]), f"start: {'exact + ' if exact_all else ''}{name}", 0, False)
    cut = False
    while queue:
        spent = sorted(c.seconds for c in candidates if c.status in ("measured", "failed"))
        # A candidate that cannot finish in the time left is not started: a typical one takes the median.
        if clock.left <= 0.5 * spent[len(spent) // 2]:
            cut = True
            break
        _, _, configs, origin, parent, bounded = heapq.heappop(queue)
        configs = [c for c in configs if c.name not in left_out]
        text = format_passes(configs)
        if text in seen:
            continue
        seen.add(text)
        candidate = TuneCandidate(len(candidates), text, origin, parent, started_s=clock.elapsed)
        candidates.append(candidate)
        blocker = next((c for c in candidates[:-1] if c.status == "measured" and not c.meets_floor
                        and c.index in configs_of and _aggressive_at_least(configs, configs_of[c.index])
                        and any(not get_pass(x.name).exact for x in configs_of[c.index])), None)
        if blocker is not None:
            candidate.status, candidate.note = "pruned", f"at least as lossy as #{blocker.index}, below the floor"
            say(f"#{candidate.index} {text}: pruned, {candidate.note}")
            continue
        start = time.perf_counter()
        try:
            stage = _Stages(candidate)
            # The tuner measures fidelity itself on its held-out images: no floor inside the passes.
            optimized = optimize(model, configs, calibration_images=calibration_arrays, model_name=model_name,
                                 min_box_iou=None)
            stage("optimize")
            idle = [r.name for r in optimized.samfx_report.passes if not r.changed]
            if idle:
                left_out.update(idle)
                candidate.status, candidate.note = "no change", f"{', '.join(idle)} changed nothing on this model"
                say(f"#{candidate.index} {text}: {candidate.note}; left out of the search")
                rest = [c for c in configs if c.name not in left_out]
                if format_passes(rest) not in seen:
                    push(-1.5, rest, f"{origin} without {', '.join(idle)}", parent, bounded)
                continue
            clock.check()
            work, predictor, candidate.size_bytes = deployed(optimized, f"c{candidate.index}")
            stage("deploy")
            clock.check()
            if objective == "latency":
                timing = interleaved({"candidate": work, "original": reference_work}, repeats=repeats, warmup=1)
                candidate.latency_s = timing["candidate"].median
                candidate.speedup = timing["original"].median / timing["candidate"].median
                stage("time")
            clock.check()
            front = pareto_front(candidates, objective, floor)
            parent_fidelity = _fidelity(candidates[parent], floor) if parent is not None else None
            rival = next((f for f in front if bounded and parent_fidelity is not None
                          and _objective(f, objective) <= _objective(candidate, objective)
                          and _fidelity(f, floor) >= parent_fidelity), None)
            if rival is not None:
                candidate.status = "pruned"
                candidate.note = f"cannot beat #{rival.index}: no better {objective}, and at most its parent's fidelity"
            else:
                fidelity(candidate, predictor)
                stage("evaluate")
            del work, predictor
        except (_OutOfTime, KeyboardInterrupt) as stop:  # Ctrl-C cuts the search like the budget
            reason = "the budget ran out" if isinstance(stop, _OutOfTime) else "interrupted"
            candidate.status, candidate.note, cut = "cut", reason, True
            candidate.seconds = time.perf_counter() - start
            say(f"#{candidate.index} {text}: cut ({reason})")
            break
        except Exception as err:  # noqa: BLE001 - a recipe that fails is a result of the search, not its end
            candidate.status, candidate.note = "failed", " ".join(f"{type(err).__name__}: {err}".split())[:300]
            candidate.seconds = time.perf_counter() - start
            say(f"#{candidate.index} {text}: failed ({candidate.note})")
            continue
        finally:
            for directory in exports[1:]:
                shutil.rmtree(directory, ignore_errors=True)
            del exports[1:]
        candidate.seconds = time.perf_counter() - start
        configs_of[candidate.index] = configs
        if candidate.status == "measured":
            models[candidate.index] = optimized
        say(f"#{candidate.index} {text} ({origin}): {_line(candidate, floor)}")
        if candidate.status != "measured":
            continue
        priority = _objective(candidate, objective)
        for moved, move, move_bounded in space.neighbours(configs, candidate.meets_floor):
            push(priority, moved, move, candidate.index, move_bounded)
        # Keep only the models the front may still return.
        keep = {c.index for c in pareto_front(candidates, objective, floor)}
        models = {index: m for index, m in models.items() if index in keep}
    if scratch is not None:
        scratch.cleanup()
    front = pareto_front(candidates, objective, floor)
    best = front[0] if front else original
    recipe = {
        "kind": RECIPE_KIND,
        "version": 1,
        "model": model_name,
        "small": small,
        "family": adapter.name,
        "passes": best.passes,
        "configs": [c.to_dict() for c in configs_of.get(best.index, [])],
        "objective": objective,
        "runtime": runtime,
        "threads": threads,
        "isa": cpu_isa(),
        "floor": floor.to_dict(),
        "budget_s": budget_s,
        "elapsed_s": clock.elapsed,
        "cut": cut,
        "images": image_record,
        "measured": {key: getattr(best, key) for key in ("index", "latency_s", "speedup", "size_bytes", "box_iou",
                                                           "box_iou_min", "gt_miou", "gt_miou_original")},
        "candidates": len(candidates),
    }
    say(f"done: best #{best.index} {best.passes or '(original)'}" + (" (cut by the budget)" if cut else ""))
    return TuneResult(candidates, front, best, recipe, objective, runtime, floor, budget_s, clock.elapsed, cut,
                      image_record, models.get(best.index))


class _Stages:
    """Records the seconds of each stage of a candidate as it ends."""

    def __init__(self, candidate: TuneCandidate) -> None:
        self.candidate, self.last = candidate, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.candidate.stages[name] = now - self.last
        self.last = now


def _line(candidate: TuneCandidate, floor: Floor) -> str:
    parts = []
    if candidate.speedup is not None:
        parts.append(f"{candidate.speedup:.2f}x ({1e3 * candidate.latency_s:.1f} ms)")
    if candidate.size_bytes is not None:
        parts.append(f"{candidate.size_bytes / 1e6:.1f} MB")
    if candidate.status == "pruned":
        parts.append(f"pruned: {candidate.note}")
        return ", ".join(parts)
    if candidate.box_iou is not None:
        parts.append(f"box IoU {candidate.box_iou:.4f}")
    if candidate.gt_miou is not None:
        parts.append(f"GT mIoU {100 * candidate.gt_miou:.1f}")
    parts.append("meets the floor" if candidate.meets_floor else "below the floor")
    stages = ", ".join(f"{name} {seconds:.0f}" for name, seconds in candidate.stages.items())
    return ", ".join(parts) + (f" (s: {stages})" if stages else "")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file written by :meth:`TuneResult.save_recipe`, checked: its pass
    list parses, and its calibration images are named (so they can be found again).

    Returns the recipe with ``configs`` holding the parsed pass configs.

    Raises:
        TuneError: not a readable tune recipe, or a pass list that does not parse.
    """
    import json

    from .passes import PassError

    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise TuneError(f"cannot read the recipe {path}: {err}") from None
    if not isinstance(recipe, dict) or recipe.get("kind") != RECIPE_KIND or not isinstance(recipe.get("passes"), str):
        raise TuneError(f"{path} is not a recipe written by samfx tune")
    try:
        recipe["configs"] = parse_passes(recipe["passes"])
    except PassError as err:
        raise TuneError(f"{path}: its passes do not parse: {err}") from None
    return recipe


def recipe_calibration(recipe: dict[str, Any], path: str | Path) -> list[str]:
    """The recipe's calibration images by name (package names or files).

    Raises:
        TuneError: some were given as arrays (recorded by digest only).
    """
    names = list((recipe.get("images") or {}).get("calibration") or [])
    unnamed = [n for n in names if n.startswith("sha256:")]
    if unnamed:
        raise TuneError(f"{path} was calibrated on {len(unnamed)} images given as arrays; give them with --calibration")
    from .data import available_images

    missing = [n for n in names if not Path(n).exists() and n not in available_images()]
    if missing:
        raise TuneError(f"{path}: calibration images not found: {', '.join(missing[:3])}; give --calibration")
    return names

