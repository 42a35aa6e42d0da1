"""The ``lightning-compress`` command: a ``LightningCLI`` whose defaults are the built-in digits example.

    lightning-compress fit --config recipes/digits_baseline.yaml
    lightning-compress fit --config recipes/digits_gradual_pruning.yaml --model my_pkg.MyModule --data my_pkg.MyData

Every subcommand of LightningCLI is there (``fit``, ``validate``, ``test``, ``predict``); compression
callbacks go in ``trainer.callbacks`` of a recipe like any other Lightning callback. One more subcommand writes
the Deep Compression file of a trained checkpoint (see :func:`export_main`):

    lightning-compress export --ckpt last.ckpt --config recipes/digits_deep_compression.yaml --out model.lcdc
    lightning-compress export --ckpt last.ckpt --config recipes/digits_qat_int8.yaml --format onnx --out model.onnx
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning_compress.cli._export import export_main, model_from_config
from lightning_compress.cli._lightning import EXPORT_HELP, LightningCompressCLI, _our_error, run_cli

__all__ = ["LightningCompressCLI", "export_main", "main", "model_from_config", "run_cli"]


def main(args: Sequence[str] | None = None) -> int:
    """Console entry point of ``lightning-compress``; ``args`` replaces ``sys.argv[1:]``.

    ``export`` goes to :func:`export_main`; everything else to the
    LightningCLI (``fit``, ``validate``, ``test``, ``predict``). Returns the exit status.

    Example:
        >>> main(["export", "--help"])  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    argv = list(sys.argv[1:] if args is None else args)
    if os.getcwd() not in sys.path and "" not in sys.path:  # import the user's modules as `python -m` would
        sys.path.insert(0, os.getcwd())
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{EXPORT_HELP}\n")
    try:
        run_cli(None if args is None else argv)  # None: LightningCLI reads sys.argv itself
    except (ValueError, TypeError) as err:
        message = _our_error(err)
        if message is None or os.environ.get("LIGHTNING_COMPRESS_TRACEBACK"):
            raise
        print(f"lightning-compress: error: {message}", file=sys.stderr)
        print("(set LIGHTNING_COMPRESS_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 2
    return 0
