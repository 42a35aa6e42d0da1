"""Callbacks under sharding strategies, single process: a real ``ModelParallelStrategy`` with one CPU device (FSDP2
``fully_shard`` in ``configure_model`` makes every parameter a DTensor, as with more processes), and the refusals
of what is not supported. The two-process comparison with one process is the contract's FSDP2 row."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_compress import (
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankFactorization,
    QuantizationAwareTraining,
    SlimmableTraining,
    WeightSharing,
    _sharding,
)
from lightning_compress.callbacks._strategies import (
    refuse_sharded_parameters,
    refuse_strategy,
    sharding_strategy,
)
from lightning_compress.examples import DigitsMLP
from lightning_compress.stats import model_stats
from tests.contract_cases import ContractDigits


class ShardedMLP(DigitsMLP):
    """The issue's user model: every Linear and the root ``fully_shard``-ed over the data-parallel mesh."""

    def configure_model(self) -> None:
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


@pytest.fixture(autouse=True)
def _own_process_group() -> Iterator[None]:
    """ModelParallelStrategy leaves its (one-process) group and its environment (MASTER_PORT, ranks) behind: take
    both back, so later tests (and the processes they start) begin plain."""
    before, environ = dist.is_initialized(), dict(os.environ)
    yield
    if dist.is_initialized() and not before:
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def _fit(tmp_path: Path, callbacks: list[Callback], max_steps: int = 8, **kwargs: Any) -> tuple[Trainer, DigitsMLP]:
    seed_everything(0)
    model = ShardedMLP(hidden_sizes=[16, 8], lr=0.01)
    ckpt_path = kwargs.pop("ckpt_path", None)
    settings: dict[str, Any] = dict(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        max_steps=max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks,
    )
    trainer = Trainer(**{**settings, **kwargs})
    trainer.fit(model, datamodule=ContractDigits(), ckpt_path=ckpt_path)
    return trainer, model


def test_weight_sharing_shares_the_parameters_fully_shard_made(tmp_path: Path) -> None:
    sharing = WeightSharing(bits=3, start_step=2, verbose=False)
    _, model = _fit(tmp_path, [sharing])
    params = dict(model.named_parameters())
    assert _sharding.sharded_parameters(model)  # the parameters are DTensors, replaced after setup
    for fqn, codebook in sharing.codebooks.items():
        weight = params[fqn].full_tensor().detach()
        assert len(codebook) == 8
        assert torch.equal(torch.unique(weight[weight != 0]), codebook.sort().values)
        assert sharing.assignments[fqn].shape == weight.shape  # full after fit


def test_pruning_and_qat_compress_the_parameters_fully_shard_made(tmp_path: Path) -> None:
    pruning = GradualPruning(final_sparsity=0.8, start_step=0, end_step=4, update_every=2, targets=["net.1", "net.3"])
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, targets=["net.5"], start_step=1)
    _, model = _fit(tmp_path, [pruning, qat])
    params = dict(model.named_parameters())
    assert _sharding.sharded_parameters(model)
    pruned = [params[fqn].full_tensor().detach() for fqn in pruning.masks]
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert zeros >= 0.8 - 1e-3, zeros  # was 0.0: the masks went to the parameters fully_shard replaced
    assert pruning.current_sparsity() == pytest.approx(zeros, abs=1e-3)
    assert type(model.net[5]).__name__.startswith("Int8"), type(model.net[5])  # converted at fit end


def test_weight_sharing_refuses_export_under_model_parallel(tmp_path: Path) -> None:
    sharing = WeightSharing(bits=3, start_step=2, export_path=str(tmp_path / "m.lcdc"))
    with pytest.raises(ValueError, match="WeightSharing: `export_path` cannot be written under ModelParallelStrategy"):
        _fit(tmp_path, [sharing])


def test_smooth_quant_is_refused_under_model_parallel(tmp_path: Path) -> None:
    qat = QuantizationAwareTraining(smooth_quant=0.5, start_step=2)
    with pytest.raises(ValueError, match="QuantizationAwareTraining: `smooth_quant` cannot run under ModelParallelStrategy"):
        _fit(tmp_path, [qat])


@pytest.mark.parametrize(
    ("callback", "name"),
    [
        (LowRankFactorization(rank_ratio=0.5, start_step=2, targets=["net.1", "net.3"]), "LowRankFactorization"),
        (SlimmableTraining(widths=[0.5, 1.0], num_random=0, log_accuracy=False), "SlimmableTraining"),
    ],
)
def test_model_surgery_callbacks_refuse_model_parallel_before_training(
    tmp_path: Path, callback: Callback, name: str
) -> None:
    steps: list[int] = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            steps.append(trainer.global_step)

    with pytest.raises(ValueError, match=f"{name}: cannot run under ModelParallelStrategy, which shards parameters"):
        _fit(tmp_path, [callback, Steps()])
    assert steps == []


def test_monitor_counts_a_sharded_model_as_the_plain_one(tmp_path: Path) -> None:
    class Sparsify(Callback):  # zero small weights through the local pieces
        def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
            with torch.no_grad():
                for p in pl_module.parameters():
                    piece = _sharding.local(p)
                    piece[piece.abs() < 0.05] = 0

    monitor = CompressionMonitor(log_every_n_steps=2, histograms=False, print_table=False)
    _, model = _fit(tmp_path, [Sparsify(), monitor], max_steps=4)
    plain = DigitsMLP(hidden_sizes=[16, 8])
    plain.load_state_dict({n: p.full_tensor() for n, p in model.named_parameters()})
    expected, got = model_stats(plain), model_stats(model)
    assert 0.1 < expected.sparsity < 0.9
    assert (got.nonzero_params, got.total_params, got.compressed_bytes) == (
        expected.nonzero_params, expected.total_params, expected.compressed_bytes
    )
    assert [(layer.name, layer.nonzero) for layer in got.layers] == [(x.name, x.nonzero) for x in expected.layers]


@pytest.mark.slow
def test_distillation_projections_checkpoint_and_resume_exactly_under_model_parallel(tmp_path: Path) -> None:
    def kd() -> KnowledgeDistillation:
        torch.manual_seed(1)
        return KnowledgeDistillation(teacher=DigitsMLP(hidden_sizes=[32]), feature_pairs={"net.1": "net.1"})

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    first = kd()
    _fit(tmp_path, [first, ckpt], max_steps=4, enable_checkpointing=True)  # a DCP checkpoint directory
    saved = first.state_dict()["projection_optimizer"]
    assert saved is not None and saved["state"]  # the projections' own optimizer, in the callback state
    resumed, straight = kd(), kd()
    _fit(tmp_path, [resumed], max_steps=8, ckpt_path=str(tmp_path / "ck" / "epoch=0-step=4.ckpt"))
    _fit(tmp_path, [straight], max_steps=8)
    for key, value in straight.state_dict()["projections"].items():
        assert torch.equal(resumed.state_dict()["projections"][key], value), key


def test_sharding_strategies_are_named_and_refused_unless_supported() -> None:
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its constructor needs the deepspeed package
    assert [sharding_strategy(s) for s in (ModelParallelStrategy(), FSDPStrategy(), deepspeed, DDPStrategy())] == [
        "ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy", None
    ]
    every = (QuantizationAwareTraining, GradualPruning, WeightSharing, KnowledgeDistillation, LowRankFactorization,
             SlimmableTraining)
    for cls in every:
        for strategy in (FSDPStrategy(), deepspeed):
            with pytest.raises(ValueError, match=f"{cls.__name__}: cannot run under {type(strategy).__name__}"):
                refuse_strategy(strategy, cls.__name__, cls._sharding_refusal, cls._sharding_support)
    for cls in (QuantizationAwareTraining, GradualPruning, WeightSharing, KnowledgeDistillation):
        refuse_strategy(ModelParallelStrategy(), cls.__name__, cls._sharding_refusal, cls._sharding_support)
    refuse_strategy(DDPStrategy(), "X", "never")


def test_sharded_parameters_are_refused_at_fit_start(tmp_path: Path) -> None:
    _, model = _fit(tmp_path, [], max_steps=1)
    refuse_sharded_parameters(DigitsMLP(hidden_sizes=[4]), "X", "never")  # plain: nothing to refuse
    with pytest.raises(ValueError, match=r"LowRank: parameters \['net.1.weight', 'net.1.bias', 'net.3.weight'\] \.\.\."):
        refuse_sharded_parameters(model, "LowRank", "it replaces layers")
