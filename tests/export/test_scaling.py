"""scale: narrower by channel importance, shallower by dropping repeated blocks; a student for distillation."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.export.scaling import kept_blocks, repeated_blocks, scale


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.stage = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.adaptive_avg_pool2d(self.stage(self.stem(x)), 1).flatten(1))


def test_width_keeps_the_most_important_units_with_their_weights() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.mul_(0.01)
        net[0].weight[[1, 4, 5]] *= 1000.0  # the three important units
    small = scale(net, width=0.5)
    torch.testing.assert_close(small[0].weight, net[0].weight[[1, 4, 5]])
    torch.testing.assert_close(small[2].weight, net[2].weight[:, [1, 4, 5]])
    torch.testing.assert_close(small[2].bias, net[2].bias)


def test_depth_drops_repeated_blocks_and_width_follows_residuals() -> None:
    model = TinyResNet(8, blocks=4)
    x = torch.rand(2, 1, 8, 8)
    assert repeated_blocks(model.stage) == [(0, 1, 4)]
    small = scale(model, width=0.5, depth=0.5, example_input=x)
    assert len(small.stage) == 2 and len(model.stage) == 4
    assert small.stem[0].out_channels == small.head.in_features == 4
    assert all(
        b.conv1.in_channels == b.conv2.out_channels == 4 and b.conv1.out_channels == 4 for b in small.stage
    )
    assert small(x).shape == (2, 10)
    mlp = scale(DigitsMLP(hidden_sizes=[32, 32, 32, 32]), depth=0.5, example_input=torch.zeros(2, 1, 8, 8))
    assert [m.out_features for m in mlp.net if isinstance(m, nn.Linear)] == [32, 32, 32, 10]  # 3 repeats -> 2


def test_spread_blocks_keep_the_first_and_last_with_their_weights() -> None:
    torch.manual_seed(0)
    model = TinyResNet(8, blocks=6).eval()
    x = torch.rand(2, 1, 8, 8)
    small = scale(model, depth=0.5, example_input=x, blocks="spread").eval()
    assert len(small.stage) == 3
    for got, want in zip(small.stage, [model.stage[i] for i in (0, 3, 5)], strict=True):
        torch.testing.assert_close(got.conv1.weight, want.conv1.weight)
    expected = model.head(nn.functional.adaptive_avg_pool2d(
        model.stage[5](model.stage[3](model.stage[0](model.stem(x)))), 1).flatten(1))
    torch.testing.assert_close(small(x), expected)
    first = scale(model, depth=0.5, example_input=x)
    torch.testing.assert_close(first.stage[2].conv1.weight, model.stage[2].conv1.weight)
    assert kept_blocks(4, 12, "spread") == [0, 4, 7, 11] and kept_blocks(2, 2, "spread") == [0, 1]


def test_shape_changing_repeats_are_kept() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    assert repeated_blocks(net)[0] == (0, 2, 3)
    small = scale(net, depth=0.34, example_input=torch.zeros(1, 4, 8, 8))
    assert len(small) == len(net)


def test_depth_with_one_activation_module_reused_at_every_position() -> None:
    """`act = nn.ReLU()` used at four positions: blocks are positions, not distinct modules."""
    torch.manual_seed(0)
    linears = [nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)]
    act = nn.ReLU()
    shared = nn.Sequential(*[m for lin in linears[:-1] for m in (lin, act)], linears[-1])
    separate = nn.Sequential(*[m for lin in linears[:-1] for m in (lin, nn.ReLU())], linears[-1])
    assert repeated_blocks(shared) == repeated_blocks(separate) == [(1, 2, 3)]
    x = torch.randn(2, 4)
    small_shared = scale(shared, depth=0.5, example_input=x)
    small_separate = scale(separate, depth=0.5, example_input=x)
    assert [type(m) for m in small_shared] == [type(m) for m in small_separate]
    assert [type(m).__name__ for m in small_shared] == ["Linear", "ReLU"] * 3 + ["Linear"]
    torch.testing.assert_close(small_shared(x), small_separate(x))


def test_indexed_module_list_is_an_error() -> None:
    class Indexed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers[2](self.layers[1](self.layers[0](x)))

    with pytest.raises(ValueError, match="fails on example_input"):
        scale(Indexed(), depth=0.5, example_input=torch.zeros(1, 4))


def test_argument_errors() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`width` must be a fraction in \(0, 1\], got 0"):
        scale(net, width=0)
    with pytest.raises(ValueError, match=r"`depth` must be a fraction in \(0, 1\], got 2"):
        scale(net, depth=2)
    with pytest.raises(ValueError, match="`example_input` is required when `depth` < 1"):
        scale(net, depth=0.5)
    with pytest.raises(ValueError, match=r"`blocks` must be one of \['first', 'spread'\], got 'last'"):
        scale(net, depth=0.5, blocks="last")  # type: ignore[arg-type]


def test_scaled_student_trains_with_knowledge_distillation(make_trainer) -> None:
    seed_everything(0)
    teacher = DigitsMLP(hidden_sizes=[64, 64, 64], lr=3e-3)
    data = DigitsDataModule(batch_size=64)
    make_trainer(max_epochs=3).fit(teacher, datamodule=data)
    student = scale(teacher, width=0.25, depth=0.5, example_input=torch.zeros(2, 1, 8, 8))
    assert [m.out_features for m in student.net if isinstance(m, nn.Linear)] == [16, 16, 10]
    trainer = make_trainer(callbacks=[KnowledgeDistillation(teacher=teacher, temperature=2.0)], max_epochs=3)
    trainer.fit(student, datamodule=data)
    assert trainer.callback_metrics["val/acc"] > 0.5  # chance is 0.1
    assert "distill/kd_loss" in trainer.callback_metrics
