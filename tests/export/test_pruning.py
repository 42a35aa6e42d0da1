"""thin: structured-pruned models become physically smaller and compute the same outputs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.examples import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_compress.export.pruning import dead_units, thin


class ResidualCNN(nn.Module):
    """stem conv-BN-ReLU, one residual block (conv-BN-ReLU-conv-BN + identity), global pool, linear head."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        r = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(h + self.bn2(self.conv2(r)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class TwoBranch(nn.Module):
    """Two conv branches concatenated on channels, then a valid (unpadded) conv without bias and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 5, 3, bias=False)
        self.head = nn.Linear(5 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(self.mix(h).flatten(1))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.fc(x)))


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN shifts/statistics, so dead units feed real constants into the next layers."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _digits(n: int = 128) -> torch.Tensor:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm.val_set.tensors[0][:n]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pruned(model: nn.Module, targets: list[str], make_trainer) -> nn.Module:
    pruning = GradualPruning(
        final_sparsity=0.5,
        start_step=0,
        end_step=4,
        update_every=2,
        mode="structured",
        scope="layer",
        targets=targets,
    )
    make_trainer(callbacks=[pruning], max_epochs=1, limit_train_batches=8, limit_val_batches=0).fit(
        model, datamodule=DigitsDataModule(batch_size=32)
    )
    return model.eval()


def test_digits_mlp_thinned_by_half_with_equal_outputs(make_trainer) -> None:
    seed_everything(0)
    model = _pruned(DigitsMLP(hidden_sizes=[32, 16]), ["net.1", "net.3"], make_trainer)
    x = _digits()
    small = thin(model, x).eval()
    assert (small.net[1].out_features, small.net[3].in_features) == (16, 16)
    assert (small.net[3].out_features, small.net[5].in_features) == (8, 8)
    assert small.net[5].out_features == 10
    assert _params(small) < 0.55 * _params(model)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert model.net[1].out_features == 32  # the original is untouched


def test_digits_cnn_thinned_conv_bn_conv_and_conv_flatten_linear(make_trainer) -> None:
    seed_everything(0)
    model = _pruned(DigitsCNN(channels=[8, 16], hidden=32), ["net.0", "net.3", "net.8"], make_trainer)
    _randomize_bn(model)  # BN shifts make the dead filters' constants non-zero after ReLU
    x = _digits()
    small = thin(model, x).eval()
    # conv -> BN -> ReLU -> padded conv: at most one dead filter is kept to carry the constants
    assert small.net[0].out_channels in (4, 5) and small.net[1].num_features == small.net[0].out_channels
    assert small.net[3].in_channels == small.net[0].out_channels
    # conv -> BN -> ReLU -> pool -> flatten -> linear: constants fold into the linear's bias
    assert (small.net[3].out_channels, small.net[4].num_features, small.net[8].in_features) == (8, 8, 8 * 16)
    assert (small.net[8].out_features, small.net[10].in_features) == (16, 16)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_residual_units_removed_only_together() -> None:
    torch.manual_seed(0)
    model = ResidualCNN(8)
    _randomize_bn(model)
    with torch.no_grad():
        model.stem[0].weight[[0, 1, 2]] = 0.0  # the residual group: 1 and 2 are dead on both sides of the add
        model.conv2.weight[[1, 2, 3]] = 0.0
        model.conv1.weight[[4, 5, 6]] = 0.0  # inside the block
    assert dead_units(model)[0].nonzero().flatten().tolist() == [1, 2]
    x = torch.rand(16, 1, 8, 8)
    small = thin(model, x)
    # 0 and 3 are alive on one side: kept; 1 and 2 go (one may stay to carry constants into the padded conv1)
    assert small.stem[0].out_channels == small.conv2.out_channels == small.head.in_features in (6, 7)
    assert small.conv1.out_channels == small.bn1.num_features == small.conv2.in_channels in (5, 6)
    torch.testing.assert_close(small.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_concat_parts_and_valid_conv_bias_folding() -> None:
    torch.manual_seed(0)
    model = TwoBranch()
    _randomize_bn(model)
    with torch.no_grad():
        model.a.weight[[0, 3]] = (
            0.0  # its bias and BN still feed constants: folded into mix (unpadded), which
        )
        model.b.weight[[1, 2, 5]] = 0.0  # has no bias until thin adds one
    x = torch.rand(8, 1, 8, 8)
    small = thin(model, x)
    assert (small.a.out_channels, small.b.out_channels, small.bn.num_features, small.mix.in_channels) == (
        2,
        3,
        5,
        5,
    )
    assert small.mix.bias is not None
    torch.testing.assert_close(small.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_units_behind_an_unsliceable_op_are_refused_or_kept() -> None:
    model = Gated()
    with torch.no_grad():
        model.fc.weight[:2] = 0.0
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"layer 'fc' has 2 zeroed units.*LayerNorm"):
        thin(model, x)
    kept = thin(model, x, strict=False)
    assert kept.fc.out_features == 6
    torch.testing.assert_close(kept(x), model(x))


def test_errors_before_any_change() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot trace Branchy"):
        thin(Branchy(), torch.ones(1, 2))
    with pytest.raises(ValueError, match="`example_input` is required"):
        thin(nn.Sequential(nn.Linear(2, 2)))


def test_nothing_dead_gives_an_equal_copy() -> None:
    model = DigitsMLP(hidden_sizes=[8])
    x = torch.rand(3, 1, 8, 8)
    copy = thin(model, x)
    assert copy is not model and copy.net[1].out_features == 8
    torch.testing.assert_close(copy(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_thinned_to_their_own_precision(dtype: torch.dtype) -> None:
    """A bf16/fp16 model's folded biases round at its precision: the check must allow that, not refuse."""
    torch.manual_seed(0)
    model = ResidualCNN(8)
    _randomize_bn(model)
    with torch.no_grad():
        model.stem[0].weight[:2] = 0.0
        model.conv2.weight[:2] = 0.0  # dead on both sides of the residual add: removable
        model.conv1.weight[4:6] = 0.0
    x = torch.rand(16, 1, 8, 8)
    full_precision = thin(model.eval(), x)
    model = model.to(dtype).eval()
    x = x.to(dtype)
    with torch.no_grad():
        small = thin(model, x).eval()
        reference, result = model(x), small(x)
    assert small.conv1.weight.dtype == dtype
    shapes = (small.stem[0].out_channels, small.conv1.out_channels)
    assert shapes == (full_precision.stem[0].out_channels, full_precision.conv1.out_channels)
    assert max(shapes) < 8  # dead units removed (a padded conv may keep one to carry their constants)
    eps = torch.finfo(dtype).eps
    assert (result - reference).abs().max() <= 2 * eps * max(1.0, float(reference.abs().max()))


def test_a_group_concatenated_twice_into_one_consumer_folds_both_copies() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(torch.cat([h, h * 2], dim=-1))

    torch.manual_seed(0)
    model = Twice()
    with torch.no_grad():
        model.a.weight[:2] = 0.0
        model.a.bias[:2] = 1.0  # the dead units feed a constant 1 (and 2) into `b`
    x = torch.randn(8, 4)
    small = thin(model, x)
    assert (small.a.out_features, small.b.in_features) == (4, 8)
    other = torch.randn(5, 4) * 3
    torch.testing.assert_close(small(other), model(other))


def test_a_layer_with_every_unit_dead_keeps_one_and_stays_exact() -> None:
    """Global structured pruning can zero a whole layer: one unit must stay, and its constant is not folded twice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[2].weight.zero_()  # its biases still feed constants into the last layer
    x = torch.randn(8, 4)
    small = thin(model, x)
    assert (small[2].out_features, small[4].in_features) == (1, 1)
    other = torch.randn(5, 4) * 3
    torch.testing.assert_close(small(other), model(other))
