"""Few-token attention in exported decoders: the projections move to the few, the masks stay."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch.export import Dim
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from samfx.emit.few_tokens import reassociate_few_token_attention


class _BatchedDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # SAM's decoder at a quarter of its width: heads of width 16 over 16 x 16 image tokens.
        self.decoder = MaskDecoder(transformer_dim=64, transformer=TwoWayTransformer(
            depth=2, embedding_dim=64, mlp_dim=128, num_heads=2))

    def forward(self, embeddings, pe, sparse, dense):
        return self.decoder(embeddings, pe, sparse, dense, False)


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


class _Float32Softmax(TorchFunctionMode):
    """Casts around every softmax, as the float32 copy of a ``bf16``-passed decoder has them
    (its float32 islands): float32 to float32, so they change nothing but the graph."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax):
            return func(args[0].to(torch.float32), *args[1:], **kwargs).to(torch.float32)
        return func(*args, **kwargs)


def _softmax_axes(program) -> dict[str, list[int]]:
    """The axis of each softmax, by attention: the tokens' self-attention, the few prompt tokens
    querying the 16 x 16 image tokens, or the many image tokens querying the few."""
    axes: dict[str, list[int]] = {"self": [], "few queries": [], "many queries": []}
    for node in program.graph.nodes:
        if node.target is torch.ops.aten.softmax.int:
            keys_axis = node.args[1] % 4
            shape = node.meta["val"].shape
            queries, keys = shape[5 - keys_axis], shape[keys_axis]  # the other of the last two axes
            kind = "few queries" if keys == 256 else "many queries" if queries == 256 else "self"
            axes[kind].append(node.args[1])
    return axes


def _exported(points: int, float32_islands: bool = False):
    torch.manual_seed(0)
    decoder = _BatchedDecoder().eval()
    embeddings, pe, dense = (torch.randn(1, 64, 16, 16) for _ in range(3))
    example = (embeddings, pe, torch.randn(3, points, 64), dense)
    dims = ({}, {}, {0: Dim("n", max=512), 1: Dim("points", max=64)}, {})
    if float32_islands:
        with _Float32Softmax():
            program = torch.export.export(decoder, example, dynamic_shapes=dims, strict=False)
    else:
        program = torch.export.export(decoder, example, dynamic_shapes=dims, strict=False)
    return decoder, program, (embeddings, pe, dense)


@pytest.mark.parametrize("float32_islands", [False, True], ids=["float32", "bf16-islands"])
def test_box_prompts_project_their_tokens_not_the_image_and_keep_their_masks(float32_islands: bool) -> None:
    decoder, program, (embeddings, pe, dense) = _exported(points=2, float32_islands=float32_islands)
    before = program.module()
    # Every image-side projection: four in each layer (keys and values of the token-to-image
    # attention, queries and outputs of the image-to-token one), the final keys and values.
    assert reassociate_few_token_attention(program.graph_module) == 10
    # The image-to-token attentions' softmaxes run over their few keys, not along a last axis of them.
    assert _softmax_axes(program) == {"self": [-1] * 2, "few queries": [-1] * 3, "many queries": [2] * 2}
    inputs = (embeddings, pe, torch.randn(24, 2, 64), dense)
    with torch.inference_mode():
        for got, want in zip(program.module()(*inputs), decoder(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert _flops(program.module(), *inputs) < 0.6 * _flops(before, *inputs)
        # Other prompt sizes than the exported example stay correct.
        many = (embeddings, pe, torch.randn(2, 9, 64), dense)
        for got, want in zip(program.module()(*many), decoder(*many)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prompts_with_more_tokens_than_a_head_is_wide_keep_their_projections() -> None:
    _, program, _ = _exported(points=16)
    assert reassociate_few_token_attention(program.graph_module) == 0


def test_projections_of_one_image_row_shared_by_the_prompts_stay_once_per_image() -> None:
    # After share_image_side the transformer meets the image as one row that broadcasts over the
    # prompts: its first projections are paid once, going through the prompt tokens would repeat them.
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128, num_heads=2).eval()
    image, pe = torch.randn(1, 64, 16, 16), torch.randn(1, 64, 16, 16)
    program = torch.export.export(transformer, (image, pe, torch.randn(3, 7, 64)),
                                  dynamic_shapes=({}, {}, {0: Dim("n", max=512)}), strict=False)
    # Layer 0 only its image-to-token output; layer 1 and the final attention as before.
    assert reassociate_few_token_attention(program.graph_module) == 1 + 4 + 2
    assert _softmax_axes(program)["many queries"] == [2] * 2
    tokens = torch.randn(24, 7, 64)
    with torch.inference_mode():
        for got, want in zip(program.module()(image, pe, tokens), transformer(image, pe, tokens)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
