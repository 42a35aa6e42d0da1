"""SlimmableTraining: sandwich rule, per-width accuracy, export equal to training, resume, DDP, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.slimmable import SlimmableTraining
from lightning_compress.checkpoints import load_bn_stats
from lightning_compress.examples import DigitsCNN, DigitsDataModule
from lightning_compress.export.slimmable import slice_width
from tests.helpers import run_python

WIDTHS = [0.25, 0.5, 0.75, 1.0]


class SmallCNN(LightningModule):
    """conv-BN-ReLU x2, global average pool, linear: 4 classes of random 8x8 images (no shuffling)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def _loader(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
            batch_size=16,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


def _val_accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return correct / sum(len(y) for _, y in loader)


def test_sandwich_rule_is_deterministic_per_step() -> None:
    slim = SlimmableTraining(widths=WIDTHS, num_random=1, seed=3)
    for step in range(20):
        widths = slim.sandwich(step)
        assert widths[0] == 1.0 and widths[-1] == 0.25 and len(widths) == 3 and widths[1] in (0.5, 0.75)
        assert widths == SlimmableTraining(widths=WIDTHS, num_random=1, seed=3).sandwich(step)
    assert {slim.sandwich(s)[1] for s in range(20)} == {0.5, 0.75}
    assert SlimmableTraining(widths=WIDTHS, num_random=5).sandwich(0) == [1.0, 0.75, 0.5, 0.25]
    assert SlimmableTraining(widths=[0.5, 1.0], num_random=2).sandwich(0) == [1.0, 0.5]


def test_digits_cnn_every_width_learns_and_exports_to_the_same_accuracy(make_trainer) -> None:
    seed_everything(0)
    model = DigitsCNN(channels=[8, 16], hidden=32, lr=5e-3)
    data = DigitsDataModule(batch_size=64)
    slim = SlimmableTraining(widths=WIDTHS, num_random=1)
    trainer = make_trainer(callbacks=[slim], max_epochs=4)
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    for w in WIDTHS:
        assert f"val/acc@{w}" in metrics
        assert slim.val_accuracy[w] > 0.5, (w, slim.val_accuracy)  # chance is 0.1
    assert "train/slim_loss" in metrics
    # fit is over: the layers run their own forward again, training_step is the module's own
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not model)
    assert "training_step" not in model.__dict__
    for w in WIDTHS:
        small = slice_width(model, w, bn_stats=slim.bn_stats(w))
        c1, c2, h = (max(1, round(w * n)) for n in (8, 16, 32))
        assert (small.net[0].out_channels, small.net[3].out_channels, small.net[8].out_features) == (
            c1,
            c2,
            h,
        )
        assert (small.net[0].in_channels, small.net[10].out_features) == (
            1,
            10,
        )  # first input, last output full
        assert small.net[8].in_features == 16 * c2
        # the exported width computes what the callback evaluated at that width during the last validation
        assert _val_accuracy(small, data.val_dataloader()) == pytest.approx(slim.val_accuracy[w], abs=1e-9)
    full = slice_width(model, 1.0)
    x = data.val_set.tensors[0][:32]
    torch.testing.assert_close(full.eval()(x), model.eval()(x))
    recalibrated = slice_width(model, 0.5, calibration=data.train_dataloader())
    assert _val_accuracy(recalibrated, data.val_dataloader()) > 0.5


def test_resume_from_model_checkpoint_matches_a_straight_run(make_trainer, tmp_path: Path) -> None:
    seed_everything(0)
    straight = SmallCNN()
    straight_slim = SlimmableTraining(widths=WIDTHS, num_random=1)
    make_trainer(callbacks=[straight_slim], max_epochs=2).fit(straight)

    seed_everything(0)
    first = SmallCNN()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(
        callbacks=[SlimmableTraining(widths=WIDTHS, num_random=1), checkpoint],
        max_epochs=1,
        enable_checkpointing=True,
    ).fit(first)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    resumed = SmallCNN()
    resumed_slim = SlimmableTraining(widths=WIDTHS, num_random=1)
    trainer = make_trainer(callbacks=[resumed_slim], max_epochs=2)
    trainer.fit(resumed, ckpt_path=str(last))
    assert trainer.global_step == 8
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    for w in (0.25, 0.5, 0.75):
        expected = straight_slim.bn_stats(w)
        assert set(expected) == {"net.1", "net.4"}
        for name, stats in expected.items():
            for key, value in stats.items():
                torch.testing.assert_close(resumed_slim.bn_stats(w)[name][key], value, atol=1e-6, rtol=1e-5)
    assert straight_slim.val_accuracy == resumed_slim.val_accuracy
    from_file = load_bn_stats(last, 0.5)
    assert from_file["net.1"]["running_mean"].shape == (4,) and from_file["net.4"]["running_var"].shape == (
        8,
    )


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_processes_agree(tmp_path: Path) -> None:
    run_python(
        """
        import torch
        from torch import nn
        from lightning.pytorch import Trainer, seed_everything
        from lightning_compress.callbacks.slimmable import SlimmableTraining
        from tests.callbacks.test_slimmable import SmallCNN

        if __name__ == "__main__":
            seed_everything(0)
            slim = SlimmableTraining(widths=[0.25, 0.5, 1.0], num_random=1)
            trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, callbacks=[slim],
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            model = SmallCNN()
            model.net[1] = nn.BatchNorm2d(8, affine=False)  # no weight: syncing its statistics must not need one
            trainer.fit(model)
            torch.save({"weights": model.state_dict(), "stats": slim.bn_stats(0.5), "acc": slim.val_accuracy,
                        "step": trainer.global_step}, f"rank{trainer.global_rank}.pt")
        """,
        cwd=tmp_path,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 4
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    for name in ("net.1", "net.4"):
        assert torch.equal(r0["stats"][name]["running_mean"], r1["stats"][name]["running_mean"])
    assert r0["acc"] == r1["acc"] and set(r0["acc"]) == {0.25, 0.5, 1.0}


def test_distillation_needs_the_module_forward(make_trainer) -> None:
    class CallsNetDirectly(SmallCNN):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    with pytest.raises(RuntimeError, match="did not call the module's forward"):
        make_trainer(callbacks=[SlimmableTraining()], max_epochs=1, limit_train_batches=1).fit(
            CallsNetDirectly()
        )
    make_trainer(callbacks=[SlimmableTraining(distill=False)], max_epochs=1, limit_train_batches=2).fit(
        CallsNetDirectly()
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(widths=[0.5, 0.75]), "must include 1.0"),
        (dict(widths=[1.0]), "must include 1.0 and at least one smaller"),
        (dict(widths=[0.0, 1.0]), r"fractions in \(0, 1\], got 0.0"),
        (dict(widths="0.5"), "must be a list"),
        (dict(num_random=-1), "`num_random` must be an integer >= 0, got -1"),
        (dict(temperature=0), "`temperature` must be a number > 0, got 0"),
    ],
)
def test_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SlimmableTraining(**kwargs)


def test_setup_errors(make_trainer) -> None:
    class OneLayer(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))

    with pytest.raises(ValueError, match="no hidden layer whose width can change"):
        make_trainer(callbacks=[SlimmableTraining()], max_epochs=1).fit(OneLayer())
    pruning = GradualPruning(
        final_sparsity=0.5, mode="structured", targets=["net.0"], start_step=0, end_step=2
    )
    with pytest.raises(ValueError, match="already"):
        make_trainer(callbacks=[pruning, SlimmableTraining()], max_epochs=1).fit(SmallCNN())
    with pytest.raises(ValueError, match="one of the trained widths"):
        SlimmableTraining().bn_stats(0.3)
    with pytest.raises(ValueError, match="`bn_stats` is required"):
        slice_width(SmallCNN(), 0.5)


class MeanHeadCNN(SmallCNN):
    """conv-BN-ReLU x2 and a `mean` over positions (an op the graph cannot slice): the last BN keeps its width."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean((2, 3)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: BN statistics are all that change


def test_unsliced_batchnorm_fed_by_a_sliced_layer_keeps_private_statistics(make_trainer) -> None:
    """net.4 keeps its 16 channels, but at width 0.5 it sees net.3 with half its inputs: its statistics differ."""
    seed_everything(0)
    alone = MeanHeadCNN()
    model = MeanHeadCNN()
    model.load_state_dict(alone.state_dict())
    make_trainer(max_epochs=1, limit_val_batches=0).fit(alone)  # full width only
    slim = SlimmableTraining(widths=[0.5, 1.0], distill=False)
    make_trainer(callbacks=[slim], max_epochs=1).fit(model)
    # width 1 runs on the module's own buffers, which only the full-width passes may update
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model.net[4], key), getattr(alone.net[4], key))
    stats = slim.bn_stats(0.5)
    assert stats["net.4"]["running_mean"].shape == (16,)
    small = slice_width(model, 0.5, bn_stats=stats)
    assert small.net[4].num_features == 16 and torch.equal(
        small.net[4].running_var, stats["net.4"]["running_var"]
    )
    assert _val_accuracy(small, model.val_dataloader()) == pytest.approx(slim.val_accuracy[0.5], abs=1e-9)


@pytest.mark.parametrize("precision, dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_true_precision_keeps_private_statistics_in_the_model_dtype(
    make_trainer, precision: str, dtype: torch.dtype
) -> None:
    seed_everything(0)
    model = SmallCNN()
    slim = SlimmableTraining(widths=[0.5, 1.0])
    make_trainer(
        callbacks=[slim],
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,  # the Trainer's default sanity check evaluates the widths before any training
        precision=precision,
    ).fit(model)
    assert set(slim.val_accuracy) == {0.5, 1.0}  # every width was evaluated in this precision
    stats = slim.bn_stats(0.5)
    assert {s["running_mean"].dtype for s in stats.values()} == {dtype}
    x = model.val_dataloader().dataset.tensors[0][:4].to(dtype)
    small = slice_width(model, 0.5, bn_stats=stats)
    assert small.eval()(x).dtype == dtype


def test_a_width_exported_during_fit_runs_its_own_layers(make_trainer) -> None:
    """Until teardown the layers' forward is the callback's; a copy made then must not call the original's."""
    seed_everything(0)
    slim = SlimmableTraining(widths=[0.5, 1.0])
    exported: dict[str, nn.Module] = {}

    class ExportAtFitEnd(Callback):
        def on_fit_end(
            self, trainer: Any, pl_module: LightningModule
        ) -> None:  # before SlimmableTraining.teardown
            exported["small"] = slice_width(pl_module, 0.5, bn_stats=slim.bn_stats(0.5))

    model = SmallCNN()
    make_trainer(callbacks=[slim, ExportAtFitEnd()], max_epochs=1).fit(model)
    small = exported["small"].eval()
    assert all("forward" not in m.__dict__ for m in small.modules())
    x = model.val_dataloader().dataset.tensors[0]
    after = slice_width(model, 0.5, bn_stats=slim.bn_stats(0.5)).eval()
    torch.testing.assert_close(small(x), after(x))


class _FailsAtFitStart(Callback):
    def on_fit_start(self, trainer: Any, pl_module: LightningModule) -> None:
        raise RuntimeError("another callback failed")


def test_a_failed_fit_leaves_the_model_as_it_was(make_trainer) -> None:
    """Lightning skips `teardown` when fit raises: the patched forwards, training_step and claims must go anyway."""
    from lightning_compress import claims

    model = SmallCNN()
    with pytest.raises(RuntimeError, match="another callback failed"):
        make_trainer(callbacks=[SlimmableTraining(widths=[0.5, 1.0]), _FailsAtFitStart()], max_epochs=1).fit(
            model
        )
    assert "training_step" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert claims.claims(model) == {}
    slim = SlimmableTraining(widths=[0.5, 1.0])  # the user fixes the run and fits the same model again
    make_trainer(callbacks=[slim], max_epochs=1, limit_train_batches=2).fit(model)
    assert set(slim.val_accuracy) == {0.5, 1.0}


def test_load_bn_stats_from_a_checkpoint_with_non_tensor_hyperparameters(
    make_trainer, tmp_path: Path
) -> None:
    """A Path in the hyperparameters makes torch.load(weights_only=True) refuse the file: say so, allow opting out."""

    class WithPath(SmallCNN):
        def __init__(self, root: Path = Path("data")) -> None:
            super().__init__()
            self.save_hyperparameters()

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    slim = SlimmableTraining(widths=[0.5, 1.0])
    make_trainer(
        callbacks=[slim, checkpoint],
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        enable_checkpointing=True,
    ).fit(WithPath())
    last = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(ValueError, match="weights_only=False"):
        load_bn_stats(last, 0.5)
    stats = load_bn_stats(last, 0.5, weights_only=False)
    assert torch.equal(stats["net.1"]["running_mean"], slim.bn_stats(0.5)["net.1"]["running_mean"])


def test_manual_optimization_is_refused_before_the_first_step(make_trainer) -> None:
    """Manual optimization returns no loss to sum the widths into: it must not silently train only width 1."""

    class Manual(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            optimizer = self.optimizers()
            x, y = batch
            optimizer.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            optimizer.step()

    model = Manual()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="SlimmableTraining needs automatic optimization"):
        make_trainer(callbacks=[SlimmableTraining(widths=[0.5, 1.0])], max_epochs=1).fit(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any step


@pytest.mark.parametrize("slim_first", [True, False])
def test_composes_with_knowledge_distillation_in_either_order(make_trainer, slim_first: bool) -> None:
    seed_everything(0)
    teacher = SmallCNN()
    student = SmallCNN()
    slim = SlimmableTraining(widths=[0.5, 1.0])
    kd = KnowledgeDistillation(teacher=teacher, temperature=2.0, alpha=0.5)
    trainer = make_trainer(callbacks=[slim, kd] if slim_first else [kd, slim], max_epochs=1)
    trainer.fit(student)
    assert {"distill/kd_loss", "train/slim_loss", "val/acc@0.5"} <= set(trainer.callback_metrics)
    leftover = student.__dict__.get("training_step")  # an inner wrapper left by the outer one passes through
    assert leftover is None or leftover.active is False
    assert all(p.grad is None for p in teacher.parameters())
