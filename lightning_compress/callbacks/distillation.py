"""KnowledgeDistillation: a frozen teacher adds soft-target (and feature) losses to an unmodified student."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_compress import claims
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.functional.distillation import (
    FeatureRecorder,
    agreement_counts,
    build_module,
    distill_loss,
    feature_loss,
    layer_width,
    load_teacher_weights,
    project_features,
    resolve_class,
    select_output,
)
from lightning_compress.schedules import (
    Schedule,
    ScheduleKind,
    resolve_window,
    validate_kind,
    validate_window,
)

__all__ = ["KnowledgeDistillation"]

log = logging.getLogger(__name__)
_VERSION = 1


class KnowledgeDistillation(_ReleasesModelOnException):
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
    and under DDP their gradients are averaged across processes before each optimizer step.

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
        for name, value in (("temperature", temperature), ("final_temperature", final_temperature)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"`{name}` must be a number > 0, got {value!r}")
        for name, value in (("alpha", alpha), ("final_alpha", final_alpha)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
                raise ValueError(f"`{name}` must be in [0, 1], got {value!r}")
        if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or feature_weight < 0:
            raise ValueError(f"`feature_weight` must be a number >= 0, got {feature_weight!r}")
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
        self._temperature_window = (temperature_start_step, temperature_end_step, temperature_start_epoch,
                                    temperature_end_epoch)
        self.final_alpha = final_alpha
        self.alpha_schedule = alpha_schedule
        self._alpha_window = (alpha_start_step, alpha_end_step, alpha_start_epoch, alpha_end_epoch)
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
        self._wrapper: _DistillStep | None = None
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
            original = pl_module.__dict__.get("training_step", None)
            step = original or type(pl_module).training_step.__get__(pl_module)
            self._wrapper = _DistillStep(self, pl_module, step, original)
            pl_module.training_step = self._wrapper  # type: ignore[method-assign]

    @staticmethod
    def _named(root: nn.Module, name: str, argument: str, teacher: bool = False) -> nn.Module:
        modules = dict(root.named_modules())
        if name not in modules:
            names = [n for n in modules if n][:30]
            who = "teacher" if teacher else "student"
            raise ValueError(f"`{argument}`: the {who} has no layer {name!r}; its layers are {names}")
        return modules[name]

    def _build_projections(self, s_layers: dict[str, nn.Module], t_layers: dict[str, nn.Module]) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # same projections in every process and every run, global RNG untouched
            for name, s_mod in s_layers.items():
                s_width, dim = layer_width(s_mod)
                t_width, _ = layer_width(t_layers[name])
                self._proj_dims[name] = dim
                kept = self._projections[_key(name)] if _key(name) in self._projections else None
                if s_width != t_width and (kept is None or kept.weight.shape != (t_width, s_width)):
                    self._projections[_key(name)] = nn.Linear(s_width, t_width)  # a later fit keeps trained ones
        if self._pending_projections is not None:
            self._projections.load_state_dict(self._pending_projections)
            self._pending_projections = None

    def _resolve_schedules(self, trainer: pl.Trainer) -> None:
        self._schedules = {}
        for name, final, kind, window, initial in (
            ("temperature", self.final_temperature, self.temperature_schedule, self._temperature_window, self.temperature),
            ("alpha", self.final_alpha, self.alpha_schedule, self._alpha_window, self.alpha),
        ):
            if final is None:
                continue
            start, end = resolve_window(trainer, *window, prefix=f"{name}_")
            if window[1] is None and window[3] is None and trainer.estimated_stepping_batches != float("inf"):
                end = max(start, int(trainer.estimated_stepping_batches))
            self._schedules[name] = Schedule(kind, float(initial), float(final), start, end)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_student(pl_module)
        params = list(self._projections.parameters())
        if params and trainer.optimizers:
            optimizer = trainer.optimizers[0]
            group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            optimizer.add_param_group({**group, "params": params})

    def _to_student(self, pl_module: pl.LightningModule) -> None:
        ref = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else pl_module.device
        dtype = ref.dtype if ref is not None else torch.float32
        self._dtype_from_inputs = ref is None
        self.load_teacher().to(device=device, dtype=dtype)
        self._projections.to(device=device, dtype=dtype)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_schedules(trainer)
        self._check_slimmed_features(pl_module)

    def _check_slimmed_features(self, pl_module: pl.LightningModule) -> None:
        """Refuse feature hints on layers whose width a callback wrapped around this one changes per call.

        ``SlimmableTraining`` listed after this callback wraps its ``training_step`` on the outside and runs it at
        every width, so a projection built for the full width would meet narrower features mid-fit. Listed
        before, it runs inside, and this callback distils the first (full-width) forward.
        """
        if not self.feature_pairs or pl_module.__dict__.get("training_step") is self._wrapper:
            return
        held = claims.claims(pl_module)
        slimmed = [
            layer for layer in self.feature_pairs
            if any(kind == "slim" for name, owners in held.items() if name.startswith(f"{layer}.")
                   for kind in owners.values())
        ]
        if slimmed:
            raise ValueError(
                f"`feature_pairs`: {slimmed} change width while a callback listed after KnowledgeDistillation runs "
                "`training_step` at several widths: list SlimmableTraining before KnowledgeDistillation (the "
                "full width is then distilled) or pair layers that keep their width"
            )

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
            if pl_module.__dict__.get("training_step") is self._wrapper:
                if self._wrapper.previous is None:
                    del pl_module.training_step
                else:
                    pl_module.training_step = self._wrapper.previous  # type: ignore[method-assign]
            self._wrapper.active = False  # if another wrapper sits on top of ours, pass through from now on
            self._wrapper = None

    # -- the distillation step -------------------------------------------------------------------------
    def _record_student(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capturing and self._captured is None:
            self._captured = (args, kwargs, output)

    def _follow_replaced_layers(self, pl_module: nn.Module) -> None:
        """Move the feature hooks to layers that another callback replaced since setup (e.g. a layer that
        ``LowRankFactorization`` factorizes mid-fit): the hook follows the name, not the old module."""
        if self._student_features is None or not self.feature_pairs:
            return
        current = {name: pl_module.get_submodule(name) for name in self.feature_pairs}
        if all(current[name] is self._student_layers.get(name) for name in current):
            return
        self._student_features.remove()
        self._student_features = FeatureRecorder(current)
        self._student_layers = current

    def _start_capture(self) -> None:
        self._captured = None
        self._capturing = True
        if self._student_features is not None:
            self._student_features.start()

    def _stop_capture(self) -> None:
        self._capturing = False
        if self._student_features is not None:
            self._student_features.stop()

    def _run_teacher(self, args: tuple, kwargs: dict) -> torch.Tensor:
        teacher = self.load_teacher()
        if self._dtype_from_inputs:  # e.g. the student was converted to integers: its inputs tell the precision
            _follow_input_dtype(teacher, (args, kwargs))
        if self._teacher_features is not None:
            self._teacher_features.start()
        try:
            with torch.no_grad():
                out = teacher(*args, **kwargs)
        except (RuntimeError, TypeError) as err:
            if self._teacher_ran:  # it ran before: a genuine runtime error, not a configuration one
                raise
            student = f"`student_module`={self.student_module!r}" if self.student_module else "the LightningModule"
            raise ValueError(
                f"the teacher {type(teacher).__name__} cannot run on the inputs of {student} ({err}); the teacher "
                "receives exactly the arguments of the student's forward call: set `student_module` to the "
                "submodule whose inputs the teacher takes"
            ) from err
        finally:
            if self._teacher_features is not None:
                self._teacher_features.stop()
        self._teacher_ran = True
        return select_output(out, self.teacher_output, "teacher_output")

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

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # DDP averages the student's gradients; the projections are not in the DDP module: average theirs here.
        grads = [p.grad for p in self._projections.parameters() if p.grad is not None]
        if trainer.world_size > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- validation: teacher-student agreement ---------------------------------------------------------------
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_student(pl_module)
        self._agree = [0, 0]

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._captured = None
        self._capturing = self.loss == "kl"

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._capturing = False
        if self._captured is None:
            return
        args, kwargs, output = self._captured
        self._captured = None
        try:  # agreement is a diagnostic: a validation_step that does not call the student is skipped
            student = select_output(output, self.student_output, "student_output")
            teacher = self._run_teacher(args, kwargs)
            matches, total = agreement_counts(student, teacher)
        except (ValueError, TypeError) as err:
            log.debug("no teacher-student agreement for this validation batch: %s", err)
            return
        self._agree[0] += matches
        self._agree[1] += total

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = torch.tensor(self._agree, dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[1] > 0:
            pl_module.log("distill/agreement", float(counts[0] / counts[1]))

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
        }

    def _projection_state(self) -> dict[str, torch.Tensor]:
        if self._pending_projections is not None:  # loaded, not set up yet: hand the loaded weights on unchanged
            return {k: v.detach().cpu().clone() for k, v in self._pending_projections.items()}
        return {k: v.detach().cpu().clone() for k, v in self._projections.state_dict().items()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        projections = state_dict.get("projections", {})
        if state_dict.get("teacher_checkpoint", self.teacher_checkpoint) != self.teacher_checkpoint:
            log.warning(
                "resuming with teacher_checkpoint=%r; the checkpoint was trained with %r",
                self.teacher_checkpoint, state_dict.get("teacher_checkpoint"),
            )
        if len(self._projections) or not self.feature_pairs:
            if projections:
                self._projections.load_state_dict(projections)
        else:
            self._pending_projections = projections


def _follow_input_dtype(teacher: nn.Module, inputs: Any) -> None:
    """Cast ``teacher`` to the dtype of the first floating-point tensor in ``inputs`` (nested tuples/lists/dicts)."""
    stack = [inputs]
    while stack:
        x = stack.pop(0)
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                current = next((p.dtype for p in teacher.parameters() if p.is_floating_point()), x.dtype)
                if current != x.dtype:
                    teacher.to(dtype=x.dtype)
                return
        elif isinstance(x, (tuple, list)):
            stack.extend(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())


def _key(layer: str) -> str:
    return layer.replace(".", "__")


class _DistillStep:
    """The student's ``training_step``, followed by the distillation loss (an instance attribute of the student)."""

    def __init__(self, callback: KnowledgeDistillation, module: pl.LightningModule, step: Any, previous: Any) -> None:
        self.callback = callback
        self.module = module
        self.step = step
        self.__wrapped__ = step  # Lightning's `is_overridden` looks through it, as through `functools.wraps`
        self.previous = previous
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cb = self.callback
        if not self.active:
            return self.step(*args, **kwargs)
        cb._follow_replaced_layers(self.module)
        cb._start_capture()
        try:
            out = self.step(*args, **kwargs)
        finally:
            cb._stop_capture()
        if out is None:  # the user skipped this batch
            cb._captured = None
            return None
        module = self.module
        if isinstance(out, torch.Tensor):
            return cb.distillation_loss(module, out)
        if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
            return {**out, "loss": cb.distillation_loss(module, out["loss"])}
        raise TypeError(
            f"KnowledgeDistillation needs `training_step` to return a loss tensor or a dict with 'loss', got {type(out).__name__}"
        )
