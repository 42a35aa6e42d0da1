"""A compressed model's checkpoint loads back for inference, the way README.md and the docstrings say.

For every callback a real ``fit`` writes a real checkpoint with ``ModelCheckpoint``; the checkpoint is then loaded
into a freshly built model by the documented route (``Model.load_from_checkpoint``, ``load_quantized_checkpoint``,
``load_factorized_checkpoint``, ``load_bn_stats`` + ``slice_width``, ``load_compressed``) and must give exactly the
predictions of the model the fit left in memory. The models are the README's own (``DigitsMLP``/``DigitsCNN`` on the
bundled digits), shrunk so that each fit is a few optimizer steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.callbacks.slimmable import SlimmableTraining
from lightning_compress.callbacks.weight_sharing import WeightSharing
from lightning_compress.checkpoints import (
    load_bn_stats,
    load_factorized_checkpoint,
    load_quantized_checkpoint,
)
from lightning_compress.cli import run_cli
from lightning_compress.examples import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_compress.export.lcdc import load_compressed
from lightning_compress.export.quantization import convert
from lightning_compress.export.slimmable import slice_width
from lightning_compress.layers.low_rank import is_factorized
from tests.helpers import REPO_ROOT

HIDDEN = [32, 16]  # DigitsMLP 64-32-16-10: Linear layers net.1, net.3, net.5


def _data(train_subset: int = 256) -> DigitsDataModule:
    """256 training digits in batches of 128: two optimizer steps per epoch; the full val/test splits."""
    data = DigitsDataModule(batch_size=128, train_subset=train_subset)
    data.setup("fit")
    return data


def _fit(
    root: Path, model: LightningModule, callbacks: list[Callback], epochs: int = 4, train_subset: int = 256
) -> tuple[Trainer, Path]:
    """Fit with a ModelCheckpoint(save_last=True) after the compression callbacks; return the last checkpoint."""
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        default_root_dir=str(root),
        logger=False,
        callbacks=[*callbacks, saver],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, datamodule=_data(train_subset))
    last = root / "ckpt" / "last.ckpt"
    assert last.is_file()
    return trainer, last


def _inputs() -> torch.Tensor:
    data = _data()
    data.setup("test")
    return data.test_set.tensors[0]  # 359 held-out digits


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _assert_same_predictions(loaded: torch.nn.Module, trained: torch.nn.Module) -> None:
    x = _inputs()
    expected, got = _predict(trained, x), _predict(loaded, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# -- GradualPruning: the checkpoint is the user's plain model -----------------------------------------------------
def test_pruned_checkpoint_loads_with_load_from_checkpoint(tmp_path: Path) -> None:
    seed_everything(0)
    trained = DigitsMLP(hidden_sizes=HIDDEN, lr=3e-3)
    pruning = GradualPruning(final_sparsity=0.8, start_step=0, end_step=4, update_every=2, scope="global")
    _, last = _fit(tmp_path, trained, [pruning])
    loaded = DigitsMLP.load_from_checkpoint(last)  # strict: no weight_orig/weight_mask keys
    assert loaded.hparams.hidden_sizes == HIDDEN
    _assert_same_predictions(loaded, trained)
    weights = [m.weight for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)
    for fqn, keep in pruning.masks.items():  # the pruned entries of the file are exactly the masks' zeros
        assert torch.equal(loaded.get_parameter(fqn) != 0, keep), fqn


# -- QuantizationAwareTraining: load_quantized_checkpoint, then convert -------------------------------------------
QAT_RECIPES = {  # the settings of recipes/digits_qat_*.yaml, with the window in steps
    "int8": dict(weight_bits=8, activation_bits=8, granularity="per_tensor"),
    "int4_lsq": dict(weight_bits=4, activation_bits=8, granularity="per_channel", learn_scale=True),
    "pow2": dict(weight_bits=4, activation_bits=None, scheme="power_of_two", granularity="per_channel"),
}


@pytest.mark.parametrize("name", list(QAT_RECIPES))
def test_quantized_checkpoint_loads_and_converts_to_the_trained_integer_model(
    name: str, tmp_path: Path
) -> None:
    seed_everything(0)
    trained = DigitsMLP(hidden_sizes=HIDDEN)
    qat = QuantizationAwareTraining(
        **QAT_RECIPES[name], symmetric=True, start_step=2, freeze_observers_step=6, convert_on_fit_end=True
    )
    _, last = _fit(tmp_path, trained, [qat])
    assert qat._converted  # the fit left the integer model in memory (convert_on_fit_end)
    assert all(type(trained.net[i]).__name__ in ("Int8Linear", "PackedLinear") for i in (1, 3, 5))

    fake = load_quantized_checkpoint(DigitsMLP(hidden_sizes=HIDDEN), last)  # (model, checkpoint_path)
    assert int(fake.net[1].weight_quant.fake_quant_enabled) == 1
    integer = convert(fake)
    _assert_same_predictions(integer, trained)
    x = _inputs()
    # the fake-quantized model of the checkpoint predicts what its integer conversion predicts
    assert float((_predict(fake, x).argmax(-1) == _predict(integer, x).argmax(-1)).float().mean()) >= 0.99

    # the integer model's own state_dict (what the README's sizes measure) reloads into the same structure
    saved = tmp_path / "int.pt"
    torch.save(trained.state_dict(), saved)
    again = convert(load_quantized_checkpoint(DigitsMLP(hidden_sizes=HIDDEN), last))
    again.load_state_dict(torch.load(saved, weights_only=True), strict=True)
    _assert_same_predictions(again, trained)


# -- KnowledgeDistillation: the student's checkpoint holds the student only ----------------------------------------
def test_distilled_student_loads_with_load_from_checkpoint(tmp_path: Path) -> None:
    seed_everything(0)
    teacher = DigitsMLP(hidden_sizes=[64])
    _, teacher_ckpt = _fit(tmp_path / "teacher", teacher, [], epochs=2)
    seed_everything(0)
    student = DigitsMLP(hidden_sizes=[16], lr=3e-3)
    kd = KnowledgeDistillation(
        teacher={"class_path": "lightning_compress.examples.DigitsMLP", "init_args": {"hidden_sizes": [64]}},
        teacher_checkpoint=str(teacher_ckpt),
        temperature=4.0,
        alpha=0.9,
        feature_pairs={"net.1": "net.1"},  # its learned 16 -> 64 projection lives in the callback
    )
    _, last = _fit(tmp_path / "student", student, [kd])
    loaded = DigitsMLP.load_from_checkpoint(last)
    assert set(loaded.state_dict()) == set(DigitsMLP(hidden_sizes=[16]).state_dict())
    _assert_same_predictions(loaded, student)


# -- LowRankFactorization: load_factorized_checkpoint ---------------------------------------------------------------
def test_factorized_checkpoint_loads_with_load_factorized_checkpoint(tmp_path: Path) -> None:
    seed_everything(0)
    trained = DigitsMLP(hidden_sizes=HIDDEN)
    lowrank = LowRankFactorization(targets=["net.1", "net.3"], param_ratio=0.5, start_step=3)
    _, last = _fit(tmp_path, trained, [lowrank])
    assert lowrank.factorized
    loaded = load_factorized_checkpoint(DigitsMLP(hidden_sizes=HIDDEN), last)  # (model, checkpoint_path)
    assert is_factorized(loaded.net[1]) and is_factorized(loaded.net[3]) and not is_factorized(loaded.net[5])
    assert loaded.net[1].rank == trained.net[1].rank
    _assert_same_predictions(loaded, trained)


# -- WeightSharing (Deep Compression): plain checkpoint and the Huffman-coded file ---------------------------------
def test_shared_checkpoint_and_compressed_file_load_for_inference(tmp_path: Path) -> None:
    seed_everything(0)
    trained = DigitsMLP(hidden_sizes=HIDDEN, lr=3e-3)
    export = tmp_path / "model.lcdc"
    callbacks = [
        GradualPruning(final_sparsity=0.9, start_step=0, end_step=3, update_every=1),
        WeightSharing(bits=4, init="density", start_step=4, export_path=str(export), verbose=False),
    ]
    _, last = _fit(tmp_path, trained, callbacks)
    assert callbacks[1].shared and export.is_file()
    from_ckpt = DigitsMLP.load_from_checkpoint(last)
    _assert_same_predictions(from_ckpt, trained)
    from_file = DigitsMLP(hidden_sizes=HIDDEN)
    state = load_compressed(export, from_file)  # the README's `load_compressed("model.lcdc", DigitsMLP())`
    assert set(state) == set(from_file.state_dict())
    _assert_same_predictions(from_file, trained)
    for layer in (from_file.net[1], from_file.net[3], from_file.net[5]):
        assert len(torch.unique(layer.weight[layer.weight != 0])) <= 16


# -- SlimmableTraining: load_from_checkpoint, load_bn_stats + slice_width -------------------------------------------
def test_slimmable_checkpoint_exports_each_width_as_trained(tmp_path: Path) -> None:
    seed_everything(0)
    trained = DigitsCNN(channels=[8, 16], hidden=16, lr=1e-2)
    slim = SlimmableTraining(widths=[0.25, 0.5, 1.0], num_random=1)
    _, last = _fit(tmp_path, trained, [slim], epochs=3, train_subset=1024)  # 24 steps
    assert min(slim.val_accuracy.values()) > 0.3, slim.val_accuracy  # trained well past chance (0.1)
    loaded = DigitsCNN.load_from_checkpoint(last)
    _assert_same_predictions(loaded, trained)  # width 1.0: the checkpoint's state_dict is the full model
    data = _data()
    x_val, y_val = data.val_set.tensors
    for width in (0.25, 0.5):
        small = slice_width(loaded, width, bn_stats=load_bn_stats(last, width))
        assert small.net[0].out_channels == round(8 * width) and small.net[3].out_channels == round(
            16 * width
        )
        _assert_same_predictions(small, slice_width(trained, width, bn_stats=slim.bn_stats(width)))
        # and it is the sub-network whose accuracy the callback logged as val/acc@<width> at the last validation
        accuracy = float((_predict(small, x_val).argmax(-1) == y_val).float().mean())
        assert accuracy == pytest.approx(slim.val_accuracy[width], abs=1e-6)


# -- TensorBoard after the gradual pruning recipe ------------------------------------------------------------------
def test_gradual_pruning_recipe_event_files_hold_sparsity_target_and_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README "What you see in TensorBoard": the recipe, run by the CLI (3 batches per epoch), logs the actual
    sparsity beside the schedule's target, and val/acc, to the event files under lightning_logs/."""
    monkeypatch.chdir(tmp_path)
    recipe = REPO_ROOT / "recipes" / "digits_gradual_pruning.yaml"
    fast = [
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    ]
    cli = run_cli(["fit", "--config", str(recipe), *fast])
    assert cli.trainer.global_step == 90
    (run_dir,) = (tmp_path / "lightning_logs").glob("version_*")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"compression/sparsity", "compression/target/sparsity", "val/acc"} <= tags
    actual = {e.step: e.value for e in events.Scalars("compression/sparsity")}
    target = {e.step: e.value for e in events.Scalars("compression/target/sparsity")}
    assert actual.keys() == target.keys() and len(actual) >= 10
    for step in actual:  # every layer weight is pruned here, so actual and scheduled agree at every point
        assert actual[step] == pytest.approx(target[step], abs=2e-3), step
    assert actual[min(actual)] == 0.0 and actual[max(actual)] == pytest.approx(0.95, abs=1e-4)
    assert len(events.Scalars("val/acc")) == 30  # one per epoch


# -- bugs found walking the README (expected to fail until fixed) ---------------------------------------------------
def test_qat_converted_at_fit_end_can_still_be_tested_from_its_checkpoint(tmp_path: Path) -> None:
    seed_everything(0)
    trained = DigitsMLP(hidden_sizes=HIDDEN)
    qat = QuantizationAwareTraining(**QAT_RECIPES["int8"], start_step=2, convert_on_fit_end=True)
    trainer, last = _fit(tmp_path, trained, [qat])
    data = _data()
    data.setup("test")
    x, y = data.test_set.tensors
    integer = convert(load_quantized_checkpoint(DigitsMLP(hidden_sizes=HIDDEN), last))
    expected = float((_predict(integer, x).argmax(-1) == y).float().mean())
    (result,) = trainer.test(trained, datamodule=data, ckpt_path="last", verbose=False)  # the Lightning idiom
    assert result["test/acc"] == pytest.approx(expected, abs=1e-6)


class UserModel(LightningModule):
    """A user's module whose hyperparameters share names with DigitsMLP's (``lr``, ``dropout``)."""

    def __init__(self, lr: float = 0.5, dropout: float = 0.25) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(dropout), torch.nn.Linear(64, 10))


class UserData(LightningDataModule):
    """A user's data module whose ``batch_size`` shares its name with DigitsDataModule's."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size


def test_cli_model_and_data_swap_keep_the_users_own_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--model", f"{__name__}.UserModel", "--data", f"{__name__}.UserData", "--trainer.logger=false"]
    cli = run_cli(args, run=False)
    assert isinstance(cli.model, UserModel) and isinstance(cli.datamodule, UserData)
    assert (cli.model.hparams.lr, cli.model.hparams.dropout, cli.datamodule.batch_size) == (0.5, 0.25, 16)
