"""Shared fixtures: small configurations of every zoo family, built once."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import samfx  # noqa: E402

torch.manual_seed(0)

# One small model per family the zoo covers; LiteMedSAM is the real checkpoint
# (its TinyViT encoder is MobileSAM's, which tests use where SamPredictor matters).
SMALL_FAMILIES = ["sam_vit_b", "sam_hq_vit_b", "sam2.1_hiera_t", "hf_sam_vit_b", "lite_medsam"]

_CACHE: dict[str, torch.nn.Module] = {}


def small_model(name: str) -> torch.nn.Module:
    """A fresh copy of a cached small model (tests may not share mutations)."""
    import copy

    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = samfx.models.build(name, small=True)
    return copy.deepcopy(_CACHE[name])


@pytest.fixture(params=SMALL_FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, small_model(request.param)


@pytest.fixture
def lite_medsam() -> torch.nn.Module:
    return small_model("lite_medsam")


@pytest.fixture
def no_mac_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``samfx.optimize`` without counting MACs (fake-tensor runs of every component, before
    and after the passes: about half an optimize of LiteMedSAM's 37-GMAC encoder), for tests
    that assert something else; tests/test_stats.py and tests/test_pipeline.py check the counts."""
    monkeypatch.setattr(samfx.stats, "component_macs", lambda model, adapter=None: {})


@pytest.fixture(scope="session")
def lite_medsam_reference() -> samfx.fidelity.CachedPredictor:
    """The original LiteMedSAM (real weights) as a reference for
    :func:`samfx.fidelity.compare`: its embedding and masks are computed once per
    image and prompt for the whole session, not again in every fidelity test."""
    model = small_model("lite_medsam")
    return samfx.fidelity.CachedPredictor(samfx.adapters.find_adapter(model).predictor(model))


def image_input(model: torch.nn.Module, batch: int = 1) -> torch.Tensor:
    """A random input of the right size for the model's image encoder."""
    adapter = samfx.adapters.find_adapter(model)
    spec = next(s for s in adapter.components(model) if s.role == "image_encoder")
    example = spec.example_inputs()
    (name, tensor), = example.items()
    return torch.randn(batch, *tensor.shape[1:])


def encoder_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The main image embedding of any family, as one tensor."""
    adapter = samfx.adapters.find_adapter(model)
    spec = next(s for s in adapter.components(model) if s.role == "image_encoder")
    encoder = model.get_submodule(spec.path) if spec.path else model
    out = encoder(x)
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return out["vision_features"]
    if isinstance(out, tuple):
        return out[0]
    return out


def open_png(path: Path) -> np.ndarray:
    """The pixels of a PNG, after checking it is one."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 10  # a picture, not a blank
    return pixels
