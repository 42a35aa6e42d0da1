import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_compress.examples import DigitsCNN, DigitsDataModule, DigitsMLP


def test_split_is_fixed_disjoint_and_scaled() -> None:
    a, b = DigitsDataModule(split_seed=3), DigitsDataModule(split_seed=3)
    a.setup("fit"), b.setup("fit")
    xa = a.train_set.tensors[0]
    assert torch.equal(xa, b.train_set.tensors[0])
    assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    sizes = len(a.train_set) + len(a.val_set) + len(a.test_set)
    assert sizes == 1797
    rows = {tuple(r.tolist()) for r in a.test_set.tensors[0].flatten(1)}
    # the digits set has a few duplicate images; the split itself must be disjoint by index
    assert len(rows) > 0.95 * len(a.test_set)
    c = DigitsDataModule(split_seed=4)
    c.setup("fit")
    assert not torch.equal(xa, c.train_set.tensors[0])


def test_train_subset() -> None:
    dm = DigitsDataModule(train_subset=100)
    dm.setup("fit")
    assert len(dm.train_set) == 100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "`batch_size`"),
        (dict(val_fraction=1.2), "`val_fraction`"),
        (dict(val_fraction=0.5, test_fraction=0.5), "must be < 1"),
        (dict(train_subset=0), "`train_subset`"),
    ],
)
def test_datamodule_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_models_learn_digits(make_trainer) -> None:
    """Five epochs already put both models far above chance (10%) on the test split."""
    seed_everything(0)
    for model in (DigitsMLP(hidden_sizes=[64], lr=3e-3), DigitsCNN(channels=[8, 8], hidden=32)):
        trainer = make_trainer(max_epochs=5)
        dm = DigitsDataModule()
        trainer.fit(model, datamodule=dm)
        (result,) = trainer.test(model, datamodule=dm, verbose=False)
        assert result["test/acc"] > 0.8, type(model).__name__


def test_model_errors() -> None:
    with pytest.raises(ValueError, match="`hidden_sizes`"):
        DigitsMLP(hidden_sizes=[])
    with pytest.raises(ValueError, match="`channels`"):
        DigitsCNN(channels=[8])
    with pytest.raises(ValueError, match="`optimizer`"):
        DigitsMLP(optimizer="lbfgs")


def test_examples_carry_an_example_input_so_thin_needs_no_argument() -> None:
    from lightning_compress.export import thin

    mlp = DigitsMLP(hidden_sizes=[32, 16])
    assert mlp.example_input_array.shape == (4, 1, 8, 8)
    with torch.no_grad():
        mlp.net[1].weight[:8] = 0  # 8 dead units of the first hidden layer
        mlp.net[1].bias[:8] = 0
    small = thin(mlp)
    assert small.net[1].out_features == 24 and small.net[3].in_features == 24
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(small(x), mlp(x), atol=1e-5)
    assert DigitsCNN(channels=[4, 8], hidden=16)(DigitsCNN().example_input_array).shape == (4, 10)


@pytest.mark.slow
def test_resume_continues_the_shuffle_of_an_uninterrupted_run(make_trainer, tmp_path) -> None:
    """README "Quick start": a fit resumed with ``ckpt_path`` ends where an uninterrupted one does. The training
    loader shuffles from torch's global generator, whose state a fresh process does not have: the data module
    keeps it in the checkpoint (found with the recipe's own data module: a resumed digits_gradual_pruning run ended
    at 97.77 % against 97.49 % uninterrupted)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_compress import GradualPruning

    def run(max_epochs: int, ckpt_path: str | None = None) -> DigitsMLP:
        seed_everything(0)
        model = DigitsMLP(hidden_sizes=[32], lr=3e-3)
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
        pruning = GradualPruning(final_sparsity=0.8, start_epoch=0, end_epoch=3, update_every=5)
        trainer = make_trainer(max_epochs=max_epochs, callbacks=[pruning, every], enable_checkpointing=True)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
        return model

    whole = run(4)
    resumed = run(4, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
