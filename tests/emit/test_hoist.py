"""Batch-invariant work in exported decoders runs once per image, not once per prompt."""

from __future__ import annotations

import torch
from torch.export import Dim
from torch.utils.flop_counter import FlopCounterMode

from samfx.emit.hoist import hoist_batch_invariant

from ..conftest import small_model


class _BatchedDecoder(torch.nn.Module):
    """A SAM mask decoder given one image embedding and a batch of prompts."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, embeddings, pe, sparse, dense):
        return self.decoder(embeddings, pe, sparse, dense, False)


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_sam_decoder_runs_its_image_side_projections_once_and_gives_the_same_masks() -> None:
    decoder = _BatchedDecoder(small_model("sam_vit_b").mask_decoder).eval()
    channels, side = 32, 8  # the small ViT's embedding
    embeddings, pe, dense = (torch.randn(1, channels, side, side) for _ in range(3))
    example = (embeddings, pe, torch.randn(3, 2, channels), dense)
    program = torch.export.export(decoder, example, dynamic_shapes=({}, {}, {0: Dim("n", max=512)}, {}), strict=False)
    before = program.module()
    assert hoist_batch_invariant(program.graph_module) >= 3  # keys, values, image-to-token queries of layer 0
    inputs = (embeddings, pe, torch.randn(24, 2, channels), dense)
    with torch.inference_mode():
        for got, want in zip(program.module()(*inputs), decoder(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Three 32 -> 16 projections of the 8 x 8 image tokens run once instead of 24 times.
        saved = 3 * (24 - 1) * 2 * side * side * channels * (channels // 2)
        assert _flops(before, *inputs) - _flops(program.module(), *inputs) == saved


def test_work_that_meets_per_prompt_data_stays_batched() -> None:
    class PerPrompt(torch.nn.Module):
        def forward(self, image, prompts):
            return torch.repeat_interleave(image, prompts.shape[0], dim=0) + prompts

    image, prompts = torch.randn(1, 4), torch.randn(5, 4)
    program = torch.export.export(PerPrompt(), (image, prompts), dynamic_shapes=({}, {0: Dim("n")}), strict=False)
    assert hoist_batch_invariant(program.graph_module) == 0
    torch.testing.assert_close(program.module()(image, prompts), image + prompts)


def test_a_layout_change_that_moves_the_batch_dimension_stays_batched() -> None:
    class MovesBatch(torch.nn.Module):
        def forward(self, image, prompts):
            return torch.repeat_interleave(image, prompts.shape[0], dim=0).transpose(0, 1) * 2

    image, prompts = torch.randn(1, 3, 4), torch.randn(5, 4)
    program = torch.export.export(MovesBatch(), (image, prompts), dynamic_shapes=({}, {0: Dim("n")}), strict=False)
    assert hoist_batch_invariant(program.graph_module) == 0
