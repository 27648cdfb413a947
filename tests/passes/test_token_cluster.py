"""token_cluster: the rewrite against a hand-written hourglass, the no-op setting,
every plain-ViT family, stage limits, composition, replay and the tuner."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import samfx
from samfx.kernels.token_cluster import reference_token_cluster, reference_token_reconstruct
from samfx.passes import PassError, TokenClusterConfig, tune_token_cluster
from samfx.passes.token_cluster import cluster_grid

from ..conftest import encoder_output, image_input, small_model


def _padded_sam_encoder() -> nn.Module:
    """A bare SAM ViT whose 10x10 token map is padded to 12x12 by its 4x4 windows."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    return ImageEncoderViT(img_size=160, patch_size=16, embed_dim=48, depth=4, num_heads=2, out_chans=16,
                           qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                           window_size=4, global_attn_indexes=(2,)).eval()


def _hiera_sam2() -> nn.Module:
    """SAM 2.1 Hiera-T with a third stage of three blocks: pooling, windowed, global."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    return build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", hydra_overrides_extra=[
        "++model.image_size=256", "++model.image_encoder.trunk.stages=[1,1,3,1]",
        "++model.image_encoder.trunk.global_att_blocks=[4]"]).eval()


def _hf_sam() -> nn.Module:
    # The Hub init leaves the small vision tower's activations near 1e-8, where
    # every exp(-t d^2) rounds to 1; give it ordinary weights.
    model = small_model("hf_sam_vit_b")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.vision_encoder.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


# name -> (builder, a location whose later blocks are windowed, window side)
FAMILIES = {
    "sam_vit": (_padded_sam_encoder, 1, 4),
    "sam_hq_vit_b": (partial(small_model, "sam_hq_vit_b"), 0, 4),
    "hf_sam_vit_b": (_hf_sam, 0, 4),
    "sam2.1_hiera": (_hiera_sam2, 3, 14),
}


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor an image encoder returns (HQ's early features, SAM 2's FPN levels)."""
    spec = next(s for s in samfx.adapters.find_adapter(model).components(model) if s.role == "image_encoder")
    encoder = model.get_submodule(spec.path) if spec.path else model
    with torch.no_grad():
        out = encoder(x)
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    flat = []
    torch.utils._pytree.tree_map(lambda v: flat.append(v) if isinstance(v, torch.Tensor) else None,
                                 dict(out) if isinstance(out, dict) else out)
    return flat


def _ops(model: nn.Module) -> list[str]:
    captured = samfx.capture(model)
    return [str(n.target) for _, n in captured.component("image_encoder").nodes()
            if "samfx." in str(n.target) or getattr(n.target, "__module__", "").startswith("samfx.kernels")]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_cluster_per_token_reproduces_the_original(family: str) -> None:
    build, location, window = FAMILIES[family]
    model = build()
    config = TokenClusterConfig(location=location, clusters=window * window, iterations=0, k=1)
    optimized = samfx.optimize(model, [config], min_box_iou=None)
    report = optimized.samfx_report.passes[0]
    assert report.changed, report.skipped
    assert any("token_cluster" in op for op in _ops(optimized))
    assert any("token_reconstruct" in op for op in _ops(optimized))
    x = image_input(model, 2)
    for want, got in zip(_outputs(model, x), _outputs(optimized, x), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_clustering_changes_the_encoder_within_reason(family: str) -> None:
    build, location, window = FAMILIES[family]
    model = build()
    grid = (window - 1, window - 2)  # rectangular: later windows become (w-1) x (w-2)
    optimized = samfx.optimize(model, [TokenClusterConfig(location=location, clusters=grid)], min_box_iou=None)
    details = optimized.samfx_report.passes[0].details["image_encoder"]
    assert details["clustered_size"] < details["size"]
    x = image_input(model, 1)
    for want, got in zip(_outputs(model, x), _outputs(optimized, x), strict=True):
        assert got.shape == want.shape and torch.isfinite(got).all()
    with torch.no_grad():
        assert not torch.allclose(encoder_output(optimized, x), encoder_output(model, x))


def test_rewrite_matches_a_hand_written_hourglass() -> None:
    """The rewritten graph equals upstream blocks run by hand on the reference ops:
    blocks before the location on the map, later ones on the clusters with
    SAM's own window size set to the cluster grid, reconstruction before the neck."""
    encoder = _padded_sam_encoder()
    location, grid, iterations = 1, 3, 3
    optimized = samfx.optimize(encoder, [TokenClusterConfig(location=location, clusters=grid * grid,
                                                            iterations=iterations, temperature=0.05)], min_box_iou=None)
    image = torch.randn(2, 3, 160, 160)
    by_hand = copy.deepcopy(encoder)
    with torch.no_grad():
        x = by_hand.patch_embed(image) + by_hand.pos_embed
        for block in by_hand.blocks[:location]:
            x = block(x)
        clusters = reference_token_cluster(x, (4, 4), (grid, grid), iterations, temperature=0.05)
        z = clusters
        for block in by_hand.blocks[location:]:
            block.window_size = grid if block.window_size else 0
            z = block(z)
        # k above the 9 clusters of a window: no top-k cut, so nothing hinges on rounding.
        y = reference_token_reconstruct(z, x, clusters, (4, 4), (grid, grid), k=20, temperature=0.05)
        want = by_hand.neck(y.permute(0, 3, 1, 2))
        got = optimized(image)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_hq_early_features_are_rebuilt_too() -> None:
    model = small_model("sam_hq_vit_b")  # block 1 is global: its output feeds the HQ decoder
    optimized = samfx.optimize(model, [TokenClusterConfig(location=0, clusters=4)], min_box_iou=None)
    assert optimized.samfx_report.passes[0].details["image_encoder"]["reconstructions"] == 1
    x = image_input(model, 1)
    (_, early), (_, early_new) = model.image_encoder(x), optimized.image_encoder(x)
    assert early_new[0].shape == early[0].shape


def test_hiera_clusters_stay_inside_a_stage() -> None:
    model = _hiera_sam2()
    stages = samfx.adapters.find_adapter(model).token_stages(model.image_encoder)
    assert [s.indices for s in stages] == [(0,), (3, 4)]  # blocks 1, 2 and 5 pool
    with pytest.raises(PassError, match="location 2 .* locations for this image_encoder: 0..0, 3..4"):
        samfx.optimize(model, [TokenClusterConfig(location=2, clusters=81)], min_box_iou=None)
    optimized = samfx.optimize(model, [TokenClusterConfig(location=3, clusters=81)], min_box_iou=None)
    details = optimized.samfx_report.passes[0].details["image_encoder"]
    assert details["size"] == (16, 16) and details["clustered_size"] == (10, 10) and details["blocks"] == 2
    # Stage 3's output is rebuilt once, for the FPN and for stage 4's pooling block.
    assert details["reconstructions"] == 1


def test_tinyvit_one_cluster_per_token_reproduces_litemedsam(lite_medsam: nn.Module) -> None:
    """TinyViT blocks fix their map size in code: the pass re-traces resized copies."""
    config = TokenClusterConfig(location=2, clusters=196, iterations=0, k=1)  # stage 2: 64x64, 14x14 windows
    optimized = samfx.optimize(lite_medsam, [config], min_box_iou=None)
    details = optimized.samfx_report.passes[0].details["image_encoder"]
    assert details["size"] == details["clustered_size"] == (64, 64) and details["blocks"] == 6
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(optimized.image_encoder(x), lite_medsam.image_encoder(x), atol=1e-5, rtol=1e-4)


def test_tinyvit_blocks_run_on_the_cluster_map(lite_medsam: nn.Module) -> None:
    optimized = samfx.optimize(lite_medsam, [TokenClusterConfig(location=4, clusters=81)], min_box_iou=None)
    details = optimized.samfx_report.passes[0].details["image_encoder"]
    assert details["clustered_size"] == (41, 41) and details["blocks"] == 4
    block, original = optimized.image_encoder.layers[2].blocks[4], lite_medsam.image_encoder.layers[2].blocks[4]
    assert block.input_resolution == (41, 41) and block.window_size == 9
    assert block.attn.ab.shape == (original.attn.num_heads, 81, 81)
    assert torch.equal(block.attn.qkv.weight, original.attn.qkv.weight)
    # Biases were resampled, not reset: offsets 0 and the largest are the original's.
    biases = original.attn.attention_biases[:, original.attn.attention_bias_idxs[0]].reshape(-1, 14, 14)
    torch.testing.assert_close(block.attn.ab[:, 0, 0], biases[:, 0, 0])
    assert lite_medsam.image_encoder.layers[2].blocks[4].input_resolution == (64, 64)  # the input is untouched


def test_real_weights_fidelity_on_litemedsam(lite_medsam: nn.Module, lite_medsam_reference) -> None:
    """LiteMedSAM's real weights on coins (48 prompts, points and boxes), with its
    last stage-2 block on 11x11 clusters per 14x14 window. Measured: box mIoU
    against ground truth 96.9 -> 95.7, embedding cosine 0.970, mask IoU against
    the original 0.73 (point prompts' three masks swap places easily).

    The temperature is in units of squared feature distances: Expedit-SAM's
    0.01 suits SAM ViT-H's wide residual stream, but on TinyViT's stage-2
    features it makes every weight about 1, so a token becomes the L2-scaled
    sum of its 20 nearest clusters and the embedding is lost (cosine < 0.5)."""
    good = samfx.fidelity.compare(lite_medsam_reference, samfx.optimize(
        lite_medsam, [TokenClusterConfig(location=7, clusters=121, norm="sum", temperature=10.0)],
        min_box_iou=None), ["coins"])
    assert good.gt_miou_original > 0.96 and good.gt_miou_optimized > 0.94
    assert good.embedding_cosine_mean > 0.95 and good.mask_iou_mean > 0.65
    # Expedit-SAM's own temperature loses the embedding here (suite time: one image's cosine).
    literal = samfx.optimize(lite_medsam, [TokenClusterConfig(location=7, clusters=121)], min_box_iou=None)
    assert samfx.fidelity.compare(lite_medsam_reference, literal, ["coins"],
                                  max_prompts_per_image=1).embedding_cosine_mean < 0.5


def test_tinyvit_after_a_block_rewrite_is_a_reported_skip(lite_medsam: nn.Module) -> None:
    optimized = samfx.optimize(lite_medsam, ["split_qkv", TokenClusterConfig(location=2, clusters=81)],
                               min_box_iou=None)
    report = optimized.samfx_report.passes[1]
    assert not report.changed and "rewritten by an earlier pass" in report.skipped[0]
    assert "run token_cluster first" in report.skipped[0]


def test_tinyvit_needs_square_windows(lite_medsam: nn.Module) -> None:
    optimized = samfx.optimize(lite_medsam, [TokenClusterConfig(location=2, clusters=(9, 10))], min_box_iou=None)
    report = optimized.samfx_report.passes[0]
    assert not report.changed and "square windows, not 9x10" in report.skipped[0]


@pytest.mark.parametrize("options,message", [
    ({"neighbourhood": 4}, "neighbourhood must be an odd"),
    ({"clusters": (3, 0)}, r"\(rows, cols\) of counts >= 1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"k": 0}, "k must be >= 1"),
])
def test_bad_options_are_refused_when_the_config_is_made(options, message) -> None:
    with pytest.raises(PassError, match=message):
        TokenClusterConfig(location=0, **options)


def test_a_location_outside_the_encoder_is_refused_and_the_model_untouched() -> None:
    model = small_model("sam_vit_b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match="location 9 .* 0..1"):
        samfx.optimize(model, [TokenClusterConfig(location=9, clusters=4)], min_box_iou=None)
    assert type(model.image_encoder).__name__ == "ImageEncoderViT" and "_samfx_component" not in vars(model.image_encoder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_many_clusters_for_the_window_is_a_reported_skip() -> None:
    optimized = samfx.optimize(small_model("sam_vit_b"), [TokenClusterConfig(location=0, clusters=(5, 2))],
                               min_box_iou=None)
    report = optimized.samfx_report.passes[0]
    assert not report.changed and "5x2 clusters do not fit 4x4 windows" in report.skipped[0]


def test_cluster_counts_become_grids() -> None:
    assert cluster_grid(81) == (9, 9) and cluster_grid(90) == (9, 10) and cluster_grid((3, 7)) == (3, 7)
    assert cluster_grid(7) == (1, 7)


@pytest.mark.parametrize("order", [("split_qkv", "token_cluster"), ("token_cluster", "split_qkv")])
def test_composes_with_split_qkv(order) -> None:
    model = _padded_sam_encoder()
    cluster = TokenClusterConfig(location=1, clusters=9)
    passes = [cluster if name == "token_cluster" else name for name in order]
    both = samfx.optimize(model, passes, min_box_iou=None)
    alone = samfx.optimize(model, [cluster], min_box_iou=None)
    assert all(p.changed for p in both.samfx_report.passes)
    assert not any(n.endswith(".qkv") for n, _ in both.named_modules())
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(both(x), alone(x), atol=1e-5, rtol=1e-5)


def test_save_and_load_replay_the_clusters(tmp_path) -> None:
    model = small_model("sam_vit_b")
    optimized = samfx.optimize(model, [TokenClusterConfig(location=0, clusters=(2, 3))], min_box_iou=None)
    again = samfx.load(samfx.save(optimized, tmp_path / "tc"))
    assert again.samfx_report.passes[0].replay == {"location": 0, "clusters": [2, 3]}
    x = image_input(model, 1)
    torch.testing.assert_close(encoder_output(again, x), encoder_output(optimized, x))


def test_tuner_picks_the_cheapest_setting_above_the_floor() -> None:
    model = small_model("sam_vit_b")
    config = TokenClusterConfig(floor=0.9, cluster_choices=(4, 9, 16), images=("coins",))
    result = tune_token_cluster(model, config)
    ratios = [c.macs_ratio for c in result.candidates]
    assert ratios == sorted(ratios, reverse=True) and len(result.candidates) == 6  # 2 locations x 3 counts
    curve = result.curve()
    assert curve and all(c.mask_iou is not None and c.encoder_s > 0 for c in curve)
    if result.chosen is not None:
        assert result.chosen.mask_iou >= 0.9 and result.chosen is curve[-1]
        assert all(c.mask_iou < 0.9 for c in curve[:-1])
    for skipped in (c for c in result.candidates if c.note.startswith("not run: an equally early")):
        assert any(f.location >= skipped.location and np.prod(f.clusters) >= np.prod(skipped.clusters)
                   for f in curve if f.mask_iou < 0.9)
    # One cluster per token (16 per 4x4 window) gives the original's cost.
    assert min(ratios) == pytest.approx(1.0, abs=0.1)


def test_pass_tunes_when_no_location_is_given() -> None:
    model = small_model("sam_vit_b")
    config = TokenClusterConfig(floor=0.5, cluster_choices=(9, 16), images=("coins",), max_evaluations=3)
    optimized = samfx.optimize(model, [config], min_box_iou=None)
    report = optimized.samfx_report.passes[0]
    tuning = report.details["tuning"]
    assert report.changed and tuning["chosen"]["mask_iou"] >= 0.5
    assert report.replay == {"location": tuning["chosen"]["location"], "clusters": tuning["chosen"]["clusters"]}


def test_predictors_run_on_the_clustered_model() -> None:
    from segment_anything import SamPredictor

    model = small_model("sam_vit_b")
    optimized = samfx.optimize(model, [TokenClusterConfig(location=1, clusters=9)], min_box_iou=None)
    predictor = SamPredictor(optimized)
    predictor.set_image((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    masks, scores, _ = predictor.predict(point_coords=np.array([[40, 30]]), point_labels=np.array([1]))
    assert masks.shape == (3, 64, 96) and np.isfinite(scores).all()
