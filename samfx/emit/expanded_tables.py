"""Expanded lookup tables in an ONNX graph stored as the small table and its index.

Relative position biases are looked up once from a small learned table and
kept expanded: TinyViT (LiteMedSAM, MobileSAM) caches ``heads x N x N``
biases per attention block (``ab``), 0.77 MB for one 14 x 14 window block of
LiteMedSAM, where the table is ``heads x 196`` and the index ``N x N`` is the
same in every block of a stage. Traced, the expanded copies become
initializers: 45% of LiteMedSAM's int8 encoder file. :func:`factor_expanded_tables`
stores each such initializer as ``Gather(table, index, axis=1)`` over its
distinct columns, with identical indexes shared between blocks. The values are
bit for bit the same; runtimes fold the ``Gather`` when they compile the graph.

Example::

    >>> import numpy as np, onnx_ir as ir
    >>> table = np.arange(20, dtype=np.float32).reshape(4, 5)
    >>> index = np.random.default_rng(0).integers(0, 5, (128, 128))
    >>> model = _model_adding(table[:, index])
    >>> factor_expanded_tables(model)
    1
    >>> [node.op_type for node in model.graph]
    ['Gather', 'Add']
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["factor_expanded_tables"]

#: Initializers below this size are left as they are: too small to matter in the file.
MIN_BYTES = 1 << 16


def factor_expanded_tables(model: Any, min_bytes: int = MIN_BYTES) -> int:
    """Replace every float initializer of ``model`` (an ``onnx_ir.Model``) of at least
    ``min_bytes`` whose ``(rows, ...)`` entries take few distinct columns by a
    ``Gather`` from those columns, when that at least halves its bytes; returns
    how many were replaced."""
    import onnx_ir as ir

    graph = model.graph
    indexes: dict[str, Any] = {}  # digest of an index -> its shared initializer
    replaced = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        array = tensor.numpy()
        if array.dtype.kind != "f" or array.ndim < 2 or array.nbytes < min_bytes:
            continue
        rows = array.shape[0]
        columns, first, inverse = np.unique(array.reshape(rows, -1).T, axis=0, return_index=True,
                                            return_inverse=True)
        # Columns numbered in order of first use (not of value), so that blocks looking up
        # their own tables with the same pattern get the same index.
        order = np.argsort(first)
        columns, index = columns[order], np.argsort(order)[inverse].reshape(array.shape[1:]).astype(np.int32)
        if columns.nbytes + index.nbytes > array.nbytes // 2:
            continue
        digest = hashlib.sha256(index.tobytes() + str(index.shape).encode()).hexdigest()
        if digest not in indexes:
            indexes[digest] = _initializer(graph, f"{name}.index", index)
        table = _initializer(graph, f"{name}.table", np.ascontiguousarray(columns.T))
        gather = ir.node("Gather", [table, indexes[digest]], {"axis": 1}, name=f"{name}.gather")
        gather.outputs[0].name = f"{name}.expanded"
        gather.outputs[0].dtype = value.dtype
        gather.outputs[0].shape = value.shape
        graph.insert_before(graph.node(0), gather)
        ir.convenience.replace_all_uses_with(value, gather.outputs[0])
        graph.initializers.pop(name)
        replaced += 1
    return replaced


def _initializer(graph: Any, name: str, array: np.ndarray) -> Any:
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def _model_adding(constant: np.ndarray) -> Any:
    """A graph ``y = x + constant`` (the docstring's example)."""
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape(constant.shape), type=ir.TensorType(ir.DataType.FLOAT))
    const = ir.Value(name="constant", const_value=ir.tensor(constant, name="constant"))
    const.shape, const.dtype = ir.Shape(constant.shape), ir.DataType.FLOAT
    add = ir.node("Add", [x, const])
    graph = ir.Graph([x], add.outputs, nodes=[add], initializers=[const], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)
