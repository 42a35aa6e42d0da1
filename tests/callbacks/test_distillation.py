"""KnowledgeDistillation with a real Trainer: the loss it trains on, teacher isolation, resume, DDP, composition."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.functional.distillation import kd_loss
from tests.helpers import StopAt, TinyModule, run_python


def _teacher(hidden: int = 48, seed: int = 1) -> TinyModule:
    torch.manual_seed(seed)
    return TinyModule(hidden=hidden)


def _student() -> TinyModule:
    seed_everything(0)
    return TinyModule()


def _first_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b for _, b in zip(range(n), TinyModule().train_dataloader(), strict=False)]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trains_on_the_distillation_loss(make_trainer, accumulate: int) -> None:
    """One optimizer step moves the weights exactly as a hand-written (1-a)*CE + a*T^2*KL step does."""
    teacher, student = _teacher(), _student()
    reference = copy.deepcopy(student)
    kd = KnowledgeDistillation(teacher=teacher, temperature=2.5, alpha=0.7)
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[kd])
    trainer.fit(student)

    opt = torch.optim.SGD(reference.parameters(), lr=reference.lr)
    for x, y in _first_batches(accumulate):
        logits = reference(x)
        loss = 0.3 * F.cross_entropy(logits, y) + 0.7 * kd_loss(logits, teacher(x).detach(), 2.5)
        (loss / accumulate).backward()
    opt.step()
    for (name, a), b in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert float(trainer.callback_metrics["distill/kd_loss"]) > 0
    assert "training_step" not in student.__dict__  # the wrapper is gone after fit


def test_alpha_zero_is_plain_training(make_trainer) -> None:
    plain, distilled = _student(), _student()
    make_trainer(max_steps=3).fit(plain)
    make_trainer(max_steps=3, callbacks=[KnowledgeDistillation(teacher=_teacher(), alpha=0.0)]).fit(distilled)
    for a, b in zip(plain.parameters(), distilled.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_teacher_frozen_outside_optimizer_and_checkpoint(make_trainer, tmp_path: Path) -> None:
    teacher, student = _teacher(), _student()
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()
    kd = KnowledgeDistillation(teacher=teacher)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_epochs=1, callbacks=[kd, ckpt], enable_checkpointing=True)
    trainer.fit(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in trainer.optimizers[0].param_groups for p in g["params"])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(student.state_dict())
    state = saved["callbacks"][kd.state_key]
    assert state["version"] == 1 and state["teacher"] == "tests.helpers.TinyModule"
    TinyModule().load_state_dict(saved["state_dict"], strict=True)


def test_teacher_from_yaml_spec_and_checkpoint_files(make_trainer, tmp_path: Path) -> None:
    """The YAML form: class_path/init_args plus a Lightning checkpoint or a plain state_dict file."""
    trained = _teacher(hidden=24)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="teacher")
    make_trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(trained)
    assert (tmp_path / "teacher.ckpt").is_file()
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    spec = {"class_path": "tests.helpers.TinyModule", "init_args": {"hidden": 24}}
    for path in ("teacher.ckpt", "teacher.pt"):
        kd = KnowledgeDistillation(teacher=spec, teacher_checkpoint=str(tmp_path / path))
        make_trainer(max_steps=1, callbacks=[kd]).fit(_student())
        loaded = kd.load_teacher()
        for a, b in zip(loaded.parameters(), trained.parameters(), strict=True):
            assert torch.equal(a, b), path
    bad = KnowledgeDistillation(teacher={"class_path": "tests.helpers.TinyModule"}, teacher_checkpoint=str(tmp_path / "teacher.pt"))
    with pytest.raises(ValueError, match=r"does not fit the teacher TinyModule: shape mismatches: \['net.0.weight: checkpoint \(24, 16\) vs module \(32, 16\)'"):
        make_trainer(max_steps=1, callbacks=[bad]).fit(_student())


def test_feature_pairs_projection_trains_and_is_checkpointed(make_trainer, tmp_path: Path) -> None:
    teacher, student = _teacher(hidden=48), _student()
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, feature_pairs={"net.0": "net.0"}, feature_weight=2.0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_epochs=1, callbacks=[kd, ckpt], enable_checkpointing=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        initial = nn.Linear(32, 48).weight.detach().clone()  # the callback's seeded projection init
    trainer.fit(student)
    proj = kd._projections["net__0"]
    assert proj.weight.shape == (48, 32) and not torch.equal(proj.weight, initial)
    assert any(p is proj.weight for p in trainer.optimizers[0].param_groups[-1]["params"])
    assert float(trainer.callback_metrics["distill/feature_loss"]) > 0
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert torch.equal(saved["callbacks"][kd.state_key]["projections"]["net__0.weight"], proj.weight)
    assert set(saved["state_dict"]) == set(student.state_dict())


def _resume_kd() -> KnowledgeDistillation:
    return KnowledgeDistillation(
        teacher=_teacher(hidden=48), temperature=3.0, alpha=0.2, final_alpha=0.9, alpha_end_epoch=3,
        feature_pairs={"net.0": "net.0"},
    )


class _AdamTiny(TinyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_resume_equals_uninterrupted_run(make_trainer, tmp_path: Path) -> None:
    seed_everything(0)
    straight = _AdamTiny()
    kd_straight = _resume_kd()
    make_trainer(max_epochs=4, callbacks=[kd_straight]).fit(straight)

    seed_everything(0)
    first = _AdamTiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    crash = StopAt(epoch=1)  # the run is cut off after 2 of its 4 epochs
    make_trainer(max_epochs=4, callbacks=[_resume_kd(), ckpt, crash], enable_checkpointing=True).fit(first)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 1
    seed_everything(123)  # a fresh process would start from other random weights
    resumed = _AdamTiny()
    kd_resumed = _resume_kd()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_epochs=4, callbacks=[kd_resumed, ckpt], enable_checkpointing=True)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(kd_straight._projections["net__0"].weight, kd_resumed._projections["net__0"].weight)
    assert kd_resumed.values_at(trainer.global_step) == pytest.approx((3.0, 0.9))


def test_schedules(make_trainer) -> None:
    kd = KnowledgeDistillation(
        teacher=_teacher(), temperature=8.0, final_temperature=2.0, temperature_start_step=2, temperature_end_step=6,
        alpha=0.0, final_alpha=1.0, alpha_schedule="linear",
    )
    trainer = make_trainer(max_steps=8, callbacks=[kd])
    trainer.fit(_student())
    assert kd.values_at(0) == (8.0, 0.0)
    assert kd.values_at(4) == (5.0, 0.5)  # alpha's ramp defaults to the whole run (8 steps)
    assert kd.values_at(6) == (2.0, 0.75)
    assert float(trainer.callback_metrics["distill/alpha"]) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="`temperature_end_step` puts the end of the schedule at optimizer step 50"):
        make_trainer(max_steps=8, callbacks=[KnowledgeDistillation(teacher=_teacher(), final_temperature=1.0,
                                                                   temperature_end_step=50)]).fit(_student())


class _DictStudent(TinyModule):
    """A student whose forward returns a dict and whose training_step returns a dict."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.net[0](x), "scores": self.net(x)}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        return {"loss": F.cross_entropy(self(x)["scores"], y), "extra": 1}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


class _TupleTeacher(nn.Module):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.inner = teacher

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sum(-1), self.inner(x)


def test_output_selectors(make_trainer) -> None:
    teacher = _teacher()
    seed_everything(0)
    student, reference = _DictStudent(), _DictStudent()
    reference.load_state_dict(student.state_dict())
    kd = KnowledgeDistillation(teacher=_TupleTeacher(teacher), student_output="scores", teacher_output=1, alpha=1.0)
    make_trainer(max_steps=1, callbacks=[kd]).fit(student)
    (x, _), = _first_batches(1)
    kd_loss(reference(x)["scores"], teacher(x).detach(), 4.0).backward()
    torch.optim.SGD(reference.parameters(), lr=reference.lr).step()
    torch.testing.assert_close(student.net[2].weight, reference.net[2].weight)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(student_output="logits"), ValueError, r"`student_output`='logits' does not exist in the output \(dict with keys \['hidden', 'scores'\]\)"),
        (dict(student_output="hidden"), ValueError, r"different shapes: \(16, 32\) vs \(16, 4\)"),
        (dict(student_module="encoder"), ValueError, r"`student_module`: the student has no layer 'encoder'; its layers are \['net', 'net.0'"),
        (dict(student_output="scores", feature_pairs={"net.1": "net.0"}), ValueError, "cannot tell the output width of a ReLU"),
        (dict(student_output="scores", feature_pairs={"net.0": "body"}), ValueError, "`feature_pairs`: the teacher has no layer 'body'"),
        (dict(student_module="net.0"), ValueError, r"different shapes: \(16, 32\) vs \(16, 4\)"),
    ],
)
def test_errors_before_the_first_update(make_trainer, kwargs, error, match) -> None:
    seed_everything(0)
    student = _DictStudent()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(error, match=match):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher=_teacher(), **kwargs)]).fit(student)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0), ValueError, "`temperature` must be a number > 0, got 0"),
        (dict(final_temperature=-1.0), ValueError, "`final_temperature` must be a number > 0, got -1.0"),
        (dict(alpha=-0.1), ValueError, r"`alpha` must be in \[0, 1\], got -0.1"),
        (dict(final_alpha=2), ValueError, r"`final_alpha` must be in \[0, 1\], got 2"),
        (dict(teacher="resnet"), TypeError, "`teacher` must be a"),
        (dict(teacher={"class_path": "nope.Model"}), ValueError, "cannot import 'nope.Model'"),
        (dict(teacher_checkpoint=""), ValueError, "`teacher_checkpoint` must be a file path or None, got ''"),
        (dict(feature_pairs={"a": 1}), ValueError, "`feature_pairs` must map student layer names"),
        (dict(feature_weight=-1), ValueError, "`feature_weight` must be a number >= 0"),
        (dict(student_output=""), ValueError, "`student_output` must be a non-empty"),
        (dict(alpha_schedule="steep"), ValueError, "`alpha_schedule` must be one of"),
        (dict(alpha_start_epoch=2.0, alpha_end_epoch=1.0), ValueError, "`alpha_end_epoch`=1.0 < `alpha_start_epoch`=2.0"),
        (dict(loss="l1"), ValueError, "`loss` must be 'kl', 'mse' or 'cosine', got 'l1'"),
    ],
)
def test_init_errors(kwargs, error, match) -> None:
    kwargs = {"teacher": nn.Linear(2, 2), **kwargs}
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**kwargs)


class _Manual(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_refused(make_trainer) -> None:
    with pytest.raises(ValueError, match="needs automatic optimization"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher=_teacher())]).fit(_Manual())


def test_validation_agreement(make_trainer) -> None:
    student = _student()
    kd_same = KnowledgeDistillation(teacher=copy.deepcopy(student))
    (same,) = make_trainer(callbacks=[kd_same]).validate(student, verbose=False)
    assert same["distill/agreement"] == 1.0
    teacher = _teacher()
    (other,) = make_trainer(callbacks=[KnowledgeDistillation(teacher=teacher)]).validate(student, verbose=False)
    x, _ = student.val_dataloader().dataset.tensors
    expected = float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())
    assert other["distill/agreement"] == pytest.approx(expected)
    assert expected < 1.0


@pytest.mark.parametrize("precision, dtype", [("64-true", torch.float64), ("bf16-mixed", torch.float32)])
def test_teacher_follows_student_precision(make_trainer, precision: str, dtype: torch.dtype) -> None:
    teacher = _teacher()
    kd = KnowledgeDistillation(teacher=teacher)
    trainer = make_trainer(max_steps=2, precision=precision, callbacks=[kd])
    trainer.fit(_student())
    assert teacher.net[0].weight.dtype == dtype  # true precision converts it; mixed runs it under autocast
    assert torch.isfinite(trainer.callback_metrics["distill/kd_loss"])


def test_recipe_builds_pickles_and_round_trips_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_compress.cli import run_cli
    from tests.helpers import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["--config", str(REPO_ROOT / "recipes/digits_distillation.yaml"), "--trainer.logger=false"],
                  run=False)
    (kd,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert kd.teacher["init_args"]["hidden_sizes"] == [1200, 1200]
    assert kd.teacher_checkpoint == "checkpoints/digits_teacher.ckpt"
    clone = pickle.loads(pickle.dumps(kd))
    assert (clone.temperature, clone.alpha, clone.teacher) == (kd.temperature, kd.alpha, kd.teacher)
    state = kd.state_dict()
    assert state["version"] == 1 and state["teacher"] == kd.teacher
    clone.load_state_dict(state)
    clone.load_state_dict({})  # an older state without any key still loads


def test_composes_with_gradual_pruning_in_either_order(make_trainer) -> None:
    pruning_mod = pytest.importorskip("lightning_compress.callbacks.pruning")
    results = []
    for order in (0, 1):
        teacher, student = _teacher(), _student()
        cbs = [KnowledgeDistillation(teacher=teacher, alpha=0.8),
               pruning_mod.GradualPruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=2, scope="layer")]
        trainer = make_trainer(max_steps=6, callbacks=cbs[::-1] if order else cbs)
        trainer.fit(student)
        assert "distill/kd_loss" in trainer.callback_metrics
        w = student.net[0].weight
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
        results.append(copy.deepcopy(student.state_dict()))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], msg=k)


DDP_SCRIPT = """
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, Subset
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from tests.helpers import TinyModule


class Half(TinyModule):
    # rank r takes samples r, r+2, ... in batches of 8: per step the two ranks see the same 16 samples
    # as one process with batches of 16
    def train_dataloader(self):
        data = super().train_dataloader().dataset
        return DataLoader(Subset(data, range(self.global_rank, len(data), 2)), batch_size=8)

    def val_dataloader(self):
        data = super().val_dataloader().dataset
        return DataLoader(Subset(data, range(self.global_rank, len(data), 2)), batch_size=8)


torch.manual_seed(1)
teacher = TinyModule(hidden=48)
seed_everything(0)
student = Half()
kd = KnowledgeDistillation(teacher=teacher, alpha=0.6, temperature=2.0, feature_pairs={"net.0": "net.0"})
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[kd])
trainer.fit(student)
state = {k: v.cpu() for k, v in student.state_dict().items()}
state.update({"proj." + k: v.cpu() for k, v in kd._projections.state_dict().items()})
state["agreement"] = trainer.callback_metrics["distill/agreement"].cpu().reshape(1)
torch.save(state, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_matches_single_process(make_trainer, tmp_path: Path) -> None:
    """2-process DDP (gloo) ends where one process on the same global batches ends, projections included."""
    run_python(DDP_SCRIPT, cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k in ranks[0]:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], msg=k)  # projections too: their grads are averaged

    torch.manual_seed(1)
    teacher = TinyModule(hidden=48)
    seed_everything(0)
    single = TinyModule()
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.6, temperature=2.0, feature_pairs={"net.0": "net.0"})
    trainer = make_trainer(max_epochs=2, callbacks=[kd])
    trainer.fit(single)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in kd._projections.state_dict().items():
        torch.testing.assert_close(ranks[0]["proj." + k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert float(ranks[0]["agreement"]) == pytest.approx(float(trainer.callback_metrics["distill/agreement"]))


def test_distils_while_pruning_and_quantizing(make_trainer) -> None:
    """KD + GradualPruning + QAT in one Trainer: all three act on the student, none touches the teacher."""
    pruning = pytest.importorskip("lightning_compress.callbacks.pruning")
    quantization = pytest.importorskip("lightning_compress.callbacks.quantization")
    teacher, student = _teacher(), _student()
    before = copy.deepcopy(teacher.state_dict())
    callbacks = [
        KnowledgeDistillation(teacher=teacher, alpha=0.8),
        pruning.GradualPruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=2, scope="layer"),
        quantization.QuantizationAwareTraining(weight_bits=8, activation_bits=8, convert_on_fit_end=False),
    ]
    trainer = make_trainer(max_steps=6, callbacks=callbacks)
    trainer.fit(student)
    assert float(trainer.callback_metrics["distill/kd_loss"]) > 0
    weights = [m.weight for m in student.modules() if isinstance(m, nn.Linear)]
    assert weights and all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02) for w in weights)
    assert [type(m) for m in teacher.modules()] == [type(m) for m in _teacher().modules()]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_keeps_loaded_projections_before_setup(make_trainer) -> None:
    kd = KnowledgeDistillation(teacher=_teacher(hidden=48), feature_pairs={"net.0": "net.0"})
    make_trainer(max_steps=2, callbacks=[kd]).fit(_student())
    fresh = KnowledgeDistillation(teacher=_teacher(hidden=48), feature_pairs={"net.0": "net.0"})
    fresh.load_state_dict(kd.state_dict())
    saved, again = kd.state_dict()["projections"], fresh.state_dict()["projections"]
    assert set(saved) == set(again) == {"net__0.weight", "net__0.bias"}
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_feature_hooks_follow_a_layer_factorized_mid_fit(make_trainer) -> None:
    """A feature layer that LowRankFactorization replaces at step 2 keeps feeding the feature loss."""
    from lightning_compress.callbacks.low_rank import LowRankFactorization

    class Features(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(trainer.callback_metrics["distill/feature_loss"]))

    kd = KnowledgeDistillation(teacher=_teacher(hidden=48), feature_pairs={"net.0": "net.0"})
    features = Features()
    student = _student()
    lowrank = LowRankFactorization(rank_ratio=0.5, start_step=2, targets=["net.0"])
    make_trainer(max_steps=5, callbacks=[kd, lowrank, features]).fit(student)
    assert type(student.net[0]).__name__ == "LowRankLinear"
    assert len(features.losses) == 5 and all(loss > 0 for loss in features.losses)


def test_feature_hints_on_slimmed_layers_need_slimmable_listed_first(make_trainer) -> None:
    """SlimmableTraining listed after KD would run KD's step at half width against a full-width projection."""
    from lightning_compress.callbacks.slimmable import SlimmableTraining

    def callbacks(kd_first: bool) -> list[Callback]:
        kd = KnowledgeDistillation(teacher=_teacher(hidden=48), feature_pairs={"net.0": "net.0"})
        slim = SlimmableTraining(widths=[0.5, 1.0], num_random=0, log_accuracy=False)
        return [kd, slim] if kd_first else [slim, kd]

    with pytest.raises(ValueError, match="list SlimmableTraining before KnowledgeDistillation"):
        make_trainer(max_steps=2, callbacks=callbacks(kd_first=True)).fit(_student())
    trainer = make_trainer(max_steps=2, callbacks=callbacks(kd_first=False))
    trainer.fit(_student())
    assert float(trainer.callback_metrics["distill/feature_loss"]) > 0


def test_teacher_that_cannot_take_the_student_inputs_is_a_value_error(make_trainer) -> None:
    """`student_module` names a layer whose inputs (32 wide) the teacher (16 inputs) cannot take."""
    trainer = make_trainer(max_steps=2, callbacks=[KnowledgeDistillation(teacher=_teacher(), student_module="net.2")])
    with pytest.raises(ValueError, match="cannot run on the inputs of `student_module`='net.2'"):
        trainer.fit(_student())
    assert trainer.global_step == 0


def test_validate_after_fit_with_feature_pairs_on_a_layer_converted_to_integers(make_trainer) -> None:
    # validation only measures agreement, yet `setup("validate")` built the feature projections: after QAT had
    # converted the paired layer at fit end, `trainer.validate(model)` failed ("cannot tell the output width of a
    # Int8Linear layer")
    from lightning_compress.callbacks.quantization import QuantizationAwareTraining

    teacher, student = _teacher(hidden=48), _student()
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, feature_pairs={"net.0": "net.0"})
    trainer = make_trainer(max_steps=4, callbacks=[kd, QuantizationAwareTraining(weight_bits=8, activation_bits=8)])
    trainer.fit(student)
    assert type(student.net[0]).__name__ == "Int8Linear"
    trained = kd._projections["net__0"].weight.detach().clone()
    metrics = trainer.validate(student, verbose=False)[0]
    assert 0.0 <= metrics["distill/agreement"] <= 1.0
    assert torch.equal(kd._projections["net__0"].weight, trained)  # validation leaves the projection alone


def test_validate_a_student_converted_to_integers_in_true_half_precision(make_trainer) -> None:
    # the converted student has no float parameter left to take the dtype from: the teacher went back to float32
    # while Lightning fed bfloat16 inputs ("mat1 and mat2 must have the same dtype")
    from lightning_compress.callbacks.quantization import QuantizationAwareTraining

    teacher, student = _teacher(), _student()
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8)
    trainer = make_trainer(max_steps=2, precision="bf16-true", callbacks=[kd, qat])
    trainer.fit(student)
    assert type(student.net[0]).__name__ == "Int8Linear" and not list(student.parameters())
    metrics = trainer.validate(student, verbose=False)[0]
    assert 0.0 <= metrics["distill/agreement"] <= 1.0
    assert teacher.net[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"\x80\x02garbage"])
def test_a_teacher_checkpoint_that_is_not_a_checkpoint_is_a_clear_error(
    content: bytes, tmp_path: Path, make_trainer
) -> None:
    # it raised `UnpicklingError: invalid load key` from inside torch.load
    path = tmp_path / "teacher.ckpt"
    path.write_bytes(content)
    kd = KnowledgeDistillation(teacher=_teacher(), teacher_checkpoint=str(path))
    with pytest.raises(ValueError, match=r"`teacher_checkpoint` '.*teacher.ckpt' is not a file torch.load can read"):
        make_trainer(max_steps=1, callbacks=[kd]).fit(_student())


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_embedding_losses_train_on_the_selected_outputs(make_trainer, loss: str) -> None:
    """``loss="mse"``/``"cosine"``: one step moves the weights as a hand-written (1-a)*CE + a*loss step does;
    the temperature plays no part and validation logs no class agreement."""
    teacher, student = _teacher(), _student()
    reference = copy.deepcopy(student)
    kd = KnowledgeDistillation(teacher=teacher, temperature=7.0, alpha=0.6, loss=loss)
    trainer = make_trainer(max_steps=1, limit_val_batches=1, callbacks=[kd])
    trainer.fit(student)

    (x, y), = _first_batches(1)
    out, target = reference(x), teacher(x).detach()
    match = F.mse_loss(out, target) if loss == "mse" else (1 - F.cosine_similarity(out, target, dim=-1)).mean()
    (0.4 * F.cross_entropy(out, y) + 0.6 * match).backward()
    torch.optim.SGD(reference.parameters(), lr=reference.lr).step()
    for (name, a), b in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(trainer.callback_metrics["distill/kd_loss"], match.detach())
    assert "distill/agreement" not in trainer.callback_metrics
    assert kd.loss == loss
