"""share_image_side: the decoder's image side once per image; exact for every family it rewrites."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import samfx
from samfx.data import package_images
from samfx.passes.share_image_side import shared_rows

_SHARED: dict[str, nn.Module] = {}


def _shared(name: str, model: nn.Module) -> nn.Module:
    if name not in _SHARED:
        _SHARED[name] = samfx.optimize(model, ["share_image_side"])
    return _SHARED[name]


def test_batched_prompts_give_the_originals_masks(family_model) -> None:
    """Eight clicks decoded in one batch, every family: the logits are the original's."""
    name, model = family_model
    fast = _shared(name, model)
    report = fast.samfx_report.passes[0]
    if name.startswith("hf_"):
        assert not report.changed and report.skipped  # Hugging Face's decoder has no per-prompt copy
    else:
        assert report.changed and report.details["graphs"] > 0, report.skipped
    image = package_images(["coins"])[0].image
    points = np.stack([np.linspace(20, 300, 8), np.linspace(20, 240, 8)], axis=1)
    outputs = []
    for m in (model, fast):
        predictor = samfx.adapters.find_adapter(m).predictor(m)
        with torch.no_grad():
            predictor.set_image(image)
            outputs.append(predictor.predict_points(points))
    for a, b in zip(*outputs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_per_prompt_dense_embeddings_stay_exact(lite_medsam: nn.Module) -> None:
    """Mask inputs give each prompt its own dense embedding: nothing is shared then, and nothing changes."""
    fast = _shared("lite_medsam", lite_medsam)
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    sparse = torch.randn(4, 2, 256, generator=generator)
    for dense in (torch.randn(4, 256, 64, 64, generator=generator), torch.randn(1, 256, 1, 1).expand(4, 256, 64, 64)):
        with torch.no_grad():
            a = lite_medsam.mask_decoder(embedding, lite_medsam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            b = fast.mask_decoder(embedding, fast.prompt_encoder.get_dense_pe(), sparse, dense, False)
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b))


def test_shared_rows_only_collapses_broadcasts() -> None:
    broadcast = torch.randn(1, 3).expand(5, 3)
    assert shared_rows(broadcast).shape == (1, 3) and torch.equal(shared_rows(broadcast)[0], broadcast[0])
    distinct = torch.randn(5, 3)
    assert shared_rows(distinct) is distinct
