"""The ``token_cluster`` rewrite: its config, and clustering a captured image encoder
before block ``location`` and rebuilding the token map before the neck.

Where the clusters go comes from the adapter (:meth:`Adapter.token_stages`,
:meth:`Adapter.window_call`); nothing here depends on a model class.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from ...capture import CaptureError, CapturedModel, Component
from ...graph import module_paths
from ...kernels import token_cluster as ops
from ..base import PassConfig, PassError

__all__ = ["TokenClusterConfig", "cluster_grid"]


@dataclass(frozen=True)
class TokenClusterConfig(PassConfig):
    """Options of :func:`token_cluster`.

    Attributes:
        location: index of the block before which tokens are clustered
            (Expedit-SAM's ``clustering_location``). ``None``: choose location
            and clusters with :func:`tune` on the calibration images.
        clusters: clusters per window: a count (a perfect square gives a square
            grid; other counts the most nearly square ``rows x cols`` grid) or
            ``(rows, cols)``.
        iterations: soft k-means iterations.
        temperature: multiplies squared distances in assignments and weights.
        neighbourhood: side of the square of cells a token may be assigned to,
            centred on its own cell (odd).
        k: clusters each token is rebuilt from.
        norm: how a token's weights are normalised: ``"l2"`` (Expedit-SAM) or
            ``"sum"`` (a weighted mean; see :func:`samfx.kernels.token_cluster.token_reconstruct`).
        residual: rebuild a token as its own features plus the weighted change
            of its clusters, instead of the weighted clusters (Expedit-SAM).
        floor: tuning: the least mean mask IoU against the unclustered model.
        cluster_choices: tuning: cluster counts to try (empty: every square
            grid from half the window's side to one short of it, 49..169 for
            SAM's 14x14 windows).
        locations: tuning: locations to try (empty: every block that can be one).
        images: tuning: package images to use when no calibration images are
            given (calibration photos: never the held-out ones the fidelity
            floor and reports are measured on).
        max_evaluations: tuning: settings to run on the images at most.
    """

    location: int | None = None
    clusters: int | tuple[int, int] = 81
    iterations: int = 5
    temperature: float = 0.01
    neighbourhood: int = 5
    k: int = 20
    norm: str = "l2"
    residual: bool = False
    floor: float = 0.90
    cluster_choices: tuple[int, ...] = ()
    locations: tuple[int, ...] = ()
    images: tuple[str, ...] = ("chelsea", "rocket", "camera")
    max_evaluations: int = 16

    def validate(self) -> None:
        """Raise :class:`PassError` naming the first bad option."""
        checks = [
            (self.location is None or self.location >= 0, f"location must be >= 0, got {self.location}"),
            (self.iterations >= 0, f"iterations must be >= 0, got {self.iterations}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.neighbourhood >= 1 and self.neighbourhood % 2 == 1,
             f"neighbourhood must be an odd number of cells >= 1, got {self.neighbourhood}"),
            (self.k >= 1, f"k must be >= 1, got {self.k}"),
            (self.norm in ops.NORMS, f"norm must be one of {ops.NORMS}, got {self.norm!r}"),
            (0 < self.floor <= 1, f"floor is a mask IoU in (0, 1], got {self.floor}"),
            (all(isinstance(c, int) and c >= 1 for c in self.cluster_choices),
             f"cluster_choices must be counts >= 1, got {self.cluster_choices}"),
            (self.max_evaluations >= 1, f"max_evaluations must be >= 1, got {self.max_evaluations}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PassError(f"token_cluster: {message}")
        cluster_grid(self.clusters)


def cluster_grid(clusters: int | Sequence[int]) -> tuple[int, int]:
    """``(rows, cols)`` of clusters per window for a count or a pair.

    A count is laid out as the most nearly square grid with ``rows <= cols``
    (81 -> 9x9, 90 -> 9x10, 7 -> 1x7).
    """
    if isinstance(clusters, (tuple, list)):
        if len(clusters) != 2 or any(not isinstance(c, int) or c < 1 for c in clusters):
            raise PassError(f"token_cluster: clusters as a grid is (rows, cols) of counts >= 1, got {clusters}")
        return int(clusters[0]), int(clusters[1])
    if not isinstance(clusters, int) or clusters < 1:
        raise PassError(f"token_cluster: clusters must be a count >= 1 or (rows, cols), got {clusters!r}")
    rows = max(r for r in range(1, math.isqrt(clusters) + 1) if clusters % r == 0)
    return rows, clusters // rows


@dataclass(frozen=True)
class _Setting:
    location: int
    grid: tuple[int, int]
    iterations: int
    temperature: float
    radius: int
    k: int
    norm: str
    residual: bool


class _Unsupported(Exception):
    pass


# -- the rewrite ---------------------------------------------------------------------

def _tensor(node: fx.Node) -> torch.Tensor | None:
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


@dataclass
class _Block:
    path: str
    window: int
    nodes: list[fx.Node]
    members: set[fx.Node]
    output: fx.Node
    windows: list[tuple[str, fx.Node]]


def _block(graph: fx.Graph, root: torch.nn.Module, adapter: Any, path: str, window: int, rank: int) -> _Block:
    nodes = [n for n in graph.nodes if path in module_paths(n)]
    if not nodes:
        raise _Unsupported(f"block {path} is not in the graph")
    members = set(nodes)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    if len(outputs) != 1 or _tensor(outputs[0]) is None or _tensor(outputs[0]).dim() != rank:
        raise _Unsupported(f"block {path} does not hand one rank-{rank} token tensor on ({[n.name for n in outputs]})")
    calls = [(adapter.window_call(root, n), n) for n in nodes]
    return _Block(path, window, nodes, members, outputs[0], [(kind, n) for kind, n in calls if kind is not None])


def _stream_input(block: _Block, rank: int) -> fx.Node:
    inputs = {m for n in block.nodes for m in n.all_input_nodes
              if m not in block.members and m.op != "get_attr" and _tensor(m) is not None}
    if len(inputs) != 1:
        raise _Unsupported(f"block {block.path} reads {len(inputs)} tensors from outside, not one token map")
    (x,) = inputs
    if _tensor(x).dim() != rank:
        raise _Unsupported(f"block {block.path} reads a rank-{_tensor(x).dim()} tensor, not rank {rank}")
    return x


def _stage_window(windows: Sequence[int], path: str) -> int:
    sizes = sorted({w for w in windows if w})
    if len(sizes) != 1:
        raise _Unsupported(f"the blocks from {path} on attend in windows of {sizes or 'no size'}; "
                           "clusters need one window size")
    return sizes[0]


def _check_window_calls(block: _Block) -> None:
    kinds = sorted(kind for kind, _ in block.windows)
    expected = ["partition", "unpartition"] if block.window else []
    if kinds != expected:
        raise _Unsupported(f"block {block.path} has window calls {kinds}, expected {expected}")
    if any(n.args[1] != block.window for _, n in block.windows):
        raise _Unsupported(f"block {block.path} does not pass its window size {block.window} as a constant")


def _signature(nodes: Sequence[fx.Node]) -> list[tuple[str, Any]]:
    return [(n.op, n.target) for n in nodes if n.op not in ("placeholder", "output")]


def _splice(graph: fx.Graph, block: _Block, traced: fx.Graph, source: fx.Node) -> fx.Node:
    """Put ``traced`` (the block re-traced) in place of ``block``'s nodes, reading
    ``source``; returns the new output."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(block.nodes, key=order.__getitem__)
    outer = {k: v for k, v in first.meta.get("nn_module_stack", {}).items()
             if block.path.startswith(k.split("@")[0] + ".")}
    mapping: dict[fx.Node, Any] = {}
    with graph.inserting_before(first):
        for node in traced.nodes:
            if node.op == "placeholder":
                mapping[node] = source
            elif node.op == "output":
                output = fx.node.map_arg(node.args[0], mapping.__getitem__)
            else:
                mapping[node] = graph.node_copy(node, mapping.__getitem__)
                mapping[node].meta["nn_module_stack"] = {**outer, **node.meta.get("nn_module_stack", {})}
    block.output.replace_all_uses_with(output)
    for node in sorted(block.nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    return output


def _rewrite_graph(graph: fx.Graph, component: Component, adapter: Any, stage: Any, start: int,
                   setting: _Setting, resized: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Plan everything first (raising :class:`_Unsupported`), then edit ``graph``.

    ``resized`` holds the re-sized blocks of a ``"sequence"`` stage.
    """
    root = component.root
    sequence = stage.layout == "sequence"
    rank = 3 if sequence else 4
    paths, windows = stage.blocks[start:], stage.windows[start:]
    window = _stage_window(stage.windows, paths[0])
    grid = setting.grid
    if grid[0] > window or grid[1] > window:
        raise _Unsupported(f"{grid[0]}x{grid[1]} clusters do not fit {window}x{window} windows")
    blocks = [_block(graph, root, adapter, p, w, rank) for p, w in zip(paths, windows)]
    x = _stream_input(blocks[0], rank)
    for block, nxt in zip(blocks, blocks[1:]):
        if _stream_input(nxt, rank) is not block.output:
            raise _Unsupported(f"block {nxt.path} does not read the map {block.path} hands on")
    odd = [b.path for b in blocks if b.window not in (0, window)]
    if odd:
        raise _Unsupported(f"blocks {odd} attend in windows other than the {window}x{window} ones clusters are made in")
    if sequence:
        size = tuple(stage.size)
        traced = {}
        for block in blocks:
            try:
                upstream = _signature(component.trace_submodule(block.path, root.get_submodule(block.path)).nodes)
            except CaptureError:
                upstream = None
            if _signature(block.nodes) != upstream:
                raise _Unsupported(f"block {block.path} was rewritten by an earlier pass; its code fixes the map size, "
                                   "so it is re-traced at the cluster size, which needs the upstream block: run "
                                   "token_cluster first")
            try:
                traced[block.path] = component.trace_submodule(block.path, resized[block.path])
            except CaptureError as err:
                raise _Unsupported(str(err)) from None
    else:
        size = tuple(_tensor(x).shape[1:3])
        for block in blocks:
            _check_window_calls(block)

    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(blocks[0].nodes, key=order.__getitem__)
    # New nodes belong to the module that holds the blocks (the encoder, Hiera's trunk).
    outer = {k: v for k, v in first.meta.get("nn_module_stack", {}).items()
             if blocks[0].path.startswith(k.split("@")[0] + ".")}
    window2, grid2 = [window, window], list(grid)
    clustered_size = ops.clustered_size(size, (window, window), grid)

    def add(function: Any, args: tuple[Any, ...]) -> fx.Node:
        node = graph.call_function(function, args)
        node.meta["nn_module_stack"] = dict(outer)
        return node

    with graph.inserting_before(first):
        features = add(torch.unflatten, (x, 1, size)) if sequence else x
        clustered = add(torch.ops.samfx.token_cluster.default,
                        (features, window2, grid2, setting.iterations, setting.temperature, setting.radius))
        stream = add(torch.flatten, (clustered, 1, 2)) if sequence else clustered
    replaced = []
    if sequence:
        for block in blocks:
            stream = block.output = _splice(graph, block, traced[block.path], stream)
    else:
        for node in blocks[0].nodes:
            node.replace_input_with(x, stream)
        for block in blocks:
            for kind, call in block.windows:
                with graph.inserting_before(call):
                    if kind == "partition":
                        new = graph.call_function(ops.partition_windows, (call.args[0], tuple(grid)))
                    else:
                        new = graph.call_function(ops.unpartition_windows,
                                                  (call.args[0], tuple(grid), *call.args[2:4]))
                new.meta["nn_module_stack"] = dict(call.meta.get("nn_module_stack", {}))
                call.replace_all_uses_with(new)
                graph.erase_node(call)
                if call.op == "call_module":
                    replaced.append(str(call.target))
    rebuilt = 0
    for index, block in enumerate(blocks):
        nxt = blocks[index + 1].path if index + 1 < len(blocks) else None
        outside = [u for u in block.output.users if nxt not in module_paths(u)]
        if not outside:
            continue
        with graph.inserting_before(block.output.next):
            processed = add(torch.unflatten, (block.output, 1, clustered_size)) if sequence else block.output
            restored = add(torch.ops.samfx.token_reconstruct.default,
                           (processed, features, clustered, window2, grid2, setting.k, setting.temperature, setting.norm,
                            setting.residual))
            restored = add(torch.flatten, (restored, 1, 2)) if sequence else restored
        for user in outside:
            user.replace_input_with(block.output, restored)
        rebuilt += 1
    return {"window": window, "size": size, "clustered_size": clustered_size,
            "blocks": len(blocks), "reconstructions": rebuilt, "replaced_modules": replaced}


def _apply(captured: CapturedModel, setting: _Setting) -> tuple[dict[str, Any], list[str]]:
    """Rewrite every image encoder of ``captured``; the details and the skips."""
    details: dict[str, Any] = {}
    skipped: list[str] = []
    adapter = captured.adapter
    for role, component in captured.components.items():
        stages = adapter.token_stages(component.root)
        if not stages:
            if role == "image_encoder":
                skipped.append(f"{role} ({type(component.root).__name__}): no stage of blocks over one token map "
                               f"that {adapter.name}'s adapter can describe, so no place to cluster tokens")
            continue
        found = [(s, s.indices.index(setting.location)) for s in stages if setting.location in s.indices]
        if not found:
            valid = ", ".join(f"{s.indices[0]}..{s.indices[-1]}" for s in stages)
            raise PassError(f"token_cluster: location {setting.location} is not a block that reads the same token "
                            f"map as the blocks after it; locations for this {role}: {valid}")
        stage, start = found[0]
        component.propagate_shapes()
        work = {key: copy.deepcopy(graph) for key, graph in component.graphs.items()}
        try:
            resized = {}
            if stage.layout == "sequence":
                window = _stage_window(stage.windows, stage.blocks[start])
                cells = ops.clustered_size(stage.size, (window, window), setting.grid)
                try:
                    resized = {p: adapter.resized_block(component.root, p, cells, setting.grid)
                               for p in stage.blocks[start:]}
                except ValueError as why:
                    raise _Unsupported(str(why)) from None
            results = [_rewrite_graph(graph, component, adapter, stage, start, setting, resized)
                       for graph in work.values()]
        except _Unsupported as why:
            skipped.append(f"{role}: {why}")
            continue
        for path, block in resized.items():
            component.set_submodule(path, block)
        component.graphs.update(work)
        for target in {t for r in results for t in r.pop("replaced_modules")}:
            component.mark_replaced(target)
        component.delete_unused_submodules()
        component.recompile()
        details[role] = results[0]
    return details, skipped


def _summary(details: dict[str, Any], setting: _Setting) -> str:
    parts = []
    for role, d in details.items():
        (h, w), (ch, cw), win = d["size"], d["clustered_size"], d["window"]
        parts.append(f"{role}: {h}x{w} tokens -> {ch}x{cw} clusters before block {setting.location} "
                     f"({setting.grid[0]}x{setting.grid[1]} per {win}x{win} window)")
    return "; ".join(parts)


def _setting(config: TokenClusterConfig, location: int, clusters: int | Sequence[int]) -> _Setting:
    return _Setting(location, cluster_grid(clusters), config.iterations, config.temperature,
                    config.neighbourhood // 2, config.k, config.norm, config.residual)
