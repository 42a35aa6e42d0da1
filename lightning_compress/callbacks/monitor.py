"""CompressionMonitor: sparsity, bit widths and model size, logged to the trainer's loggers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_compress import _sharding
from lightning_compress._validation import check_number, check_state_version
from lightning_compress.callbacks._strategies import refuse_strategy
from lightning_compress.functional.pruning import nm_fraction
from lightning_compress.stats import ModelStats, model_stats

__all__ = ["CompressionMonitor", "format_table"]

_VERSION = 1


class CompressionMonitor(Callback):
    """Log how compressed the model is, counted from its weights, to every logger of the trainer.

    Every ``log_every_n_steps`` optimizer steps and at the end of each validation run it logs:

    - ``compression/sparsity``: fraction of zeros over all layer weights (tensors with >= 2 dims);
    - ``compression/sparsity/<layer>``: the same per layer (module fully-qualified name);
    - ``compression/nonzero_params`` and ``compression/total_params``;
    - ``compression/size_bytes/dense_fp32`` and ``compression/size_bytes/compressed``, and their ratio
      ``compression/ratio`` (see :mod:`lightning_compress.stats` for the storage format counted);
    - ``compression/bits/<layer>`` for layers whose bit width a callback reports;
    - ``compression/pattern_<N>of<M>/<layer>``: the fraction of the layer's groups of M input-dimension neighbours
      with at most N non-zeros, counted from the weights, for layers a callback holds to an N:M pattern
      (``compression_pattern() -> dict`` of weight name -> ``(N, M)``, e.g. ``GradualPruning(pattern="2:4")``);
    - whatever the other callbacks report as scheduled targets, e.g. ``compression/target/sparsity``.

    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` it also writes weight histograms
    (``weights/<layer>``, at validation end) and a custom-scalars layout grouping these charts.
    At the end of fit it prints a per-layer table (rank zero only).

    Under ``ModelParallelStrategy`` (FSDP2-sharded parameters) every figure is the whole model's: each rank counts
    its shards, the counts are summed over the ranks (so every rank takes part in each count) and rank zero logs;
    histograms gather one full weight at a time. ``FSDPStrategy`` and DeepSpeed are refused.

    Other callbacks take part by duck typing: a callback with ``compression_bits(pl_module) -> dict``
    (parameter fully-qualified name -> bits) or ``compression_targets() -> dict`` (name -> value) is
    asked at each log, and one with ``compression_sizes(pl_module) -> dict`` (name -> bytes of a real artefact,
    e.g. a converted integer model) adds ``compression/size_bytes/<name>``. Because it reads the weights, the monitor is right for any method, including
    Lightning's own ``ModelPruning``.

    Args:
        log_every_n_steps: optimizer steps between logs during training (``0``: only at validation end).
        histograms: write weight histograms at validation end (TensorBoard only).
        print_table: print the per-layer table at the end of fit.

    Raises:
        ValueError: ``log_every_n_steps`` is negative.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = CompressionMonitor(log_every_n_steps=10)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, max_epochs=1)
    """

    def __init__(self, log_every_n_steps: int = 50, histograms: bool = True, print_table: bool = True) -> None:
        super().__init__()
        check_number(log_every_n_steps, "log_every_n_steps", low=0, integer=True)
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.print_table = print_table
        self._last_logged_step = -1
        self.last_stats: ModelStats | None = None

    # -- gathering -------------------------------------------------------------------------------
    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[ModelStats, dict[str, float]]:
        """Count the model now and return ``(stats, metrics)``; ``metrics`` is what gets logged."""
        bits: dict[str, int] = {}
        targets: dict[str, float] = {}
        sizes: dict[str, int] = {}
        patterns: dict[str, tuple[int, int]] = {}
        for cb in trainer.callbacks:
            if cb is self:
                continue
            if callable(getattr(cb, "compression_bits", None)):
                bits.update(cb.compression_bits(pl_module))
            if callable(getattr(cb, "compression_targets", None)):
                targets.update(cb.compression_targets())
            if callable(getattr(cb, "compression_sizes", None)):
                sizes.update(cb.compression_sizes(pl_module))
            if callable(getattr(cb, "compression_pattern", None)):
                patterns.update(cb.compression_pattern())
        stats = model_stats(pl_module, bits)
        metrics: dict[str, float] = {
            "compression/sparsity": stats.sparsity,
            "compression/nonzero_params": float(stats.nonzero_params),
            "compression/total_params": float(stats.total_params),
            "compression/size_bytes/dense_fp32": float(stats.dense_fp32_bytes),
            "compression/size_bytes/compressed": float(stats.compressed_bytes),
            "compression/ratio": stats.compression_ratio,
        }
        for layer in stats.layers:
            metrics[f"compression/sparsity/{layer.name}"] = layer.sparsity
        for fqn, b in bits.items():
            metrics[f"compression/bits/{fqn.removesuffix('.weight')}"] = float(b)
        for key, value in targets.items():
            metrics[f"compression/target/{key}"] = float(value)
        for key, value in sizes.items():
            metrics[f"compression/size_bytes/{key}"] = float(value)
        params = dict(pl_module.named_parameters()) if patterns else {}
        for fqn, (n, m) in patterns.items():
            if fqn in params:
                metrics[f"compression/pattern_{n}of{m}/{fqn.removesuffix('.weight')}"] = _nm_fraction(params[fqn], n, m)
        self.last_stats = stats
        return stats, metrics

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, histograms: bool) -> None:
        if not trainer.loggers:
            return
        step = trainer.global_step
        sharded = bool(_sharding.sharded_parameters(pl_module))  # then counting is a collective: every rank counts
        if not trainer.is_global_zero and not sharded:
            self._last_logged_step = step  # the same state on every rank; only rank zero writes
            return
        # logged already at this step (a validation right after a logging step): no optimizer step since, so the
        # same values; write each scalar once per step, only the histograms are new
        scalars = step != self._last_logged_step
        _, metrics = self.collect(trainer, pl_module)
        writes = trainer.is_global_zero
        for logger in trainer.loggers:
            if scalars and writes:
                logger.log_metrics(metrics, step=step)
            if histograms and isinstance(logger, TensorBoardLogger):
                for name, module in pl_module.named_modules():
                    w = getattr(module, "weight", None)
                    if w is not None and hasattr(w, "dim") and w.dim() >= 2:
                        values = _sharding.full(_sharding.local(w.detach()), w)  # a collective when sharded
                        if writes:
                            logger.experiment.add_histogram(f"weights/{name}", values.float().cpu(), step)
        self._last_logged_step = step

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new run logs from its first step (a resumed one gets the step back from its state)
            self._last_logged_step = -1
            refuse_strategy(trainer.strategy, "CompressionMonitor", "its counts are summed over FSDP2 (DTensor) shards only",
                            ("ModelParallelStrategy",))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(_layout())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.log_every_n_steps
        step = trainer.global_step
        if n and step % n == 0 and step != self._last_logged_step:
            self._log(trainer, pl_module, histograms=False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._log(trainer, pl_module, histograms=self.histograms)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.print_table and (trainer.is_global_zero or _sharding.sharded_parameters(pl_module)):
            stats, metrics = self.collect(trainer, pl_module)
            artefacts = {k: v for k, v in metrics.items() if k.startswith("compression/size_bytes/")
                         and k.rpartition("/")[2] not in ("dense_fp32", "compressed")}
            lines = [f"{k.rpartition('/')[2]}: {int(v):,} B (artefact)" for k, v in artefacts.items()]
            _print("\n".join([format_table(stats), *lines]))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, "last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "CompressionMonitor")
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))


def format_table(stats: ModelStats) -> str:
    """A per-layer text table of ``stats`` (params, non-zeros, sparsity, bits) with a total line.

    Example:
        >>> from torch import nn
        >>> from lightning_compress.stats import model_stats
        >>> print(format_table(model_stats(nn.Sequential(nn.Linear(2, 3, bias=False)))))  # doctest: +NORMALIZE_WHITESPACE
        layer  params  nonzero  sparsity  bits
        0           6        6     0.00%    32
        total       6        6     0.00%     -
        size: 24 B dense fp32 -> 24 B compressed (1.00x)
    """
    rows = [("layer", "params", "nonzero", "sparsity", "bits")]
    for layer in stats.layers:
        rows.append((layer.name, str(layer.numel), str(layer.nonzero), f"{layer.sparsity:.2%}", str(layer.bits)))
    rows.append(
        (
            "total",
            str(sum(layer.numel for layer in stats.layers)),
            str(sum(layer.nonzero for layer in stats.layers)),
            f"{stats.sparsity:.2%}",
            "-",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))) for r in rows]
    lines.append(
        f"size: {stats.dense_fp32_bytes:,} B dense fp32 -> {stats.compressed_bytes:,} B compressed "
        f"({stats.compression_ratio:.2f}x)"
    )
    return "\n".join(lines)


def _nm_fraction(weight: torch.Tensor, n: int, m: int) -> float:
    """:func:`nm_fraction` of the whole ``weight``: groups run along rows, so a sharded one's pieces (whole rows)
    are counted where they are, weighted by their rows and summed over the shards."""
    if _sharding.group_of(weight) is None:
        return nm_fraction(weight, n, m)
    piece = _sharding.local(weight.detach())
    part = torch.tensor([nm_fraction(piece, n, m) * piece.shape[0] if piece.shape[0] else 0.0], dtype=torch.float64)
    return float(_sharding.all_reduce(part, weight)) / weight.shape[0]


@rank_zero_only
def _print(text: str) -> None:
    print(text)


def _layout() -> dict[str, Any]:
    """TensorBoard custom-scalars layout: one category, a chart per group of compression tags."""
    charts = {
        "sparsity (actual vs target)": ["Multiline", [r"compression/sparsity$", r"compression/target/.*sparsity.*"]],
        "sparsity per layer": ["Multiline", [r"compression/sparsity/.*"]],
        "size (bytes)": ["Multiline", [r"compression/size_bytes/.*"]],
        "compression ratio": ["Multiline", [r"compression/ratio"]],
        "bits per layer": ["Multiline", [r"compression/bits/.*"]],
        "N:M pattern (fraction of groups)": ["Multiline", [r"compression/pattern_.*"]],
        "accuracy": ["Multiline", [r"val/acc.*", r"test/acc.*"]],
    }
    return {"lightning-compress": charts}
