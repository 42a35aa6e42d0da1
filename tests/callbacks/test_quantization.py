"""QuantizationAwareTraining with a real Trainer: prepare, schedule, LSQ, resume, evaluation loads, conversion,
pruning composition, digits accuracy and 2-process DDP."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.checkpoints import load_quantized_checkpoint
from lightning_compress.export.quantization import Int8Linear, PackedLinear, convert, serialized_size
from lightning_compress.functional.quantization import uniform_qparams
from tests.helpers import StopAt, TinyModule

QAT = "lightning_compress.callbacks.quantization.QuantizationAwareTraining"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(weight_bits=9), ValueError, r"`weight_bits` must be an integer in \[2, 8\], got 9"),
        (dict(weight_bits=1), ValueError, "`weight_bits` must be an integer"),
        (dict(activation_bits=16), ValueError, "`activation_bits` must be 8"),
        (dict(scheme="power_of_two", activation_bits=4), ValueError, "power-of-two levels are for weights only"),
        (dict(scheme="power_of_two", symmetric=False), ValueError, "symmetric around 0"),
        (dict(scheme="power_of_two", learn_scale=True), ValueError, "LSQ"),
        (dict(granularity="per_row"), ValueError, "`granularity` must be one of"),
        (dict(start_step=2, start_epoch=1.0), ValueError, "give `start_step` or `start_epoch`, not both"),
        (dict(freeze_observers_step=-1), ValueError, "`freeze_observers_step` must be an integer >= 0"),
        (dict(freeze_bn_epoch="late"), ValueError, "`freeze_bn_epoch` must be a number"),
        (dict(targets="net.0"), TypeError, "must be a list of patterns"),
        (dict(convert_on_fit_end="yes"), TypeError, "`convert_on_fit_end` must be a bool"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        QuantizationAwareTraining(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(targets=["net.1"]), "layer 'net.1' is a ReLU, which this callback cannot handle"),
        (dict(targets=["net.9"]), "match no layer"),
        (dict(start_step=100), "the model would never be quantized"),
        (dict(start_step=2, freeze_observers_step=2), "observers would freeze"),
    ],
)
def test_bad_setup_fails_before_training(make_trainer, tiny_module: TinyModule, kwargs: dict, message: str) -> None:
    trainer = make_trainer(max_steps=8, callbacks=[QuantizationAwareTraining(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(tiny_module)
    assert trainer.global_step == 0


def test_unsupported_layer_subclass_is_refused(make_trainer, tiny_module: TinyModule) -> None:
    class MyLinear(nn.Linear):
        pass

    tiny_module.net[2] = MyLinear(32, 4)
    with pytest.raises(ValueError, match="layer 'net.2' is a MyLinear"):
        make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining()]).fit(tiny_module)


class _FlagProbe(Callback):
    """Records, after each optimizer step, whether fake quantization ran in that step."""

    def __init__(self) -> None:
        self.flags: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.flags.append(int(pl_module.net[0].weight_quant.fake_quant_enabled))


def test_prepare_keeps_parameters_and_keys_and_lsq_scales_train(make_trainer, tiny_module: TinyModule) -> None:
    weight = tiny_module.net[0].weight
    keys = set(tiny_module.state_dict())
    qat = QuantizationAwareTraining(weight_bits=4, learn_scale=True, start_step=3, convert_on_fit_end=False)
    probe = _FlagProbe()
    trainer = make_trainer(max_steps=10, max_epochs=5, callbacks=[qat, probe])
    trainer.fit(tiny_module)
    assert probe.flags == [0, 0, 0] + [1] * 7  # float first, quantized from `start_step` on
    layer = tiny_module.net[0]
    assert type(layer).__name__ == "QATLinear" and layer.weight is weight
    assert keys < set(tiny_module.state_dict())  # original keys kept, quantizer state added
    wq = layer.weight_quant
    assert isinstance(wq.scale, nn.Parameter) and wq.initialized.item() == 1
    assert any(p is wq.scale for g in trainer.optimizers[0].param_groups for p in g["params"])
    init = 2 * layer.weight.detach().abs().mean(1) / 7**0.5
    assert not torch.allclose(wq.scale.detach(), init, rtol=1e-3)  # moved by the optimizer since its init
    with torch.no_grad():
        assert torch.unique(wq(layer.weight)[0]).numel() <= 15


def test_observers_freeze_and_bits_reported(make_trainer, tiny_module: TinyModule) -> None:
    qat = QuantizationAwareTraining(weight_bits=6, start_step=1, freeze_observers_step=4, convert_on_fit_end=False)
    monitor = CompressionMonitor(log_every_n_steps=2, histograms=False, print_table=False)
    trainer = make_trainer(max_steps=12, max_epochs=5, callbacks=[qat, monitor])
    trainer.fit(tiny_module)
    wq = tiny_module.net[0].weight_quant
    assert wq.observer_enabled.item() == 0
    now, _ = uniform_qparams(tiny_module.net[0].weight, 6, True, True)
    assert not torch.allclose(wq.scale, now)  # the frozen range is the one of step 4, the weights moved on
    assert qat.compression_bits(tiny_module) == {"net.0.weight": 6, "net.2.weight": 6}
    stats, metrics = monitor.collect(trainer, tiny_module)
    assert {layer.name: layer.bits for layer in stats.layers} == {"net.0": 6, "net.2": 6}
    assert metrics["compression/bits/net.0"] == 6.0


def test_convert_on_fit_end_gives_the_integer_model(make_trainer, tiny_module: TinyModule) -> None:
    fp32_bytes = serialized_size(tiny_module)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8)
    trainer = make_trainer(max_epochs=2, callbacks=[qat])
    trainer.fit(tiny_module)
    assert isinstance(tiny_module.net[0], Int8Linear) and isinstance(tiny_module.net[2], Int8Linear)
    assert qat.converted_bytes == serialized_size(tiny_module) < fp32_bytes  # tiny: file overhead dominates
    assert qat.compression_sizes(tiny_module) == {"serialized_int": qat.converted_bytes}
    out = trainer.validate(tiny_module, verbose=False)  # the integer model runs in the Trainer
    assert 0.0 <= out[0]["val/acc"] <= 1.0
    clone = pickle.loads(pickle.dumps(qat))  # the callback pickles after use, its settings intact
    assert clone.state_dict()["quantization_config"] == qat.state_dict()["quantization_config"]


def _resume_setup(tmp_path: Path, make_trainer, epochs: int, ckpt: str | None = None):
    seed_everything(0)
    model = TinyModule()
    qat = QuantizationAwareTraining(
        weight_bits=4, activation_bits=8, learn_scale=True, start_epoch=1, freeze_observers_epoch=3,
        convert_on_fit_end=False,
    )
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer(max_epochs=epochs, callbacks=[qat, saver], enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt)
    return model


def test_resume_mid_qat_equals_straight_run_and_loads_for_eval(tmp_path: Path, make_trainer) -> None:
    straight = _resume_setup(tmp_path / "a", make_trainer, epochs=4)
    first = _resume_setup(tmp_path / "b", make_trainer, epochs=2)  # "killed" after 2 epochs, mid-QAT
    ckpt = tmp_path / "b" / "ckpt" / "epoch=1.ckpt"
    resumed = _resume_setup(tmp_path / "b", make_trainer, epochs=4, ckpt=str(ckpt))
    sd_a, sd_b = straight.state_dict(), resumed.state_dict()
    assert sd_a.keys() == sd_b.keys() and any("weight_quant.scale" in k for k in sd_a)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    # the mid-QAT checkpoint loads into a fresh float model for evaluation
    fresh = load_quantized_checkpoint(TinyModule(), ckpt).eval()
    first.eval()
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), first(x))
        assert fresh.net[0].weight_quant.fake_quant_enabled.item() == 1
        torch.testing.assert_close(convert(fresh)(x), fresh(x), rtol=1e-4, atol=1e-4)
    # settings that do not match the checkpoint are an error, not a silent mix
    trainer = make_trainer(max_epochs=4, callbacks=[QuantizationAwareTraining(weight_bits=8, learn_scale=True)])
    with pytest.raises(ValueError, match="`weight_bits`=4 \\(this callback: 8\\)"):
        trainer.fit(TinyModule(), ckpt_path=str(ckpt))


def test_with_gradual_pruning_zeros_stay_zero_in_either_order(make_trainer) -> None:
    final: dict[str, dict[str, torch.Tensor]] = {}
    for order in ("prune_first", "quantize_first"):
        seed_everything(0)
        model = TinyModule()
        pruning = GradualPruning(final_sparsity=0.6, start_step=0, end_step=8, update_every=2)
        qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, symmetric=False, convert_on_fit_end=False)
        callbacks = [pruning, qat] if order == "prune_first" else [qat, pruning]
        make_trainer(max_steps=16, max_epochs=5, callbacks=callbacks).fit(model)
        int_model = convert(model)
        for name in ("net.0", "net.2"):
            float_w = model.get_submodule(name).weight
            assert float((float_w == 0).float().mean()) >= 0.55
            assert isinstance(int_model.get_submodule(name), PackedLinear)
            int_w = int_model.get_submodule(name).weight
            assert bool((int_w[float_w == 0] == 0).all()), (order, name)
        final[order] = model.state_dict()
    a, b = final.values()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the order of the callbacks does not change the result


def test_fit_from_a_float_checkpoint(tmp_path: Path, make_trainer) -> None:
    """A float run's checkpoint (no quantizer state yet) resumes into quantization-aware training."""
    seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="float")
    make_trainer(max_epochs=1, callbacks=[saver], enable_checkpointing=True).fit(TinyModule())
    model = TinyModule()
    qat = QuantizationAwareTraining(weight_bits=8, convert_on_fit_end=False)
    make_trainer(max_epochs=2, callbacks=[qat, ModelCheckpoint(dirpath=tmp_path / "q")], enable_checkpointing=True).fit(
        model, ckpt_path=str(tmp_path / "float.ckpt")
    )
    assert model.net[0].weight_quant.initialized.item() == 1 and model.net[2].input_quant.initialized.item() == 1


def test_freeze_bn_stops_running_statistics(make_trainer) -> None:
    from lightning_compress.examples import DigitsCNN, DigitsDataModule

    class BNProbe(Callback):
        def __init__(self) -> None:
            self.means: list[torch.Tensor] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.means.append(pl_module.net[1].running_mean.clone())

    seed_everything(0)
    model, probe = DigitsCNN(channels=[4, 8], hidden=16), BNProbe()
    qat = QuantizationAwareTraining(weight_bits=8, freeze_bn_step=4, convert_on_fit_end=False)
    make_trainer(max_steps=8, max_epochs=2, limit_train_batches=8, callbacks=[qat, probe]).fit(
        model, datamodule=DigitsDataModule(batch_size=32)
    )
    m = probe.means
    assert not torch.equal(m[2], m[3])  # still updating before the freeze
    assert all(torch.equal(m[3], t) for t in m[4:])  # frozen from step 4 on
    assert qat.state_dict()["bn_pairs"] == {"net.0": "net.1", "net.3": "net.4"}


@pytest.mark.slow
def test_digits_converted_accuracy_matches_fake_quant(make_trainer) -> None:
    from lightning_compress.examples import DigitsCNN, DigitsDataModule, DigitsMLP

    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    for model, cfg in (
        (DigitsMLP(), dict(weight_bits=4, activation_bits=8, learn_scale=True, start_epoch=2)),
        (DigitsCNN(channels=[8, 16], hidden=32), dict(weight_bits=8, activation_bits=8, freeze_bn_epoch=4)),
    ):
        seed_everything(0)
        qat = QuantizationAwareTraining(**cfg, convert_on_fit_end=False)
        trainer = make_trainer(max_epochs=6, callbacks=[qat])
        trainer.fit(model, datamodule=dm)
        fake_acc = _accuracy(model.eval(), dm)
        int_acc = _accuracy(convert(model), dm)
        assert fake_acc > 0.85
        assert abs(fake_acc - int_acc) <= 0.003, (type(model).__name__, fake_acc, int_acc)


def _accuracy(model: nn.Module, dm) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def test_state_dict_round_trips_before_setup(make_trainer, tiny_module: TinyModule) -> None:
    """A state loaded into a callback not yet set up (a pickled or fresh one) comes back unchanged from it."""
    qat = QuantizationAwareTraining(weight_bits=4, convert_on_fit_end=False)
    make_trainer(max_steps=2, callbacks=[qat]).fit(tiny_module)
    fresh = QuantizationAwareTraining(weight_bits=4, convert_on_fit_end=False)
    fresh.load_state_dict(qat.state_dict())
    assert fresh.state_dict() == qat.state_dict() and fresh.state_dict()["layers"] == ["net.0", "net.2"]


class _Tied(TinyModule):
    """The output layer's weight is also an embedding table (tied weights, as in language models)."""

    def __init__(self) -> None:
        super().__init__(in_features=16, hidden=16, out_features=4)
        self.embed = nn.Embedding(4, 16)
        self.net[2].weight = self.embed.weight


def test_tied_weights_are_skipped_by_default_and_refused_when_named(make_trainer) -> None:
    seed_everything(0)
    model = _Tied()
    with pytest.warns(UserWarning, match=r"skipping 'net.2', its weight is tied to \['embed'\]"):
        make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining(weight_bits=4)]).fit(model)
    assert isinstance(model.net[2], nn.Linear) and model.net[2].weight is model.embed.weight
    assert isinstance(model.net[0], PackedLinear)
    with pytest.raises(ValueError, match=r"tied to \['embed'\].*leave them out with `exclude`"):
        make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining(targets=["net.2"])]).fit(_Tied())


def test_converted_cnn_with_folded_bn_still_tests_from_a_fake_quant_checkpoint(tmp_path: Path, make_trainer) -> None:
    """After convert_on_fit_end, trainer.test(ckpt_path="last") loads the fake-quant checkpoint into the integer
    model: the prepared layers and the folded BatchNorm come back for the load and are converted again."""
    from lightning_compress.examples import DigitsCNN, DigitsDataModule
    from lightning_compress.export.quantization import Int8Conv2d

    dm = DigitsDataModule(batch_size=64, train_subset=256)
    seed_everything(0)
    model = DigitsCNN(channels=[4, 8], hidden=16)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, freeze_bn_step=4, convert_on_fit_end=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    trainer = make_trainer(max_epochs=3, callbacks=[qat, ckpt], enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert isinstance(model.net[0], Int8Conv2d)
    with torch.no_grad():  # perturb the in-memory integer model: the test must run the checkpoint's model
        for p in model.parameters():
            p.mul_(0.5)
    fresh = convert(load_quantized_checkpoint(DigitsCNN(channels=[4, 8], hidden=16), tmp_path / "ckpt" / "last.ckpt"))
    dm.setup("test")
    expected = _accuracy(fresh, dm)
    (result,) = trainer.test(model, datamodule=dm, ckpt_path="last", verbose=False)
    assert isinstance(model.net[0], Int8Conv2d)  # converted again after the load
    assert result["test/acc"] == pytest.approx(expected, abs=1e-6)
    x = next(iter(dm.test_dataloader()))[0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh(x))
    clone = pickle.loads(pickle.dumps(model))  # the whole integer model pickles, without the float layers kept
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), fresh(x))
    assert len(pickle.dumps(model)) < len(pickle.dumps(load_quantized_checkpoint(
        DigitsCNN(channels=[4, 8], hidden=16), tmp_path / "ckpt" / "last.ckpt")))


def test_a_run_stopped_before_quantization_starts_ends_in_float(make_trainer, tiny_module: TinyModule) -> None:
    # e.g. EarlyStopping before `start_step`: convert_on_fit_end then raised "layer 'net.0' has no observed input
    # range" after training had finished, failing the whole fit
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=5)
    trainer = make_trainer(max_epochs=2, callbacks=[qat, StopAt(2)])
    with pytest.warns(UserWarning, match=r"stopped at optimizer step 2 before quantization started \(at step 5\)"):
        trainer.fit(tiny_module)
    assert trainer.global_step == 2
    assert type(tiny_module.net[0]).__name__ == "QATLinear"  # prepared, not converted: it never quantized
    assert qat.converted_bytes is None


@pytest.mark.parametrize(("bits", "layer"), [(8, "Int8Linear"), (4, "PackedLinear")])
@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_converted_layers_keep_the_dtype_of_a_true_precision_run(
    make_trainer, bits: int, layer: str, precision: str
) -> None:
    # converted layers computed and returned float32 whatever their input: next to a layer left in float (here
    # the excluded classifier) a bf16-true model failed to validate ("mat1 and mat2 must have the same dtype")
    seed_everything(0)
    model = TinyModule()
    qat = QuantizationAwareTraining(weight_bits=bits, activation_bits=8, exclude=["net.2"])
    trainer = make_trainer(max_steps=3, precision=precision, callbacks=[qat])
    trainer.fit(model)
    assert type(model.net[0]).__name__ == layer and type(model.net[2]) is nn.Linear
    dtype = model.net[2].weight.dtype
    x = torch.randn(5, 16, dtype=dtype)
    assert model.net[0](x).dtype == dtype
    metrics = trainer.validate(model, verbose=False)[0]
    assert 0.0 <= metrics["val/acc"] <= 1.0


def test_the_fits_trainer_validates_a_copy_converted_by_hand(make_trainer, tiny_module: TinyModule) -> None:
    # with convert_on_fit_end=False, trainer.validate(convert(model)) failed in the callback's setup: it looked for
    # layers to prepare in the integer copy ("no layer left to act on ... layers of those types: none")
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, convert_on_fit_end=False)
    trainer = make_trainer(max_steps=4, callbacks=[qat])
    trainer.fit(tiny_module)
    fake_quant = trainer.validate(tiny_module, verbose=False)[0]["val/acc"]
    integer = convert(tiny_module)
    assert type(integer.net[0]) is Int8Linear
    assert trainer.validate(integer, verbose=False)[0]["val/acc"] == pytest.approx(fake_quant, abs=0.02)
    assert qat.compression_bits(integer) == {"net.0.weight": 8, "net.2.weight": 8}
    # and the fake-quantized model is still the callback's to validate
    assert trainer.validate(tiny_module, verbose=False)[0]["val/acc"] == pytest.approx(fake_quant)


def test_the_saved_config_carries_a_version_and_a_newer_one_is_refused() -> None:
    state = QuantizationAwareTraining(weight_bits=4).state_dict()
    assert state["quantization_config"]["version"] == 1
    newer = {**state, "quantization_config": {**state["quantization_config"], "version": 2}}
    with pytest.raises(ValueError, match=r"`quantization_config`\).*newer than this code knows \(1\)"):
        QuantizationAwareTraining(weight_bits=4).load_state_dict(newer)
    older = {**state, "quantization_config": {k: v for k, v in state["quantization_config"].items() if k != "version"}}
    QuantizationAwareTraining(weight_bits=4).load_state_dict(older)  # written before configs had a version
    with pytest.raises(ValueError, match="`weight_bits`=4 \\(this callback: 8\\)"):  # and settings still compared
        QuantizationAwareTraining(weight_bits=8).load_state_dict(older)
