"""Channel groups found by tracing (graph.py) and the modules sliced to a plan (slicing.py), on tiny real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.graph import analyze, channels_at
from lightning_compress.slicing import index_plan, slice_modules


class Residual(nn.Module):
    """conv -> bn -> relu, a residual add of two convs, pooling, flatten, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.body(y)
        return self.head(torch.flatten(self.pool(y), 1))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.a(x), self.b(x)], dim=-1))


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sort(self.a(x), dim=-1).values)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.a(x))


def test_a_residual_add_unites_groups_and_flatten_repeats_channels() -> None:
    cg = analyze(Residual())
    assert cg.group_of("stem") == cg.group_of("body")  # the add: both sides keep or drop channels together
    assert cg.followers["bn"] == ((cg.producers["stem"], 8),)
    assert cg.consumers["head"].spatial == 4  # each of the 8 channels 2*2 times after flatten
    assert cg.free_groups() == [cg.group_of("stem")]
    assert cg.pin_reason(cg.group_of("head")) == "is a model output"


def test_cat_gives_segments_and_an_unknown_op_pins_with_its_name() -> None:
    cg = analyze(Concat())
    assert cg.consumers["out"].segments == ((cg.producers["a"], 3), (cg.producers["b"], 5))
    assert sorted(cg.free_groups()) == sorted([cg.group_of("a"), cg.group_of("b")])
    pinned = analyze(Unknown())
    assert "sort" in (pinned.pin_reason(pinned.group_of("a")) or "")
    assert pinned.free_groups() == []


def test_a_layer_called_twice_or_an_untraceable_forward_is_refused() -> None:
    with pytest.raises(ValueError, match="called more than once"):
        analyze(Twice())

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="cannot trace Branchy.forward"):
        analyze(Branchy())


def test_channels_at_rounds_and_keeps_one() -> None:
    assert [channels_at(w, 10) for w in (0.01, 0.25, 0.5, 1.0)] == [1, 3, 5, 10]


def test_sliced_modules_compute_what_the_zeroed_model_computes() -> None:
    torch.manual_seed(0)
    net = Residual().eval()
    cg = analyze(net)
    keep = torch.tensor([0, 2, 3, 6])
    drop = torch.tensor([i for i in range(8) if i not in keep.tolist()])
    with torch.no_grad():  # zero the dropped channels everywhere they are produced: they then contribute nothing
        for name in ("stem", "body"):
            getattr(net, name).weight[drop] = 0
            getattr(net, name).bias[drop] = 0
        net.bn.weight[drop] = 0
        net.bn.bias[drop] = 0
    x = torch.randn(2, 3, 6, 6)
    expected = net(x)
    plan = index_plan(cg, {cg.group_of("stem"): keep})
    assert torch.equal(plan["head"].inputs, (keep[:, None] * 4 + torch.arange(4)).reshape(-1))
    slice_modules(net, plan)
    assert (net.stem.out_channels, net.body.in_channels, net.bn.num_features, net.head.in_features) == (4, 4, 4, 16)
    torch.testing.assert_close(net(x), expected)
    with pytest.raises(ValueError, match="may not change"):
        index_plan(cg, {cg.group_of("head"): torch.tensor([0])})
