"""QuantizationAwareTraining's sharding support, single process: the range reductions and the one-pass weight
observer (``layers._quant_sharded``) on plain tensors compute what the forward-time observer computes on the full
weight, conversion's gather is a no-op without sharding, and the strategies it cannot handle are refused.

The two-process FSDP2 run itself is one row of the contract (``tests/test_contract.py``)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_compress.functional import quantization as qf
from lightning_compress.layers._quant_sharded import (
    check_tensor_parallel,
    gathered,
    observe_weights,
    reduce_input_range,
    tensor_range,
)
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

CONFIGS = [
    dict(weight_bits=8, granularity="per_tensor"),
    dict(weight_bits=8, granularity="per_channel"),
    dict(weight_bits=4, granularity="per_channel", symmetric=False),
    dict(weight_bits=4, granularity="per_tensor", symmetric=False),
    dict(weight_bits=4, granularity="per_tensor", learn_scale=True),
    dict(weight_bits=4, granularity="per_channel", learn_scale=True, symmetric=False),
    dict(weight_bits=4, granularity="per_group", group_size=8),
    dict(weight_bits=4, granularity="per_group", group_size=8, learn_scale=True),
    dict(weight_bits=4, scheme="power_of_two"),
    dict(weight_bits=4, scheme="power_of_two", granularity="per_tensor"),
    dict(weight_bits=8, scheme="fp8_e4m3"),
    dict(weight_bits=8, scheme="fp8_e5m2", granularity="per_tensor"),
    dict(weight_bits=4, scheme="mxfp4"),
]


def _net(config: dict, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))  # in_features fit groups of 8 and MX blocks
    prepare_qat(net, ["0", "2"], QuantConfig(activation_bits=None, **config))
    return net


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_observe_weights_matches_the_forward_observer(config: dict) -> None:
    """The one-pass observer (reductions, no full copies) sets the grid the forward-time observer sets."""
    by_forward, by_pass = _net(config), _net(config)
    set_qat_flags(by_forward, fake_quant=True, observe=True)
    by_forward(torch.randn(3, 64))
    assert observe_weights(by_pass) == 2
    for i in (0, 2):
        a, b = by_forward[i].weight_quant, by_pass[i].weight_quant
        assert bool(b.initialized)
        torch.testing.assert_close(b.scale, a.scale, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(b.zero_point, a.zero_point, rtol=0.0, atol=0.0)
    if config.get("scheme", "uniform") == "uniform":  # a grid that actually depends on the weight
        assert not torch.equal(by_pass[0].weight_quant.scale, torch.ones_like(by_pass[0].weight_quant.scale))


def test_observe_weights_uninitialized_only_keeps_a_learned_step() -> None:
    net = _net(dict(weight_bits=4, learn_scale=True))
    observe_weights(net)
    with torch.no_grad():
        net[0].weight_quant.scale.mul_(3.0)  # as if training had moved the LSQ step
    learned = net[0].weight_quant.scale.detach().clone()
    observe_weights(net, uninitialized_only=True)
    assert torch.equal(net[0].weight_quant.scale, learned)
    observe_weights(net)
    assert not torch.equal(net[0].weight_quant.scale, learned)


def test_observe_weights_with_a_folded_batchnorm_uses_the_folded_weight() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    prepare_qat(net, ["0"], QuantConfig(weight_bits=8, activation_bits=None), {"0": "1"})
    observe_weights(net)
    folded = net[0].effective_weight().detach()
    expected, _ = qf.uniform_qparams(folded, 8, True, per_channel=True)
    torch.testing.assert_close(net[0].weight_quant.scale, expected, rtol=1e-6, atol=0.0)
    assert not torch.allclose(expected, qf.uniform_qparams(net[0].weight.detach(), 8, True, True)[0])


@pytest.mark.parametrize("per_channel", [True, False])
def test_tensor_range_and_range_qparams_equal_uniform_qparams(per_channel: bool) -> None:
    w = torch.randn(6, 5, 3)
    lo, hi = tensor_range(w, w, per_channel)
    assert lo.shape == hi.shape == ((6,) if per_channel else (1,))
    for symmetric in (True, False):
        got = qf.range_qparams(lo, hi, 4, symmetric)
        want = qf.uniform_qparams(w, 4, symmetric, per_channel)
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def test_tensor_range_of_an_empty_piece_is_neutral_for_min_and_max() -> None:
    """A rank holding no rows (fewer rows than ranks) contributes +inf/-inf, the identities of min and max."""
    empty = torch.empty(0, 4)
    lo, hi = tensor_range(empty, empty, per_channel=False)
    assert lo.item() == float("inf") and hi.item() == float("-inf")
    scale, zp = qf.range_qparams(torch.minimum(lo, torch.tensor([-2.0])), torch.maximum(hi, torch.tensor([1.0])), 8, True)
    assert scale.item() == pytest.approx(2.0 / 127) and zp.item() == 0.0


def test_gathered_and_reduce_input_range_pass_plain_layers_through() -> None:
    net = _net(dict(weight_bits=8))
    assert gathered(net[0]) is net[0]
    lo, hi = torch.tensor([-1.0]), torch.tensor([2.0])
    got = reduce_input_range(net[0], lo, hi)
    assert got[0] is lo and got[1] is hi


@pytest.mark.parametrize("strategy", [DDPStrategy(), ModelParallelStrategy(), "none"])
def test_check_tensor_parallel_passes_ddp_fsdp2_and_no_strategy(strategy: object) -> None:
    check_tensor_parallel(None if strategy == "none" else strategy, "QuantizationAwareTraining")
