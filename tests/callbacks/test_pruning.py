"""GradualPruning with a real Trainer: schedule, exact zeros, checkpoints, resume, DDP, optimizers, errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_compress import CompressionMonitor, GradualPruning
from lightning_compress.functional.pruning import num_to_prune
from lightning_compress.schedules import Schedule
from tests.helpers import TinyModule

WEIGHTS = ("net.0.weight", "net.2.weight")


class Record(Callback):
    """After every batch: the sparsity of each layer, and whether any masked entry is non-zero."""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.sparsity: dict[int, float] = {}
        self.revived = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in WEIGHTS)
        self.sparsity[trainer.global_step] = zeros / sum(params[n].numel() for n in WEIGHTS)
        for fqn, mask in self.pruning.masks.items():
            self.revived += int((params[fqn][~mask] != 0).sum())


def _masked_zero(module: nn.Module, pruning: GradualPruning) -> bool:
    params = dict(module.named_parameters())
    return all(bool((params[f][~m] == 0).all()) for f, m in pruning.masks.items())


def test_follows_the_schedule_and_keeps_zeros(tiny_module, make_trainer) -> None:
    pruning = GradualPruning(final_sparsity=0.8, start_step=2, end_step=10, update_every=2, scope="layer")
    record = Record(pruning)
    make_trainer(callbacks=[pruning, record], max_epochs=2).fit(tiny_module)  # 16 steps
    schedule = Schedule("cubic", 0.0, 0.8, 2, 10)
    sizes = [tiny_module.get_parameter(n).numel() for n in WEIGHTS]
    for step, actual in record.sparsity.items():
        # masks are updated at the start of steps 2, 4, ..., 10 and then held
        last_update = max([s for s in range(2, 11, 2) if s <= step - 1], default=None)
        expected = 0.0 if last_update is None else sum(num_to_prune(schedule.value_at(last_update), n) for n in sizes)
        assert actual * sum(sizes) == pytest.approx(expected, abs=0.5), f"step {step}"
    assert record.revived == 0
    for n, size in zip(WEIGHTS, sizes, strict=True):
        assert int((tiny_module.get_parameter(n) == 0).sum()) == num_to_prune(0.8, size)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_momentum_cannot_revive_and_checkpoint_loads_strict(optimizer: str, tmp_path: Path, make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    if optimizer == "adam":
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    pruning = GradualPruning(final_sparsity=0.9, start_step=0, end_step=4, update_every=1)
    record = Record(pruning)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(callbacks=[pruning, record, ckpt], max_epochs=2, enable_checkpointing=True).fit(model)
    assert record.revived == 0
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert set(state) == set(TinyModule().state_dict())  # no weight_orig / weight_mask
    fresh = TinyModule()
    fresh.load_state_dict(state, strict=True)
    total = sum(fresh.get_parameter(n).numel() for n in WEIGHTS)
    zeros = sum(int((fresh.get_parameter(n) == 0).sum()) for n in WEIGHTS)
    assert zeros == num_to_prune(0.9, total)


def _pruning() -> GradualPruning:
    return GradualPruning(final_sparsity=0.85, start_epoch=0.5, end_epoch=3, update_every=3)


def _fit(make_trainer, tmp_path: Path, callbacks: list[Any], ckpt_path: str | None = None) -> tuple[TinyModule, Any]:
    seed_everything(0)
    model = TinyModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(callbacks=[*callbacks, ckpt], max_epochs=4, enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def test_structured_zeroes_whole_units_and_biases(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule(hidden=32)
    pruning = GradualPruning(final_sparsity=0.5, start_step=0, end_step=4, mode="structured", norm=2,
                             scope="layer", targets=["net.0"])
    make_trainer(callbacks=[pruning], max_epochs=1).fit(model)
    rows_zero = (model.net[0].weight == 0).all(dim=1)
    assert int(rows_zero.sum()) == 16
    assert bool((model.net[0].bias[rows_zero] == 0).all())
    assert int((model.net[2].weight == 0).sum()) == 0  # not targeted


class TwoOptimizers(TinyModule):
    """Manual optimization with one optimizer per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
                torch.optim.Adam(self.net[2].parameters(), lr=0.05))


def test_several_optimizers(make_trainer) -> None:
    seed_everything(0)
    model = TwoOptimizers()
    pruning = GradualPruning(final_sparsity=0.6, start_step=0, end_step=10, update_every=2, scope="layer")
    record = Record(pruning)
    make_trainer(callbacks=[pruning, record], max_epochs=2).fit(model)
    assert record.revived == 0
    for n in WEIGHTS:
        assert int((model.get_parameter(n) == 0).sum()) == num_to_prune(0.6, model.get_parameter(n).numel())


def test_gradient_accumulation_counts_optimizer_steps(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, update_every=1)
    trainer = make_trainer(callbacks=[pruning], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(model)
    assert trainer.global_step == 8
    assert pruning._last_update_step == 4  # one epoch = 4 optimizer steps of 2 batches
    assert pruning.current_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert _masked_zero(model, pruning)


def test_frozen_layers_skipped_with_warning_unless_targeted(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    model.net[0].weight.requires_grad_(False)
    pruning = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2)
    with pytest.warns(UserWarning, match="skipping 'net.0', its weight is frozen"):
        make_trainer(callbacks=[pruning], max_steps=3).fit(model)
    assert set(pruning.masks) == {"net.2.weight"}

    model = TinyModule()
    model.net[0].weight.requires_grad_(False)
    pruning = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2, targets=["net.*"], scope="layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*(workers|LeafSpec|GPU available|max_steps).*")
        make_trainer(callbacks=[pruning], max_steps=3).fit(model)
    assert set(pruning.masks) == set(WEIGHTS)
    assert int((model.net[0].weight == 0).sum()) == 256


def test_layer_override_and_global_scope(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(final_sparsity=0.9, start_step=0, end_step=4, layer_sparsity={"net.2": 0.25})
    make_trainer(callbacks=[pruning], max_steps=6).fit(model)
    assert int((model.net[2].weight == 0).sum()) == num_to_prune(0.25, 128)
    assert int((model.net[0].weight == 0).sum()) == num_to_prune(0.9, 512)


def test_monitor_logs_actual_and_scheduled_sparsity(tmp_path: Path, make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(final_sparsity=0.75, start_step=0, end_step=8, update_every=1)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(callbacks=[pruning, CompressionMonitor(log_every_n_steps=2, print_table=False)], logger=logger,
                 max_epochs=2).fit(model)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    target = {e.step: e.value for e in acc.Scalars("compression/target/sparsity")}
    actual = {e.step: e.value for e in acc.Scalars("compression/sparsity")}
    # logged after step 2: the masks in effect were set at the start of step 1
    assert target[2] == pytest.approx(Schedule("cubic", 0, 0.75, 0, 8).value_at(1), abs=1e-6)
    assert actual[16] == pytest.approx(0.75, abs=1e-3) and target[16] == pytest.approx(0.75)
    assert actual[2] == pytest.approx(target[2], abs=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"final_sparsity": -0.1}, r"`final_sparsity` must be a number in \[0, 1\), got -0.1"),
        ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, "`initial_sparsity` must be <= `final_sparsity`"),
        ({"start_epoch": 3, "end_epoch": 1}, "ends before it starts: `end_epoch`=1 < `start_epoch`=3"),
        ({"start_step": 3, "end_epoch": 1}, "not both"),
        ({"update_every": 0}, "`update_every` must be an integer >= 1, got 0"),
        ({"schedule": "quadratic"}, "`schedule` must be one of"),
        ({"mode": "channels"}, "`mode` must be one of"),
        ({"scope": "model"}, "`scope` must be one of"),
        ({"norm": 3}, "`norm` must be one of"),
        ({"targets": "net.0"}, "single string"),
        ({"layer_sparsity": {"net.0": 2.0}}, r"`layer_sparsity\['net.0'\]` must be a number in \[0, 1\)"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        GradualPruning(**kwargs)


class WithEmbedding(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ["net.9"]}, r"`targets`: pattern\(s\) \['net.9'\] match no layer"),
        ({"exclude": ["encoder"]}, r"`exclude`: pattern\(s\) \['encoder'\] match no layer"),
        ({"end_step": 500}, "end of the schedule at optimizer step 500, but this run has only 8"),
        ({"end_epoch": 2.0}, "`end_epoch` puts the end of the schedule at optimizer step 16, but this run has only 8"),
        ({"layer_sparsity": {"head": 0.5}}, r"`layer_sparsity`: pattern\(s\) \['head'\] match no pruned layer"),
        ({"mode": "structured", "targets": ["emb"]}, "'emb' is a Embedding, which this callback cannot handle"),
    ],
)
def test_bad_configuration_fails_before_the_first_step(kwargs: dict[str, Any], message: str, make_trainer) -> None:
    model = WithEmbedding()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(callbacks=[GradualPruning(**kwargs)], max_epochs=1)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_pruning_callbacks_on_one_layer_refused(make_trainer) -> None:
    trainer = make_trainer(callbacks=[GradualPruning(targets=["net.0"]), GradualPruning(targets=["re:net\\.[02]"])])
    with pytest.raises(ValueError, match=r"GradualPruning#\d+ wants to prune 'net.0.weight', which GradualPruning#\d+"):
        trainer.fit(TinyModule())


@pytest.mark.parametrize(
    ("kwargs", "layer"),
    [
        ({"final_sparsity": 0.9, "scope": "layer"}, "net.0"),  # round(0.9 * 4) = 4 of net.0's 4 output units
        ({"final_sparsity": 0.5, "layer_sparsity": {"net.0": 0.9}}, "net.0"),  # overrides are ranked on their own
    ],
)
def test_structured_pruning_that_would_remove_every_unit_of_a_layer_is_refused(
    kwargs: dict[str, Any], layer: str, make_trainer
) -> None:
    # layer-wise structured masks prune round(s * units) units: at 90% every unit of a 4-unit layer went, the
    # model's output became a constant (the global ranking keeps a unit per layer; the layer-wise one did not)
    tiny_module = TinyModule(hidden=4)
    before = {k: v.clone() for k, v in tiny_module.state_dict().items()}
    trainer = make_trainer(callbacks=[GradualPruning(mode="structured", end_step=4, **kwargs)])
    with pytest.raises(ValueError, match=rf"would prune all 4 output units of {layer!r}"):
        trainer.fit(tiny_module)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in tiny_module.state_dict().items())
    # at most 3 of 4 units (0.75) is accepted, and one unit survives
    seed_everything(0)
    ok = GradualPruning(mode="structured", scope="layer", final_sparsity=0.75, end_step=4)
    make_trainer(callbacks=[ok]).fit(TinyModule(hidden=4))
    assert int(ok.masks["net.0.weight"][:, 0].sum()) == 1


class HeadFirst(nn.Module):
    """A 3-class classifier whose output layer is registered first (registration order is not forward order)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(16, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.body(x)), dim=-1)


class HeadFirstModule(TinyModule):
    def __init__(self) -> None:
        super().__init__(out_features=3)
        self.net = HeadFirst()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_structured_pruning_leaves_the_output_layer_whole(scope: str, make_trainer) -> None:
    # with default targets, 2 of the 3 output rows of the classifier were zeroed: whole classes dead
    seed_everything(0)
    model = HeadFirstModule()
    pruning = GradualPruning(mode="structured", final_sparsity=0.5, scope=scope, start_step=0, end_step=2)
    make_trainer(callbacks=[pruning], max_epochs=1).fit(model)
    assert sorted(pruning.masks) == ["net.body.0.weight"]
    assert int((model.net.body[0].weight == 0).all(dim=1).sum()) == 4  # the hidden layer: half its units
    assert not bool((model.net.head.weight == 0).all(dim=1).any())  # every class keeps its output unit
    named = GradualPruning(mode="structured", final_sparsity=0.5, targets=["net.head", "net.body.0"], end_step=2)
    with pytest.raises(ValueError, match=r"'net.head'.*output of the model.*`exclude`"):
        make_trainer(callbacks=[named], max_epochs=1).fit(HeadFirstModule())


def test_a_callback_reused_for_another_model_prunes_that_model_from_its_own_weights(make_trainer) -> None:
    # the masks (and last update step) of the first fit stayed in the callback: a second, different model was
    # given the first model's masks and, past the end of the window, never got masks of its own
    def fit(model: TinyModule, pruning: GradualPruning) -> None:
        make_trainer(callbacks=[pruning], max_epochs=2).fit(model)

    reused = GradualPruning(final_sparsity=0.6, start_step=0, end_step=6, update_every=2, scope="layer")
    seed_everything(0)
    fit(TinyModule(), reused)
    seed_everything(1)
    second = TinyModule()
    fit(second, reused)
    fresh = GradualPruning(final_sparsity=0.6, start_step=0, end_step=6, update_every=2, scope="layer")
    seed_everything(1)
    reference = TinyModule()
    fit(reference, fresh)
    for name, mask in fresh.masks.items():
        assert torch.equal(reused.masks[name], mask), name
    for a, b in zip(second.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_default_targets_are_linear_and_conv_layers_embeddings_only_when_named(make_trainer) -> None:
    # the docstring says `targets=None` prunes every Linear/Conv layer, but embeddings were pruned too (and in the
    # global ranking their N(0, 1) rows outweighed the classifier's small weights)
    seed_everything(0)
    default = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2)
    make_trainer(callbacks=[default], max_steps=3).fit(WithEmbedding())
    assert set(default.masks) == {"net.0.weight", "net.2.weight"}
    seed_everything(0)
    named = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2, targets=["emb", "net.*"])
    make_trainer(callbacks=[named], max_steps=3).fit(WithEmbedding())
    assert set(named.masks) == {"emb.weight", "net.0.weight", "net.2.weight"}


def test_masking_skips_all_kept_weights_and_reuses_its_factor_buffers() -> None:
    from lightning_compress.callbacks._pruning_masking import Masking

    a, b = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 4.0]])), nn.Parameter(torch.tensor([5.0, 6.0]))
    bias = nn.Parameter(torch.tensor([1.0, 1.0]))
    masking = Masking()
    masking.update({"a": torch.tensor([[True, True], [False, False]]), "b": torch.ones(2, dtype=torch.bool)},
                   {"a": a, "b": b}, {"a": bias})
    assert [p is a or p is bias for p, _ in masking.factors] == [True, True], "b keeps everything: no factor"
    buffer = masking.factors[0][1]
    a.data.fill_(7.0)
    masking.update({"a": torch.tensor([[True, False], [False, False]]), "b": torch.ones(2, dtype=torch.bool)},
                   {"a": a, "b": b}, {"a": bias})
    assert masking.factors[0][1] is buffer and buffer.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    params = {id(a)}
    masking.apply(params)
    masking.apply(params)  # the lists built for this set of parameters are reused
    assert a.tolist() == [[7.0, 0.0], [0.0, 0.0]] and b.tolist() == [5.0, 6.0] and bias.tolist() == [1.0, 1.0]
    masking.apply()
    assert bias.tolist() == [1.0, 0.0]
