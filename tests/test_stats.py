"""Stats: parameter counts, weight bytes and MACs."""

from __future__ import annotations

import torch
from torch import nn

from samfx.stats import component_macs, model_stats, parameter_count, weight_bytes

from .conftest import small_model


def test_weight_bytes_counts_shared_storage_once() -> None:
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, shared)
    assert weight_bytes(model) == 16 * 4
    assert parameter_count(model) == 16


def test_sam_vit_b_encoder_macs_match_the_published_figure() -> None:
    import samfx

    with torch.device("meta"):
        model = samfx.models.spec("sam_vit_b").builder(False)
    macs = component_macs(model)["image_encoder"]
    # 486 G MACs at 1024 px (TinySAM's table lists 487 G "FLOPs" for SAM-B).
    assert 480e9 < macs < 490e9


def test_model_stats_cover_every_component() -> None:
    model = small_model("sam2.1_hiera_t")
    stats = model_stats(model)
    assert set(stats.macs) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    persistent = model.state_dict()
    buffers = sum(b.numel() * 4 for name, b in model.named_buffers() if name in persistent)
    assert stats.weight_bytes == 4 * stats.params + buffers
