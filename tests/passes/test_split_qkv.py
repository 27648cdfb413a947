"""split_qkv: exact on every family, consistent module tree, honest skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import samfx
from samfx.adapters.base import QKVLayout
from samfx.passes import PassContext, SplitQKVConfig, split_qkv

from ..conftest import SMALL_FAMILIES, encoder_output, image_input, small_model


def _qkv_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    fused = [n for n in names if n.endswith(".qkv")]
    split = [n for n in names if n.rsplit(".", 1)[-1] in ("q", "k", "v")]
    return fused, split


@pytest.mark.parametrize("name", SMALL_FAMILIES)
def test_split_qkv_is_exact_and_complete(name: str) -> None:
    model = small_model(name)
    fused_before, _ = _qkv_modules(model)
    optimized = samfx.optimize(model, ["split_qkv"])
    fused_after, split = _qkv_modules(optimized)
    assert fused_before and not fused_after
    assert len(split) == 3 * len(fused_before)
    x = image_input(model, 1)
    with torch.no_grad():
        expected, actual = encoder_output(model, x), encoder_output(optimized, x)
    assert (expected - actual).abs().max().item() <= 1e-5
    assert optimized.samfx_report.passes[0].changed


def test_split_linears_hold_the_fused_rows() -> None:
    model = small_model("sam_vit_b")
    optimized = samfx.optimize(model, ["split_qkv"])
    fused = model.image_encoder.blocks[0].attn.qkv
    attn = optimized.image_encoder.blocks[0].attn
    stacked = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight])
    assert torch.equal(stacked, fused.weight)
    assert torch.equal(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]), fused.bias)


def test_head_interleaved_layout_rows() -> None:
    """TinyViT groups rows per head: [q_h k_h v_h] for each head h."""
    layout = QKVLayout("head_interleaved", num_heads=2, sizes=(2, 2, 3))
    q, k, v = layout.part_rows()
    assert q.tolist() == [0, 1, 7, 8]
    assert k.tolist() == [2, 3, 9, 10]
    assert v.tolist() == [4, 5, 6, 11, 12, 13]


def test_split_qkv_on_real_weights_keeps_masks_identical(lite_medsam: nn.Module, lite_medsam_reference) -> None:
    optimized = samfx.optimize(lite_medsam, ["split_qkv"])
    fidelity = samfx.fidelity.compare(lite_medsam_reference, optimized, ["coins"])
    assert fidelity.mask_iou_min == 1.0
    assert fidelity.embedding_cosine_min > 0.99999
    assert fidelity.gt_miou_original == fidelity.gt_miou_optimized
    assert fidelity.gt_miou_original > 0.9  # LiteMedSAM segments the coins well


def test_split_qkv_twice_is_a_reported_no_op() -> None:
    once = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"])
    twice = samfx.optimize(once, ["split_qkv"])
    report = twice.samfx_report.passes[0]
    assert not report.changed
    assert "no fused qkv" in report.summary


class _OddAttention(nn.Module):
    """Uses the fused projection's output directly: the split cannot be followed."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        return qkv.sum(-1, keepdim=True) * x


def test_unfollowable_fused_tensor_is_left_fused_and_reported() -> None:
    from samfx.adapters import Adapter, ComponentSpec, TraceRecipe, register_adapter
    from samfx.adapters import _REGISTRY

    class OddAdapter(Adapter):
        name = "odd_for_tests"
        model_classes = (f"{__name__}._OddAttention",)

        def components(self, model):
            return [ComponentSpec("image_encoder", "", TraceRecipe(), lambda: {"x": torch.zeros(1, 3, 8)})]

        def _qkv_layouts(self, module):
            if isinstance(module, _OddAttention):
                yield "qkv", QKVLayout("blocked", 2, (8, 8, 8))

    register_adapter(OddAdapter())
    try:
        model = _OddAttention()
        optimized = samfx.optimize(model, ["split_qkv"])
        report = optimized.samfx_report.passes[0]
        assert not report.changed
        assert "left fused" in report.skipped[0] and "sum" in report.skipped[0]
        x = torch.randn(2, 3, 8)
        torch.testing.assert_close(optimized(x), model(x))
        assert isinstance(optimized.qkv, nn.Linear)
    finally:
        _REGISTRY.pop("odd_for_tests")


def test_config_names_the_new_modules() -> None:
    captured = samfx.capture(small_model("sam_vit_b"))
    split_qkv(captured, SplitQKVConfig(names=("query", "key", "value")), PassContext())
    attn = captured.model.image_encoder.blocks[1].attn
    assert all(isinstance(getattr(attn, n), nn.Linear) for n in ("query", "key", "value"))
    assert not hasattr(attn, "qkv")


def test_sam_predictor_runs_on_split_sam() -> None:
    from segment_anything import SamPredictor

    model = small_model("sam_vit_b")
    optimized = samfx.optimize(model, ["split_qkv"])
    image = (np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)
    masks = []
    for m in (model, optimized):
        predictor = SamPredictor(m)
        predictor.set_image(image)
        masks.append(predictor.predict(point_coords=np.array([[40, 30]]), point_labels=np.array([1]))[0])
    np.testing.assert_array_equal(masks[0], masks[1])


def test_new_nodes_keep_their_module_of_origin() -> None:
    captured = samfx.capture(small_model("sam_vit_b"))
    split_qkv(captured, SplitQKVConfig(), PassContext())
    graph = captured.component("image_encoder").graphs[()]
    q = next(n for n in graph.nodes if n.op == "call_module" and n.target == "blocks.0.attn.q")
    assert list(q.meta["nn_module_stack"])[-2:] == ["blocks.0.attn", "blocks.0.attn.q"]
    squeeze = next(iter(q.users))
    while squeeze.target != "squeeze":
        squeeze = next(iter(squeeze.users))
    assert list(squeeze.meta["nn_module_stack"])[-1] == "blocks.0.attn"
