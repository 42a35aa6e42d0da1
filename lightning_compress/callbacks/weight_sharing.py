"""WeightSharing: k-means codebooks per layer, then training with the weights tied (Deep Compression)."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress import _sharding, claims
from lightning_compress._validation import check_choice, check_number, check_state_version
from lightning_compress.callbacks import _weight_sharing_parts as parts
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._step_hooks import AfterOptimizerStep
from lightning_compress.callbacks._strategies import resolve_parameters, sharding_strategy
from lightning_compress.export.lcdc import CompressionReport, save_compressed
from lightning_compress.functional import weight_sharing as kmeans
from lightning_compress.schedules import check_starts_in_run, resolve_window, validate_window
from lightning_compress.targets import match, select_modules, validate_patterns

__all__ = ["WeightSharing"]

log = logging.getLogger(__name__)

_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_VERSION = 2  # 2: assignments saved as codes (uint8, 255 unassigned; int16 for 256 values)
_MAX_BITS = 8
_COUNTER = itertools.count(1)


class WeightSharing(_ReleasesModelOnException):
    """Share weights by k-means at a scheduled step, then train the shared values (Han et al., ICLR 2016).

    At the start of optimizer step ``start_step`` (or epoch ``start_epoch``), before its forward pass, the non-zero
    weights of each targeted layer are clustered into at most ``2**bits`` values (1-D k-means, see
    :mod:`lightning_compress.functional.weight_sharing`) and every weight is set to its centroid. Zeros (pruned weights) are not
    clustered and stay exactly zero.

    **Tied training.** From then on, before every optimizer step, each weight's gradient is replaced by its
    cluster's gradient: the **sum** of its members' gradients (the paper's rule; ``reduce="mean"`` for the mean).
    Pruned entries keep their own gradient (zeroed only when the trainer clips gradients, so that the clipping norm
    counts the shared weights alone): the optimizer moves them, the re-tie after the step puts them back to exactly
    zero before any forward, and per-entry optimizers give the shared weights the same trajectory either way (Adam
    is slower on exactly-zero second moments: +80 ms a step on 10M parameters, 90 % of them zero). The optimizer
    state (momentum, Adam moments) of the shared weights is reset at clustering, so every member of a cluster sees
    the same gradients from the same state and any element-wise optimizer (SGD, momentum, Adam, AdamW, weight decay)
    moves them together: the centroid is the trained quantity.
    After each step the weights are re-tied exactly (each cluster takes the new value of one of its members), so
    rounding can never drift members apart. The model is not rewritten: ``weight`` stays a plain parameter holding
    the shared values expanded, so a checkpoint's ``state_dict`` loads into the unmodified module. Codebooks and
    assignments are the callback's state (checkpointed; resuming continues exactly).

    **Sharded (FSDP2, ``ModelParallelStrategy``).** Each rank clusters its piece with the k-means statistics reduced
    over the shards (the codebook is the whole tensor's) and ties cluster gradients over all shards; checkpoints
    hold full assignments. ``export_path`` is refused there; ``FSDPStrategy`` and DeepSpeed are refused.

    **With GradualPruning.** Pruning must have reached its final sparsity before sharing starts (otherwise pruning
    would remove members of clusters): a :class:`~lightning_compress.GradualPruning` on the same weights whose
    window ends at or after the sharing step is an error (its last mask update happens at the start of its end
    step, so start sharing at least one step later, e.g. ``end_epoch: 20`` then ``start_epoch: 21``). Pruning keeps
    enforcing its masks, which only ever zero what sharing already keeps at zero, so the order of the two callbacks
    in the list does not matter.

    **Export.** With ``export_path``, the model is written when training ends (``on_train_end``, so before any
    callback's ``on_fit_end``) with :func:`~lightning_compress.export.lcdc.save_compressed` (relative
    indices, codebook indices and codebooks, Huffman-coded); the stage report is printed and kept in
    :attr:`report`, the file's size is logged as ``compression/size_bytes/deep_compression`` and reported to
    :class:`~lightning_compress.CompressionMonitor` (``compression_sizes``), as are the codebook index widths
    (``compression_bits``).

    Args:
        bits: codebook size ``2**bits`` (1 to 8) for every targeted layer.
        layer_bits: per-layer ``bits`` by layer pattern, e.g. ``{"net.1": 3, "net.5": 5}``.
        init: centroid initialisation: ``linear`` (paper's choice), ``density`` or ``random``.
        start_epoch: epoch (fractions allowed) at which the weights are shared; or give ``start_step``.
        start_step: optimizer step at which the weights are shared (default 0).
        reduce: ``sum`` (paper) or ``mean`` of the members' gradients as a centroid's gradient.
        max_iter: k-means iterations at most.
        seed: seed of the ``random`` initialisation.
        targets: layers to share (names, globs or ``"re:"`` regexes); ``None``: every Linear/Conv layer.
        exclude: layers to leave unshared.
        export_path: write the compressed file here when training ends (rank zero); ``None``: no export.
        verbose: print the stage table at export.

    Raises:
        ValueError: bits outside [1, 8], an unknown ``init``/``reduce``, a bad window, a pattern that matches no
            layer, a start after the run's end, a GradualPruning on the same weights ending after the start, or
            an ``export_path`` that is a directory.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> sharing = WeightSharing(bits=4, layer_bits={"net.5": 5}, start_epoch=20, export_path="model.lcdc")
        >>> trainer = Trainer(callbacks=[sharing], max_epochs=30, logger=False)
    """

    _sharding_refusal = "its k-means statistics are reduced over FSDP2 (DTensor) shards only"
    _sharding_support = ("ModelParallelStrategy",)

    def __init__(
        self,
        bits: int = 4,
        layer_bits: dict[str, int] | None = None,
        init: Literal["linear", "density", "random"] = "linear",
        start_epoch: float | None = None,
        start_step: int | None = None,
        reduce: Literal["sum", "mean"] = "sum",
        max_iter: int = 50,
        seed: int = 0,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        export_path: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_number(bits, "bits", low=1, high=_MAX_BITS, integer=True)
        if layer_bits is not None:
            if not isinstance(layer_bits, dict):
                raise TypeError(f"`layer_bits` must map layer patterns to bits, got {layer_bits!r}")
            validate_patterns(list(layer_bits), "layer_bits")
            for pattern, value in layer_bits.items():
                check_number(value, f"layer_bits[{pattern!r}]", low=1, high=_MAX_BITS, integer=True)
        check_choice(init, "init", kmeans.INITS)
        check_choice(reduce, "reduce", ("sum", "mean"))
        validate_window(start_step, None, start_epoch, None)
        check_number(max_iter, "max_iter", low=1, integer=True)
        check_number(seed, "seed", integer=True, error=TypeError)
        if export_path is not None and (not isinstance(export_path, str) or not export_path):
            raise TypeError(f"`export_path` must be a non-empty string or None, got {export_path!r}")
        validate_patterns(targets, "targets")
        validate_patterns(exclude, "exclude")
        self.bits = bits
        self.layer_bits = layer_bits
        self.init = init
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.reduce = reduce
        self.max_iter = max_iter
        self.seed = seed
        self.targets = targets
        self.exclude = exclude
        self.export_path = export_path
        self.verbose = verbose
        self._owner = f"WeightSharing#{next(_COUNTER)}"
        self._codebooks: dict[str, torch.Tensor] = {}  # weight fqn -> shared values (sorted at clustering)
        self._assignments: dict[str, torch.Tensor] = {}  # fqn -> codes per entry (parts.to_codes)
        self._shared_step = -1  # optimizer step at which the weights were clustered (-1: not yet)
        self.report: CompressionReport | None = None  # of the last export
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._weights: dict[str, nn.Parameter] = {}
        self._layer_bits: dict[str, int] = {}
        self._start: int | None = None
        self._pieces: set[str] = set()  # weights whose assignments are this rank's piece (sharded)
        self._ties: dict[str, parts.Ties] = {}  # weight fqn -> members and one representative per cluster (local piece)
        self._step_hooks = AfterOptimizerStep(self._retie_if_shared)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.bits, targets=self.targets, exclude=self.exclude)

    @property
    def shared(self) -> bool:
        """Whether the weights have been clustered (and are now tied)."""
        return self._shared_step >= 0

    @property
    def codebooks(self) -> dict[str, torch.Tensor]:
        """Current shared values per weight (parameter name -> 1-D tensor); empty before sharing."""
        return {fqn: cb.clone() for fqn, cb in self._codebooks.items()}

    @property
    def assignments(self) -> dict[str, torch.Tensor]:
        """Codebook index of every entry per weight (``-1`` for zeros); empty before sharing. Sharded (FSDP2): this
        rank's rows during fit, the full tensor after it."""
        return {fqn: parts.to_assignments(a) for fqn, a in self._assignments.items()}

    # -- setup -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.export_path is not None and Path(self.export_path).is_dir():
            raise ValueError(
                f"`export_path` {self.export_path!r} is a directory; give the file to write, e.g. "
                f"{str(Path(self.export_path) / 'model.lcdc')!r}"
            )
        if self.export_path is not None and sharding_strategy(trainer.strategy) is not None:
            raise ValueError(
                f"WeightSharing: `export_path` cannot be written under {type(trainer.strategy).__name__} (each "
                "process holds a shard of the weights); set `export_path: null` and export after fit instead"
            )
        self._reset_runtime()
        modules = select_modules(pl_module, self.targets, self.exclude, types=_TYPES)
        overrides = dict(self.layer_bits or {})
        unmatched = [p for p in overrides if not any(match(p, m) for m in modules)]
        if unmatched:
            raise ValueError(
                f"`layer_bits`: pattern(s) {unmatched} match no shared layer; shared layers: {list(modules)}"
            )
        names = {id(p): n for n, p in pl_module.named_parameters(remove_duplicate=False)}
        for module_name, module in modules.items():
            weight = module.weight
            fqn = names[id(weight)]
            if fqn in self._weights:
                continue
            if not weight.requires_grad and self.targets is None:
                rank_zero_warn(
                    f"WeightSharing: skipping {module_name!r}, its weight is frozen (requires_grad=False)"
                )
                continue
            self._weights[fqn] = weight
            self._layer_bits[fqn] = next(
                (v for p, v in overrides.items() if match(p, module_name)), self.bits
            )
        if not self._weights:
            raise ValueError(f"WeightSharing: every targeted layer has frozen weights: {list(modules)}")
        claims.claim(pl_module, list(self._weights), "share", self._owner)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._weights = resolve_parameters(pl_module, list(self._weights), "WeightSharing")  # after configure_model
        self._start, _ = resolve_window(trainer, self.start_step, None, self.start_epoch, None)
        parts.check_pruning_order(trainer, list(self._weights), self._start)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_hooks.attach(trainer)
        # here, not at fit start: ModelParallelStrategy restores callback states after on_fit_start
        if not self.shared:
            given = "start_step" if self.start_step is not None else "start_epoch"
            check_starts_in_run(trainer, self._start, given, "puts weight sharing", "start earlier or train longer")
        if self._assignments and not self._ties:  # restored from a checkpoint
            if set(self._assignments) != set(self._weights):
                raise ValueError(
                    f"WeightSharing: the checkpoint shares {sorted(self._assignments)}, but this run targets "
                    f"{sorted(self._weights)}; resume with the same `targets`/`exclude`"
                )
            for fqn, a in self._assignments.items():
                weight = self._weights[fqn]
                if a.shape != weight.shape:
                    raise ValueError(
                        f"WeightSharing: assignments of {fqn!r} have shape {tuple(a.shape)}, the weight "
                        f"has {tuple(weight.shape)}"
                    )
                self._assignments[fqn] = _sharding.local_like(a, weight)  # this rank's piece
                self._pieces |= {fqn} if _sharding.is_sharded(weight) else set()
                self._codebooks[fqn] = self._codebooks[fqn].to(_sharding.local(weight).device, weight.dtype)
                self._index(fqn)
            self._retie()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_hooks.attach(trainer)  # no-op unless the optimizers were rebuilt
        if not self.shared and self._start is not None and trainer.global_step >= self._start:
            # before the forward: the first tied step's gradient is taken at the shared weights
            self.cluster(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.shared:
            return
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for fqn, weight in self._weights.items():
                if id(weight) not in params or weight.grad is None:
                    continue
                grad, k = _sharding.local(weight.grad), len(self._codebooks[fqn])
                if grad.is_contiguous():  # the usual case: touch only the members (cluster sums over all shards)
                    # the entries of no cluster (pruned) keep their gradient unless the trainer clips: the re-tie
                    # after the step zeroes them anyway, and Adam runs slower on exactly-zero second moments
                    kmeans.tie_gradient_(grad, *self._ties[fqn].members, k, self.reduce, like=weight,
                                         zero_rest=bool(trainer.gradient_clip_val))
                elif not _sharding.is_sharded(weight):
                    a = parts.to_assignments(self._assignments[fqn])
                    grad.copy_(kmeans.cluster_gradient(grad, a, k, self.reduce))
                else:
                    tied = grad.contiguous()
                    grad.copy_(kmeans.tie_gradient_(tied, *self._ties[fqn].members, k, self.reduce, like=weight))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is None or not trainer.is_global_zero:
            return
        if not self.shared:
            rank_zero_warn(
                "WeightSharing: training ended before the weights were shared; exporting them unshared"
            )
        self.report = save_compressed(pl_module, Path(self.export_path), verbose=self.verbose)
        for logger in trainer.loggers:
            logger.log_metrics(
                {"compression/size_bytes/deep_compression": float(self.report.file_bytes)},
                step=trainer.global_step,
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._assignments = {fqn: self._full(fqn, a) for fqn, a in self._assignments.items()}  # full after fit
        self._pieces = set()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._step_hooks.remove()
        claims.release(pl_module, self._owner)
        self._reset_runtime()

    # -- clustering and tying -----------------------------------------------------------------------
    @torch.no_grad()
    def cluster(self, trainer: pl.Trainer | None = None) -> None:
        """Cluster every targeted weight now, tie it to its codebook and reset its optimizer state."""
        generator = torch.Generator().manual_seed(self.seed)
        plan, pieces = {}, {}  # sharded weights: statistics reduced over the shards, assignments of the local piece
        for fqn, weight in self._weights.items():
            piece = _sharding.local(weight)
            codebook, codes = kmeans.share(piece, self._layer_bits[fqn], self.init, self.max_iter, generator, weight)
            codes = parts.to_codes(codes, len(codebook)).cpu()  # the int64 assignments live for one layer only
            (pieces if _sharding.is_sharded(weight) else plan)[fqn] = (codebook.cpu(), codes)
        if trainer is not None:
            plan = trainer.strategy.broadcast(plan, src=0)  # one decision for every process
        for fqn, (codebook, a) in {**plan, **pieces}.items():
            weight = self._weights[fqn]
            piece = _sharding.local(weight)
            self._codebooks[fqn] = codebook.to(piece.device, weight.dtype)
            self._assignments[fqn] = a.to(piece.device)
            self._pieces |= {fqn} if fqn in pieces else set()
            self._index(fqn)
            self._tie(fqn, piece, self._codebooks[fqn])
            for optimizer in trainer.optimizers if trainer is not None else []:
                optimizer.state.pop(weight, None)  # members start from the same (fresh) optimizer state
        self._shared_step = trainer.global_step if trainer is not None else 0
        rank_zero_info(
            "WeightSharing: shared " + ", ".join(f"{f} ({len(c)} values)" for f, c in self._codebooks.items())
        )

    @torch.no_grad()
    def _retie(self, params: set[int] | None = None) -> None:
        for fqn, weight in self._weights.items():
            if fqn not in self._assignments or (params is not None and id(weight) not in params):
                continue
            piece = _sharding.local(weight)
            codebook = self._ties[fqn].codebook(piece, weight)
            self._codebooks[fqn] = codebook
            self._tie(fqn, piece, codebook)

    def _index(self, fqn: str) -> None:
        """Derive the per-step lookups of ``fqn`` from its assignments: one member per cluster, all members."""
        self._ties[fqn] = parts.Ties(self._assignments[fqn], len(self._codebooks[fqn]), self._weights[fqn])

    def _tie(self, fqn: str, weight: torch.Tensor, codebook: torch.Tensor) -> None:
        """Set ``weight`` (a local piece) to ``codebook`` expanded by the assignments (zeros where unassigned)."""
        if weight.is_contiguous():
            self._ties[fqn].expand_(weight, codebook)
        else:
            weight.copy_(kmeans.expand(codebook, parts.to_assignments(self._assignments[fqn])))

    def _retie_if_shared(self, params: set[int]) -> None:
        if self.shared:
            self._retie(params)

    # -- reporting ----------------------------------------------------------------------------------
    def compression_bits(self, pl_module: pl.LightningModule) -> dict[str, int]:
        """Bits of a codebook index per shared weight (``ceil(log2 k)``), for the CompressionMonitor."""
        return {fqn: max(1, math.ceil(math.log2(max(2, len(cb))))) for fqn, cb in self._codebooks.items()}

    def compression_sizes(self, pl_module: pl.LightningModule) -> dict[str, int]:
        """Bytes of the compressed file once exported (``{}`` before), for the CompressionMonitor."""
        return {"deep_compression": self.report.file_bytes} if self.report is not None else {}

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "codebooks": {fqn: cb.detach().cpu().clone() for fqn, cb in self._codebooks.items()},
            "assignments": {  # codes, full and the same on every rank (a collective gather of sharded ones)
                fqn: self._full(fqn, a).cpu() for fqn, a in self._assignments.items()
            },
            "shared_step": self._shared_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "WeightSharing")  # versions 0 and 1: int with -1 unassigned
        self._codebooks = {fqn: cb.clone() for fqn, cb in state_dict.get("codebooks", {}).items()}
        sizes = {fqn: len(self._codebooks.get(fqn, range(256))) for fqn in state_dict.get("assignments", {})}
        self._assignments = {f: parts.to_codes(a, sizes[f]) for f, a in state_dict.get("assignments", {}).items()}
        self._shared_step = int(state_dict.get("shared_step", -1))

    def _full(self, fqn: str, assignments: torch.Tensor) -> torch.Tensor:
        """The full assignments: gathered over the shards while they are a local piece (a collective)."""
        return _sharding.full(assignments, self._weights[fqn]) if fqn in self._pieces else assignments.detach()

