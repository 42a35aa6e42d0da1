"""Wrap the user's ``training_step`` while fit runs, and give it back at teardown (also when fit raises).

``KnowledgeDistillation`` (adds the teacher's loss) and ``SlimmableTraining`` (runs the step at several widths)
change what ``training_step`` returns without touching the user's class: the wrapper is an instance attribute
of the LightningModule, so the class's own method is back as soon as it is removed. Wrappers stack (each wraps
what it found, another callback's wrapper included); one removed while another sits on top of it passes
through from then on. Lightning's ``is_overridden`` sees the user's method through ``__wrapped__``.

Example:
    >>> from lightning.pytorch import LightningModule
    >>> class Net(LightningModule):
    ...     def training_step(self, batch, batch_idx):
    ...         return batch * 2
    >>> net = Net()
    >>> wrapper = TrainingStepWrapper(net, lambda step, *args, **kwargs: step(*args, **kwargs) + 1)
    >>> net.training_step(1, 0)
    3
    >>> wrapper.remove(); net.training_step(1, 0), "training_step" in vars(net)
    (2, False)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl

__all__ = ["TrainingStepWrapper", "logging_off"]


class TrainingStepWrapper:
    """``around(step, *args, **kwargs)`` runs instead of ``module.training_step`` until :meth:`remove`.

    Args:
        module: the LightningModule; the wrapper is set as its ``training_step`` instance attribute.
        around: called with the wrapped step (the class's method, or the wrapper found there) and the step's
            arguments; returns what ``training_step`` returns.
    """

    lightning_compress_patch = True  # `export._common.copy_model` leaves it out of copies of the model

    def __init__(self, module: pl.LightningModule, around: Callable[..., Any]) -> None:
        previous = module.__dict__.get("training_step")  # another callback's wrapper, if any
        self.module = module
        self.step = previous or type(module).training_step.__get__(module)
        self.previous = previous
        self.around = around
        self.active = True
        self.__wrapped__ = inspect.unwrap(self.step)  # Lightning's `is_overridden` looks through it
        module.training_step = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.step(*args, **kwargs)
        return self.around(self.step, *args, **kwargs)

    def remove(self) -> None:
        """Put back what was there before; if another wrapper sits on top of this one, pass through from now on."""
        if self.module.__dict__.get("training_step") is self:
            if self.previous is None:
                del self.module.training_step
            else:
                self.module.training_step = self.previous  # type: ignore[method-assign]
        self.active = False


@contextmanager
def logging_off(module: pl.LightningModule) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside (e.g. for extra runs of ``training_step``)."""
    module.__dict__["log"] = _no_log
    module.__dict__["log_dict"] = _no_log
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
