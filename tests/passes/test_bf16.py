"""bf16: reduced precision with float32 islands, within stated tolerances, drop-in dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samfx
from samfx.passes import BF16Config, FuseAttentionConfig, PassContext, PassError, bf16, fuse_attention

from ..conftest import SMALL_FAMILIES, small_model
from .conftest import assert_components_match, attention_model


def _half(model: nn.Module, config: BF16Config = BF16Config()) -> tuple[samfx.CapturedModel, samfx.passes.PassReport]:
    captured = samfx.capture(model)
    fuse_attention(captured, FuseAttentionConfig(), PassContext())
    return captured, bf16(captured, config, PassContext()).report


# LiteMedSAM (the real model) runs in bfloat16 once, in the fidelity test below:
# on CPUs without native bfloat16 it is an order of magnitude slower than float32.
@pytest.mark.parametrize("name", [n for n in SMALL_FAMILIES if n != "lite_medsam"])
def test_half_model_stays_close_and_keeps_float32_interfaces(name: str) -> None:
    model = attention_model(name)
    captured, report = _half(model)
    assert report.changed and report.skipped == []
    # outputs in float32 like the original (checked inside), within bfloat16's
    # precision: 8 significant bits give relative errors of a few 1e-3 per op
    assert_components_match(model, captured, rtol=3e-2)
    for role in ("image_encoder", "mask_decoder"):
        component = captured.component(role)
        islands = captured.adapter.precision_islands(component.root)
        assert islands, role
        for path, module in component.root.named_modules():
            in_island = any(path == i or path.startswith(i + ".") for i in islands)
            for param in module.parameters(recurse=False):
                assert param.dtype == (torch.float32 if in_island else torch.bfloat16), (role, path)
    prompt_encoder = next(c for r, c in captured.components.items() if r == "prompt_encoder")
    assert all(p.dtype == torch.float32 for p in prompt_encoder.root.parameters())


def test_islands_are_norms_and_the_iou_head() -> None:
    captured, _ = _half(attention_model("sam_vit_b"))
    decoder = captured.component("mask_decoder").root
    assert decoder.iou_prediction_head.layers[0].weight.dtype == torch.float32
    assert decoder.output_upscaling[1].weight.dtype == torch.float32  # a LayerNorm2d
    assert decoder.output_upscaling[0].weight.dtype == torch.bfloat16
    encoder = captured.component("image_encoder").root
    assert encoder.blocks[0].norm1.weight.dtype == torch.float32
    assert encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_float16_variant() -> None:
    model = attention_model("sam_vit_b")
    captured, report = _half(model, BF16Config(dtype="float16"))
    assert report.summary.endswith("in float16 with float32 islands")
    assert_components_match(model, captured, rtol=5e-3)


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(PassError, match="dtype must be one of"):
        BF16Config(dtype="int8")


def test_save_load_round_trip(tmp_path) -> None:
    half = samfx.optimize(small_model("sam_vit_b"), ["fuse_attention", "bf16"], min_box_iou=None)
    again = samfx.load(samfx.save(half, tmp_path))
    assert again.image_encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, half.image_encoder.img_size, half.image_encoder.img_size)
    with torch.no_grad():
        assert torch.equal(again.image_encoder(x), half.image_encoder(x))


def test_real_weights_fidelity(lite_medsam: nn.Module, lite_medsam_reference) -> None:
    """LiteMedSAM's real checkpoint on ``coins``, box prompts (the model is
    box-prompted; its click masks are near-empty). Measured on the whole image
    (benchmarks/precision.py): embedding cosine 0.99883, box-mask IoU 0.998
    (worst 0.996) against the original, ground-truth mIoU unchanged at 96.9."""
    captured, report = _half(lite_medsam)
    assert report.details["image_encoder"]["islands"] > 0
    fidelity = samfx.fidelity.compare(lite_medsam_reference, captured.model, ["coins"], max_prompts_per_image=8)
    assert fidelity.embedding_cosine_min >= 0.998
    assert fidelity.box_mask_iou_mean >= 0.99 and fidelity.box_mask_iou_min >= 0.98
    assert abs(fidelity.gt_miou_original - fidelity.gt_miou_optimized) < 0.01


def test_int8_layers_stay_float32_after_quantize() -> None:
    """quantize then bf16 (the lite_medsam_cpu_bf16 recipe): the int8 kernels take float32
    activations and scales, so their layers are float32 islands and the model runs."""
    from samfx.modules import FLOAT32_KERNELS

    model = small_model("sam_vit_b")
    fast = samfx.optimize(model, [samfx.QuantizeConfig(roles=("image_encoder",), images=("chelsea",),
                                                       prompts_per_image=1), "bf16"], min_box_iou=None)
    int8 = [m for m in fast.image_encoder.modules() if isinstance(m, FLOAT32_KERNELS)]
    assert int8 and all(t.dtype != torch.bfloat16 for m in int8 for t in [*m.parameters(), *m.buffers()])
    assert any(p.dtype == torch.bfloat16 for p in fast.mask_decoder.parameters())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(fast.image_encoder(x).flatten(), model.image_encoder(x).flatten(), 0)
    assert cosine > 0.95
