"""Run a function after every step of the trainer's optimizers, following optimizers that are rebuilt.

Callbacks that keep weights in a constrained set (pruning masks, shared values) must restore the constraint
after each optimizer step, whichever way the step is taken (automatic or manual optimization, an optimizer
wrapped by a strategy). ``torch.optim.Optimizer.register_step_post_hook`` sees them all; this class keeps the
handles and re-attaches when another callback rebuilds the optimizers (e.g. ``LowRankFactorization``).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> seen = []
    >>> hooks = AfterOptimizerStep(lambda params: seen.append(id(w) in params))
    >>> hooks.attach(SimpleNamespace(optimizers=[opt]))
    >>> w.grad = torch.ones(3); opt.step()
    >>> seen
    [True]
    >>> hooks.remove(); opt.step(); seen
    [True]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AfterOptimizerStep"]


class AfterOptimizerStep:
    """Calls ``fn(param_ids)`` after each step of each optimizer, with the ids of that optimizer's parameters.

    Args:
        fn: called with the set of ``id()`` of the parameters the stepping optimizer holds.
    """

    def __init__(self, fn: Callable[[set[int]], None]) -> None:
        self._fn = fn
        self._handles: list[Any] = []
        self._optimizer_ids: list[int] = []

    def attach(self, trainer: Any) -> None:
        """Hook ``trainer.optimizers``; a no-op when they are the ones already hooked."""
        optimizers = list(trainer.optimizers)
        if [id(o) for o in optimizers] == self._optimizer_ids:
            return
        self.remove()
        for optimizer in optimizers:
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._handles.append(optimizer.register_step_post_hook(self._hook(params)))
        self._optimizer_ids = [id(o) for o in optimizers]

    def remove(self) -> None:
        """Detach from every optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._optimizer_ids = []

    def _hook(self, params: set[int]) -> Callable[[torch.optim.Optimizer, Any, Any], None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._fn(params)

        return hook
