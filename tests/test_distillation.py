"""samfx.distill (samfx/distillation.py): the student moves towards the teacher, and an interrupted run
resumes from its checkpoint to exactly where an uninterrupted one ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import samfx
import samfx.distillation as distill_module
from samfx.passes import PruneConfig

from .conftest import encoder_output, small_model


def _pair() -> tuple[nn.Module, nn.Module]:
    teacher = small_model("sam_vit_b")
    student = samfx.optimize(teacher, [PruneConfig(mlp=0.5, head_dims=0.25)], min_box_iou=None)
    return student, teacher


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((80, 96, 3)) * 255).astype(np.uint8) for _ in range(2)]


def test_distillation_brings_the_student_closer_to_the_teacher() -> None:
    student, teacher = _pair()
    image = _images()[0]
    x = samfx.adapters.find_adapter(teacher).predictor(teacher).encoder_input(image)
    with torch.no_grad():
        target = encoder_output(teacher, x)
        before = (encoder_output(student, x) - target).pow(2).mean().item()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = samfx.distill(student, teacher, [image], steps=12, lr=1e-3, augment=False, progress=False)
    with torch.no_grad():
        after = (encoder_output(student, x) - target).pow(2).mean().item()
    assert report.finished and report.steps == 12 and len(report.losses) == 12
    assert np.mean(report.losses[-3:]) < 0.7 * np.mean(report.losses[:3])
    assert after < before
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert all(p.grad is None for p in student.parameters())


def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    images = _images()
    reference, teacher = _pair()
    student = samfx.optimize(teacher, [PruneConfig(mlp=0.5, head_dims=0.25)], min_box_iou=None)
    straight = samfx.distill(reference, teacher, images, steps=6, lr=1e-3, progress=False)

    augment, calls = distill_module._augment, []

    def interrupting(image, rng):
        calls.append(1)
        if len(calls) == 5:  # during step 5, after the checkpoint of step 4
            raise KeyboardInterrupt
        return augment(image, rng)

    checkpoint = tmp_path / "state.pt"
    monkeypatch.setattr(distill_module, "_augment", interrupting)
    with pytest.raises(KeyboardInterrupt):
        samfx.distill(student, teacher, images, steps=6, lr=1e-3, checkpoint=checkpoint, save_every=2, progress=False)
    monkeypatch.setattr(distill_module, "_augment", augment)
    assert torch.load(checkpoint, weights_only=True)["step"] == 4

    # a new process would start so
    fresh = samfx.optimize(teacher, [PruneConfig(mlp=0.5, head_dims=0.25)], min_box_iou=None)
    resumed = samfx.distill(fresh, teacher, images, steps=6, lr=1e-3, checkpoint=checkpoint, progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-5)
    for (name, a), b in zip(fresh.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    with pytest.raises(ValueError, match="other settings"):
        samfx.distill(fresh, teacher, images, steps=6, lr=5e-4, checkpoint=checkpoint, progress=False)


def test_bad_inputs_are_refused() -> None:
    student, teacher = _pair()
    with pytest.raises(ValueError, match="same family"):
        samfx.distill(student, small_model("sam2.1_hiera_t"), _images(), steps=1, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        samfx.distill(student, teacher, [np.zeros((8, 8), np.float32)], steps=1, progress=False)
    with pytest.raises(ValueError, match="positive"):
        samfx.distill(student, teacher, _images(), steps=0, progress=False)
