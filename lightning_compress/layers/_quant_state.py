"""Loading the state of fake-quantizers from checkpoints written by other versions (or before ``prepare_qat``).

A :class:`~lightning_compress.layers.quantization.WeightFakeQuantize` records the grid its steps were computed for
in its ``full_range`` buffer (1: symmetric weights on all ``2**bits`` codes, ``[-8, 7]`` at 4 bits; 0: the
restricted ``[-7, 7]``), so the grid travels with the steps in every checkpoint. Checkpoints written before that
buffer existed hold steps for the restricted grid: :func:`fill_missing` loads them as restricted, so resuming such
a QAT run (or converting its model) keeps the grid it was trained on, whatever ``symmetric_range`` resolves to now.
A float checkpoint (written before prepare) has no quantizer entries at all: the quantizer keeps its own, not yet
initialized, state instead of failing a strict load.

Example:
    >>> import torch
    >>> from lightning_compress.layers.quantization import QuantConfig, WeightFakeQuantize
    >>> q = WeightFakeQuantize(QuantConfig(weight_bits=4), channels=2)
    >>> old = {k: v for k, v in q.state_dict().items() if k != "full_range"}
    >>> _ = q.load_state_dict(old)
    >>> q.qrange
    (-7, 7)
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["fill_missing"]


def fill_missing(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of the quantizers (see the module docstring)."""
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    if not any(prefix + k in state_dict for k in own):
        for k, t in own.items():
            if t is not None:
                state_dict[prefix + k] = t.detach().clone()
    elif "full_range" in own and prefix + "full_range" not in state_dict:
        state_dict[prefix + "full_range"] = own["full_range"].detach().new_zeros(())
