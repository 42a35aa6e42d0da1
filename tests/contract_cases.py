"""The callback cases of the contract suite (tests/test_contract.py) and what every check shares.

A new callback is covered by adding one :class:`Case` to :data:`CASES`: its class path, a small YAML-writable
configuration for the contract's tiny digits MLP, how to read its compression state (masks, codebooks, scales,
factors) and how to check that it reached its own target.

The contract's run: ``DigitsMLP(hidden_sizes=[16, 8])`` (layers ``net.1``, ``net.3``, ``net.5``) on the first
128 training digits, 4 optimizer steps an epoch, 4 epochs (16 steps), a checkpoint at every epoch end. The
training order is shuffled with a seed per epoch (:class:`EpochSampler`), so a run resumed from an epoch-end
checkpoint sees exactly the batches of an uninterrupted one.

Example:
    >>> [case.name for case in CASES][:3]
    ['pruning', 'quantization', 'distillation']
    >>> build(case_by_name("pruning"), Path(".")).final_sparsity
    0.75
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_compress.examples import DigitsMLP
from lightning_compress.examples.digits import load_digits_tensors

__all__ = [
    "CASES",
    "COMPOSED_SHARDED",
    "FSDP_RUNS",
    "RUNS",
    "Case",
    "ContractDigits",
    "build",
    "callbacks_for",
    "case_by_name",
    "composed",
    "composed_sharded",
    "fit",
    "order_of",
    "ShardedMLP",
    "full_of",
    "small_mlp",
    "state_of",
]

STEPS_PER_EPOCH = 4
EPOCHS = 4
BATCH = 32


# -- data and models -----------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """A shuffle that depends only on the epoch (Lightning calls ``set_epoch``), not on the global RNG; with
    ``world`` processes, process ``rank`` takes every ``world``-th index of it (half of every global batch when
    each process's batch is half the size)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, 0, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = load_digits_tensors()
    return _DIGITS


class ContractDigits(LightningDataModule):
    """The first ``n_train`` digits for training (seeded per-epoch shuffle), the next ``n_val`` for validation.

    ``split``: under several processes each takes its own part of the shuffle (:class:`EpochSampler`), so with half
    the batch size every process gets half of each global batch of the one-process run; the Trainer then needs
    ``use_distributed_sampler=False`` (Lightning's own wrapper would reshuffle the order).
    """

    def __init__(
        self,
        n_train: int = STEPS_PER_EPOCH * BATCH,
        n_val: int = 64,
        batch_size: int = BATCH,
        split: bool = False,
    ) -> None:
        super().__init__()
        x, y = _digits()
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train : n_train + n_val], y[n_train : n_train + n_val])
        self.batch_size, self.split = batch_size, split

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.split else (0, 1)
        sampler = EpochSampler(len(self.train_set), rank=rank, world=world)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def small_mlp() -> DigitsMLP:
    """The contract's model: 64-16-8-10, Adam at 1e-2."""
    return DigitsMLP(hidden_sizes=[16, 8], lr=0.01)


class ShardedMLP(DigitsMLP):
    """The contract MLP sharded with FSDP2 as a user writes it for ``ModelParallelStrategy``: every ``nn.Linear``,
    then the root, ``fully_shard`` over the data-parallel mesh in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__(hidden_sizes=[16, 8], lr=0.01)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


def full_of(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as a full tensor: a ``DTensor`` gathered, a rank's piece of the sharded parameter ``like`` gathered
    (both collectives: every rank calls this in the same order), anything else unchanged."""
    from lightning_compress import _sharding

    if _sharding.is_sharded(t):
        return t.full_tensor()
    if (
        like is not None
        and _sharding.is_sharded(like)
        and tuple(t.shape) == tuple(_sharding.local(like).shape) != tuple(like.shape)
    ):
        return _sharding.full(t, like)
    return t


class MultiInputNet(LightningModule):
    """Forward takes two inputs and a keyword argument and returns a dict (logits under ``"logits"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(32, 16)
        self.enc_b = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.enc_a(a) + self.enc_b(b)) * scale
        return {"logits": self.head(hidden), "hidden": hidden}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        flat = x.flatten(1)
        loss = F.cross_entropy(self(flat[:, :32], flat[:, 32:], scale=0.5)["logits"], y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class TiedNet(LightningModule):
    """A tiny language-model shape: the output layer's weight *is* the embedding's (one shared parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.hidden = nn.Linear(8, 32)
        self.proj = nn.Linear(32, 8)
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(torch.relu(self.hidden(self.embed(tokens).mean(1)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        tokens = (x.flatten(1)[:, 20:28] * 15).round().long()
        loss = F.cross_entropy(self(tokens), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class FrozenMLP(DigitsMLP):
    """The contract MLP with its first layer frozen (``requires_grad=False``), as when fine-tuning a head."""

    def __init__(self) -> None:
        super().__init__(hidden_sizes=[16, 8], lr=0.01)
        self.net[1].requires_grad_(False)


# -- running -------------------------------------------------------------------------------------------
def fit(
    callbacks: list[Callback],
    workdir: Path,
    *,
    model: LightningModule | None = None,
    make_model: Callable[[], LightningModule] | None = None,
    ckpt_path: str | None = None,
    checkpoints: bool = True,
    seed: int = 0,
    data: LightningDataModule | None = None,
    **trainer_kwargs: Any,
) -> tuple[LightningModule, Trainer]:
    """One contract run: seeded model (``model``, or built by ``make_model`` after seeding; default
    :func:`small_mlp`), 4 epochs of 4 steps, an epoch-end checkpoint in ``workdir/ckpt``."""
    seed_everything(seed, verbose=False)
    if model is None:
        model = (make_model or small_mlp)()
    extra: list[Callback] = []
    if checkpoints:
        extra.append(
            ModelCheckpoint(
                dirpath=workdir / "ckpt",
                save_last=True,
                save_top_k=-1,
                every_n_epochs=1,
                filename="{epoch}-{step}",
            )
        )
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=0,
        default_root_dir=str(workdir),
        logger=False,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(trainer_kwargs)
    trainer = Trainer(callbacks=[*callbacks, *extra], **kwargs)
    trainer.fit(model, datamodule=ContractDigits() if data is None else data, ckpt_path=ckpt_path)
    return model, trainer


# -- reading state and checking targets ----------------------------------------------------------------
def _tensors(d: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": torch.as_tensor(v).detach().cpu().clone() for k, v in d.items()}


def _model_keys(model: nn.Module, *needles: str) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().clone() for k, v in model.state_dict().items() if any(n in k for n in needles)
    }


def _weight(model: nn.Module, fqn: str) -> torch.Tensor:
    """The weight named ``fqn``, also once QAT converted its layer (integer layers show it dequantized)."""
    return full_of(model.get_submodule(fqn.rpartition(".")[0]).weight.detach())


def _param(model: nn.Module, fqn: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(fqn)
    except AttributeError:
        return None


def _verify_pruning(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    assert cb.masks, "no masks"
    masks = {fqn: full_of(mask, _param(model, fqn)) for fqn, mask in cb.masks.items()}
    for fqn, mask in masks.items():
        weight = _weight(model, fqn)
        assert bool((weight[~mask.to(weight.device)] == 0).all()), f"masked entries of {fqn}"
    from lightning_compress.targets import match

    pooled = [0, 0]  # pruned, total over the layers ranked together at `final_sparsity`
    for fqn, mask in masks.items():
        layer = fqn.rpartition(".")[0]
        own = next((v for p, v in (cb.layer_sparsity or {}).items() if match(p, layer)), None)
        if own is None:
            pooled[0] += int((~mask).sum())
            pooled[1] += mask.numel()
        else:
            assert float((~mask).float().mean()) >= own - 0.02, (fqn, own)
    assert not pooled[1] or pooled[0] / pooled[1] >= cb.final_sparsity - 0.02, pooled


def _verify_quantization(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    from lightning_compress.layers.quantization import is_qat_module

    if cb.convert_on_fit_end:
        assert cb.converted_bytes and cb.converted_bytes > 0
        assert not any(is_qat_module(m) for m in model.modules()), "still fake-quantized after fit"
        assert all(
            type(model.get_submodule(n)).__module__.startswith("lightning_compress") for n in cb._layers
        )
    else:
        assert cb._layers and all(is_qat_module(model.get_submodule(n)) for n in cb._layers)


def _verify_distillation(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    kd = trainer.callback_metrics.get("distill/kd_loss")
    assert kd is not None and math.isfinite(float(kd)), trainer.callback_metrics


def _verify_low_rank(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    from lightning_compress.layers.low_rank import is_factorized

    assert cb.factorized and cb.layers
    for name, info in cb.layers.items():
        layer = model.get_submodule(name)
        assert is_factorized(layer) and layer.rank == info["rank"], name


def _verify_weight_sharing(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    assert cb.shared and cb.codebooks
    for fqn, codebook in cb.codebooks.items():
        values = torch.unique(_weight(model, fqn))
        assert len(values[values != 0]) <= 2**cb.bits, (fqn, len(values))
        assert len(codebook) <= 2**cb.bits


def _verify_monitor(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    stats, metrics = cb.collect(trainer, model)
    assert 0.0 <= stats.sparsity <= 1.0 and all(math.isfinite(v) for v in metrics.values())


def _monitor_figures(cb: Any) -> dict[str, torch.Tensor]:
    """The counts the monitor logged last (whole-model figures: a sharded model counts every shard)."""
    stats = cb.last_stats
    if stats is None:
        return {}
    names = ("total_params", "nonzero_params", "dense_fp32_bytes", "compressed_bytes")
    return {
        **{f"figure/{n}": torch.tensor(getattr(stats, n)) for n in names},
        **{f"figure/{layer.name}/nonzero": torch.tensor(layer.nonzero) for layer in stats.layers},
    }


def _verify_slimmable(cb: Any, model: nn.Module, trainer: Trainer) -> None:
    from lightning_compress.export.slimmable import slice_width

    narrow = slice_width(model, min(cb.widths))
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Case:
    """One callback under contract.

    Attributes:
        name: test id.
        class_path: import path (what a recipe's ``class_path`` holds).
        args: the callback's YAML-writable ``init_args`` for the contract run, given a work directory (for files).
        kind: what it claims on a parameter (see :mod:`lightning_compress.claims`), ``None`` if nothing.
        read_state: callback, model -> named tensors of its compression state.
        verify: callback, model, trainer -> asserts that the run reached the callback's own target.
        xfail: check name -> reason, for a known failure (strict: a fix makes the test fail until removed).
        fsdp: under FSDP2 (``ModelParallelStrategy``) the callback ``"run"``s to its target, or ``"refuses"``
            the sharded model in ``setup`` with a ``ValueError`` naming the callback and the strategy.
    """

    name: str
    class_path: str
    args: Callable[[Path], dict[str, Any]]
    kind: str | None
    read_state: Callable[[Any, nn.Module], dict[str, torch.Tensor]]
    verify: Callable[[Any, nn.Module, Trainer], None]
    xfail: dict[str, str] = field(default_factory=dict)
    fsdp: Literal["run", "refuses"] = "run"

    @property
    def cls(self) -> type:
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)


TEACHER_FILE = "teacher.pt"


def teacher_checkpoint(workdir: Path) -> str:
    """A fixed teacher (64-32-10 digits MLP, seeded weights) saved as a plain state_dict in ``workdir``."""
    path = workdir / TEACHER_FILE
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            teacher = DigitsMLP(hidden_sizes=[32])
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(teacher.state_dict(), tmp)
        os.replace(tmp, path)
    return str(path)


CASES: list[Case] = [
    Case(
        "pruning",
        "lightning_compress.callbacks.pruning.GradualPruning",
        lambda d: {"final_sparsity": 0.75, "start_step": 1, "end_step": 10, "update_every": 3},
        "prune",
        lambda cb, m: _tensors(cb.masks, "mask"),
        _verify_pruning,
    ),
    Case(
        "quantization",
        "lightning_compress.callbacks.quantization.QuantizationAwareTraining",
        lambda d: {"weight_bits": 4, "activation_bits": 8, "learn_scale": True, "start_step": 2},
        "quantize",
        lambda cb, m: _model_keys(m, "quant", "scale", "zero_point", "packed", "qweight"),
        _verify_quantization,
    ),
    Case(
        "distillation",
        "lightning_compress.callbacks.distillation.KnowledgeDistillation",
        lambda d: {
            "teacher": {
                "class_path": "lightning_compress.examples.DigitsMLP",
                "init_args": {"hidden_sizes": [32]},
            },
            "teacher_checkpoint": teacher_checkpoint(d),
            "temperature": 2.0,
            "alpha": 0.5,
            "feature_pairs": {"net.1": "net.1"},
        },
        None,
        lambda cb, m: _tensors(cb.state_dict()["projections"], "projection"),
        _verify_distillation,
    ),
    Case(
        "low_rank",
        "lightning_compress.callbacks.low_rank.LowRankFactorization",
        lambda d: {"rank_ratio": 0.5, "start_step": 6, "targets": ["net.1", "net.3"]},
        "factorize",
        lambda cb, m: {
            **_model_keys(m, ".down.", ".up."),
            **{f"rank/{k}": torch.tensor(v["rank"]) for k, v in cb.layers.items()},
        },
        _verify_low_rank,
        fsdp="refuses",  # it replaces layers mid-training; sharded parameters cannot follow
    ),
    Case(
        "weight_sharing",
        "lightning_compress.callbacks.weight_sharing.WeightSharing",
        lambda d: {"bits": 3, "start_step": 6},
        "share",
        lambda cb, m: {**_tensors(cb.codebooks, "codebook"), **_tensors(cb.assignments, "assignment")},
        _verify_weight_sharing,
    ),
    Case(
        "monitor",
        "lightning_compress.callbacks.monitor.CompressionMonitor",
        lambda d: {"log_every_n_steps": 2, "histograms": False, "print_table": False},
        None,
        lambda cb, m: {
            "last_logged_step": torch.tensor(cb.state_dict()["last_logged_step"]),
            **_monitor_figures(cb),
        },
        _verify_monitor,
    ),
]


if (Path(__file__).resolve().parents[1] / "lightning_compress" / "callbacks" / "slimmable.py").exists():
    CASES.append(
        Case(
            "slimmable",
            "lightning_compress.callbacks.slimmable.SlimmableTraining",
            lambda d: {"widths": [0.5, 1.0], "num_random": 0, "log_accuracy": False},
            "slim",
            lambda cb, m: {
                "widths": torch.tensor(cb.state_dict()["widths"]),
                **{
                    f"bn/{w}/{n}/{k}": v
                    for w, per in cb.state_dict()["bn_stats"].items()
                    for n, stats in per.items()
                    for k, v in stats.items()
                },
            },
            _verify_slimmable,
            fsdp="refuses",  # it slices weights to narrower widths
        )
    )


def case_by_name(name: str) -> Case:
    """The case called ``name``."""
    return next(c for c in CASES if c.name == name)


def build(case: Case, workdir: Path, **overrides: Any) -> Any:
    """Construct the case's callback from its ``args`` (updated with ``overrides``)."""
    return case.cls(**{**case.args(workdir), **overrides})


# -- runs: one per case, and all methods in one Trainer ---------------------------------------------------
COMPOSED = "composed"
COMPOSED_ORDER = ["low_rank", "pruning", "weight_sharing", "quantization", "distillation", "monitor"]
RUNS = [c.name for c in CASES] + [COMPOSED]
COMPOSED_SHARDED = "composed_sharded"  # under FSDP2: the methods that support it, in one Trainer
COMPOSED_SHARDED_ORDER = ["pruning", "weight_sharing", "quantization", "distillation", "monitor"]
FSDP_RUNS = [*RUNS, COMPOSED_SHARDED]


def composed(workdir: Path) -> list[Callback]:
    """Every method in one Trainer on the contract MLP, each on layers it may share with the others: net.3
    factorized at step 0 (its factors and net.5 fake-quantized from step 2), net.1 and net.5 pruned over steps
    2-10, net.1 shared at step 11, the teacher distilled through logits and a net.1 feature hint."""
    return [
        build(case_by_name("low_rank"), workdir, start_step=0, targets=["net.3"]),
        build(case_by_name("pruning"), workdir, targets=["net.1", "net.5"], start_step=2, update_every=2),
        build(case_by_name("weight_sharing"), workdir, targets=["net.1"], start_step=11),
        build(case_by_name("quantization"), workdir, targets=["net.5", "net.3.down", "net.3.up"]),
        build(case_by_name("distillation"), workdir),
        build(case_by_name("monitor"), workdir),
    ]


def composed_sharded(workdir: Path) -> list[Callback]:
    """The composed run without the methods that refuse FSDP2 (low_rank, slimmable): net.1 and net.5 pruned,
    net.1 shared at step 11, net.3 and net.5 fake-quantized, the teacher distilled, the monitor."""
    return [
        build(case_by_name("pruning"), workdir, targets=["net.1", "net.5"], start_step=2, update_every=2),
        build(case_by_name("weight_sharing"), workdir, targets=["net.1"], start_step=11),
        build(case_by_name("quantization"), workdir, targets=["net.3", "net.5"]),
        build(case_by_name("distillation"), workdir),
        build(case_by_name("monitor"), workdir),
    ]


def order_of(run: str) -> list[str]:
    """The case names of run ``run``, in callback order."""
    return {COMPOSED: COMPOSED_ORDER, COMPOSED_SHARDED: COMPOSED_SHARDED_ORDER}.get(run, [run])


def callbacks_for(run: str, workdir: Path) -> list[Callback]:
    """The callbacks of run ``run`` (a case name, :data:`COMPOSED` or :data:`COMPOSED_SHARDED`)."""
    if run == COMPOSED:
        return composed(workdir)
    if run == COMPOSED_SHARDED:
        return composed_sharded(workdir)
    return [build(case_by_name(run), workdir)]


def state_of(run: str, callbacks: list[Callback], model: nn.Module) -> dict[str, torch.Tensor]:
    """The compression state of every callback of run ``run``."""
    names = order_of(run)
    return {
        f"{name}/{k}": v
        for name, cb in zip(names, callbacks, strict=True)
        for k, v in case_by_name(name).read_state(cb, model).items()
    }
