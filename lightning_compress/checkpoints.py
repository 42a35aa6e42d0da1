"""Load what a compression callback saved in a Lightning checkpoint, without the callback or a ``Trainer``.

A checkpoint written mid-run holds a model that a freshly built one cannot load as it is (quantizers, factorized
layers) or per-width statistics the model does not hold: each loader finds its callback's state in the
checkpoint's ``"callbacks"`` entry (by a key only that callback writes, so the callback's ``state_key`` need not
be known) and rebuilds or returns what it needs. All three read the file the same way: ``torch.load`` with
``weights_only=True`` unless told otherwise (a checkpoint whose hyperparameters hold other objects, e.g. a
``Path``, needs ``weights_only=False``: only for checkpoints you trust), with an error saying so.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "x.ckpt")
    >>> torch.save({"callbacks": {"SlimmableTraining{'widths': [1.0, 0.5]}": {"bn_stats": {"0.5": {}}}}}, path)
    >>> load_bn_stats(path, 0.5)
    {}
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.functional.slimmable import width_key
from lightning_compress.layers.low_rank import build_factorized, is_factorized, replace_module
from lightning_compress.layers.quantization import QuantConfig, prepare_qat

__all__ = ["load_bn_stats", "load_factorized_checkpoint", "load_quantized_checkpoint"]


def _callback_states(
    checkpoint_path: str | Path, field: str, callback: str, weights_only: bool, hint: str = ""
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The checkpoint and its callback states that hold ``field`` (state key -> state); at least one.

    Raises:
        ValueError: objects ``weights_only=True`` refuses, not a checkpoint (no mapping), or no such state.
    """
    try:
        checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise ValueError(
            f"`checkpoint_path`: {checkpoint_path} holds objects that torch.load(weights_only=True) refuses"
            f"{what}; if you trust this checkpoint, pass weights_only=False"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"`checkpoint_path`: {checkpoint_path} is not a Lightning checkpoint (a dict)")
    states = {
        k: v for k, v in (checkpoint.get("callbacks") or {}).items() if isinstance(v, dict) and field in v
    }
    if not states:
        raise ValueError(f"`checkpoint_path`: {checkpoint_path} holds no {callback} state{hint}")
    return checkpoint, states


def load_quantized_checkpoint(
    model: nn.Module,
    checkpoint_path: str | Path,
    state_key: str | None = None,
    strict: bool = True,
    *,
    weights_only: bool = True,
) -> nn.Module:
    """Load a checkpoint written during quantization-aware training into a fresh (float) ``model``.

    The model is first prepared as the callback had prepared it (settings and layers are read from the
    callback's state in the checkpoint), then its ``state_dict`` is loaded; quantizer on/off flags and ranges
    come from the checkpoint. Evaluate it as it is (fake-quantized) or pass it to ``convert``.

    Args:
        model: a freshly built model of the same architecture (a LightningModule or any ``nn.Module``).
        checkpoint_path: a Lightning checkpoint (``.ckpt``).
        state_key: which QuantizationAwareTraining's state to use when several wrote one (default: the only one).
        strict: passed to ``load_state_dict``.
        weights_only: passed to ``torch.load`` (``False`` only for checkpoints you trust).

    Returns:
        ``model``, prepared and loaded.

    Raises:
        ValueError: the checkpoint has no (or several, without ``state_key``) QuantizationAwareTraining states,
            or objects that ``weights_only=True`` refuses to load.

    Example:
        >>> import os, tempfile
        >>> from lightning_compress.layers.quantization import QuantConfig, prepare_qat
        >>> trained = nn.Sequential(nn.Linear(8, 4))
        >>> prepare_qat(trained, ["0"], QuantConfig(weight_bits=4))
        >>> state = {"quantization_config": QuantConfig(weight_bits=4).as_dict(), "layers": ["0"]}
        >>> path = os.path.join(tempfile.mkdtemp(), "qat.ckpt")
        >>> torch.save({"state_dict": trained.state_dict(), "callbacks": {"QuantizationAwareTraining": state}}, path)
        >>> type(load_quantized_checkpoint(nn.Sequential(nn.Linear(8, 4)), path)[0]).__name__
        'QATLinear'
    """
    ckpt, states = _callback_states(checkpoint_path, "quantization_config", "QuantizationAwareTraining", weights_only)
    if state_key is not None:
        if state_key not in states:
            raise ValueError(f"`state_key`={state_key!r} not in the checkpoint; it has {list(states)}")
        state = states[state_key]
    elif len(states) == 1:
        state = next(iter(states.values()))
    else:
        raise ValueError(f"{checkpoint_path} holds {len(states)} QuantizationAwareTraining states {list(states)}; give `state_key`")
    config = {k: v for k, v in state["quantization_config"].items() if k != "version"}
    prepare_qat(model, state["layers"], QuantConfig(**config), state.get("bn_pairs", {}))
    model.load_state_dict(ckpt["state_dict"], strict=strict)
    return model


def load_factorized_checkpoint(
    model: nn.Module, checkpoint_path: str | Path, strict: bool = True, *, weights_only: bool = True
) -> nn.Module:
    """Load a checkpoint written after :class:`LowRankFactorization` factorized the model into a fresh ``model``.

    The factorized layers are rebuilt from the callback state(s) in the checkpoint (layer names and ranks), then
    the checkpoint's ``state_dict`` is loaded. A checkpoint written before the factorization loads as it is.

    Args:
        model: a freshly built model of the same architecture (a LightningModule or an ``nn.Module`` whose
            ``state_dict`` keys match the checkpoint's).
        checkpoint_path: a Lightning checkpoint (``.ckpt``).
        strict: passed to ``load_state_dict``.
        weights_only: passed to ``torch.load`` (``False`` only for checkpoints you trust).

    Returns:
        ``model``, with its factorized layers rebuilt and all weights loaded.

    Raises:
        ValueError: the checkpoint holds no ``LowRankFactorization`` state, or objects that ``weights_only=True``
            refuses to load.

    Example:
        >>> import os, tempfile
        >>> from lightning_compress.layers.low_rank import factorize
        >>> trained = nn.Sequential(factorize(nn.Linear(8, 6), 2))  # as saved by a run with the callback
        >>> path = os.path.join(tempfile.mkdtemp(), "last.ckpt")
        >>> state = {"factorized_layers": {"0": {"rank": 2}}}
        >>> torch.save({"state_dict": trained.state_dict(), "callbacks": {"LowRankFactorization": state}}, path)
        >>> load_factorized_checkpoint(nn.Sequential(nn.Linear(8, 6)), path)[0].rank
        2
    """
    ckpt, states = _callback_states(
        checkpoint_path, "factorized_layers", "LowRankFactorization", weights_only, "; load it with `load_state_dict`"
    )
    for state in states.values():
        for name, info in state["factorized_layers"].items():
            layer = model.get_submodule(name)
            if not is_factorized(layer):
                replace_module(model, name, build_factorized(layer, int(info["rank"])))
    model.load_state_dict(ckpt["state_dict"], strict=strict)
    return model


def load_bn_stats(
    checkpoint_path: str | Path, width: float, *, weights_only: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """A width's private BatchNorm statistics from a checkpoint written with :class:`SlimmableTraining`.

    Pass them to :func:`~lightning_compress.export.slimmable.slice_width` to export that width.

    Args:
        checkpoint_path: the Lightning checkpoint.
        width: one of the trained widths.
        weights_only: passed to ``torch.load``; a checkpoint whose hyperparameters hold other objects (a
            ``Path``, a module) needs ``False`` (as ``LightningModule.load_from_checkpoint`` does): only for
            checkpoints you trust.

    Raises:
        ValueError: the checkpoint holds no SlimmableTraining state, or none for ``width``, or objects that
            ``weights_only=True`` refuses to load.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_compress import SlimmableTraining, slice_width
        >>> from lightning_compress.examples import DigitsCNN, DigitsDataModule
        >>> net = DigitsCNN(channels=[4, 8], hidden=16)
        >>> trainer = Trainer(callbacks=[SlimmableTraining(widths=[0.5, 1.0])], max_epochs=1, limit_train_batches=2,
        ...                   limit_val_batches=1, logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(net, DigitsDataModule(batch_size=16))
        >>> path = os.path.join(tempfile.mkdtemp(), "slim.ckpt")
        >>> trainer.save_checkpoint(path)
        >>> stats = load_bn_stats(path, 0.5)
        >>> sorted(stats), stats["net.1"]["running_mean"].shape  # the two BatchNorms, 2 of their 4 channels
        (['net.1', 'net.4'], torch.Size([2]))
        >>> slice_width(net, 0.5, bn_stats=stats)(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """
    _, states = _callback_states(checkpoint_path, "bn_stats", "SlimmableTraining", weights_only)
    stats = next(iter(states.values()))["bn_stats"]
    if width_key(width) not in stats:
        raise ValueError(
            f"`width`: {checkpoint_path} has BatchNorm statistics for widths {sorted(stats)}, not {width!r}"
        )
    return stats[width_key(width)]
