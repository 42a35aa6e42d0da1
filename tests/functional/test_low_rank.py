"""Truncated-SVD factorization math, checked against torch.linalg.svd and against the dense layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.functional.low_rank import (
    dense_params,
    factorized_params,
    full_rank,
    kept_energy,
    rank_for_energy,
    rank_for_params,
    rank_for_ratio,
    singular_values,
    truncated_svd,
)
from lightning_compress.layers.low_rank import (
    LowRankConv2d,
    LowRankLinear,
    build_factorized,
    factorize,
    rebuild_from_state_dict,
    replace_module,
)


def _spectral_linear(out_f: int, in_f: int, seed: int = 0) -> nn.Linear:
    """A Linear whose weight has a decaying spectrum, like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    k = min(out_f, in_f)
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / 4)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(u[:, :k] @ torch.diag(s) @ v[:, :k].T)
    return lin


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_linear_full_rank_is_exact_and_error_falls_with_rank(shape: tuple[int, int]) -> None:
    lin = _spectral_linear(*shape)
    x = torch.randn(64, shape[1], generator=torch.Generator().manual_seed(1))
    ref = lin(x)
    full = factorize(lin, full_rank(lin))
    torch.testing.assert_close(full(x), ref, atol=1e-5, rtol=1e-5)
    s_ref = torch.linalg.svd(lin.weight.detach().double()).S
    errors = []
    for rank in (1, 2, 4, 8, 16):
        low = factorize(lin, rank)
        w = (low.up.weight @ low.down.weight).double()
        # Eckart-Young: the weight error is exactly the norm of the dropped singular values
        expected = s_ref[rank:].pow(2).sum().sqrt()
        torch.testing.assert_close(torch.linalg.norm(w - lin.weight.double()), expected, atol=1e-5, rtol=1e-4)
        errors.append(float((low(x) - ref).detach().pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 1e-3


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=False),
        nn.Conv2d(2, 5, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["plain", "strided-dilated-nobias", "reflect"],
)
def test_conv_full_rank_is_exact_and_error_falls_with_rank(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 9, 9)
    ref = conv(x)
    full = factorize(conv, full_rank(conv))
    assert isinstance(full, LowRankConv2d) and full.up.kernel_size == (1, 1)
    torch.testing.assert_close(full(x), ref, atol=1e-5, rtol=1e-5)
    errors = [float((factorize(conv, r)(x) - ref).detach().pow(2).mean()) for r in range(1, full_rank(conv) + 1)]
    assert all(a >= b for a, b in zip(errors, errors[1:], strict=False)) and errors[0] > errors[-1] + 1e-4


def test_parameter_counts_match_the_modules() -> None:
    for layer in (nn.Linear(64, 300), nn.Linear(10, 5, bias=False), nn.Conv2d(8, 16, 3)):
        for rank in (1, 3):
            low = factorize(layer, rank)
            assert factorized_params(layer, rank) == sum(p.numel() for p in low.parameters())
        assert dense_params(layer) == sum(p.numel() for p in layer.parameters())


def test_bias_is_kept_as_the_same_parameter_and_mode_is_copied() -> None:
    lin = nn.Linear(6, 4).eval()
    low = factorize(lin, 2)
    assert low.up.bias is lin.bias and low.down.bias is None and not low.training
    assert isinstance(build_factorized(lin, 3), LowRankLinear)


def test_rank_rules_against_brute_force() -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])
    sq = s**2
    for energy in (0.1, 0.5, 0.7, 0.9, 0.99, 0.999999, 1.0):
        brute = next(r for r in range(1, 6) if sq[:r].sum() / sq.sum() >= energy - 1e-12)
        assert rank_for_energy(s, energy) == brute
        assert kept_energy(s, brute) >= energy - 1e-9
    assert rank_for_energy(torch.zeros(3), 0.5) == 1 and kept_energy(torch.zeros(3), 1) == 1.0
    assert [rank_for_ratio(64, r) for r in (0.01, 0.25, 0.5, 1.0)] == [1, 16, 32, 64]
    for layer, ratio in ((nn.Linear(64, 300), 0.25), (nn.Linear(300, 100), 0.25), (nn.Conv2d(8, 16, 3), 0.5)):
        r = rank_for_params(layer, ratio)
        weight = layer.weight.numel()
        assert factorized_params(layer, r) - (layer.bias.numel()) <= ratio * weight
        assert factorized_params(layer, r + 1) - (layer.bias.numel()) > ratio * weight


def test_singular_values_and_truncated_svd_match_reference() -> None:
    lin = _spectral_linear(12, 7)
    torch.testing.assert_close(singular_values(lin), torch.linalg.svdvals(lin.weight.detach().double()))
    up, down = truncated_svd(lin.weight.detach(), 3)
    assert up.dtype == torch.float32 and up.shape == (12, 3) and down.shape == (3, 7)
    # balanced split: both factors carry sqrt(S)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), atol=1e-5, rtol=1e-5)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"`rank` must be an integer in \[1, 4\]"):
        build_factorized(nn.Linear(4, 6), 5)
    with pytest.raises(ValueError, match="`rank`"):
        build_factorized(nn.Linear(4, 6), 0)
    with pytest.raises(TypeError, match="Conv1d"):
        factorize(nn.Conv1d(2, 4, 3), 1)
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        factorize(nn.MultiheadAttention(8, 2).out_proj, 2)
    with pytest.raises(ValueError, match="groups=2"):
        factorize(nn.Conv2d(4, 4, 3, groups=2), 1)
    with pytest.raises(ValueError, match=r"`energy` must be in \(0, 1\], got 0"):
        rank_for_energy(torch.ones(3), 0)
    with pytest.raises(ValueError, match="`rank_ratio`"):
        rank_for_ratio(4, 1.5)
    with pytest.raises(ValueError, match="`param_ratio`"):
        rank_for_params(nn.Linear(3, 3), -0.1)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 3\]"):
        truncated_svd(torch.ones(3, 5), 4)


def test_replace_module_nested() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 3)), nn.ReLU())
    new = nn.Identity()
    old = replace_module(net, "0.0", new)
    assert isinstance(old, nn.Linear) and net[0][0] is new


def test_rebuild_from_state_dict_restores_structure_and_function() -> None:
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    trained[0] = factorize(trained[0], 3)
    trained[3] = factorize(trained[3], 4)
    saved = trained.state_dict()
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    fresh[3] = factorize(fresh[3], 2)  # factorized at another rank: rebuilt at the saved one
    assert rebuild_from_state_dict(fresh, saved) == ["0", "3"]
    fresh.load_state_dict(saved)  # strict
    assert isinstance(fresh[0], LowRankConv2d) and fresh[3].rank == 4
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x))
    plain = nn.Sequential(nn.Linear(4, 4))
    assert rebuild_from_state_dict(plain, plain.state_dict()) == [] and type(plain[0]) is nn.Linear
