"""slice_width: the exported sub-network computes what the slimmed layers compute at that width."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.export.slimmable import slice_width
from tests.export.test_pruning import ResidualCNN, TwoBranch


def test_mlp_slice_is_the_first_units_of_each_hidden_layer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 10)
    )
    x = torch.rand(5, 1, 8, 8)
    small = slice_width(net, 0.25)
    assert [m.weight.shape for m in small if isinstance(m, nn.Linear)] == [(10, 64), (5, 10), (10, 5)]
    # reference: the same function written out with sliced weights
    h = F.relu(F.linear(x.flatten(1), net[1].weight[:10], net[1].bias[:10]))
    h = F.relu(F.linear(h, net[3].weight[:5, :10], net[3].bias[:5]))
    torch.testing.assert_close(small(x), F.linear(h, net[5].weight[:, :5], net[5].bias))
    torch.testing.assert_close(slice_width(net, 1.0)(x), net(x))
    assert net[1].out_features == 40  # the original is untouched


def test_residual_groups_share_a_width_and_concat_parts_slice_separately() -> None:
    res = slice_width(ResidualCNN(8), 0.5, calibration=[torch.rand(16, 1, 8, 8)])
    assert (
        res.stem[0].out_channels
        == res.conv2.out_channels
        == res.conv1.out_channels
        == res.head.in_features
        == 4
    )
    assert res(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    two = slice_width(TwoBranch(), 0.5, calibration=[torch.rand(4, 1, 8, 8)])
    assert (two.a.out_channels, two.b.out_channels, two.bn.num_features, two.mix.in_channels) == (2, 3, 5, 5)
    assert (two.mix.out_channels, two.head.in_features, two.head.out_features) == (3, 3 * 36, 3)


def test_calibration_recomputes_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 3)
    )
    batches = [torch.rand(16, 1, 8, 8) for _ in range(3)]
    small = slice_width(net, 0.5, calibration=[(b, torch.zeros(16)) for b in batches])
    with torch.no_grad():
        conv_out = torch.cat([small[0](b) for b in batches])
    torch.testing.assert_close(small[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert small[1].momentum == 0.1 and small.training


def test_bn_stats_are_installed_and_checked() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 3)
    )
    stats = {"1": {"running_mean": torch.arange(4.0), "running_var": torch.full((4,), 2.0)}}
    small = slice_width(net, 0.5, bn_stats=stats)
    assert torch.equal(small[1].running_mean, torch.arange(4.0)) and torch.equal(
        small[1].running_var, torch.full((4,), 2.0)
    )
    with pytest.raises(ValueError, match=r"`bn_stats`: '1' needs running statistics of shape \(4,\)"):
        slice_width(net, 0.5, bn_stats={"1": {"running_mean": torch.zeros(8), "running_var": torch.ones(8)}})
    with pytest.raises(ValueError, match="`bn_stats` is required"):
        slice_width(net, 0.5)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"`width` must be a fraction in \(0, 1\]"):
            slice_width(net, bad)


def test_flattened_per_position_linear_keeps_the_units_it_drops_out_of_the_consumer() -> None:
    """A Linear over (N, T, C) flattens channels-last (t * C + c): its slice must drop the right inputs."""

    class PerPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(3 * 6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flatten(F.relu(self.a(x)), 1))

    torch.manual_seed(0)
    net = PerPosition()
    x = torch.randn(5, 3, 4)
    small = slice_width(net, 0.5)
    kept = small.a.out_features
    # reference: the full model with the dropped units silenced (ReLU(0) = 0 feeds nothing into `b`)
    reference = PerPosition()
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        reference.a.weight[kept:] = 0.0
        reference.a.bias[kept:] = 0.0
    torch.testing.assert_close(small(x), reference(x))


def test_calibration_leaves_the_statistics_of_unsliced_batchnorms_alone() -> None:
    """An input BatchNorm is not slimmed (SlimmableTraining runs it on its own buffers at every width)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].running_mean.copy_(torch.randn(6))
        net[0].running_var.copy_(torch.rand(6) + 0.5)
    batches = [torch.randn(32, 6) * 3 + 5 for _ in range(3)]
    small = slice_width(net, 0.5, calibration=batches)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(small[0], key), getattr(net[0], key)), key
    with torch.no_grad():
        hidden = torch.cat([small[1](small[0].eval()(b)) for b in batches])
    torch.testing.assert_close(small[2].running_mean, hidden.mean(dim=0), atol=1e-5, rtol=1e-5)
