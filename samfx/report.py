"""The report of one :func:`samfx.optimize` run: what each pass did, size and
cost before and after, and fidelity against the original on real images."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fidelity import FidelityReport
from .passes.base import PassReport
from .stats import ModelStats

__all__ = ["OptimizeReport", "environment", "floor_line", "write_json"]


def environment() -> dict[str, Any]:
    """Software and thread settings, recorded with every measurement."""
    import os

    from ._version import __version__

    return {
        "samfx": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a report's dict as indented JSON, creating the folder; the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _human(value: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def floor_line(record: dict[str, Any]) -> str:
    """One line on a pass's fidelity floor: the figure kept and any back-off.

    Example::

        >>> floor_line({"min_box_iou": 0.97, "images": ["coins"], "boxes": 24, "backed_off": True,
        ...             "attempts": [{"options": {"mlp": 0.5}, "box_iou": 0.38},
        ...                          {"options": {"mlp": 0.25}, "box_iou": 0.98}]})
        'floor box IoU >= 0.97 on 1 held-out images (24 boxes): 0.9800; backed off from 0.3800 (mlp=0.5 -> mlp=0.25)'
    """
    attempts = record["attempts"]
    last = attempts[-1]
    if "box_iou" not in last:
        return f"floor box IoU >= {record['min_box_iou']}: nothing changed, nothing to check"
    text = (f"floor box IoU >= {record['min_box_iou']} on {len(record['images'])} held-out images "
            f"({record['boxes']} boxes): {last['box_iou']:.4f}")
    if record.get("backed_off"):
        first = attempts[0]
        changed = [k for k in last["options"] if last["options"][k] != first["options"][k]]
        before = ", ".join(f"{k}={first['options'][k]}" for k in changed)
        after = ", ".join(f"{k}={last['options'][k]}" for k in changed)
        text += f"; backed off from {first['box_iou']:.4f} ({before} -> {after})"
    return text


@dataclass
class OptimizeReport:
    """Everything :func:`samfx.optimize` measured. ``save`` writes it as JSON."""

    model: str
    family: str
    passes: list[PassReport]
    before: ModelStats
    after: ModelStats
    capture_time_s: float
    fidelity: FidelityReport | None = None
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=environment)
    #: which images were used for what (:meth:`samfx.data.ImageSplit.record`), when known
    images: dict[str, Any] | None = None
    #: the fidelity floor lossy passes were held to (``None``: none); each
    #: pass's attempts are in its ``fidelity_floor``
    min_box_iou: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "family": self.family,
            "capture_time_s": self.capture_time_s,
            "passes": [asdict(p) for p in self.passes],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "notes": self.notes,
            "environment": self.environment,
            "images": self.images,
            "min_box_iou": self.min_box_iou,
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def table(self) -> str:
        lines = [f"samfx: {self.model} ({self.family} adapter), captured in {self.capture_time_s:.2f} s"]
        lines += [f"note: {note}" for note in self.notes] + [""]
        lines.append(f"{'pass':<16}{'time':>9}  {'changed':<8} summary")
        for p in self.passes:
            lines.append(f"{p.name:<16}{p.time_s:>8.2f}s  {'yes' if p.changed else 'no':<8} {p.summary}")
            lines += [f"{'':<35}skipped: {reason}" for reason in p.skipped[:5]]
            if len(p.skipped) > 5:
                lines.append(f"{'':<35}... {len(p.skipped) - 5} more skipped (see the JSON report)")
            if p.fidelity_floor:
                lines.append(f"{'':<35}{floor_line(p.fidelity_floor)}")
        lines += ["", f"{'':<22}{'original':>14}{'optimized':>14}{'ratio':>9}"]
        rows = [("parameters", self.before.params, self.after.params, ""),
                ("weight bytes", self.before.weight_bytes, self.after.weight_bytes, "B")]
        rows += [(f"MACs {role}", self.before.macs.get(role, 0), self.after.macs.get(role, 0), "")
                 for role in self.before.macs]
        for label, old, new, unit in rows:
            ratio = f"{old / new:.2f}x" if new else "-"
            lines.append(f"{label:<22}{_human(old, unit):>14}{_human(new, unit):>14}{ratio:>9}")
        if self.fidelity is not None:
            f = self.fidelity
            trained = " and ".join(f.trained_prompts)
            lines += ["", f"fidelity on {', '.join(f.images)} ({f.prompts} prompts; mask IoU over {trained} prompts, "
                          "the kinds the model was trained with):",
                      f"  mask IoU vs original   mean {f.mask_iou_mean:.4f}   worst {f.mask_iou_min:.4f}"]
            for kind, row in f.by_prompt.items():
                if row["trained"] and len(f.trained_prompts) > 1:
                    lines.append(f"    {kind + ' prompts only':<21}mean {row['mask_iou_mean']:.4f}   "
                                 f"worst {row['mask_iou_min']:.4f}")
            for kind, row in f.by_prompt.items():
                if not row["trained"]:
                    lines.append(f"  {kind + ' prompts (apart)':<21}mean {row['mask_iou_mean']:.4f}   "
                                 f"worst {row['mask_iou_min']:.4f}   not trained"
                                 + (f": {f.untrained_prompts_note}" if f.untrained_prompts_note else ""))
            lines += [f"  IoU-prediction error   mean {f.iou_pred_error_mean:.4f}   max {f.iou_pred_error_max:.4f}",
                      f"  embedding cosine       mean {f.embedding_cosine_mean:.6f}   min {f.embedding_cosine_min:.6f}"]
            if f.gt_miou_original is not None:
                lines.append(f"  box mIoU vs ground truth: original {100 * f.gt_miou_original:.1f}, "
                             f"optimized {100 * f.gt_miou_optimized:.1f}")
        if self.images:
            lines.append("")
            for use in ("calibration", "evaluation"):
                names = self.images.get(use) or []
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
                default = "none given: data-driven passes use their own defaults" if use == "calibration" else "none"
                lines.append(f"{use + ' images':<22} {shown or default}")
            if self.images.get("overlap"):
                lines.append(f"{'evaluated on calibration images':<22} {', '.join(self.images['overlap'])}")
        return "\n".join(lines)
