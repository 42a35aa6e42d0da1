"""One entry point for every file format, for the ``lightning-compress export --format`` command.

Example:
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> out = export_model(nn.Linear(4, 2), "onnx", os.path.join(tempfile.mkdtemp(), "m.onnx"), torch.randn(2, 4))
    >>> os.path.basename(out)
    'm.onnx'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from lightning_compress.export.lcdc import save_compressed
from lightning_compress.export.onnx import to_onnx
from lightning_compress.export.safetensors import save_pretrained

__all__ = ["FORMATS", "export_model"]


def _lcdc(model: nn.Module, out: str, example_input: Any) -> str:
    save_compressed(model, out, verbose=False)
    return out


#: format -> writer(model, out, example_input) returning the path written.
FORMATS: dict[str, Callable[[nn.Module, str, Any], str]] = {
    "onnx": lambda model, out, example_input: to_onnx(model, out, example_input),
    "safetensors": lambda model, out, example_input: save_pretrained(model, out),
    "lcdc": _lcdc,
}


def export_model(
    model: nn.Module,
    format: Literal["onnx", "safetensors", "lcdc"],
    out: str | os.PathLike,
    example_input: Any = None,
) -> str:
    """Write ``model`` in ``format`` to ``out`` and return the path written.

    Args:
        model: a float, prepared (QAT) or converted model; a LightningModule is exported as its ``forward``
            (``onnx``), its one transformers model or itself (``safetensors``), its ``state_dict`` (``lcdc``).
        format: ``onnx`` (:func:`~lightning_compress.export.onnx.to_onnx`: a file for onnxruntime),
            ``safetensors`` (:func:`~lightning_compress.export.safetensors.save_pretrained`: a Hugging Face
            directory in the compressed-tensors layout), or ``lcdc`` (the Deep Compression file).
        out: the file (``onnx``, ``lcdc``) or directory (``safetensors``) to write.
        example_input: one input batch for ``onnx`` (default: the model's ``example_input_array``); unused otherwise.

    Raises:
        ValueError: an unknown ``format``, or the format's own errors (see each writer).
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {sorted(FORMATS)}, got {format!r}")
    return FORMATS[format](model, os.fspath(out), example_input)
