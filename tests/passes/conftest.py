"""Helpers shared by the pass tests: models whose attention biases matter, and
the check that a captured model computes what the original computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samfx

from ..conftest import small_model


@pytest.fixture(autouse=True)
def _real_weights_without_mac_counting(request: pytest.FixtureRequest) -> None:
    """Tests on LiteMedSAM's real weights check masks and weights, not MACs: they optimize
    without counting them (the ``no_mac_counting`` fixture). The counting code still runs after
    every pass on the other families' small models here, and on LiteMedSAM in the CLI and preset tests."""
    if "lite_medsam" in request.fixturenames or "lite_medsam" in request.node.name:
        request.getfixturevalue("no_mac_counting")


def hf_eager_model() -> nn.Module:
    """Hugging Face's other graph variant: eager attention (softmax in float32, dropout)."""
    model = small_model("hf_sam_vit_b")
    return type(model)._from_config(model.config, attn_implementation="eager").eval()


def attention_model(name: str) -> nn.Module:
    """A small zoo model (or Hugging Face's eager variant) whose relative-position
    tables are random, so that fusing them is tested."""
    model = hf_eager_model() if name == "hf_sam_vit_b_eager" else small_model(name)
    torch.manual_seed(1)
    for param_name, param in model.named_parameters():
        if "rel_pos" in param_name:  # zero-initialised upstream: make the bias matter
            param.data.normal_(0, 0.5)
    return model


def _randomized(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return torch.randn_like(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_randomized(v) for v in value)
    return value


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for item in out for t in _tensors(item)] if isinstance(out, (tuple, list)) else []


def assert_components_match(original: nn.Module, captured: samfx.CapturedModel, rtol: float) -> None:
    """Every graph variant of every captured component gives the original's
    outputs on random inputs (the adapter's example call, randomized)."""
    torch.manual_seed(2)
    for role, component in captured.components.items():
        reference = original.get_submodule(component.path) if component.path else original
        for key in component.graphs:
            args = _randomized(component.example_args(key))
            with torch.no_grad():
                expected, actual = _tensors(reference(*args)), _tensors(component.root(*args))
            assert len(expected) == len(actual) > 0, role
            for e, a in zip(expected, actual):
                assert a.dtype == e.dtype, f"{role} {key}: {a.dtype} instead of {e.dtype}"
                # Relative to the output's size; an output near zero (SAM 2's object-score logit of a
                # random model, ~0.02) is held to an RMS of 0.1 instead: reduced precision rounds it
                # absolutely, and on CPUs with native bfloat16 that rounding alone exceeded rtol.
                scale = e.double().norm().clamp_min(max(0.1 * e.numel() ** 0.5, 1e-30))
                error = (a.double() - e.double()).norm() / scale
                assert error <= rtol, f"{role} {key}: relative error {error:.2e}"
