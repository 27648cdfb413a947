"""Token sequences back to feature maps as reshape-then-permute: the same values, one fewer transpose."""

from __future__ import annotations

import torch

from samfx.emit.token_maps import reshape_then_permute

_aten = torch.ops.aten


class _Upscale(torch.nn.Module):
    """SAM's mask decoder handing its image tokens to the upscaling convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.ConvTranspose2d(32, 8, 2, stride=2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, channels = tokens.shape
        return self.conv(tokens.transpose(1, 2).view(batch, channels, 16, 16))


def _targets(program: torch.export.ExportedProgram) -> list:
    return [node.target for node in program.graph.nodes if node.op == "call_function"]


def test_the_maps_are_the_tokens_seen_channels_last_for_any_batch() -> None:
    model = _Upscale().eval()
    tokens = torch.randn(3, 256, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (tokens,), dynamic_shapes=({0: batch},))
    assert _aten.transpose.int in _targets(program)
    assert reshape_then_permute(program.graph_module) == 1
    assert _aten.transpose.int not in _targets(program) and _aten.permute.default in _targets(program)
    for rows in (1, 5):
        inputs = torch.randn(rows, 256, 32)
        assert torch.equal(program.module()(inputs), model(inputs))


def test_a_transpose_that_is_not_a_token_map_is_left_alone() -> None:
    class _Split(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(2, 2, 2, 24)  # channels split across two axes: not a map

    program = torch.export.export(_Split(), (torch.randn(2, 24, 4),))
    before = _targets(program)
    assert reshape_then_permute(program.graph_module) == 0
    assert _targets(program) == before
