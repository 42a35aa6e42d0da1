"""GradualPruning's criteria (activation, movement), N:M patterns and the per-step masking, with a real Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_compress import CompressionMonitor, GradualPruning, QuantizationAwareTraining
from lightning_compress.export import convert_quantized
from lightning_compress.functional import pruning as masks
from lightning_compress.schedules import Schedule
from tests.helpers import TinyModule, run_python


class Witness(Callback):
    """Listed before the pruning callback: what it will see at ``step`` (weights, inputs and movement so far)."""

    def __init__(self, step: int) -> None:
        self.step, self.inputs, self.movement, self.weights = step, [], {}, {}
        self.grads_zero_where_pruned: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.step:
            self.inputs.append(batch[0].clone())
        if trainer.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for n, p in pl_module.named_parameters():
            if n.endswith("weight") and trainer.global_step < self.step:
                self.movement[n] = self.movement.get(n, 0) - p.detach() * p.grad


def test_activation_criterion_ranks_by_weight_times_input_norm_from_the_training_batches(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    witness = Witness(step=3)
    pruning = GradualPruning(final_sparsity=0.5, start_step=3, end_step=3, schedule="one_shot", targets=["net.0"],
                             criterion="activation")
    make_trainer(callbacks=[witness, pruning], max_steps=5).fit(model)
    norms = torch.linalg.vector_norm(torch.cat(witness.inputs), dim=0)  # batches 0-2, seen before the update
    w = witness.weights["net.0.weight"]
    expected = masks.unstructured_mask(w, 0.5, scores=w.abs() * norms)
    assert torch.equal(pruning.masks["net.0.weight"], expected)
    assert not torch.equal(expected, masks.unstructured_mask(w, 0.5))  # not what magnitude gives
    assert not model.net[0]._forward_pre_hooks, "the input hooks were not removed"


def test_row_scope_prunes_every_output_row_to_the_sparsity_by_its_own_ranking(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    witness = Witness(step=3)
    pruning = GradualPruning(final_sparsity=0.5, start_step=3, end_step=3, schedule="one_shot", targets=["net.0"],
                             criterion="activation", scope="row")
    make_trainer(callbacks=[witness, pruning], max_steps=5).fit(model)
    norms = torch.linalg.vector_norm(torch.cat(witness.inputs), dim=0)
    w = witness.weights["net.0.weight"]
    keep = pruning.masks["net.0.weight"]
    expected = torch.stack([masks.unstructured_mask(row, 0.5, scores=row.abs() * norms) for row in w])
    assert torch.equal(keep, expected)
    assert (~keep).sum(1).tolist() == [masks.num_to_prune(0.5, w.shape[1])] * w.shape[0]
    assert not torch.equal(keep, masks.unstructured_mask(w, 0.5, scores=w.abs() * norms))  # not the layer's cut
    assert bool((model.net[0].weight.detach()[~keep] == 0).all())


def test_activation_criterion_prunes_a_model_passed_to_fit_in_eval_mode(make_trainer) -> None:
    # Lightning trains a module handed over in eval mode in eval mode; the input norms must still be gathered
    # (before the fix the hooks skipped eval-mode modules and the masks were never computed: 0 % sparsity)
    seed_everything(0)
    model = TinyModule().eval()
    pruning = GradualPruning(final_sparsity=0.5, start_step=2, end_step=2, schedule="one_shot", targets=["net.0"],
                             criterion="activation")
    make_trainer(callbacks=[pruning], max_steps=4).fit(model)
    assert not model.training
    assert float((model.net[0].weight == 0).float().mean()) == 0.5


class SkipsNet0(TinyModule):
    """Runs its first layer only outside training (with gradients off), so training never shows it an input."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.net[0](batch[0])
        return self.net[1:](hidden).pow(2).mean()


def test_activation_criterion_refuses_to_train_on_when_it_never_sees_an_input(make_trainer) -> None:
    pruning = GradualPruning(final_sparsity=0.5, start_step=1, end_step=6, update_every=1, targets=["net.0"],
                             criterion="activation")
    with pytest.raises(RuntimeError, match=r"criterion='activation'.*no inputs.*from step 1 to step 2"):
        make_trainer(callbacks=[pruning], max_steps=6).fit(SkipsNet0())


def test_movement_criterion_ranks_by_accumulated_minus_weight_times_gradient(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    witness = Witness(step=4)
    pruning = GradualPruning(final_sparsity=0.6, start_step=4, end_step=4, schedule="one_shot", criterion="movement",
                             scope="layer")
    make_trainer(callbacks=[witness, pruning], max_steps=6).fit(model)
    for fqn in ("net.0.weight", "net.2.weight"):
        expected = masks.unstructured_mask(witness.weights[fqn], 0.6, scores=witness.movement[fqn], signed=True)
        assert torch.equal(pruning.masks[fqn], expected), fqn
    assert not pruning._stats.sums, "movement scores kept after the last update"


@pytest.mark.parametrize("reconstruct, statistics", [(False, "since_update"), (True, "since_update"),
                                                     (True, "cumulative")])
def test_criterion_statistics_resume_exactly_and_hooks_go_on_a_crash(reconstruct: bool, statistics: str,
                                                                     tmp_path: Path, make_trainer) -> None:
    def fit(root: Path, crash: bool = False, ckpt: str | None = None) -> tuple[TinyModule, GradualPruning]:
        seed_everything(0)
        model = TinyModule()
        pruning = GradualPruning(final_sparsity=0.8, start_step=5, end_step=14, update_every=3, criterion="activation",
                                 reconstruct=reconstruct, statistics=statistics)
        callbacks: list[Any] = [pruning, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=4)]
        if crash:
            callbacks.append(Crasher())
        make_trainer(callbacks=callbacks, max_steps=20, max_epochs=3, enable_checkpointing=True).fit(model, ckpt_path=ckpt)
        return model, pruning

    straight, straight_pruning = fit(tmp_path / "a")
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "b", crash=True)  # checkpoint at step 8: mid-interval, input sums gathered since step 5
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("GradualPruning"))
    assert saved["global_step"] == 8 and set(state["criterion_stats"]) == {"net.0.weight", "net.2.weight"}
    grams = {"net.0.weight": (16, 16), "net.2.weight": (32, 32)} if reconstruct else {}  # inputs' Gram since step 5
    assert {k: tuple(v.shape) for k, v in state["reconstruct_gram"].items()} == grams
    resumed, resumed_pruning = fit(tmp_path / "b", ckpt=str(tmp_path / "b" / "last.ckpt"))
    for fqn, mask in straight_pruning.masks.items():
        assert torch.equal(mask, resumed_pruning.masks[fqn]), fqn
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


class Crasher(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 10:
            assert pl_module.net[0]._forward_pre_hooks, "activation hooks expected while gathering"
            raise RuntimeError("crash")

    def on_exception(self, trainer, pl_module, exception) -> None:  # listed after the pruning callback
        assert not pl_module.net[0]._forward_pre_hooks, "hooks left on the model after the crash"


def test_structured_activation_pruning_removes_whole_units(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(final_sparsity=0.5, start_step=1, end_step=4, mode="structured", criterion="activation",
                             scope="layer", targets=["net.0"])
    make_trainer(callbacks=[pruning], max_steps=6).fit(model)
    assert int((model.net[0].weight == 0).all(1).sum()) == 16


def test_ddp_activation_masks_identical_on_every_rank(tmp_path: Path) -> None:
    # with reconstruct="adaptive" (one 2-process launch for both): the activation criterion's masks come from
    # input norms summed over the ranks, and the sweep then picks entries from Gram matrices summed the same way
    run_python(
        """
        import torch
        from lightning.pytorch import Trainer, seed_everything
        from lightning_compress import GradualPruning
        from tests.helpers import TinyModule

        if __name__ == "__main__":
            seed_everything(0)
            pruning = GradualPruning(final_sparsity=0.7, start_step=1, end_step=3, update_every=1,
                                     criterion="activation", reconstruct="adaptive")
            trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False,
                              callbacks=[pruning], enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False)
            model = TinyModule()
            trainer.fit(model)
            torch.save({"masks": pruning.masks, "weights": model.state_dict()}, f"rank{trainer.global_rank}.pt")
        """,
        cwd=tmp_path,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    kept = sum(int(m.sum()) for m in r0["masks"].values()) / sum(m.numel() for m in r0["masks"].values())
    assert kept == pytest.approx(0.3, abs=0.01)  # 70 % pruned over the pool (global scope)
    for fqn in r0["masks"]:
        assert torch.equal(r0["masks"][fqn], r1["masks"][fqn])
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name])


def test_two_four_pattern_grows_with_the_schedule_and_is_logged(tmp_path: Path, make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(pattern="2:4", start_step=0, end_step=8, update_every=2, criterion="movement")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(callbacks=[pruning, CompressionMonitor(log_every_n_steps=1, print_table=False)], logger=logger,
                 max_steps=12, max_epochs=2).fit(model)
    for layer in (model.net[0], model.net[2]):
        groups = layer.weight.detach().reshape(-1, 4)
        assert bool(((groups != 0).sum(1) <= 2).all()) and masks.nm_fraction(layer.weight, 2, 4) == 1.0
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("compression/pattern_2of4/net.0")}
    groups = model.net[0].weight.numel() // 4
    for step in (3, 5, 7):  # masks from the update at step - 1 (movement: the one due at step 0 waits for step 1)
        update = step - 1
        assert logged[step] == pytest.approx(round(Schedule("cubic", 0, 1, 0, 8).value_at(update) * groups) / groups)
    assert logged[12] == 1.0


def test_two_four_with_int8_quantization_keeps_exactly_the_pattern(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(pattern="2:4", start_step=0, end_step=6, update_every=2)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, convert_on_fit_end=False)
    make_trainer(callbacks=[pruning, qat], max_steps=10).fit(model)
    int_model = convert_quantized(model)
    for name in ("net.0", "net.2"):
        codes = int_model.get_submodule(name).weight_int8
        assert codes.dtype == torch.int8
        assert torch.equal(codes != 0, pruning.masks[f"{name}.weight"] & (model.get_submodule(name).weight != 0))
        assert bool(((codes.reshape(-1, 4) != 0).sum(1) <= 2).all())
        assert int((codes == 0).sum()) >= codes.numel() // 2


class GradSeen(Callback):
    """Listed after the pruning callback: are the pruned entries' gradients zero when the optimizer steps?"""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning, self.zero = pruning, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.pruning.masks:
            mask = self.pruning.masks["net.0.weight"]
            self.zero.append(bool((pl_module.net[0].weight.grad[~mask] == 0).all()))


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradients_of_pruned_entries_are_masked_only_for_gradient_clipping(clip: float | None, make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(final_sparsity=0.7, start_step=0, end_step=2, update_every=1)
    seen = GradSeen(pruning)
    make_trainer(callbacks=[pruning, seen], max_steps=6, gradient_clip_val=clip).fit(model)
    assert seen.zero and all(seen.zero) == (clip is not None)
    assert bool((model.net[0].weight[~pruning.masks["net.0.weight"]] == 0).all())  # weights zero either way


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "wanda"}, "`criterion` must be one of"),
        ({"pattern": "4:2"}, "`pattern` must be 'N:M' with integers 1 <= N < M"),
        ({"pattern": "2:4", "mode": "structured"}, "takes neither `mode='structured'`"),
        ({"scope": "row", "mode": "structured"}, "`scope='row'` ranks the entries of each output unit"),
        ({"scope": "rows"}, "`scope` must be one of"),
        ({"pattern": "2:4", "layer_sparsity": {"net.0": 0.5}}, "takes neither"),
    ],
)
def test_bad_criterion_or_pattern_raise_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradualPruning(**kwargs)


class WithEmbedding(TinyModule):
    def __init__(self) -> None:
        super().__init__(in_features=18)
        self.emb = nn.Embedding(10, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "2:4"}, r"'net.0' has 18 inputs, not a multiple of 4"),
        ({"criterion": "activation", "targets": ["emb"]}, "'emb' is a Embedding, which this callback cannot handle"),
    ],
)
def test_bad_layers_for_criterion_or_pattern_fail_before_the_first_step(kwargs, message, make_trainer) -> None:
    trainer = make_trainer(callbacks=[GradualPruning(end_step=4, **kwargs)], max_steps=5)
    with pytest.raises(ValueError, match=message):
        trainer.fit(WithEmbedding())
    assert trainer.global_step == 0
