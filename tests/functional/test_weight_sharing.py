"""k-means codebooks and tied gradients, against a plain reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_compress.functional import weight_sharing as kmeans


def _reference_lloyd(x: np.ndarray, centroids: np.ndarray, iters: int = 50) -> np.ndarray:
    """Textbook Lloyd's algorithm with brute-force nearest centroid; empty clusters dropped."""
    c = centroids.astype(np.float64)
    for _ in range(iters):
        labels = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        used = np.unique(labels)
        new = np.array([x[labels == j].mean() for j in used])
        if len(new) == len(c) and np.allclose(new, c, rtol=0, atol=0):
            break
        c = np.sort(new)
    return c


@pytest.mark.parametrize("k", [2, 4, 16])
def test_kmeans_matches_reference_lloyd(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.cat([torch.randn(400, generator=g) * 0.1 - 0.5, torch.randn(300, generator=g) * 0.2 + 0.4])
    centroids, labels = kmeans.kmeans_1d(x, k, "linear")
    ref = _reference_lloyd(x.double().numpy(), np.linspace(float(x.min()), float(x.max()), k))
    np.testing.assert_allclose(centroids.double().numpy(), ref, rtol=0, atol=1e-6)
    # a fixed point: every value sits with its nearest centroid and every centroid is its members' mean
    nearest = torch.argmin((x[:, None] - centroids[None, :]).abs(), dim=1)
    assert torch.equal(labels, nearest)
    for j in range(len(centroids)):
        assert torch.isclose(x[labels == j].double().mean(), centroids[j].double(), atol=1e-6)


def test_inits() -> None:
    x = torch.arange(100, dtype=torch.float32)
    assert torch.allclose(
        kmeans.init_centroids(x, 5, "linear"), torch.tensor([0.0, 24.75, 49.5, 74.25, 99.0])
    )
    assert torch.allclose(
        kmeans.init_centroids(x, 2, "density"), torch.quantile(x, torch.tensor([0.25, 0.75]))
    )
    a = kmeans.init_centroids(x, 8, "random", torch.Generator().manual_seed(3))
    b = kmeans.init_centroids(x, 8, "random", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and set(a.tolist()) <= set(x.tolist()) and len(set(a.tolist())) == 8
    with pytest.raises(ValueError, match="`init` must be one of"):
        kmeans.init_centroids(x, 2, "kmeans++")
    with pytest.raises(ValueError, match="empty"):
        kmeans.init_centroids(torch.zeros(0), 2)


def test_random_init_draws_distinct_values_when_weights_repeat() -> None:
    """Low-precision or already-shared weights repeat values: Forgy must still draw distinct ones."""
    x = torch.tensor([1.0] * 20 + [2.0, 3.0])
    for seed in range(5):
        c = kmeans.init_centroids(x, 3, "random", torch.Generator().manual_seed(seed))
        assert c.tolist() == [1.0, 2.0, 3.0]
        centroids, labels = kmeans.kmeans_1d(x, 3, "random", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(centroids[labels], x)  # three values, three exact clusters
    assert kmeans.init_centroids(x, 8, "random").tolist() == [1.0, 2.0, 3.0]  # at most the distinct values


@pytest.mark.parametrize("init", kmeans.INITS)
def test_share_keeps_zeros_and_bounds_codebook(init: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=g)
    w[torch.rand(30, 20, generator=g) < 0.7] = 0.0
    codebook, a = kmeans.share(w, bits=3, init=init, generator=torch.Generator().manual_seed(0))
    assert len(codebook) <= 8 and torch.all(codebook[1:] > codebook[:-1])
    assert torch.equal(a == -1, w == 0)
    tied = kmeans.expand(codebook, a)
    assert torch.equal(tied == 0, w == 0)
    assert set(tied[w != 0].tolist()) <= set(codebook.tolist())
    # sharing loses little: error well below the spread of the weights
    assert (tied - w).abs().max() < 0.5 * w.abs().max()


def test_share_edge_cases() -> None:
    codebook, a = kmeans.share(torch.zeros(3, 3), bits=2)
    assert codebook.numel() == 0 and torch.all(a == -1)
    assert torch.equal(kmeans.expand(codebook, a), torch.zeros(3, 3))
    codebook, a = kmeans.share(torch.tensor([[0.0, 2.0], [2.0, 0.0]]), bits=4)
    assert codebook.tolist() == [2.0]
    with pytest.raises(ValueError, match="`bits` must be an integer >= 1"):
        kmeans.share(torch.ones(2), bits=0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cluster_gradient_matches_loop(reduce: str) -> None:
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(6, 5, generator=g)
    a = torch.randint(-1, 3, (6, 5), generator=g)
    out = kmeans.cluster_gradient(grad, a, 3, reduce)
    for i in range(6):
        for j in range(5):
            c = int(a[i, j])
            if c < 0:
                assert out[i, j] == 0
            else:
                members = grad[a == c]
                expected = members.sum() if reduce == "sum" else members.mean()
                assert torch.isclose(out[i, j], expected, atol=1e-6)
    with pytest.raises(ValueError, match="`reduce`"):
        kmeans.cluster_gradient(grad, a, 3, "max")  # type: ignore[arg-type]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_in_place_tying_matches_the_reference(reduce: str) -> None:
    """tie_gradient_ / expand_ on the members' positions equal cluster_gradient / expand on the whole tensor."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 30, generator=g)
    weight[torch.rand(40, 30, generator=g) < 0.8] = 0.0
    codebook, a = kmeans.share(weight, bits=3)
    positions, labels = kmeans.members(a)
    assert torch.equal(positions, torch.nonzero(a.reshape(-1) >= 0).reshape(-1))
    grad = torch.randn(40, 30, generator=g)
    reference = kmeans.cluster_gradient(grad, a, len(codebook), reduce)
    tied = kmeans.tie_gradient_(grad.clone(), positions, labels, len(codebook), reduce)
    torch.testing.assert_close(tied, reference, atol=1e-6, rtol=1e-6)
    assert torch.equal(tied == 0, reference == 0)
    out = torch.full((40, 30), 7.0)  # stale values everywhere: all overwritten
    assert torch.equal(kmeans.expand_(out, codebook, positions, labels), kmeans.expand(codebook, a))
    with pytest.raises(ValueError, match="`reduce`"):
        kmeans.tie_gradient_(grad, positions, labels, len(codebook), "max")  # type: ignore[arg-type]
