"""What every model-changing callback shares: the model is given back even when fit raises.

Lightning calls a callback's ``teardown`` at the end of a fit but skips it when the fit raises; a callback that
claimed parameters, hooked optimizers or wrapped ``training_step`` would then leave the model unusable for the
next fit ("already prunes ..."). :class:`_ReleasesModelOnException` runs ``teardown(stage="fit")`` from
``on_exception`` too, and then gives back the ``requires_grad`` flags and train/eval modes that the model (and
any module a callback was handed, such as a teacher) had when the fit started: the first such callback's
``setup`` records them for all of them, before any of them changes anything.

Example:
    >>> from lightning_compress import GradualPruning
    >>> issubclass(GradualPruning, _ReleasesModelOnException)
    True
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks import _strategies

__all__: list[str] = []  # a private base of the package's callbacks

# trainer -> [(module, {parameter name: requires_grad}, {module name: training})] as they were when fit started
_BEFORE_FIT: weakref.WeakKeyDictionary[Any, list[tuple[Any, dict[str, bool], dict[str, bool]]]] = (
    weakref.WeakKeyDictionary()
)


class _ReleasesModelOnException(Callback):
    """Base of the compression callbacks: ``teardown(stage="fit")`` also runs when fit raises, and the modes of
    what the callbacks touched are restored."""

    # what the callback cannot do on sharded parameters (None: it checks strategies itself), and the sharding
    # strategies it supports: others are refused in setup, DTensor parameters at fit start (see _strategies)
    _sharding_refusal: str | None = None
    _sharding_support: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setup = cls.__dict__.get("setup")
        if setup is not None:  # record the modes before the subclass's own setup changes anything

            @functools.wraps(setup)
            def recording_setup(
                self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
            ) -> None:
                if stage == "fit" and self._sharding_refusal is not None:
                    _strategies.refuse_strategy(trainer.strategy, type(self).__name__, self._sharding_refusal,
                                                self._sharding_support)
                if stage == "fit":
                    _remember_modes(trainer, pl_module, self)
                setup(self, trainer, pl_module, stage)

            cls.setup = recording_setup  # type: ignore[method-assign]
        if cls.__dict__.get("_sharding_refusal") and "ModelParallelStrategy" not in cls._sharding_support:
            fit_start = cls.on_fit_start

            @functools.wraps(fit_start)
            def checking_fit_start(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                _strategies.refuse_sharded_parameters(pl_module, type(self).__name__, self._sharding_refusal)
                fit_start(self, trainer, pl_module)

            cls.on_fit_start = checking_fit_start  # type: ignore[method-assign]

    def _touched_modules(self) -> list[nn.Module]:
        """Modules besides the model whose modes this callback changes (e.g. a teacher the user handed it)."""
        return []

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.teardown(trainer, pl_module, "fit")
            for module_ref, grads, modes in _BEFORE_FIT.get(trainer, []):
                module = module_ref()
                if module is not None:
                    _restore(module, grads, modes)


def _remember_modes(trainer: pl.Trainer, pl_module: nn.Module, caller: _ReleasesModelOnException) -> None:
    """Record the modes once per fit: in the setup of the first compression callback of the trainer."""
    first = next((cb for cb in trainer.callbacks if isinstance(cb, _ReleasesModelOnException)), caller)
    if first is not caller:
        return
    modules = [pl_module]
    for cb in trainer.callbacks:
        if isinstance(cb, _ReleasesModelOnException):
            modules += [m for m in cb._touched_modules() if all(m is not seen for seen in modules)]
    _BEFORE_FIT[trainer] = [
        (
            weakref.ref(module),
            {n: p.requires_grad for n, p in module.named_parameters(remove_duplicate=False)},
            {n: m.training for n, m in module.named_modules(remove_duplicate=False)},
        )
        for module in modules
    ]


def _restore(module: nn.Module, grads: dict[str, bool], modes: dict[str, bool]) -> None:
    """Set back what was recorded; a module added during the fit (a factorized layer's parts, a fake-quantizer)
    takes the mode its nearest recorded ancestor had."""
    for name, param in module.named_parameters(remove_duplicate=False):
        if name in grads:
            param.requires_grad_(grads[name])
    for name, sub in module.named_modules(remove_duplicate=False):
        ancestor = name
        while ancestor not in modes and ancestor:
            ancestor = ancestor.rpartition(".")[0]
        sub.training = modes.get(ancestor, sub.training)
