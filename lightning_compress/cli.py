"""The ``lightning-compress`` command: a ``LightningCLI`` whose defaults are the built-in digits example.

    lightning-compress fit --config recipes/digits_baseline.yaml
    lightning-compress fit --config recipes/digits_gradual_pruning.yaml --model my_pkg.MyModule --data my_pkg.MyData

Every subcommand of LightningCLI is there (``fit``, ``validate``, ``test``, ``predict``); compression
callbacks go in ``trainer.callbacks`` of a recipe like any other Lightning callback. One more subcommand writes
the Deep Compression file of a trained checkpoint (see :func:`export_main`):

    lightning-compress export --ckpt last.ckpt --config recipes/digits_deep_compression.yaml --out model.lcdc
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

from lightning_compress.export.lcdc import save_compressed

__all__ = ["LightningCompressCLI", "export_main", "main", "model_from_config", "run_cli"]

DEFAULT_MODEL = "lightning_compress.examples.DigitsMLP"
DEFAULT_DATA = "lightning_compress.examples.DigitsDataModule"
EXPORT_HELP = (
    "lightning-compress export --ckpt CKPT [--config CONFIG] --out FILE: write a checkpoint's weights as a "
    "Deep Compression file (see `lightning-compress export --help`)"
)


class LightningCompressCLI(LightningCLI):
    """LightningCLI with the digits example as default model and data, and TensorBoard as the logger.

    Any ``LightningModule``/``LightningDataModule`` can be given with ``--model``/``--data`` (a class path
    and ``--model.init_args.*``), or in a config file.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, evaluate the final model on the data's test split (if it has one).",
        )
        parser.set_defaults(
            {
                "model": {"class_path": DEFAULT_MODEL},
                "data": {"class_path": DEFAULT_DATA},
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": ".", "name": "lightning_logs"},
                },
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; when ``--model``/``--data`` (or a config) names another class than the digits example, parse
        again without the example as default, so that the example's init-arg defaults (``lr``, ``batch_size``,
        ...) do not leak into a user's class that has arguments of the same names."""
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        swapped = {
            key: None
            for key, default in (("model", DEFAULT_MODEL), ("data", DEFAULT_DATA))
            if (config.get(key) or {}).get("class_path", default) != default
        }
        if not swapped:
            return
        parsers = list(getattr(self, "_subcommand_parsers", {}).values()) or [parser]
        for sub in parsers:
            sub.set_defaults(swapped)
        super().parse_arguments(parser, args)

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        has_test = getattr(self.datamodule, "test_dataloader", None) is not None or hasattr(
            self.model, "test_step"
        )
        if has_test and type(self.model).test_step is not LightningModule.test_step:
            self.trainer.test(self.model, datamodule=self.datamodule)


def run_cli(
    args: list[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any
) -> LightningCompressCLI:
    """Build (and by default run) the CLI; ``args`` (a list, or a config dict) replaces ``sys.argv[1:]``.

    Example:
        >>> cli = run_cli(["--model.hidden_sizes=[16]", "--trainer.logger=false"], run=False)
        >>> type(cli.model).__name__, type(cli.datamodule).__name__
        ('DigitsMLP', 'DigitsDataModule')
    """
    return LightningCompressCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        **kwargs,
    )


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
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{EXPORT_HELP}\n")
    run_cli(None if args is None else argv)  # None: LightningCLI reads sys.argv itself
    return 0


# -- `lightning-compress export`: a checkpoint's weights as a Deep Compression file -----------------------
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
    """``lightning-compress export --ckpt CKPT [--config CONFIG] --out FILE``: compress a checkpoint's weights.

    With ``--config`` (a recipe or a saved ``config.yaml``), the model is built from it and the checkpoint's
    ``state_dict`` is loaded into it with ``strict=True`` before export, so a mismatch is an error; without it the
    checkpoint's ``state_dict`` is written as is. Prints the stage table; returns 0.
    """
    parser = argparse.ArgumentParser(prog="lightning-compress export", description=export_main.__doc__)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) to export")
    parser.add_argument("--config", default=None, help="config (recipe YAML) that builds the model")
    parser.add_argument("--out", required=True, help="compressed file to write")
    parser.add_argument("--quiet", action="store_true", help="do not print the stage table")
    args = parser.parse_args(argv)
    for flag, value in (("--ckpt", args.ckpt), ("--config", args.config)):
        if value is not None and not Path(value).is_file():
            parser.error(f"{flag} {value!r}: no such file")
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        parser.error(f"--ckpt {args.ckpt!r} holds no 'state_dict': not a Lightning checkpoint")
    target: nn.Module | Mapping[str, torch.Tensor] = checkpoint["state_dict"]
    if args.config is not None:
        target = model_from_config(args.config)
        target.load_state_dict(checkpoint["state_dict"], strict=True)
    save_compressed(target, args.out, verbose=not args.quiet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
