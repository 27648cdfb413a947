"""samfx.graph.nodes: op names across spellings, module paths of repeated calls,
softmax outputs found through dropout modules by type."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from samfx.graph import follows_softmax, module_path, module_paths, op_name


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scores_drop = nn.Dropout(0.0)  # not named attn_drop: found by type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.scores_drop(torch.softmax(self.proj(x), dim=-1))
        return p @ x.transpose(-2, -1)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x) @ x)


def _graph() -> fx.Graph:
    return fx.Tracer().trace(_Twice())


def test_a_module_called_twice_has_one_path() -> None:
    softmaxes = [n for n in _graph().nodes if op_name(n) == "softmax"]
    assert len(softmaxes) == 2
    # fx keys the second call "block@1"; both calls belong to the module "block".
    assert [module_path(n) for n in softmaxes] == ["block", "block"]
    assert all(module_paths(n) == ["block"] for n in softmaxes)


def test_nodes_outside_any_module_have_no_path() -> None:
    placeholder = next(n for n in _graph().nodes if n.op == "placeholder")
    assert module_path(placeholder) is None and module_paths(placeholder) == []


def test_op_names_cover_method_and_function_spellings() -> None:
    gm = fx.symbolic_trace(lambda x: (torch.reshape(x, (-1,)), x.view(-1), torch.bmm(x, x), x.matmul(x)))
    names = [op_name(n) for n in gm.graph.nodes if n.op.startswith("call_")]
    assert names[:4] == ["view", "view", "matmul", "matmul"]


def test_softmax_output_is_found_through_dropout_modules_by_type() -> None:
    root = _Twice()
    graph = fx.Tracer().trace(root)
    products = [n for n in graph.nodes if op_name(n) == "matmul" and module_path(n) == "block"]
    probabilities = [n.args[0] for n in products]
    assert all(p.op == "call_module" for p in probabilities)
    assert all(follows_softmax(p, root) for p in probabilities)
    # Without the root the module cannot be told apart from any other call: not assumed.
    assert not any(follows_softmax(p) for p in probabilities)
    linear = next(n for n in graph.nodes if n.op == "call_module" and n.target == "block.proj")
    assert not follows_softmax(linear, root)
