"""``samfx.distill``: recover a lossy model by self-distillation, on the CPU.

The student (a pruned model, say) learns to reproduce the teacher's (the
original's) image-encoder features: the image embedding and every other
feature map the mask decoder reads, as SlimSAM's "embedding alignment" does.
Only the student's image encoder is trained; its prompt encoder and mask
decoder are the teacher's and stay as they are.

The data are a handful of real photos that ship with scikit-image
(:func:`samfx.data.package_images`), augmented with random crops, flips and
brightness/contrast changes; no labels are needed. By default the photos the
fidelity report evaluates on (``coins``, ``astronaut``, ``coffee``) are left
out, so that a fidelity measured afterwards is not measured on training images.

Training state (student weights, optimizer, schedule, random generators, loss
history) is written to ``checkpoint`` every ``save_every`` steps and at the
end; calling :func:`distill` again with the same checkpoint resumes where it
stopped (after an interruption, or with a larger ``steps``).

Example::

    >>> import samfx
    >>> teacher = samfx.models.build("sam_vit_b", small=True)
    >>> student = samfx.optimize(teacher, [samfx.PruneConfig(mlp=0.3)], min_box_iou=None)  # distill recovers it
    >>> report = samfx.distill(student, teacher, steps=2, progress=False)
    >>> report.steps
    2
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, find_adapter
from .data import DEFAULT_IMAGES, available_images, load_images

__all__ = ["DEFAULT_TRAINING_IMAGES", "DistillReport", "distill"]

#: Package photos other than the ones fidelity reports evaluate on.
DEFAULT_TRAINING_IMAGES = tuple(name for name in available_images() if name not in DEFAULT_IMAGES)
_FORMAT = "samfx-distill/1"


@dataclass
class DistillReport:
    """What one :func:`distill` call did.

    Attributes:
        steps: optimisation steps done so far (including resumed ones).
        target_steps: the ``steps`` asked for.
        images: names (package names, or digests of arrays) of the training images.
        time_s: wall time of this call.
        resumed_from: the step the call started at (0 unless resumed).
        losses: the loss of every step so far.
        checkpoint: where the state was saved, if anywhere.
    """

    steps: int
    target_steps: int
    images: list[str]
    time_s: float
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    checkpoint: str | None = None

    @property
    def finished(self) -> bool:
        return self.steps >= self.target_steps

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "finished": self.finished}


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (35-100 % of the area, aspect 3:4 to 4:3), a horizontal flip
    half of the time, and brightness and contrast changes of up to 20 %."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = rng.uniform(0.35, 1.0) * h * w
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            image = image[y:y + ch, x:x + cw]
            break
    if rng.random() < 0.5:
        image = image[:, ::-1]
    pixels = image.astype(np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)
    return np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encoder(model: nn.Module, adapter: Adapter) -> nn.Module:
    spec = next((s for s in adapter.components(model) if s.role == "image_encoder"), None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no image encoder")
    return model.get_submodule(spec.path) if spec.path else model


def _loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared error per feature map, each normalised by the teacher map's
    mean square so that maps of different scales count alike."""
    if [s.shape for s in student] != [t.shape for t in teacher]:
        raise ValueError(f"student features {[tuple(s.shape) for s in student]} do not match the teacher's "
                         f"{[tuple(t.shape) for t in teacher]}")
    return sum(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12) for s, t in zip(student, teacher))


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: Sequence[str | np.ndarray] = DEFAULT_TRAINING_IMAGES,
    *,
    steps: int = 200,
    max_minutes: float | None = None,
    lr: float = 2e-4,
    batch_size: int = 1,
    augment: bool = True,
    checkpoint: str | Path | None = None,
    save_every: int = 25,
    seed: int = 0,
    progress: bool = True,
) -> DistillReport:
    """Train ``student``'s image encoder, in place, to reproduce ``teacher``'s features.

    Args:
        student: the model to recover (e.g. from ``samfx.optimize(..., ["prune"])``).
        teacher: the reference model of the same family; not modified.
        images: package image names (:func:`samfx.data.available_images`) or
            ``H x W x 3`` uint8 arrays. Default: the package photos that fidelity
            reports do not use.
        steps: optimisation steps in all (a resumed run continues up to it).
        max_minutes: stop earlier once this much wall time has passed; the state
            is saved, so a later call resumes.
        lr: peak learning rate of AdamW (linear warm-up, cosine decay).
        batch_size: images per step.
        augment: random crops, flips and photometric changes.
        checkpoint: file for the resumable training state.
        save_every: steps between checkpoint writes.
        seed: for image order and augmentations.
        progress: show a progress bar with the loss.

    Returns:
        A :class:`DistillReport`.

    Raises:
        ValueError: models of different families, features that do not match, a
            checkpoint written for another student or run.

    Both models stay in evaluation mode: batch-norm statistics are kept (a few
    images would corrupt them) and so are eval-only caches such as TinyViT's
    attention biases. Gradients still flow through every layer.
    """
    from tqdm.auto import tqdm

    adapter = find_adapter(teacher)
    if not adapter.matches(student):
        raise ValueError(f"student ({type(student).__name__}) and teacher ({type(teacher).__name__}) "
                         "are not of the same family")
    if steps < 1 or batch_size < 1 or save_every < 1:
        raise ValueError("steps, batch_size and save_every must be positive")
    arrays, names = load_images(images, "distillation")
    student_encoder, teacher_encoder = _encoder(student, adapter), _encoder(teacher, adapter)
    preprocess = adapter.predictor(teacher).encoder_input
    params = [p for p in student_encoder.parameters()]
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "augment": augment, "seed": seed, "images": names}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, warmup))
    rng = np.random.default_rng(seed)
    step, losses = 0, []
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a samfx distillation checkpoint")
        different = {k: (state["settings"].get(k), v) for k, v in settings.items()
                     if k != "steps" and state["settings"].get(k) != v}
        if different:
            raise ValueError(f"{path} was written by a run with other settings {different}; "
                             "use another checkpoint file to start afresh")
        try:
            student_encoder.load_state_dict(state["student"])
        except RuntimeError as err:
            raise ValueError(f"{path} holds another student's weights: {err}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        step, losses = int(state["step"]), list(state["losses"])

    def save() -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": _FORMAT, "settings": settings, "step": step, "losses": losses,
                 "student": student_encoder.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng.bit_generator.state}
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint intact

    start, resumed_from = time.perf_counter(), step
    flags = [p.requires_grad for p in params]
    teacher_encoder.eval()
    student_encoder.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with tqdm(total=steps, initial=step, desc="distill", unit="step", disable=not progress) as bar:
            while step < steps:
                if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
                    break
                batch = []
                for _ in range(batch_size):
                    image = arrays[int(rng.integers(len(arrays)))]
                    batch.append(preprocess(_augment(image, rng) if augment else image))
                x = torch.cat(batch)
                with torch.no_grad():
                    target = adapter.encoder_features(teacher_encoder(x))
                with torch.enable_grad():
                    loss = _loss(adapter.encoder_features(student_encoder(x)), target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if step % save_every == 0:
                    save()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    save()
    return DistillReport(step, steps, names, time.perf_counter() - start, resumed_from, losses,
                         str(path) if path is not None else None)
