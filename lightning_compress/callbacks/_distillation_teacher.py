"""The teacher side of ``KnowledgeDistillation``: the teacher run on the student's inputs, feature hints
(student/teacher layer pairs and their projections, also under DDP), and teacher-student agreement at validation.

:class:`_TeacherSide` is a base of :class:`~lightning_compress.callbacks.distillation.KnowledgeDistillation`, which
sets the attributes it uses in ``__init__``; the callback itself holds the settings, the schedules, the wrapped
``training_step`` and the loss.

Example:
    >>> from lightning_compress import KnowledgeDistillation
    >>> issubclass(KnowledgeDistillation, _TeacherSide), _key("encoder.layer.0")
    (True, 'encoder__layer__0')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress import claims
from lightning_compress.callbacks._strategies import sharding_strategy
from lightning_compress.functional.distillation import (
    FeatureRecorder,
    agreement_counts,
    layer_width,
    select_output,
)

__all__: list[str] = []  # private: the callback's base

log = logging.getLogger("lightning_compress.callbacks.distillation")  # the callback's logger, as before the split


class _TeacherSide(Callback):
    """Teacher, feature hints and agreement: the methods of ``KnowledgeDistillation`` that deal with the teacher."""

    feature_pairs: dict[str, str] | None
    student_module: str
    student_output: str | int | None
    teacher_output: str | int | None
    _projections: nn.ModuleDict
    _proj_dims: dict[str, int]
    _pending_projections: dict[str, Any] | None
    # under a sharding strategy the projections get an optimizer of their own (see _attach_projections)
    _own_optimizer: torch.optim.Optimizer | None = None
    _pending_optimizer: dict[str, Any] | None = None
    _student_features: FeatureRecorder | None
    _student_layers: dict[str, nn.Module]
    _teacher_features: FeatureRecorder | None
    _capturing: bool
    _captured: tuple[tuple, dict, Any] | None
    _wrapper: Any
    _agree: list[int]
    _teacher_ran: bool
    _dtype_from_inputs: bool
    load_teacher: Any  # the callback's method

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


    def _to_student(self, pl_module: pl.LightningModule) -> None:
        ref = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else pl_module.device
        dtype = ref.dtype if ref is not None else torch.float32
        self._dtype_from_inputs = ref is None
        self.load_teacher().to(device=device, dtype=dtype)
        self._projections.to(device=device, dtype=dtype)


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


    def _attach_projections(self, trainer: pl.Trainer) -> None:
        """Train the projections with the first optimizer: as an extra parameter group of it, or, under a sharding
        strategy (whose checkpoint saves optimizer state by model parameter: ModelParallelStrategy's distributed
        checkpoint knows only the model's), with an optimizer of the same kind and settings that this callback
        steps with it (its state in the callback's checkpoint, its learning rate following the first group's)."""
        params = list(self._projections.parameters())
        self._own_optimizer = None
        if not params or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        if sharding_strategy(trainer.strategy) is None:
            optimizer.add_param_group({**group, "params": params})
            return
        self._own_optimizer = type(optimizer)([{**group, "params": params}])
        if self._pending_optimizer is not None:
            self._own_optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None

    def _step_own_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        own = self._own_optimizer
        if own is None:
            return
        own.param_groups[0].update({k: v for k, v in optimizer.param_groups[0].items() if k != "params"})
        own.step()
        own.zero_grad()

    def _load_own_optimizer(self, state: dict[str, Any] | None) -> None:
        if state is not None and self._own_optimizer is not None:  # ModelParallelStrategy: after fit start
            self._own_optimizer.load_state_dict(state)
        else:
            self._pending_optimizer = state

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
        if optimizer is trainer.optimizers[0]:
            self._step_own_optimizer(optimizer)

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
        self._capturing = getattr(self, "loss", "kl") == "kl"  # agreement of predicted classes: logits only

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


    def _projection_state(self) -> dict[str, torch.Tensor]:
        if self._pending_projections is not None:  # loaded, not set up yet: hand the loaded weights on unchanged
            return {k: v.detach().cpu().clone() for k, v in self._pending_projections.items()}
        return {k: v.detach().cpu().clone() for k, v in self._projections.state_dict().items()}

    # -- capturing the student's forward (training: for the loss; validation: for agreement) ----------------
    def _record_student(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capturing and self._captured is None:
            self._captured = (args, kwargs, output)

    def _start_capture(self) -> None:
        self._captured = None
        self._capturing = True
        if self._student_features is not None:
            self._student_features.start()

    def _stop_capture(self) -> None:
        self._capturing = False
        if self._student_features is not None:
            self._student_features.stop()


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
