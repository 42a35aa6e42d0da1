"""What every model-changing callback shares: the model is given back even when fit raises.

Lightning calls a callback's ``teardown`` at the end of a fit but skips it when the fit raises; a callback that
claimed parameters, hooked optimizers or wrapped ``training_step`` would then leave the model unusable for the
next fit ("already prunes ..."). :class:`_ReleasesModelOnException` runs ``teardown(stage="fit")`` from
``on_exception`` too.

Example:
    >>> from lightning_compress import GradualPruning
    >>> issubclass(GradualPruning, _ReleasesModelOnException)
    True
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__: list[str] = []  # a private base of the package's callbacks


class _ReleasesModelOnException(Callback):
    """Base of the compression callbacks: ``teardown(stage="fit")`` also runs when fit raises."""

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.teardown(trainer, pl_module, "fit")
