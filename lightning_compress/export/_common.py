"""Helpers shared by the structured exporters (thin, slice_width, scale): copying, probing, checking."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) an attached Lightning ``Trainer``.

    Methods a callback patched onto the instances during fit (``SlimmableTraining``'s width-aware ``forward``,
    marked ``lightning_compress_patch``) are left out of the copy: deep copy keeps functions as they are, so the
    copy's layers would run the original layers' weights. The copy runs its own classes' methods.
    """
    trainer = getattr(model, "_trainer", None)
    memo = {} if trainer is None else {id(trainer): trainer}
    out = copy.deepcopy(model, memo)
    for module in out.modules():
        patched = [
            k
            for k, v in vars(module).items()
            if callable(v) and getattr(v, "lightning_compress_patch", None) is True
        ]
        for key in patched:
            delattr(module, key)
    return out


def resolve_example(model: nn.Module, example_input: Any, argument: str = "example_input") -> Any:
    """``example_input``, else the LightningModule's ``example_input_array``; an error naming both if neither."""
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            f"`{argument}` is required (one input batch for the model's forward, e.g. torch.zeros(1, 1, 8, 8)) "
            f"unless the model sets `example_input_array`; got None for {type(model).__name__}"
        )
    return example_input


@torch.no_grad()
def run_eval(model: nn.Module, example_input: Any) -> Any:
    """The model's output on ``example_input`` in eval mode (its training mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(example_input, (tuple, list)):
            return model(*example_input)
        if isinstance(example_input, dict):
            return model(**example_input)
        return model(example_input)
    finally:
        model.train(was_training)


def tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors(v)]
    return []


def max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs of the same structure (``inf`` if shapes differ)."""
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return float("inf")
    return max(
        (float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb, strict=True) if x.numel()),
        default=0.0,
    )


def output_scale(output: Any) -> float:
    return max((float(t.float().abs().max()) for t in tensors(output) if t.numel()), default=1.0)
