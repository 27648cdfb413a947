"""fuse_attention: exact on every family and graph variant, honest about what it leaves."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import samfx
from samfx.passes import FuseAttentionConfig, PassContext, PassError, fuse_attention
from samfx.graph import NoMatch, fuse_graph_attention, match_attention

from ..conftest import SMALL_FAMILIES
from .conftest import assert_components_match, attention_model

FUSED_TARGETS = (torch.ops.samfx.rel_pos_attention.default, torch.nn.functional.scaled_dot_product_attention)


def fused_calls(captured: samfx.CapturedModel, role: str) -> list[fx.Node]:
    return [n for _, n in captured.component(role).nodes() if n.op == "call_function" and n.target in FUSED_TARGETS]


@pytest.mark.parametrize("name", SMALL_FAMILIES + ["hf_sam_vit_b_eager"])
def test_every_attention_is_fused_exactly(name: str) -> None:
    model = attention_model(name)
    captured = samfx.capture(model)
    report = fuse_attention(captured, FuseAttentionConfig(), PassContext()).report
    assert report.skipped == []
    assert_components_match(model, captured, rtol=1e-5)
    counts = report.details["attentions"]
    sites = {role: captured.adapter.attention_sites(c.root) for role, c in captured.components.items()}
    for role, role_sites in sites.items():
        assert sum(counts.get(role, {}).values()) == len(role_sites)
    softmaxes = [n for _, n in captured.component("image_encoder").nodes()
                 if n.op in ("call_method", "call_function") and "softmax" in str(n.target)]
    assert softmaxes == []
    if name.startswith(("sam_vit", "sam_hq", "hf_sam")):
        # decomposed relative positions in every ViT block, never materialised
        assert counts["image_encoder"] == {"rel_pos_attention": len(sites["image_encoder"])}
        ops = fused_calls(captured, "image_encoder")
        assert {n.target for n in ops} == {torch.ops.samfx.rel_pos_attention.default}
    if name.startswith("sam2"):
        assert counts["image_encoder"] == {"already sdpa": len(sites["image_encoder"])}
    if name == "sam_vit_b":  # every specialisation of the decoder is rewritten
        decoder = captured.component("mask_decoder")
        assert len(decoder.graphs) == 2  # multimask_output True and False
        for graph in decoder.graphs.values():
            assert sum(n.target is torch.nn.functional.scaled_dot_product_attention for n in graph.nodes) == 7
    if name == "lite_medsam":  # TinyViT's attention biases become SDPA masks
        assert all("attn_mask" in n.kwargs for n in fused_calls(captured, "image_encoder"))


@pytest.mark.parametrize("order", [("split_qkv", "fuse_attention"), ("fuse_attention", "split_qkv")])
def test_composes_with_split_qkv(order: tuple[str, str]) -> None:
    model = attention_model("sam_vit_b")
    optimized = samfx.optimize(model, list(order), min_box_iou=None)
    assert [p.changed for p in optimized.samfx_report.passes] == [True, True]
    assert not any(name.endswith(".qkv") for name, _ in optimized.named_modules())
    x = torch.randn(2, 3, model.image_encoder.img_size, model.image_encoder.img_size)
    with torch.no_grad():
        torch.testing.assert_close(optimized.image_encoder(x), model.image_encoder(x), rtol=1e-5, atol=1e-5)


def test_mask_mode_gives_sdpa_the_materialised_bias() -> None:
    model = attention_model("sam_hq_vit_b")
    captured = samfx.capture(model, roles=("image_encoder",))
    report = fuse_attention(captured, FuseAttentionConfig(rel_pos="mask"), PassContext()).report
    assert report.details["attentions"]["image_encoder"] == {"sdpa + rel-pos mask": 2}
    assert_components_match(model, captured, rtol=1e-5)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(PassError, match="rel_pos must be one of"):
        FuseAttentionConfig(rel_pos="dense")
    with pytest.raises(PassError, match="unknown attention kinds"):
        samfx.PassConfig.from_dict({"pass": "fuse_attention", "options": {"kinds": ["vit"]}})


def test_kinds_restrict_the_rewrite() -> None:
    captured = samfx.capture(attention_model("sam_vit_b"))
    report = fuse_attention(captured, FuseAttentionConfig(kinds=("decoder",)), PassContext()).report
    assert list(report.details["attentions"]) == ["mask_decoder"]
    assert fused_calls(captured, "image_encoder") == []


def test_real_weights_keep_their_masks(lite_medsam: nn.Module, lite_medsam_reference) -> None:
    captured = samfx.capture(lite_medsam)
    fuse_attention(captured, FuseAttentionConfig(), PassContext())
    fidelity = samfx.fidelity.compare(lite_medsam_reference, captured.model, ["coins"], max_prompts_per_image=8)
    assert fidelity.embedding_cosine_min > 0.99999
    assert fidelity.mask_iou_min > 0.999


# -- the graph-level API, on graphs samfx did not capture ------------------------------------


class ToyRelPosAttention(nn.Module):
    """Decomposed relative positions spelled differently from SAM: function calls,
    a permute for k^T, a division for the scale, the bias on the (B, h, w, h, w) view."""

    def __init__(self, side: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.side, self.dim = side, dim
        self.table_h = nn.Parameter(torch.randn(side, side, dim))
        self.table_w = nn.Parameter(torch.randn(side, side, dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        s = self.side
        scores = torch.matmul(q, k.permute(0, 2, 1)) / 2.0
        grid = q.reshape(b, s, s, c)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid, self.table_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid, self.table_w)
        scores = scores.view(b, s, s, s, s) + rel_w.unsqueeze(3) + rel_h.unsqueeze(4)
        return torch.matmul(torch.softmax(scores.view(b, n, n), dim=-1), v)


def _traced(module: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    traced = fx.symbolic_trace(module)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        FakeTensorProp(traced, mode).propagate(*inputs)
    return traced


def test_graph_api_fuses_any_traced_attention() -> None:
    module = ToyRelPosAttention()
    q, k, v = (torch.randn(3, 16, 8) for _ in range(3))
    traced = _traced(module, q, k, v)
    new, reasons = fuse_graph_attention(traced.graph)
    traced.recompile()
    assert reasons == [] and [n.target for n in new] == [torch.ops.samfx.rel_pos_attention.default]
    assert not any("softmax" in str(n.target) for n in traced.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(traced(q, k, v), module(q, k, v))


class LeakyAttention(nn.Module):
    """Returns its attention probabilities too: the scores must exist, nothing to fuse."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return probs @ v, probs


def test_unfusable_attention_is_left_alone_with_a_reason() -> None:
    q, k, v = (torch.randn(2, 5, 4) for _ in range(3))
    traced = _traced(LeakyAttention(), q, k, v)
    before = [n.format_node() for n in traced.graph.nodes]
    new, reasons = fuse_graph_attention(traced.graph)
    assert new == [] and len(reasons) == 1 and "used elsewhere" in reasons[0]
    assert [n.format_node() for n in traced.graph.nodes] == before
    softmax = next(n for n in traced.graph.nodes if n.target == "softmax")
    with pytest.raises(NoMatch, match="probabilities are used elsewhere"):
        match_attention(softmax)
