"""Schedules: progress measured in optimizer steps -> a value (a sparsity, a temperature, ...).

Every callback in this package runs on one clock, the optimizer step (``trainer.global_step``).
Recipes may give epochs (fractions allowed); :func:`epochs_to_steps` turns them into steps once
the trainer knows how many optimizer steps an epoch has.

The math is a pure function, :func:`interpolate`; :class:`Schedule` only holds the settings.

Example:
    >>> s = Schedule(kind="cubic", initial=0.0, final=0.9, start_step=0, end_step=100)
    >>> round(s.value_at(0), 3), round(s.value_at(50), 4), s.value_at(100), s.value_at(500)
    (0.0, 0.7875, 0.9, 0.9)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from lightning_compress._validation import check_number

if TYPE_CHECKING:
    import lightning.pytorch as pl

ScheduleKind = Literal["constant", "one_shot", "linear", "cubic", "exponential"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)

__all__ = [
    "SCHEDULE_KINDS",
    "Schedule",
    "ScheduleKind",
    "check_starts_in_run",
    "epochs_to_steps",
    "interpolate",
    "optimizer_steps_per_epoch",
    "schedule_for",
    "validate_kind",
]

_EXP_RATE = 5.0


def validate_kind(kind: str, argument: str = "schedule") -> None:
    """Raise a ``ValueError`` unless ``kind`` is one of :data:`SCHEDULE_KINDS`."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"`{argument}` must be one of {list(SCHEDULE_KINDS)}, got {kind!r}")


def interpolate(kind: str, progress: float, initial: float, final: float) -> float:
    """Value of a schedule of ``kind`` at ``progress`` in [0, 1] (clamped outside it).

    - ``constant`` / ``one_shot``: ``final`` from the start on.
    - ``linear``: straight line from ``initial`` to ``final``.
    - ``cubic``: Zhu & Gupta (2017), ``final + (initial - final) * (1 - p)**3``: fast at first,
      slow near the end, when the network has fewer redundant weights left to lose.
    - ``exponential``: ``initial -> final`` along ``exp(-5 p)``, rescaled to end exactly at ``final``.

    Example:
        >>> interpolate("linear", 0.25, 0.0, 1.0)
        0.25
        >>> round(interpolate("cubic", 0.5, 0.0, 0.8), 6)
        0.7
    """
    validate_kind(kind)
    p = min(max(float(progress), 0.0), 1.0)
    if kind in ("constant", "one_shot"):
        return float(final)
    if kind == "linear":
        return float(initial + (final - initial) * p)
    if kind == "cubic":
        return float(final + (initial - final) * (1.0 - p) ** 3)
    # exponential: approaches `final` quickly, reaches it exactly at p = 1
    decay = (math.exp(-_EXP_RATE * p) - math.exp(-_EXP_RATE)) / (1.0 - math.exp(-_EXP_RATE))
    return float(final + (initial - final) * decay)


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``initial`` to ``final`` between two optimizer steps.

    Before ``start_step`` the value is ``initial``; from ``end_step`` on it is ``final``.
    A ``constant``/``one_shot`` schedule jumps to ``final`` at ``start_step``.

    Args:
        kind: one of ``constant``, ``one_shot``, ``linear``, ``cubic``, ``exponential``.
        initial: value before and at the start.
        final: value at and after the end.
        start_step: first optimizer step of the ramp.
        end_step: optimizer step at which ``final`` is reached (``>= start_step``).

    Raises:
        ValueError: unknown ``kind``, negative steps, or ``end_step < start_step``.

    Example:
        >>> Schedule("linear", 0.0, 0.5, start_step=10, end_step=20).value_at(15)
        0.25
    """

    kind: str
    initial: float
    final: float
    start_step: int
    end_step: int

    def __post_init__(self) -> None:
        validate_kind(self.kind)
        if self.start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {self.start_step}")
        if self.end_step < self.start_step:
            raise ValueError(
                f"the schedule ends before it starts: `end_step`={self.end_step} < `start_step`={self.start_step}"
            )

    def progress(self, step: int) -> float:
        """Fraction of the ramp done at ``step``, in [0, 1]."""
        if step < self.start_step:
            return 0.0
        if self.end_step == self.start_step:
            return 1.0
        return min(1.0, (step - self.start_step) / (self.end_step - self.start_step))

    def value_at(self, step: int) -> float:
        """The scheduled value at optimizer step ``step``. Override this to write your own schedule."""
        if step < self.start_step:
            return float(self.initial)
        return interpolate(self.kind, self.progress(step), self.initial, self.final)


def optimizer_steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch, once the trainer has loaded its train dataloader.

    Takes ``limit_train_batches`` and ``accumulate_grad_batches`` into account.
    """
    batches = trainer.num_training_batches
    if batches == float("inf") or batches <= 0:
        # before the train loop starts (e.g. in `on_fit_start`) the train dataloader is not loaded yet;
        # the trainer's public `estimated_stepping_batches` loads it
        _ = trainer.estimated_stepping_batches
        if trainer.train_dataloader is None:
            _load_train_dataloader(trainer)
        batches = trainer.num_training_batches
    if batches == float("inf") or batches <= 0:
        raise ValueError(
            "cannot turn epochs into optimizer steps: the train dataloader has no length; give `*_step` arguments instead"
        )
    return max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches)))


def _load_train_dataloader(trainer: pl.Trainer) -> None:
    """The one private Lightning call of the package's schedules: ``fit_loop.setup_data()``.

    With ``max_epochs=-1`` (e.g. ``Trainer(max_steps=N)``) the public ``estimated_stepping_batches`` is
    ``max_steps`` and loads nothing, and Lightning has no public way to load the train dataloader before the train
    loop does; epochs can only become steps from its length, so it is loaded here as the estimate itself does
    otherwise (the loop does not load it again).
    """
    trainer.fit_loop.setup_data()


def check_starts_in_run(trainer: pl.Trainer, step: int, argument: str, what: str, fix: str) -> None:
    """Raise ``ValueError`` when ``step`` is not before the run's last optimizer step: ``what`` would never happen.

    Example:
        >>> from types import SimpleNamespace
        >>> check_starts_in_run(SimpleNamespace(estimated_stepping_batches=10), 10, "start_step", "prunes", "start earlier")
        Traceback (most recent call last):
        ...
        ValueError: `start_step` prunes at optimizer step 10, but this run has only 10 optimizer steps: start earlier
    """
    total = trainer.estimated_stepping_batches
    if total != float("inf") and step >= int(total):
        raise ValueError(
            f"`{argument}` {what} at optimizer step {step}, but this run has only {int(total)} optimizer steps: {fix}"
        )


def schedule_for(
    trainer: pl.Trainer,
    kind: str,
    initial: float,
    final: float,
    start_step: int | None,
    end_step: int | None,
    start_epoch: float | None,
    end_epoch: float | None,
    *,
    prefix: str = "",
) -> Schedule:
    """The :class:`Schedule` from ``initial`` to ``final`` over a window in steps or epochs (see
    :func:`resolve_window`); with no end given, it ends with the run (when the run has a fixed length)."""
    start, end = resolve_window(trainer, start_step, end_step, start_epoch, end_epoch, prefix=prefix)
    if end_step is None and end_epoch is None and trainer.estimated_stepping_batches != float("inf"):
        end = max(start, int(trainer.estimated_stepping_batches))
    return Schedule(kind, float(initial), float(final), start, end)


def epochs_to_steps(epochs: float, trainer: pl.Trainer) -> int:
    """Turn a (possibly fractional) epoch count into optimizer steps for this ``trainer``."""
    return int(round(float(epochs) * optimizer_steps_per_epoch(trainer)))


def validate_window(
    start_step: int | None,
    end_step: int | None,
    start_epoch: float | None,
    end_epoch: float | None,
    *,
    prefix: str = "",
) -> None:
    """Check a start/end pair given in steps or in epochs (not both); raise ``ValueError`` naming the argument.

    ``prefix`` is put before the argument names in messages (e.g. ``"temperature_"``).

    Example:
        >>> validate_window(None, None, 2.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: the schedule ends before it starts: `end_epoch`=1.0 < `start_epoch`=2.0
    """
    names = {k: f"{prefix}{k}" for k in ("start_step", "end_step", "start_epoch", "end_epoch")}
    if (start_step is not None or end_step is not None) and (start_epoch is not None or end_epoch is not None):
        raise ValueError(
            f"give the schedule in steps (`{names['start_step']}`/`{names['end_step']}`) or in epochs "
            f"(`{names['start_epoch']}`/`{names['end_epoch']}`), not both"
        )
    for key, value in (("start_step", start_step), ("end_step", end_step)):
        check_number(value, names[key], low=0, integer=True, optional=True)
    for key, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch)):
        check_number(value, names[key], low=0, optional=True)
    for lo, hi, lo_name, hi_name in (
        (start_step, end_step, "start_step", "end_step"),
        (start_epoch, end_epoch, "start_epoch", "end_epoch"),
    ):
        if lo is not None and hi is not None and hi < lo:
            raise ValueError(
                f"the schedule ends before it starts: `{names[hi_name]}`={hi} < `{names[lo_name]}`={lo}"
            )


def resolve_window(
    trainer: pl.Trainer,
    start_step: int | None,
    end_step: int | None,
    start_epoch: float | None,
    end_epoch: float | None,
    *,
    prefix: str = "",
    check_fits: bool = True,
) -> tuple[int, int]:
    """Turn a start/end pair (steps or epochs) into optimizer steps for ``trainer``.

    Missing values default to step 0 (start) and to the start (end). With ``check_fits`` a window that
    ends after the run's last optimizer step raises ``ValueError``: the target would never be reached.
    """
    start = start_step if start_step is not None else (
        epochs_to_steps(start_epoch, trainer) if start_epoch is not None else 0
    )
    if end_step is not None:
        end = end_step
    elif end_epoch is not None:
        end = epochs_to_steps(end_epoch, trainer)
    else:
        end = start
    if end < start:
        raise ValueError(f"the schedule ends before it starts: {prefix}end={end} < {prefix}start={start} (steps)")
    if check_fits:
        total = trainer.estimated_stepping_batches
        if total != float("inf") and end > int(total):
            given = "end_step" if end_step is not None else "end_epoch"
            raise ValueError(
                f"`{prefix}{given}` puts the end of the schedule at optimizer step {end}, but this run has only "
                f"{int(total)} optimizer steps: shorten the schedule or train longer"
            )
    return int(start), int(end)
