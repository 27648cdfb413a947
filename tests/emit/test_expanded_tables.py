"""Expanded lookup tables stored as table and index: the same values, a smaller file."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from samfx.emit.expanded_tables import _model_adding, factor_expanded_tables


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _stored_bytes(model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values())


def test_a_relative_position_bias_is_stored_small_and_computes_the_same() -> None:
    rng = np.random.default_rng(0)
    side = 14  # TinyViT's 14 x 14 windows: the bias of a pair of tokens is the table's at |dy|, |dx|
    y, x = np.divmod(np.arange(side * side), side)
    index = np.abs(y[:, None] - y[None]) * side + np.abs(x[:, None] - x[None])
    bias = rng.standard_normal((5, side * side)).astype(np.float32)[:, index]
    inputs = rng.standard_normal(bias.shape).astype(np.float32)
    expected = _run(_model_adding(bias), inputs)
    model = _model_adding(bias)
    assert factor_expanded_tables(model) == 1
    assert _stored_bytes(model) < bias.nbytes / 4
    np.testing.assert_array_equal(_run(model, inputs), expected)


def test_blocks_with_the_same_index_share_it() -> None:
    rng = np.random.default_rng(1)
    index = rng.integers(0, 49, (196, 196))
    tables = [rng.standard_normal((8, 49)).astype(np.float32) for _ in range(2)]
    model = _model_adding(tables[0][:, index])
    graph = model.graph
    second = ir.Value(name="second", const_value=ir.tensor(tables[1][:, index], name="second"))
    second.shape, second.dtype = ir.Shape((8, 196, 196)), ir.DataType.FLOAT
    graph.register_initializer(second)
    add = ir.node("Add", [graph.outputs[0], second])
    graph.append(add)
    graph.outputs[0] = add.outputs[0]
    inputs = rng.standard_normal((8, 196, 196)).astype(np.float32)
    expected = _run(model, inputs)
    assert factor_expanded_tables(model) == 2
    assert sum(name.endswith(".index") for name in graph.initializers) == 1
    np.testing.assert_array_equal(_run(model, inputs), expected)


def test_weights_without_repeated_columns_are_left_alone() -> None:
    weight = np.random.default_rng(2).standard_normal((64, 256, 2)).astype(np.float32)
    model = _model_adding(weight)
    assert factor_expanded_tables(model) == 0
    assert list(model.graph.initializers) == ["constant"]
