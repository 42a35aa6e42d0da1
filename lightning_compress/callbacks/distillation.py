"""KnowledgeDistillation: a frozen teacher adds soft-target (and feature) losses to an unmodified student."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_compress._validation import check_number, check_state_version
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._distillation_teacher import _key, _TeacherSide
from lightning_compress.callbacks._wrap_step import TrainingStepWrapper
from lightning_compress.functional.distillation import (
    FeatureRecorder,
    build_module,
    distill_loss,
    feature_loss,
    load_teacher_weights,
    project_features,
    resolve_class,
    select_output,
)
from lightning_compress.schedules import (
    Schedule,
    ScheduleKind,
    schedule_for,
    validate_kind,
    validate_window,
)

__all__ = ["KnowledgeDistillation"]

log = logging.getLogger(__name__)
_VERSION = 1


class KnowledgeDistillation(_TeacherSide, _ReleasesModelOnException):
    """Distil a frozen teacher into any LightningModule without touching its ``training_step``.

    During fit the callback wraps the student's ``training_step``: a forward hook on the student records the
    inputs and output of its first forward call in the step, the teacher runs on the same inputs under
    ``no_grad``, and the loss ``training_step`` returned (a tensor, or the ``"loss"`` of a dict) becomes

        ``(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))
        + feature_weight * mean_over_pairs(MSE(proj(student_feature), teacher_feature))``

    (Hinton et al. 2015; FitNets hints for ``feature_pairs``). With ``loss="mse"`` or ``"cosine"`` the KL term is
    the mean squared error or ``1 - cos`` of the selected outputs instead (no temperature): embedding and
    regression models, e.g. a sentence encoder distilled from its original. Because the loss is replaced where Lightning
    receives it, gradient accumulation, automatic optimization, mixed precision and DDP work unchanged.
    The teacher is kept on the callback, not on the student: it is frozen, in eval mode, moved to the
    student's device and parameter dtype at fit start, never in the optimizer, and never in the student's
    checkpoint (its path and config are, in the callback state). Projections (``nn.Linear`` maps from a student
    layer's width to its teacher layer's width, where they differ) live on the callback too: they are added to
    the first optimizer as an extra parameter group at fit start, their weights are saved in the callback state,
    and under DDP their gradients are averaged across processes before each optimizer step. Under
    ``ModelParallelStrategy`` (FSDP2) the student may be sharded and the teacher kept whole on every rank or
    sharded; the projections, whole on every rank, get an optimizer of their own of the same kind (its state in the
    callback state). ``FSDPStrategy`` and DeepSpeed are refused.

    Logs ``distill/kd_loss``, ``distill/task_loss``, ``distill/feature_loss`` (with ``feature_pairs``), and
    ``distill/alpha`` / ``distill/temperature`` when they are scheduled, every training step; and
    ``distill/agreement`` (fraction of validation samples where student and teacher predict the same class) at
    each validation end (``loss="kl"`` only: outputs that are not logits have no predicted class).

    Args:
        teacher: ``{"class_path": ..., "init_args": {...}}`` of the teacher module (from YAML), or, from Python,
            any ``nn.Module``/``LightningModule`` (frozen in place).
        teacher_checkpoint: a Lightning checkpoint or a plain ``state_dict`` file loaded (strictly) into the teacher.
        temperature: softening temperature ``T > 0`` (the start value if ``final_temperature`` is given).
        alpha: weight of the soft-target loss in [0, 1]; the task loss is scaled by ``1 - alpha``.
        student_output: key, attribute or index of the logits in the student's forward output (``None``: the
            output itself if a tensor, else its ``logits``).
        teacher_output: the same for the teacher's output.
        student_module: name of the student submodule whose forward ``training_step`` calls (``""``: the
            LightningModule itself); the teacher receives the same inputs.
        feature_pairs: student layer name -> teacher layer name, for an MSE hint loss on their outputs.
        feature_weight: weight of the feature loss (``>= 0``).
        loss: how the selected outputs are matched: ``"kl"`` (soft targets of logits), ``"mse"`` or ``"cosine"``
            (see :func:`~lightning_compress.functional.distillation.distill_loss`).
        final_temperature: if given, the temperature moves from ``temperature`` to this value.
        temperature_schedule: kind of that move (``linear``, ``cubic``, ``exponential``, ``constant``, ``one_shot``).
        temperature_start_step: optimizer step where the move starts (or give ``temperature_start_epoch``).
        temperature_end_step: optimizer step where it ends (default: the end of training).
        temperature_start_epoch: start in epochs (fractions allowed).
        temperature_end_epoch: end in epochs.
        final_alpha: if given, ``alpha`` moves from ``alpha`` to this value.
        alpha_schedule: kind of that move.
        alpha_start_step: as for the temperature.
        alpha_end_step: as for the temperature.
        alpha_start_epoch: as for the temperature.
        alpha_end_epoch: as for the temperature.

    Raises:
        ValueError: ``temperature <= 0``, ``alpha`` outside [0, 1], an unknown ``loss``, a bad schedule or teacher spec (in ``__init__``);
            a ``student_module`` or ``feature_pairs`` layer that does not exist, a checkpoint that does not fit the
            teacher, manual optimization (in ``setup``); a selector that does not exist, outputs of different
            shapes or a teacher that cannot run on the student's inputs (at the first training step, before the
            first optimizer step).
        TypeError: ``teacher`` is neither a mapping nor an ``nn.Module``.

    Example:
        >>> from torch import nn
        >>> kd = KnowledgeDistillation(teacher=nn.Linear(4, 3), temperature=4.0, alpha=0.9)
        >>> kd.temperature, kd.alpha
        (4.0, 0.9)
        >>> KnowledgeDistillation(teacher=nn.Linear(4, 3), alpha=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `alpha` must be in [0, 1], got 1.5
    """

    _sharding_refusal = "its feature projections are trained whole on every rank, tested under FSDP2 only"
    _sharding_support = ("ModelParallelStrategy",)

    def __init__(
        self,
        teacher: dict[str, Any] | nn.Module,
        teacher_checkpoint: str | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        student_output: str | int | None = None,
        teacher_output: str | int | None = None,
        student_module: str = "",
        feature_pairs: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        final_temperature: float | None = None,
        temperature_schedule: ScheduleKind = "linear",
        temperature_start_step: int | None = None,
        temperature_end_step: int | None = None,
        temperature_start_epoch: float | None = None,
        temperature_end_epoch: float | None = None,
        final_alpha: float | None = None,
        alpha_schedule: ScheduleKind = "linear",
        alpha_start_step: int | None = None,
        alpha_end_step: int | None = None,
        alpha_start_epoch: float | None = None,
        alpha_end_epoch: float | None = None,
        loss: Literal["kl", "mse", "cosine"] = "kl",
    ) -> None:
        super().__init__()
        if isinstance(teacher, Mapping):
            resolve_class(teacher)
        elif not isinstance(teacher, nn.Module):
            raise TypeError(
                f"`teacher` must be a {{'class_path': ..., 'init_args': ...}} mapping or an nn.Module, got {type(teacher).__name__}"
            )
        if teacher_checkpoint is not None and not isinstance(teacher_checkpoint, str):
            raise TypeError(f"`teacher_checkpoint` must be a path string or None, got {teacher_checkpoint!r}")
        if teacher_checkpoint == "":
            raise ValueError("`teacher_checkpoint` must be a file path or None, got ''")
        check_number(temperature, "temperature", low=0, low_open=True)
        check_number(final_temperature, "final_temperature", low=0, low_open=True, optional=True)
        check_number(alpha, "alpha", low=0, high=1, noun="")
        check_number(final_alpha, "final_alpha", low=0, high=1, noun="", optional=True)
        check_number(feature_weight, "feature_weight", low=0)
        for name, sel in (("student_output", student_output), ("teacher_output", teacher_output)):
            if sel is not None and (isinstance(sel, bool) or not isinstance(sel, (str, int)) or sel == ""):
                raise ValueError(f"`{name}` must be a non-empty key/attribute name, an index or None, got {sel!r}")
        if not isinstance(student_module, str):
            raise TypeError(f"`student_module` must be a layer name string, got {student_module!r}")
        if feature_pairs is not None and (
            not isinstance(feature_pairs, Mapping)
            or not feature_pairs
            or not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in feature_pairs.items())
        ):
            raise ValueError(f"`feature_pairs` must map student layer names to teacher layer names, got {feature_pairs!r}")
        if loss not in ("kl", "mse", "cosine"):
            raise ValueError(f"`loss` must be 'kl', 'mse' or 'cosine', got {loss!r}")
        validate_kind(temperature_schedule, "temperature_schedule")
        validate_kind(alpha_schedule, "alpha_schedule")
        validate_window(temperature_start_step, temperature_end_step, temperature_start_epoch, temperature_end_epoch,
                        prefix="temperature_")
        validate_window(alpha_start_step, alpha_end_step, alpha_start_epoch, alpha_end_epoch, prefix="alpha_")

        self.teacher = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.student_output = student_output
        self.teacher_output = teacher_output
        self.student_module = student_module
        self.feature_pairs = dict(feature_pairs) if feature_pairs else None
        self.feature_weight = float(feature_weight)
        self.final_temperature = final_temperature
        self.temperature_schedule = temperature_schedule
        self.temperature_start_step, self.temperature_end_step = temperature_start_step, temperature_end_step
        self.temperature_start_epoch, self.temperature_end_epoch = temperature_start_epoch, temperature_end_epoch
        self.final_alpha = final_alpha
        self.alpha_schedule = alpha_schedule
        self.alpha_start_step, self.alpha_end_step = alpha_start_step, alpha_end_step
        self.alpha_start_epoch, self.alpha_end_epoch = alpha_start_epoch, alpha_end_epoch
        self.loss = loss

        self._teacher_module: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self._loaded_checkpoint = False
        self._projections = nn.ModuleDict()
        self._proj_dims: dict[str, int] = {}
        self._pending_projections: dict[str, Any] | None = None
        self._schedules: dict[str, Schedule] = {}
        self._student_hook: Any = None
        self._student_features: FeatureRecorder | None = None
        self._student_layers: dict[str, nn.Module] = {}  # feature layer name -> the module its hook is on
        self._teacher_features: FeatureRecorder | None = None
        self._capturing = False
        self._captured: tuple[tuple, dict, Any] | None = None
        self._wrapper: TrainingStepWrapper | None = None
        self._agree = [0, 0]
        self._teacher_ran = False  # the first teacher call turns a shape error into a ValueError naming the cause
        self._dtype_from_inputs = False  # a student without float parameters (an integer model): follow its inputs

    # -- public helpers -----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(teacher_checkpoint=self.teacher_checkpoint, student_module=self.student_module)

    def load_teacher(self) -> nn.Module:
        """Build (once) and return the frozen teacher, weights loaded from ``teacher_checkpoint`` if given."""
        if self._teacher_module is None:
            self._teacher_module = build_module(self.teacher)
        if self.teacher_checkpoint is not None and not self._loaded_checkpoint:
            load_teacher_weights(self._teacher_module, self.teacher_checkpoint)
            self._loaded_checkpoint = True
        self._teacher_module.eval().requires_grad_(False)
        return self._teacher_module

    def _touched_modules(self) -> list[nn.Module]:
        return [self.teacher] if isinstance(self.teacher, nn.Module) else []

    def values_at(self, step: int) -> tuple[float, float]:
        """``(temperature, alpha)`` at optimizer step ``step`` (schedules resolved at train start)."""
        t = self._schedules["temperature"].value_at(step) if "temperature" in self._schedules else self.temperature
        a = self._schedules["alpha"].value_at(step) if "alpha" in self._schedules else self.alpha
        return t, a

    # -- set-up ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation changes the loss `training_step` returns, so it needs automatic optimization; "
                "with manual optimization add `kd_loss` from lightning_compress.functional.distillation to your loss yourself"
            )
        student = self._named(pl_module, self.student_module, "student_module")
        if isinstance(self.teacher, nn.Module) and (
            self.teacher is pl_module
            or {id(p) for p in self.teacher.parameters()} & {id(p) for p in pl_module.parameters()}
        ):
            raise ValueError(
                "KnowledgeDistillation: `teacher` is the student (or shares parameters with it); the teacher is "
                "frozen, so the student could not train: give a separately trained model as `teacher`"
            )
        teacher = self.load_teacher()
        self._student_hook = student.register_forward_hook(self._record_student, with_kwargs=True)
        if self.feature_pairs and stage == "fit":  # validation measures agreement only: no features, no projections
            s_layers = {s: self._named(pl_module, s, "feature_pairs") for s in self.feature_pairs}
            t_layers = {s: self._named(teacher, t, "feature_pairs", teacher=True) for s, t in self.feature_pairs.items()}
            self._build_projections(s_layers, t_layers)
            self._student_features = FeatureRecorder(s_layers)
            self._student_layers = s_layers
            self._teacher_features = FeatureRecorder(t_layers)
        if stage == "fit":
            self._wrapper = TrainingStepWrapper(pl_module, self._distill_step)

    def _resolve_schedules(self, trainer: pl.Trainer) -> None:
        self._schedules = {}
        for name in ("temperature", "alpha"):
            final = getattr(self, f"final_{name}")
            if final is None:
                continue
            window = [getattr(self, f"{name}_{k}") for k in ("start_step", "end_step", "start_epoch", "end_epoch")]
            kind, initial = getattr(self, f"{name}_schedule"), getattr(self, name)
            self._schedules[name] = schedule_for(trainer, kind, initial, final, *window, prefix=f"{name}_")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_student(pl_module)
        self._attach_projections(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_schedules(trainer)
        self._check_slimmed_features(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._student_hook is not None:
            self._student_hook.remove()
            self._student_hook = None
        for rec in (self._student_features, self._teacher_features):
            if rec is not None:
                rec.remove()
        self._student_features = self._teacher_features = None
        self._student_layers = {}
        if self._wrapper is not None:
            self._wrapper.remove()
            self._wrapper = None

    # -- the distillation step -------------------------------------------------------------------------
    def _distill_step(self, step: Any, *args: Any, **kwargs: Any) -> Any:
        """The student's ``training_step``, followed by the distillation loss (wrapped around it during fit)."""
        module = self._wrapper.module if self._wrapper is not None else None
        if module is None:
            return step(*args, **kwargs)
        self._follow_replaced_layers(module)
        self._start_capture()
        try:
            out = step(*args, **kwargs)
        finally:
            self._stop_capture()
        if out is None:  # the user skipped this batch
            self._captured = None
            return None
        if isinstance(out, torch.Tensor):
            return self.distillation_loss(module, out)
        if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
            return {**out, "loss": self.distillation_loss(module, out["loss"])}
        raise TypeError(
            f"KnowledgeDistillation needs `training_step` to return a loss tensor or a dict with 'loss', got {type(out).__name__}"
        )

    def distillation_loss(self, pl_module: pl.LightningModule, task_loss: torch.Tensor) -> torch.Tensor:
        """The combined loss for the step just recorded (called by the wrapped ``training_step``)."""
        if self._captured is None:
            name = self.student_module or "the LightningModule"
            raise RuntimeError(
                f"KnowledgeDistillation saw no forward call of {name!r} during `training_step`; set `student_module` "
                "to the submodule your training_step calls"
            )
        args, kwargs, output = self._captured
        self._captured = None
        student = select_output(output, self.student_output, "student_output")
        teacher = self._run_teacher(args, kwargs)
        temperature, alpha = self.values_at(pl_module.trainer.global_step)
        kd = distill_loss(student, teacher, self.loss, temperature)
        loss = (1.0 - alpha) * task_loss + alpha * kd
        logs = {"distill/task_loss": task_loss, "distill/kd_loss": kd}
        if self._student_features is not None and self._teacher_features is not None:
            feats = []
            for name in self.feature_pairs or {}:
                s = self._student_features.outputs.get(name)
                t = self._teacher_features.outputs.get(name)
                if s is None or t is None:
                    raise RuntimeError(f"`feature_pairs`: layer pair {name!r} was not run by the student or the teacher")
                if _key(name) in self._projections:
                    s = project_features(s, self._projections[_key(name)], self._proj_dims[name])
                feats.append(feature_loss(s, t))
            feat = torch.stack(feats).mean()
            loss = loss + self.feature_weight * feat
            logs["distill/feature_loss"] = feat
        # each `log` call costs Lightning about as much as a small model's forward: scheduled values only
        for key, value in logs.items():
            pl_module.log(key, value.detach())
        if "temperature" in self._schedules:
            pl_module.log("distill/temperature", float(temperature))
        if "alpha" in self._schedules:
            pl_module.log("distill/alpha", float(alpha))
        return loss.to(task_loss.dtype)

    # -- state -------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        teacher = dict(self.teacher) if isinstance(self.teacher, Mapping) else (
            f"{type(self.teacher).__module__}.{type(self.teacher).__qualname__}"
        )
        return {
            "version": _VERSION,
            "teacher": teacher,
            "teacher_checkpoint": self.teacher_checkpoint,
            "projections": self._projection_state(),
            "projection_optimizer": self._own_optimizer.state_dict() if self._own_optimizer else self._pending_optimizer,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "KnowledgeDistillation")
        projections = state_dict.get("projections", {})
        if state_dict.get("teacher_checkpoint", self.teacher_checkpoint) != self.teacher_checkpoint:
            log.warning(
                "resuming with teacher_checkpoint=%r; the checkpoint was trained with %r",
                self.teacher_checkpoint, state_dict.get("teacher_checkpoint"),
            )
        self._load_own_optimizer(state_dict.get("projection_optimizer"))
        if len(self._projections) or not self.feature_pairs:
            if projections:
                self._projections.load_state_dict(projections)
        else:
            self._pending_projections = projections
