"""``lightning-compress export``: a trained checkpoint as a file a runtime loads (lcdc, ONNX, safetensors)."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.checkpoints import load_factorized_checkpoint, load_quantized_checkpoint
from lightning_compress.cli._lightning import run_cli
from lightning_compress.export.deploy import FORMATS, export_model
from lightning_compress.export.lcdc import save_compressed
from lightning_compress.export.onnx import to_onnx
from lightning_compress.export.quantization import convert as convert_quantized

__all__ = ["export_main", "model_from_config"]


def model_from_config(config: str | Path) -> nn.Module:
    """The model a ``lightning-compress`` config (a recipe, or the ``config.yaml`` a fit run saved) builds.

    The config is read by the same ``LightningCLI`` as ``lightning-compress fit`` (so defaults, ``--model``
    class paths and init args mean the same), without running anything and without a logger.

    Raises:
        ValueError: the file is not a YAML mapping.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "config.yaml")
        >>> with open(path, "w") as f:
        ...     _ = f.write("model: {class_path: lightning_compress.examples.DigitsMLP, init_args: {hidden_sizes: [8]}}")
        >>> model = model_from_config(path)
        >>> type(model).__name__, model.net[1].out_features
        ('DigitsMLP', 8)
    """
    import yaml

    loaded = yaml.safe_load(Path(config).read_text())
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(f"`--config` {str(config)!r} must be a YAML mapping, got {type(loaded).__name__}")
    # only what builds the model: a saved config also holds run settings (`ckpt_path`, ...) and callbacks
    loaded = {k: v for k, v in loaded.items() if k in ("model", "data", "seed_everything")}
    loaded["trainer"] = {"logger": False}
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*args parameter is intended.*"
        )  # export's own argv is not its
        cli = run_cli(loaded, run=False)
    return cli.model


def export_main(argv: Sequence[str] | None = None) -> int:
    """``lightning-compress export --ckpt CKPT [--config CONFIG] --out PATH [--format lcdc|onnx|safetensors]
    [--onnx-embeddings float|int8]``.

    ``lcdc`` (the default) writes the Deep Compression file of the checkpoint's weights: with ``--config`` (a
    recipe or a saved ``config.yaml``) the model is built from it and the checkpoint's ``state_dict`` is loaded with
    ``strict=True`` first, so a mismatch is an error; without it the ``state_dict`` is written as is. ``onnx`` and
    ``safetensors`` need ``--config``: the model is built, its weights loaded (a quantization-aware-trained
    checkpoint is rebuilt with its fake-quant layers and converted, a factorized one with its factors), and written by
    :func:`lightning_compress.export.export_model` (``onnx``: :func:`~lightning_compress.export.to_onnx` with
    ``embeddings=--onnx-embeddings``, int8 per-row embedding tables post-training). Returns 0.
    """
    parser = argparse.ArgumentParser(prog="lightning-compress export", description=export_main.__doc__)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) to export")
    parser.add_argument("--config", default=None, help="config (recipe YAML) that builds the model")
    parser.add_argument("--out", required=True, help="file (lcdc, onnx) or directory (safetensors) to write")
    parser.add_argument("--format", default="lcdc", choices=sorted(FORMATS), help="artefact format (default: lcdc)")
    parser.add_argument("--quiet", action="store_true", help="do not print the stage table (lcdc)")
    parser.add_argument("--onnx-embeddings", default="float", choices=["float", "int8"],
                        help="onnx: nn.Embedding tables as float (default) or int8 per row (to_onnx's `embeddings`)")
    args = parser.parse_args(argv)
    if args.onnx_embeddings != "float" and args.format != "onnx":
        parser.error(f"--onnx-embeddings {args.onnx_embeddings} applies to --format onnx only, got --format {args.format}")
    for flag, value in (("--ckpt", args.ckpt), ("--config", args.config)):
        if value is not None and not Path(value).is_file():
            parser.error(f"{flag} {value!r}: no such file")
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        parser.error(f"--ckpt {args.ckpt!r} holds no 'state_dict': not a Lightning checkpoint")
    if args.format != "lcdc":
        if args.config is None:
            parser.error(f"--format {args.format} needs --config to build the model the checkpoint belongs to")
        model = _load_for_deploy(model_from_config(args.config), args.ckpt, checkpoint)
        if args.format == "onnx":
            print(f"wrote {to_onnx(model, args.out, embeddings=args.onnx_embeddings)}")
        else:
            print(f"wrote {export_model(model, args.format, args.out)}")
        return 0
    unexportable = _written_by_a_layer_changing_callback(checkpoint)
    if unexportable:
        parser.error(f"--ckpt {args.ckpt!r} {unexportable}")
    target: nn.Module | Mapping[str, torch.Tensor] = checkpoint["state_dict"]
    if args.config is not None:
        target = model_from_config(args.config)
        target.load_state_dict(checkpoint["state_dict"], strict=True)
    save_compressed(target, args.out, verbose=not args.quiet)
    return 0


def _load_for_deploy(model: nn.Module, path: str, checkpoint: Mapping[str, Any]) -> nn.Module:
    """``model`` with the checkpoint's weights, its QAT layers converted to integers or its factors rebuilt."""
    names = {str(key).partition("{")[0] for key in (checkpoint.get("callbacks") or {})}
    if "QuantizationAwareTraining" in names:
        return convert_quantized(load_quantized_checkpoint(model, path))
    if "LowRankFactorization" in names:
        return load_factorized_checkpoint(model, path)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model


def _written_by_a_layer_changing_callback(checkpoint: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's weights are not the model's own layers (QAT's fake-quantized layers, factorized
    layers), with how to load it instead; ``None`` when they are."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        name, layers = str(key).partition("{")[0], []
        if name == "QuantizationAwareTraining" and isinstance(state, Mapping):
            layers = list(state.get("layers") or [])
            how = "load it with `convert_quantized(load_quantized_checkpoint(Model(), ckpt))` (an integer model)"
        elif name == "LowRankFactorization" and isinstance(state, Mapping) and state.get("factorized"):
            layers = list(state.get("factorized_layers") or [])
            how = "load it with `load_factorized_checkpoint(Model(), ckpt)`"
        if layers:
            return (
                f"was written by {name}: its layers {layers} are not the model's own layers, which a Deep "
                f"Compression file holds; {how} and save that with torch.save"
            )
    return None
