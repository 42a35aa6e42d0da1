"""The pieces of sharded k-means (FSDP2), single process: order statistics by bisection, the quantile and range
initialisations reduced over pieces, per-centroid statistics that add up over pieces, chunked uint8 assignment,
and the cluster representatives. The two-process run itself is the contract's FSDP2 row."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.callbacks._weight_sharing_parts import Ties
from lightning_compress.functional import weight_sharing as kmeans


def _values(n: int = 5000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * 0.1
    v[:50] = v[50:100]  # duplicates
    v[100] = -3.0  # a rare large weight
    return v


def test_order_statistics_by_bisection_are_the_sorted_values() -> None:
    v = _values()
    ranks = torch.tensor([0, 1, 49, 50, 2500, 4998, 4999])
    got = kmeans._order_statistics(v, ranks, v)
    assert torch.equal(got, v.sort().values[ranks])


def test_order_statistics_of_pieces_add_up_to_the_whole() -> None:
    # the bisection needs only counts below a key, which add over pieces: two pieces' counts summed give the
    # whole tensor's, as the all-reduce does
    v = _values()
    keys = kmeans._ordered_keys(v).sort().values
    a, b = (kmeans._ordered_keys(p).sort().values for p in v.chunk(2))
    probe = torch.tensor([-(1 << 31), -5, 0, 1 << 20, int(keys[1234]), (1 << 31) - 1])
    whole = torch.searchsorted(keys, probe, right=True)
    assert torch.equal(torch.searchsorted(a, probe, right=True) + torch.searchsorted(b, probe, right=True), whole)


@pytest.mark.parametrize("method", ["linear", "density"])
def test_reduced_initialisation_equals_the_one_process_one(method: str) -> None:
    v = _values()
    expected = kmeans.init_centroids(v, 8, method)
    got = kmeans._sharded_init(v, 8, method, None, v)
    assert torch.equal(got, expected)


def test_cluster_statistics_add_up_over_pieces() -> None:
    v = _values().double()
    centroids = torch.linspace(-0.3, 0.3, 8, dtype=torch.float64)

    def stats(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = piece.sort().values
        csum = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
        return kmeans._cluster_stats(csum, kmeans._run_bounds(xs, centroids), None)

    counts, sums = stats(v)
    (c0, s0), (c1, s1) = stats(v[:1700]), stats(v[1700:])
    assert torch.equal(c0 + c1, counts)
    assert torch.allclose(s0 + s1, sums, rtol=0, atol=1e-12)


def test_kmeans_labels_of_a_piece_are_those_of_the_whole_run() -> None:
    # with the codebook fixed, a piece's labels are what the whole run gives its entries
    v = _values()
    centroids, labels = kmeans.kmeans_1d(v, 8)
    assert torch.equal(kmeans.assign(v[:700], centroids), labels[:700])


def test_assign_codes_is_assign_in_uint8_chunks() -> None:
    v = _values(10_003).reshape(-1, 7)
    centroids, _ = kmeans.kmeans_1d(v.reshape(-1), 16)
    codes = kmeans.assign_codes(v, centroids, chunk_size=1000)
    assert codes.dtype == torch.uint8 and codes.shape == v.shape
    assert torch.equal(codes.long(), kmeans.assign(v, centroids))
    with pytest.raises(ValueError, match="1 to 256"):
        kmeans.assign_codes(v, torch.linspace(-1, 1, 257))


def test_ties_pick_the_first_member_of_each_cluster() -> None:
    a = torch.tensor([[2, -1, 0], [1, 0, 2]])
    w = torch.tensor([[0.25, 0.0, -0.5], [0.125, -0.75, 0.5]])
    ties = Ties(a, 3, w)
    assert ties.rep.tolist() == [2, 3, 0]
    assert ties.codebook(w, w).tolist() == [-0.5, 0.125, 0.25]
    with pytest.raises(ValueError, match="no member"):
        Ties(torch.tensor([0, 0]), 2, torch.zeros(2))
