"""A decoder traced for one or three masks computes only those: the same masks, fewer MLPs."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch.export import Dim

from samfx.emit.selected_masks import compute_selected_masks_only


class _Decoder(torch.nn.Module):
    def __init__(self, multimask_output: bool) -> None:
        super().__init__()
        self.decoder = MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(
            depth=1, embedding_dim=32, mlp_dim=64, num_heads=2))
        self.multimask_output = multimask_output

    def forward(self, embeddings, pe, sparse, dense):
        return self.decoder(embeddings, pe, sparse, dense, self.multimask_output)


def _linears(program: torch.export.ExportedProgram) -> int:
    return sum(node.target is torch.ops.aten.linear.default for node in program.graph.nodes)


@pytest.mark.parametrize("multimask_output", [False, True], ids=["one mask", "three masks"])
def test_only_the_returned_masks_are_computed(multimask_output: bool) -> None:
    torch.manual_seed(0)
    decoder = _Decoder(multimask_output).eval()
    embeddings, pe, dense = (torch.randn(1, 32, 8, 8) for _ in range(3))
    example = (embeddings, pe, torch.randn(3, 4, 32), dense)
    program = torch.export.export(decoder, example, dynamic_shapes=({}, {}, {0: Dim("n", max=64)}, {}))
    linears = _linears(program)
    assert compute_selected_masks_only(program.graph_module) == 1
    # The unused mask tokens' hypernetwork MLPs (three layers each) are gone.
    assert _linears(program) == linears - 3 * (1 if multimask_output else 3)
    products = [node.meta["val"].shape for node in program.graph.nodes if node.target is torch.ops.aten.matmul.default]
    assert products[-1][1] == (3 if multimask_output else 1)
    inputs = (embeddings, pe, torch.randn(5, 4, 32), dense)
    with torch.inference_mode():
        for got, want in zip(program.module()(*inputs), decoder(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # a smaller product may round differently
