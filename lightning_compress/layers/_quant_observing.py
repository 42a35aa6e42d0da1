"""When the input observer of an :class:`~lightning_compress.layers.quantization.ActivationFakeQuantize` updates.

Outside a fit, as in ``torch.ao``: while the quantizer is in training mode (and its ``observer_enabled`` flag is
set). During a fit, :class:`~lightning_compress.QuantizationAwareTraining` also marks the quantizers for the span of
each training batch (:func:`mark_training_batch`); a marked quantizer observes every forward run with gradients
enabled, whatever its train/eval mode. Lightning 2.6 trains a model handed to ``fit`` in eval mode in eval mode, and
a user may put a prepared model (or part of it) in eval mode on purpose (to keep BatchNorm statistics fixed, say):
keyed on the mode alone, the observed ranges would stay those of the first batch (or of an earlier fit) for good.
Validation, test and predict forwards run outside training batches and without gradients, so they never update a
range, in either mode. One difference remains: a ``no_grad`` forward inside ``training_step`` updates the ranges
of quantizers in training mode only.

The mark is a plain attribute (not a buffer): it is not part of any ``state_dict``.

Example:
    >>> import torch
    >>> from lightning_compress.layers.quantization import ActivationFakeQuantize
    >>> q = ActivationFakeQuantize().eval()
    >>> observes(q)
    False
    >>> mark_training_batch(q, True)
    >>> observes(q), torch.no_grad()(observes)(q)
    (True, False)
    >>> mark_training_batch(q, False)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mark_training_batch", "observes"]

_MARK = "_lc_training_batch"  # in an input quantizer's __dict__: True while a fit's training batch runs


def observes(quantizer: nn.Module) -> bool:
    """Whether ``quantizer``'s observer updates its range in the forward now running (see the module docstring)."""
    if not bool(quantizer.observer_enabled):
        return False
    return quantizer.training or (bool(quantizer.__dict__.get(_MARK, False)) and torch.is_grad_enabled())


def mark_training_batch(model: nn.Module, on: bool) -> None:
    """Mark (``on``) or unmark every input quantizer in ``model`` as running in a fit's training batch."""
    from lightning_compress.layers.quantization import ActivationFakeQuantize

    for module in model.modules():
        if isinstance(module, ActivationFakeQuantize):
            if on:
                module.__dict__[_MARK] = True
            else:
                module.__dict__.pop(_MARK, None)
