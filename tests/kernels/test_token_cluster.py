"""token_cluster / token_reconstruct ops against their plain per-window references."""

from __future__ import annotations

import pytest
import torch

from samfx.kernels.token_cluster import (
    clustered_size,
    partition_windows,
    reference_token_cluster,
    reference_token_reconstruct,
    token_cluster,
    token_reconstruct,
    unpartition_windows,
)

# (map size, window, grid): padded border windows, rectangular grids, a window
# holding a single token row, a map smaller than one window.
CASES = [
    ((20, 17), (7, 7), (4, 4)),
    ((20, 17), (7, 7), (3, 5)),
    ((14, 14), (7, 7), (7, 7)),
    ((15, 9), (7, 4), (2, 3)),
    ((5, 6), (8, 8), (3, 3)),
]


@pytest.mark.parametrize("size,window,grid", CASES)
@pytest.mark.parametrize("iterations,neighbourhood", [(0, 2), (3, 1), (5, 2)])
def test_cluster_matches_reference(size, window, grid, iterations, neighbourhood) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, *size, 6)
    got = token_cluster(x, window, grid, iterations, temperature=0.2, neighbourhood=neighbourhood)
    want = reference_token_cluster(x, window, grid, iterations, temperature=0.2, neighbourhood=neighbourhood)
    assert got.shape == want.shape == (2, *clustered_size(size, window, grid), 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,window,grid", CASES)
@pytest.mark.parametrize("k,norm,residual", [(1, "l2", False), (3, "l2", False), (50, "l2", False),
                                             (3, "sum", False), (50, "sum", False), (3, "sum", True), (3, "l2", True)])
def test_reconstruct_matches_reference(size, window, grid, k, norm, residual) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, *size, 6)
    centroids = token_cluster(x, window, grid, 2, temperature=0.2)
    # Without the residual, blocks after the clusters may change the width.
    processed = torch.randn(*centroids.shape[:3], 6 if residual else 5)
    options = dict(k=k, temperature=0.2, norm=norm, residual=residual)
    got = token_reconstruct(processed, x, centroids, window, grid, **options)
    want = reference_token_reconstruct(processed, x, centroids, window, grid, **options)
    assert got.shape == (2, *size, processed.shape[-1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_far_tokens_keep_their_weights() -> None:
    """exp(-t d^2) underflows in float32 for features far from every centroid;
    the op's shifted form still gives the float64 reference's answer."""
    torch.manual_seed(2)
    x = torch.randn(1, 14, 14, 8) * 40
    centroids = token_cluster(x, (7, 7), (3, 3), 5, temperature=0.01)
    naive = torch.exp(-0.01 * torch.cdist(x.reshape(1, -1, 8), centroids.reshape(1, -1, 8)) ** 2)
    assert (naive.amax(-1) == 0).any()  # the textbook formula loses some tokens entirely
    got = token_reconstruct(centroids, x, centroids, (7, 7), (3, 3), k=4, temperature=0.01)
    want = reference_token_reconstruct(centroids, x, centroids, (7, 7), (3, 3), k=4, temperature=0.01)
    # rtol 1e-4: float32 distances between features of magnitude ~100 keep about 5 digits, and
    # which GEMM path cdist takes (AVX2, AVX-512, AMX) moves the last of them.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.abs().amax(-1).min() > 0


def test_l2_weights_scale_flat_neighbourhoods_up() -> None:
    """Expedit-SAM's L2-normalised weights sum to sqrt(k) when a token is about
    as close to k clusters: a constant map comes back sqrt(k) times larger,
    where weights that sum to one give it back unchanged."""
    x = torch.full((1, 8, 8, 3), 0.5)
    ones = torch.ones(1, 4, 4, 3)
    centroids = token_cluster(x, (4, 4), (2, 2), iterations=0)
    l2 = token_reconstruct(ones, x, centroids, (4, 4), (2, 2), k=4, norm="l2")
    mean = token_reconstruct(ones, x, centroids, (4, 4), (2, 2), k=4, norm="sum")
    torch.testing.assert_close(l2, torch.full_like(x, 2.0))
    torch.testing.assert_close(mean, torch.ones_like(x))


@pytest.mark.parametrize("size,window", [((20, 17), (7, 7)), ((8, 8), (4, 4)), ((9, 5), (3, 5))])
def test_one_cluster_per_token_is_the_identity(size, window) -> None:
    x = torch.randn(3, *size, 4)
    centroids = token_cluster(x, window, window, iterations=0)
    assert torch.equal(centroids, x)
    assert torch.equal(token_reconstruct(x * 2, x, centroids, window, window, k=1), x * 2)
    torch.testing.assert_close(token_reconstruct(x * 2, x, centroids, window, window, k=1, residual=True), x * 2)


def test_residual_reconstruction_needs_one_width() -> None:
    x = torch.randn(1, 8, 8, 4)
    centroids = token_cluster(x, (4, 4), (2, 2))
    with pytest.raises(ValueError, match="one width"):
        token_reconstruct(torch.randn(1, 4, 4, 3), x, centroids, (4, 4), (2, 2), residual=True)


def test_clustering_reduces_tokens_and_windows_line_up() -> None:
    """Each window of the cluster map (grid-sized) holds one original window's clusters."""
    x = torch.randn(1, 64, 64, 4)
    assert clustered_size((64, 64), (14, 14), (9, 9)) == (41, 41)  # last window: 8 tokens -> 5 cells
    centroids = token_cluster(x, (14, 14), (9, 9), iterations=0)
    first = x[0, :14, :14]
    # With no iteration, cell (0, 0) is the mean of the tokens it covers.
    rows = [r for r in range(14) if r * 9 // 14 == 0]
    torch.testing.assert_close(centroids[0, 0, 0], first[rows][:, rows].reshape(-1, 4).mean(0))
    windows, padded = partition_windows(centroids, (9, 9))
    assert padded == (45, 45) and windows.shape[0] == 25


def test_partition_matches_sam_and_round_trips() -> None:
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    x = torch.randn(2, 11, 13, 3)
    ours, padded = partition_windows(x, (4, 4))
    theirs, their_padded = window_partition(x, 4)
    assert torch.equal(ours, theirs) and padded == their_padded
    assert torch.equal(unpartition_windows(ours, (4, 4), padded, (11, 13)), window_unpartition(theirs, 4, padded, (11, 13)))
    rect, padded = partition_windows(x, (3, 5))
    assert rect.shape == (2 * 4 * 3, 3, 5, 3)
    assert torch.equal(unpartition_windows(rect, (3, 5), padded, (11, 13)), x)


class _Hourglass(torch.nn.Module):
    # A temperature that separates the weights well: which clusters make a
    # token's top k must not hinge on rounding differences between runtimes.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = token_cluster(x, (7, 7), (4, 3), iterations=2, temperature=0.5)
        return token_reconstruct(c.tanh(), x, c, (7, 7), (4, 3), k=5, temperature=0.5)


def test_ops_compile_without_graph_breaks() -> None:
    # Static shapes: symbolic ones cost minutes of solver time through the
    # unrolled k-means; dynamic batch is covered by the ONNX test below.
    x = torch.randn(2, 20, 17, 6)
    compiled = torch.compile(_Hourglass(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), _Hourglass()(x))


def test_ops_export_to_onnx_with_standard_ops(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 20, 17, 6)
    path = tmp_path / "hourglass.onnx"
    torch.onnx.export(_Hourglass().eval(), (x,), str(path), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}  # nothing custom: any runtime can run it
    session = ort.InferenceSession(str(path))
    for batch in (2, 3):
        xb = torch.randn(batch, 20, 17, 6)
        (out,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), _Hourglass()(xb), atol=1e-5, rtol=1e-4)
