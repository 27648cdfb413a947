"""The attention rewrite on hand-written graphs: what it matches and what it leaves."""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from samfx.emit.rewrites import RewriteContext, rewrite_attention
from samfx.kernels import rel_pos_attention_reference


def _rewrite(fn, *args, differentiable: bool = False):
    """Capture ``fn`` with Dynamo, run the rewrite; returns (count, targets, output)."""
    captured = {}

    def backend(gm, example_inputs):
        captured["count"] = rewrite_attention(gm, RewriteContext(example_inputs, differentiable))
        captured["targets"] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend)(*args)
    return captured["count"], captured["targets"], out


def _plain(q, k, v):
    return torch.softmax(q @ k.permute(0, 1, 3, 2) / 4.0, dim=-1) @ v


def _biased(q, k, v, bias):
    return ((q @ k.transpose(-2, -1)) * 0.25 + bias).softmax(-1) @ v


def _rel_pos(q, k, v, rel_h, rel_w):
    n, qh, qw, kh = rel_h.shape
    scores = (q * 0.25) @ k.transpose(-2, -1)
    scores = (scores.view(n, qh, qw, kh, -1) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(n, qh * qw, -1)
    return scores.softmax(dim=-1) @ v


def test_plain_attention_becomes_sdpa() -> None:
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    count, targets, out = _rewrite(_plain, q, k, v)
    assert count == 1 and any("scaled_dot_product_attention" in t for t in targets)
    assert not any("softmax" in t for t in targets)
    torch.testing.assert_close(out, _plain(q, k, v), rtol=1e-5, atol=1e-5)


def test_additive_bias_becomes_the_sdpa_mask() -> None:
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    bias = torch.randn(3, 10, 10)
    count, _, out = _rewrite(_biased, q, k, v, bias)
    assert count == 1
    torch.testing.assert_close(out, _biased(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_decomposed_rel_pos_becomes_samfx_op_unless_gradients_are_needed() -> None:
    q, k, v = (torch.randn(4, 12, 8) for _ in range(3))
    rel_h, rel_w = torch.randn(4, 3, 4, 3), torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        count, targets, out = _rewrite(_rel_pos, q, k, v, rel_h, rel_w)
    assert count == 1 and "samfx.rel_pos_attention.default" in targets
    expected = rel_pos_attention_reference(q, k, v, rel_h.reshape(4, 12, 3), rel_w.reshape(4, 12, 4), 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The samfx op has no backward: a graph that needs one gets SDPA with the bias as its mask.
    count, targets, out = _rewrite(_rel_pos, q, k, v, rel_h, rel_w.requires_grad_(), differentiable=True)
    assert count == 1 and "samfx.rel_pos_attention.default" not in targets
    out.sum().backward()
    assert rel_w.grad is not None


def test_attention_whose_probabilities_are_used_elsewhere_is_left_alone() -> None:
    def returns_probabilities(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return p @ v, p

    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    count, targets, _ = _rewrite(returns_probabilities, q, k, v)
    assert count == 0 and any("softmax" in t for t in targets)


def test_softmax_over_another_dimension_is_left_alone() -> None:
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    count, _, _ = _rewrite(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=1) @ v, q, k, v)
    assert count == 0


def test_sam_vit_attention_module_is_rewritten() -> None:
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    attention = Attention(32, num_heads=2, use_rel_pos=True, input_size=(6, 6)).eval()
    nn.init.normal_(attention.rel_pos_h, std=0.5)
    nn.init.normal_(attention.rel_pos_w, std=0.5)
    x = torch.randn(2, 6, 6, 32)
    with torch.no_grad():
        count, targets, out = _rewrite(attention, x)
        expected = attention(x)
    assert count == 1 and "samfx.rel_pos_attention.default" in targets
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
