"""The ``LightningCLI`` behind ``lightning-compress fit|validate|test|predict`` (see :mod:`lightning_compress.cli`)."""


from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["LightningCompressCLI", "run_cli"]

DEFAULT_MODEL = "lightning_compress.examples.DigitsMLP"
DEFAULT_DATA = "lightning_compress.examples.DigitsDataModule"
EXPORT_HELP = (
    "lightning-compress export --ckpt CKPT [--config CONFIG] --out PATH [--format lcdc|onnx|safetensors]: write a "
    "checkpoint as a Deep Compression file, an ONNX file or a Hugging Face directory (see `lightning-compress export --help`)"
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
        _report_recipe_settings(args, self.config.get(self.config.get("subcommand") or "", self.config))

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` resumes where the last run wrote: see :func:`_resolve_last_checkpoint`."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if config.get("ckpt_path") == "last":
            _resolve_last_checkpoint(config)

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        has_test = getattr(self.datamodule, "test_dataloader", None) is not None or hasattr(
            self.model, "test_step"
        )
        if has_test and type(self.model).test_step is not LightningModule.test_step:
            self.trainer.test(self.model, datamodule=self.datamodule)


def _report_recipe_settings(args: Any, config: Any) -> None:
    """Say which of a recipe's ``model``/``data`` settings went to the class that ``--model``/``--data`` swapped in.

    The recipes set ``init_args`` for the digits example (``hidden_sizes``, ``lr``, ``batch_size``). When the
    command line names another class, jsonargparse keeps the values whose names the new class takes and drops the
    others; both happen silently, so this prints them (to stderr) before anything is built.
    """
    argv = [str(a) for a in (sys.argv[1:] if args is None else args if isinstance(args, list) else [])]
    recipe: dict[str, Any] = {}
    for arg, following in zip(argv, [*argv[1:], ""] if argv else [], strict=True):  # argv empty: args was a dict
        path = (
            arg.partition("=")[2] if arg.startswith("--config=") else following if arg == "--config" else ""
        )
        if path and Path(path).is_file():
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            recipe.update({k: v for k, v in loaded.items() if k in ("model", "data") and isinstance(v, dict)})
    for key, given in recipe.items():
        final = config.get(key) or {}
        wanted, used = given.get("init_args") or {}, final.get("init_args") or {}
        if not wanted or given.get("class_path") in (None, final.get("class_path")):
            continue
        applied = ", ".join(f"{k}={v!r}" for k, v in wanted.items() if k in used and used[k] == v)
        dropped = ", ".join(f"{k}={v!r}" for k, v in wanted.items() if k not in used)
        print(
            f"lightning-compress: the recipe's {key} settings were written for {given.get('class_path')}; "
            f"on {final.get('class_path')} applied: {applied or 'none'}; dropped: {dropped or 'none'}"
            + (" (not arguments of that class)" if dropped else ""),
            file=sys.stderr,
        )


def _resolve_last_checkpoint(config: Any) -> None:
    """Make ``ckpt_path: last`` resume the last run: its logger version and its newest checkpoint.

    The recipes' logger writes each run to a new ``<save_dir>/<name>/version_<n>`` folder and Lightning's
    default checkpoints go to its ``checkpoints`` subfolder, so a rerun would look for "last" in a new, empty
    folder and train from the start. Here the newest ``version_<n>`` that holds a checkpoint is reused as the
    logger's version (logs and checkpoints continue there) and ``ckpt_path`` becomes its ``last*.ckpt`` or,
    without one, its most recently written ``.ckpt``. With no such folder (or a logger with a fixed version)
    nothing changes and Lightning resolves ``last`` itself.
    """
    logger = (config.get("trainer") or {}).get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or init.get("version") is not None or init.get("save_dir") is None:
        return
    root = Path(init["save_dir"]) / (init.get("name") or "")
    versions = sorted(
        (int(d.name.split("_", 1)[1]), d)
        for d in (root.glob("version_*") if root.is_dir() else [])
        if d.name.split("_", 1)[1].isdigit() and any((d / "checkpoints").glob("*.ckpt"))
    )
    explicit = [
        cb
        for cb in (config.get("trainer") or {}).get("callbacks") or []
        if hasattr(cb, "get") and (cb.get("init_args") or {}).get("dirpath")
    ]
    if not versions and not explicit:  # (a ModelCheckpoint `dirpath` is searched by Lightning itself)
        print(
            f"lightning-compress: --ckpt_path last: no checkpoint under {root}/version_*/checkpoints",
            file=sys.stderr,
        )
    if not versions:
        return
    number, folder = versions[-1]
    files = sorted(
        (folder / "checkpoints").glob("*.ckpt"), key=lambda f: (f.stem.startswith("last"), f.stat().st_mtime)
    )
    init["version"] = number
    config["ckpt_path"] = str(files[-1])
    print(f"lightning-compress: resuming from {files[-1]} (logging to {folder})", file=sys.stderr)


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


def _our_error(err: BaseException) -> str | None:
    """The message of a ``ValueError``/``TypeError`` that this package raised (also when jsonargparse or Lightning
    re-raised it as another error), prefixed by the class that raised it (``GradualPruning: ...``); ``None`` for
    an error from elsewhere (the user's code, Lightning, torch), whose traceback the user needs."""
    package = Path(__file__).resolve().parent.parent  # lightning_compress/
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = [frame for frame, _ in traceback.walk_tb(current.__traceback__)]
        raised_in = Path(frames[-1].f_code.co_filename).resolve() if frames else None
        if (
            isinstance(current, (ValueError, TypeError))
            and raised_in is not None
            and raised_in.is_relative_to(package)
            and raised_in.parent != Path(__file__).resolve().parent  # not the CLI itself
        ):
            selves = [f.f_locals.get("self") for f in reversed(frames)]
            ours = [s for s in selves if type(s).__module__.startswith("lightning_compress.")]
            owner = next((type(s).__name__ for s in ours if isinstance(s, Callback)), None) or next(
                (type(s).__name__ for s in ours), None
            )
            text = str(current)
            return text if owner is None or text.startswith(owner) else f"{owner}: {text}"
        current = current.__cause__ or current.__context__
    return None

