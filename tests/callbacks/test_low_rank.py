"""LowRankFactorization with a real Trainer: mid-fit factorization, optimizers, resume, loading, logs, DDP."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.checkpoints import load_factorized_checkpoint
from lightning_compress.layers.low_rank import LowRankConv2d, LowRankLinear
from tests.helpers import StopAt, TinyModule, run_python


class _Snapshot(Callback):
    """Copies the model's ``net`` in ``on_train_batch_start`` at ``step`` (before or after the factorization,
    depending on where it sits in the callbacks list)."""

    def __init__(self, step: int) -> None:
        self.step, self.net = step, None

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.net is None:
            self.net = copy.deepcopy(pl_module.net)


class _WithScheduler(TinyModule):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_factorizes_mid_fit_outputs_move_by_truncation_only_and_factors_train(make_trainer: Any, tmp_path: Path) -> None:
    seed_everything(0)
    model = _WithScheduler()
    before, after = _Snapshot(3), _Snapshot(3)
    lowrank = LowRankFactorization(ranks={"net.0": 4, "net.2": 4}, start_step=3)  # net.2 (32x4) cannot shrink
    monitor = CompressionMonitor(log_every_n_steps=0, histograms=False, print_table=False)
    handler = _Records()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(handler)
    try:
        trainer = make_trainer(max_steps=8, callbacks=[before, lowrank, after, monitor],
                               logger=CSVLogger(str(tmp_path), name="csv"))
        trainer.fit(model)
    finally:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").removeHandler(handler)

    # the structure: net.0 factorized at rank 4, net.2 left dense (4 * (32 + 4) + 4 >= 32 * 4 + 4)
    assert isinstance(model.net[0], LowRankLinear) and model.net[0].rank == 4
    assert type(model.net[2]) is nn.Linear
    state = lowrank.state_dict()
    assert state["factorized_step"] == 3 and list(state["factorized_layers"]) == ["net.0"]
    assert "148" in state["skipped_layers"]["net.2"] and "132" in state["skipped_layers"]["net.2"]
    assert any("leaving 'net.2' dense" in line for line in handler.lines), handler.lines
    assert any("'net.0' rank 4/16, 544 -> 224 parameters" in line for line in handler.lines), handler.lines

    # at the moment of factorization the outputs moved exactly as much as the rank-4 truncation of W moves them
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    dense, factored = before.net, after.net
    u, s, vh = torch.linalg.svd(dense[0].weight.detach().double(), full_matrices=False)
    truncated = copy.deepcopy(dense)
    with torch.no_grad():
        truncated[0].weight.copy_((u[:, :4] * s[:4]) @ vh[:4])
        torch.testing.assert_close(factored(x), truncated(x), atol=1e-5, rtol=1e-4)
        assert (factored(x) - dense(x)).abs().max() > 1e-3  # and it did move: rank 4 of 16 is a real truncation
    assert float(lowrank.layers["net.0"]["kept_energy"]) == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()))

    # the factors train afterwards, every model parameter is in the optimizer, the LR schedule carried on
    assert not torch.equal(model.net[0].down.weight, factored[0].down.weight.to(model.net[0].down.weight))
    optimizer = trainer.optimizers[0]
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer

    # CompressionMonitor counts the factors
    stats, metrics = monitor.collect(trainer, model)
    assert stats.total_params == sum(p.numel() for p in model.parameters()) == 224 + 132
    assert {layer.name for layer in stats.layers} == {"net.0.down", "net.0.up", "net.2"}
    assert metrics["compression/target/lowrank_param_fraction"] == pytest.approx(224 / 544)
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "lowrank/rank/net.0" in logged and "lowrank/params_after" in logged


@pytest.mark.parametrize("start_step", [6, 10], ids=["checkpoint-after-factorization", "checkpoint-before"])
def test_resume_equals_uninterrupted_and_checkpoint_loads(make_trainer: Any, tmp_path: Path, start_step: int) -> None:
    def run(name: str, ckpt_path: str | None = None, stop_after_epoch: int | None = None) -> tuple[TinyModule, Any]:
        seed_everything(0)
        model = TinyModule()
        lowrank = LowRankFactorization(rank_ratio=0.25, start_step=start_step, targets=["net.0"])
        checkpoint = ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True, every_n_epochs=1)
        callbacks: list[Callback] = [lowrank, checkpoint]
        if stop_after_epoch is not None:
            callbacks.append(StopAt(epoch=stop_after_epoch))
        trainer = make_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    straight, _ = run("straight")  # 8 steps per epoch: factorized at `start_step`
    run("killed", stop_after_epoch=0)  # stops after epoch 0 (step 8), its last checkpoint written
    last = str(tmp_path / "killed" / "last.ckpt")
    resumed, trainer = run("resumed", ckpt_path=last)
    assert isinstance(resumed.net[0], LowRankLinear) and resumed.net[0].rank == 4
    assert trainer.global_step == 16
    expected = straight.state_dict()
    got = resumed.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)

    if start_step < 8:  # the checkpoint holds factors: a plain model cannot load it, the helper can
        ckpt = torch.load(last, weights_only=False)
        with pytest.raises(RuntimeError, match="down.weight"):
            TinyModule().load_state_dict(ckpt["state_dict"])
        fresh = load_factorized_checkpoint(TinyModule(), last)
        x = torch.randn(8, 16)
        with torch.no_grad():
            assert isinstance(fresh.net[0], LowRankLinear)
            fresh.load_state_dict(ckpt["state_dict"])  # strict: every key fits
        # and Trainer.validate(ckpt_path=) rebuilds the structure through the callback
        evaluated = TinyModule()
        lowrank = LowRankFactorization(rank_ratio=0.25, start_step=start_step, targets=["net.0"])
        make_trainer(callbacks=[lowrank]).validate(
            evaluated, ckpt_path=last, verbose=False
        )
        with torch.no_grad():
            torch.testing.assert_close(evaluated(x), fresh(x))
    else:
        with pytest.raises(ValueError, match="holds no LowRankFactorization state"):
            load_factorized_checkpoint(TinyModule(), _plain_ckpt(tmp_path))


def _plain_ckpt(tmp_path: Path) -> str:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": TinyModule().state_dict(), "callbacks": {}}, path)
    return str(path)


class _TinyCNN(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(128, 4),
        )


def test_conv_layers_and_energy_rule(make_trainer: Any) -> None:
    seed_everything(0)
    model = _TinyCNN()
    lowrank = LowRankFactorization(energy=0.6, ranks={"net.1": 5}, targets=["re:net\\.[13]"], start_step=2)
    make_trainer(max_steps=4, callbacks=[lowrank]).fit(model)
    assert isinstance(model.net[3], LowRankConv2d) and model.net[3].down.kernel_size == (3, 3)
    info = lowrank.layers["net.3"]
    assert info["kept_energy"] >= 0.6 and info["rank"] < info["full_rank"]
    # net.1 (1 -> 8 channels, an 8x9 matrix) at rank 5 would grow: 5 * (9 + 8) + 8 >= 8 * 9 + 8, left dense
    assert type(model.net[1]) is nn.Conv2d and "net.1" in lowrank.state_dict()["skipped_layers"]


def test_composes_with_qat_at_step_zero_and_refuses_mid_fit_overlap(make_trainer: Any) -> None:
    quantization = pytest.importorskip("lightning_compress.callbacks.quantization")
    from lightning_compress.layers.quantization import is_qat_module

    seed_everything(0)
    model = TinyModule()
    lowrank = LowRankFactorization(param_ratio=0.25, start_step=0, targets=["net.0"])
    qat = quantization.QuantizationAwareTraining(weight_bits=8, activation_bits=None, convert_on_fit_end=False)
    make_trainer(max_steps=3, callbacks=[lowrank, qat]).fit(model)
    assert is_qat_module(model.net[0].down) and is_qat_module(model.net[0].up) and is_qat_module(model.net[2])
    assert qat.compression_bits(model)["net.0.down.weight"] == 8

    # factorizing mid-fit a layer that QAT wraps from the start: refused before the first step, in either order
    for order, message in (("lowrank-first", "quantize 'net.0.weight', which LowRank"), ("qat-first", "QATLinear")):
        seed_everything(0)
        model = TinyModule()
        lowrank = LowRankFactorization(param_ratio=0.25, start_step=2, targets=["net.0"])
        qat = quantization.QuantizationAwareTraining(weight_bits=8, activation_bits=None)
        callbacks = [lowrank, qat] if order == "lowrank-first" else [qat, lowrank]
        with pytest.raises(ValueError, match=message):
            make_trainer(max_steps=3, callbacks=callbacks).fit(model)


def test_composes_with_distillation_keeping_its_parameter_group(make_trainer: Any) -> None:
    from lightning_compress.callbacks.distillation import KnowledgeDistillation

    seed_everything(0)
    model = TinyModule()
    teacher = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    kd = KnowledgeDistillation(teacher=teacher, feature_pairs={"net.2": "0"}, alpha=0.5)
    lowrank = LowRankFactorization(rank_ratio=0.25, start_step=2, targets=["net.0"])
    trainer = make_trainer(max_steps=5, callbacks=[kd, lowrank])
    trainer.fit(model)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2  # the model's group (now with the factors) and KD's projection group
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[0]["params"]} == model_params
    assert not model_params & {id(p) for p in groups[1]["params"]}
    assert isinstance(model.net[0], LowRankLinear)


def test_bad_input_in_init() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank_ratio": 0.0}, r"`rank_ratio` must be a number in \(0, 1\], got 0.0"),
        ({"rank_ratio": 1.5}, "`rank_ratio`"),
        ({"energy": -0.1}, "`energy`"),
        ({"param_ratio": 2}, "`param_ratio`"),
        ({"energy": True}, "`energy`"),
        ({}, "give a rank rule"),
        ({"rank_ratio": 0.5, "energy": 0.9}, "give one of"),
        ({"ranks": {"net.0": 0}}, r"`ranks\['net.0'\]` must be an integer >= 1, got 0"),
        ({"ranks": {"net.0": 2.5}}, "`ranks"),
        ({"rank_ratio": 0.5, "start_step": 1, "start_epoch": 1}, "not both"),
        ({"rank_ratio": 0.5, "start_step": -1}, "`start_step`"),
        ({"rank_ratio": 0.5, "start_epoch": -2.0}, "`start_epoch`"),
        ({"rank_ratio": 0.5, "targets": ["re:("]}, "`targets`"),
        ({"rank_ratio": 0.5, "whiten": True}, r"`whiten`=True needs the inputs of some training batches.*start_step=None"),
        ({"rank_ratio": 0.5, "whiten": True, "start_epoch": 0}, "`whiten`=True needs"),
        ({"rank_ratio": 0.5, "whiten": 1, "start_step": 2}, "`whiten` must be True or False, got 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            LowRankFactorization(**kwargs)
    with pytest.raises(TypeError, match="`ranks`"):
        LowRankFactorization(ranks=[("net.0", 2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`targets`"):
        LowRankFactorization(rank_ratio=0.5, targets="net.0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranks": {"net.0": 17}}, r"`ranks\['net.0'\]`=17 is larger than possible for layer 'net.0'.*at most 16"),
        ({"rank_ratio": 0.5, "targets": ["net.1"]}, "'net.1' is a ReLU"),
        ({"rank_ratio": 0.5, "targets": ["net.9"]}, r"\['net.9'\] match no layer"),
        ({"ranks": {"net.0": 2}}, "`ranks` gives no rank for layer 'net.2'"),
        ({"rank_ratio": 0.5, "ranks": {"fc": 2}}, r"`ranks`: pattern\(s\) \['fc'\] match no factorized layer"),
        ({"rank_ratio": 0.5, "start_step": 50}, "factorizes at optimizer step 50, but this run has only 8"),
    ],
)
def test_bad_input_before_the_first_step(make_trainer: Any, kwargs: dict[str, Any], message: str) -> None:
    seed_everything(0)
    model = TinyModule()
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        make_trainer(callbacks=[LowRankFactorization(**kwargs)]).fit(model)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # no step was taken


def test_subclass_target_is_refused(make_trainer: Any) -> None:
    class Custom(nn.Linear):
        pass

    model = TinyModule()
    model.net[0] = Custom(16, 32)
    with pytest.raises(ValueError, match="'net.0' cannot be factorized: it is a Custom"):
        make_trainer(callbacks=[LowRankFactorization(rank_ratio=0.5, targets=["net.0"])]).fit(model)


@pytest.mark.ddp
def test_ddp_two_processes_train_the_factors_in_sync(tmp_path: Path) -> None:
    run_python(
        """
        import torch
        from lightning.pytorch import Callback, Trainer, seed_everything
        from torch.nn.parallel import DistributedDataParallel
        from lightning_compress.callbacks.low_rank import LowRankFactorization
        from lightning_compress.layers.low_rank import LowRankLinear
        from tests.helpers import TinyModule

        class Probe(Callback):  # after the factorization, DDP must wrap (and sync) exactly the model's parameters
            synced = None

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == 4:
                    ddp = trainer.strategy.model
                    ids = {id(p) for p in pl_module.parameters()}
                    Probe.synced = isinstance(ddp, DistributedDataParallel) and {id(p) for p in ddp.parameters()} == ids

        seed_everything(0)
        model = TinyModule()
        lowrank = LowRankFactorization(energy=0.5, start_step=2, targets=["net.0"])
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0, callbacks=[lowrank, Probe()])
        trainer.fit(model)
        assert isinstance(model.net[0], LowRankLinear)
        assert Probe.synced
        torch.save({"state": model.state_dict(), "rank": model.net[0].rank, "lowrank": lowrank.state_dict()},
                   f"rank{trainer.global_rank}.pt")
        """,
        cwd=tmp_path,
        timeout=240,
    )
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert a["rank"] == b["rank"] and a["lowrank"] == b["lowrank"] and a["lowrank"]["factorized_step"] == 2
    for key, value in a["state"].items():
        torch.testing.assert_close(value, b["state"][key], atol=0, rtol=0, msg=key)
    # the factors trained after the factorization (4 steps): the up factor no longer matches an SVD split
    up, down = a["state"]["net.0.up.weight"], a["state"]["net.0.down.weight"]
    assert not torch.allclose(up.norm(dim=0), down.norm(dim=1), atol=1e-4)


class _Tied(TinyModule):
    """The output layer's weight is also an embedding table (tied weights, as in language models)."""

    def __init__(self) -> None:
        super().__init__(in_features=16, hidden=16, out_features=4)
        self.embed = nn.Embedding(4, 16)
        self.net[2].weight = self.embed.weight


def test_tied_weights_are_skipped_by_default_and_refused_when_named(make_trainer: Any) -> None:
    seed_everything(0)
    model = _Tied()
    lowrank = LowRankFactorization(rank_ratio=0.25, start_step=1)
    make_trainer(max_steps=3, callbacks=[lowrank]).fit(model)
    assert list(lowrank.layers) == ["net.0"] and model.net[2].weight is model.embed.weight
    with pytest.raises(ValueError, match=r"'net.2' cannot be factorized: its weight is tied to \['embed'\]"):
        make_trainer(max_steps=3, callbacks=[LowRankFactorization(rank_ratio=0.25, targets=["net.2"])]).fit(_Tied())


def test_a_callback_reused_for_another_model_factorizes_that_model(make_trainer: Any) -> None:
    # the first fit's state (factorized, layers, ranks) stayed in the callback: a second, fresh model failed in
    # setup with "the state says ['net.0', 'net.2'] are factorized, the model's are not"
    lowrank = LowRankFactorization(rank_ratio=0.25, start_step=2)
    make_trainer(callbacks=[lowrank], max_epochs=1).fit(TinyModule())
    seed_everything(1)
    second = TinyModule()
    make_trainer(callbacks=[lowrank], max_epochs=1).fit(second)
    assert isinstance(second.net[0], LowRankLinear) and second.net[0].rank == 4  # 0.25 of rank 16
    assert lowrank.factorized and set(lowrank.layers) == {"net.0", "net.2"}


class _Inputs(Callback):
    """The training inputs of the steps before ``until``."""

    def __init__(self, until: int) -> None:
        self.until, self.x = until, []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step < self.until:
            self.x.append(batch[0].clone())


def test_whiten_truncates_by_output_error_on_the_inputs_seen(make_trainer: Any) -> None:
    from lightning_compress.functional.low_rank import truncated_svd, whitening

    seed_everything(0)
    model = TinyModule(lr=0.0)  # the weights stay put: the factors are exactly those of the weight and inputs seen
    with torch.no_grad():
        model.net[0].weight[:, :4] *= 20.0  # four large columns: the plain SVD spends its rank on them
    weight = model.net[0].weight.detach().clone()
    inputs = _Inputs(until=3)
    lowrank = LowRankFactorization(ranks={"net.0": 4}, start_step=3, targets=["net.0"], whiten=True)
    make_trainer(max_steps=5, callbacks=[inputs, lowrank]).fit(model)

    x = torch.cat(inputs.x)  # steps 0, 1, 2: 48 rows, what net.0 saw
    gram = x.T @ x
    up, down = truncated_svd(weight, 4, whitening(gram))
    got = model.net[0].up.weight @ model.net[0].down.weight
    torch.testing.assert_close(got, up @ down, atol=1e-5, rtol=1e-4)
    plain_up, plain_down = truncated_svd(weight, 4)
    whitened_error = ((weight - got) @ x.T).norm()
    plain_error = ((weight - plain_up @ plain_down) @ x.T).norm()
    assert whitened_error < 0.95 * plain_error  # the output error on those inputs is what it minimized
    assert (weight - got).norm() > (weight - plain_up @ plain_down).norm()  # not the weight error
    assert lowrank.state_dict()["input_gram"] == {}  # the sums go with the factorization
    s = torch.linalg.svdvals(weight.double() @ whitening(gram))
    assert lowrank.layers["net.0"]["kept_energy"] == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()))


def test_whiten_resumes_with_the_inputs_gathered_before_the_checkpoint(make_trainer: Any, tmp_path: Path) -> None:
    def run(name: str, ckpt_path: str | None = None, stop_after_epoch: int | None = None) -> TinyModule:
        seed_everything(0)
        model = TinyModule()
        lowrank = LowRankFactorization(ranks={"net.0": 3}, start_step=10, targets=["net.0"], whiten=True)
        callbacks: list[Callback] = [lowrank, ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True)]
        if stop_after_epoch is not None:
            callbacks.append(StopAt(epoch=stop_after_epoch))
        make_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True).fit(model, ckpt_path=ckpt_path)
        if stop_after_epoch is not None:  # the checkpoint carries the sums of the 8 steps before it
            state = torch.load(tmp_path / name / "last.ckpt", weights_only=False)["callbacks"]
            grams = next(v["input_gram"] for k, v in state.items() if k.startswith("LowRankFactorization"))
            assert list(grams) == ["net.0"] and grams["net.0"].shape == (16, 16)
        return model

    straight = run("straight")
    run("killed", stop_after_epoch=0)
    resumed = run("resumed", ckpt_path=str(tmp_path / "killed" / "last.ckpt"))
    for key, value in straight.state_dict().items():  # sums added in another order: float rounding only
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_whiten_refuses_conv_layers(make_trainer: Any) -> None:
    model = TinyModule()
    model.net[0] = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"whitens nn.Linear layers only.*\{'net.0.1': 'Conv2d'\}"):
        make_trainer(callbacks=[LowRankFactorization(rank_ratio=0.5, start_step=1, whiten=True,
                                                     targets=["net.0.1"])]).fit(model)


@pytest.mark.ddp
def test_ddp_whiten_uses_the_inputs_of_every_rank(tmp_path: Path) -> None:
    from lightning_compress.functional.low_rank import truncated_svd, whitening

    run_python(
        """
        import torch
        from lightning.pytorch import Callback, Trainer, seed_everything
        from lightning_compress.callbacks.low_rank import LowRankFactorization
        from tests.helpers import TinyModule

        class Inputs(Callback):
            x = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step < 2:
                    Inputs.x.append(batch[0].clone())

        seed_everything(0)
        model = TinyModule(lr=0.0)  # the weights stay put: the factors are those of the weight and the inputs seen
        weight = model.net[0].weight.detach().clone()
        lowrank = LowRankFactorization(ranks={"net.0": 4}, start_step=2, targets=["net.0"], whiten=True)
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Inputs(), lowrank])
        trainer.fit(model)
        torch.save({"weight": weight, "x": torch.cat(Inputs.x),
                    "product": model.net[0].up.weight @ model.net[0].down.weight}, f"rank{trainer.global_rank}.pt")
        """,
        cwd=tmp_path,
        timeout=240,
    )
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert not torch.equal(a["x"], b["x"])  # each rank saw its own batches
    torch.testing.assert_close(a["product"], b["product"], atol=0, rtol=0)
    gram = a["x"].T @ a["x"] + b["x"].T @ b["x"]
    up, down = truncated_svd(a["weight"], 4, whitening(gram))
    torch.testing.assert_close(a["product"], up @ down, atol=1e-5, rtol=1e-4)
    own_up, own_down = truncated_svd(a["weight"], 4, whitening(a["x"].T @ a["x"]))
    assert not torch.allclose(own_up @ own_down, up @ down, atol=1e-3)  # rank 0's inputs alone give other factors


def test_whiten_refuses_a_layer_that_saw_no_training_input(make_trainer: Any) -> None:
    class SkipsFirst(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net[2](torch.relu(batch[0].repeat(1, 2))).square().mean()  # net.0 is not run

    lowrank = LowRankFactorization(rank_ratio=0.25, start_step=2, targets=["net.0"], whiten=True)
    with pytest.raises(RuntimeError, match=r"\['net.0'\] saw no training input with gradients on"):
        make_trainer(max_steps=4, callbacks=[lowrank]).fit(SkipsFirst())
    assert lowrank._gram is not None and not lowrank._gram._handles  # the hooks were removed
