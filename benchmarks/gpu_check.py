"""Checks that need a CUDA GPU: run this on one, put the figures (with the GPU's name) in the README.

    python benchmarks/gpu_check.py            # every check
    python benchmarks/gpu_check.py --quick    # fewer steps and timing repetitions
    python benchmarks/gpu_check.py --cpu --quick   # the callback checks on CPU: checks the script, times nothing

Without CUDA (and without ``--cpu``) it prints that it needs CUDA and exits 0 (this project's machines have no GPU;
nothing here has been run on one yet). It exits 1 when a callback misses its target.

Checks:
- ``callbacks``: every callback of the package fits a 2-layer BERT built from a config (``transformers.BertModel``,
  hidden 256, 4 heads, intermediate 1024, no download) with a classification head, in ``bf16-mixed``, for a few
  dozen steps on a synthetic task, and must reach its own target: GradualPruning 50% sparsity over its masks and
  zeros where they say; QuantizationAwareTraining converted layers (no fake-quantized layer left); WeightSharing
  at most 16 distinct values per shared weight; LowRankFactorization factorized layers of the rank it reports;
  KnowledgeDistillation a finite KD loss; CompressionMonitor finite figures; SlimmableTraining trains or refuses the
  model in ``setup`` with a ``ValueError`` (a BERT has no plain hidden width to slim).
- ``overhead``: step time (mean over the steps after warm-up, CUDA synchronized, the periodic mask updates
  included) of plain training, GradualPruning and QuantizationAwareTraining (8-bit weights and activations from
  step 0), in interleaved rounds: the overhead of each over plain training.
- ``semi_structured``: a 2:4-sparse ``nn.Linear`` (4096 x 4096, bias, float16 and bfloat16, batch 1024) stored by
  :func:`lightning_compress.export.to_semi_structured` (``torch.sparse.to_sparse_semi_structured``) against the
  same dense layer: the outputs agree, and the median time of a forward (CUDA events, after warm-up) of each.
  The weights are pruned to 2:4 by :func:`lightning_compress.functional.pruning.nm_mask`, as
  ``GradualPruning(pattern="2:4")`` leaves them. Sparse tensor cores need compute capability >= 8.0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.export import to_semi_structured
from lightning_compress.functional.pruning import nm_mask

ROOT = Path(__file__).resolve().parents[1]


def _time_ms(fn: Any, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def semi_structured(repeats: int, size: int = 4096, batch: int = 1024) -> dict[str, Any]:
    """Dense vs 2:4 semi-structured ``nn.Linear`` at ``size`` x ``size``, batch ``batch``, in fp16 and bf16."""
    rows: dict[str, Any] = {}
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        dense = nn.Linear(size, size).to("cuda", dtype)
        dense.weight.mul_(nm_mask(dense.weight.float(), 2, 4).to(dtype))
        sparse = nn.Sequential(nn.Linear(size, size)).to("cuda", dtype)
        sparse[0].load_state_dict(dense.state_dict())
        converted = to_semi_structured(sparse)
        x = torch.randn(batch, size, device="cuda", dtype=dtype)
        error = float((sparse(x) - dense(x)).abs().max() / dense(x).abs().max())
        dense_ms = _time_ms(lambda d=dense, x=x: d(x), repeats)
        sparse_ms = _time_ms(lambda s=sparse, x=x: s(x), repeats)
        rows[str(dtype).removeprefix("torch.")] = {
            "converted": converted, "relative_max_error": error, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
        }
        print(f"| {dtype} | {dense_ms:.3f} | {sparse_ms:.3f} | {dense_ms / sparse_ms:.2f}x | {error:.1e} |", flush=True)
    return rows


# -- every callback on a small transformer in bf16-mixed ---------------------------------------------------
VOCAB, SEQ, CLASSES, BATCH = 128, 32, 4, 32
HIDDEN = {"cuda": 256, "cpu": 64}  # --cpu only checks the script: a narrower model


class TinyBert(LightningModule):
    """A 2-layer BERT from a config (random weights) with a linear head; label = the second token's id mod 4."""

    def __init__(self, hidden: int = HIDDEN["cuda"], seed: int = 0) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=4 * hidden, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=tokens).last_hidden_state[:, 0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens), labels)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _data(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (steps * BATCH, SEQ), generator=g)
    return DataLoader(TensorDataset(tokens, tokens[:, 1] % CLASSES), batch_size=BATCH, shuffle=False)


class _StepTimer(Callback):
    def __init__(self, sync: bool) -> None:
        self.sync, self.times, self._t0 = sync, [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def _fit(callbacks: list[Callback], steps: int, device: str, model: LightningModule | None = None) -> Any:
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0, verbose=False)
    model = TinyBert(HIDDEN[device]) if model is None else model
    trainer = Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed", max_steps=steps,
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(model, train_dataloaders=_data(steps))
    return model, trainer


_FFN = ["re:bert\\.encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense"]


def _callback_checks(steps: int, device: str) -> dict[str, tuple[Callable[[], Callback], Callable[..., str]]]:
    """name -> (build the callback, check(cb, model, trainer) -> what it reached; raises AssertionError if not)."""
    import lightning_compress as lc
    from lightning_compress.layers.low_rank import is_factorized
    from lightning_compress.layers.quantization import is_qat_module

    def pruning(cb: Any, model: nn.Module, trainer: Any) -> str:
        pruned = total = 0
        for fqn, mask in cb.masks.items():
            weight = model.get_parameter(fqn).detach()
            assert bool((weight[~mask.to(weight.device)] == 0).all()), f"masked entries of {fqn} are not zero"
            pruned, total = pruned + int((~mask).sum()), total + mask.numel()
        assert total and pruned / total >= 0.48, (pruned, total)
        return f"sparsity {pruned / total:.3f} over {len(cb.masks)} weights"

    def quantization(cb: Any, model: nn.Module, trainer: Any) -> str:
        assert cb.converted_bytes and not any(is_qat_module(m) for m in model.modules())
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in cb._layers})
        return f"{len(cb._layers)} layers converted to {', '.join(kinds)}, {cb.converted_bytes:,} B"

    def sharing(cb: Any, model: nn.Module, trainer: Any) -> str:
        most = 0
        for fqn in cb.codebooks:
            values = torch.unique(model.get_parameter(fqn).detach().float())
            most = max(most, len(values[values != 0]))
        assert cb.codebooks and most <= 2**cb.bits, most
        return f"{len(cb.codebooks)} weights, at most {most} distinct values"

    def low_rank(cb: Any, model: nn.Module, trainer: Any) -> str:
        assert cb.layers and all(
            is_factorized(model.get_submodule(n)) and model.get_submodule(n).rank == i["rank"]
            for n, i in cb.layers.items()
        )
        return f"{len(cb.layers)} layers factorized, ranks {sorted({i['rank'] for i in cb.layers.values()})}"

    def distillation(cb: Any, model: nn.Module, trainer: Any) -> str:
        kd = trainer.callback_metrics.get("distill/kd_loss")
        assert kd is not None and math.isfinite(float(kd)), trainer.callback_metrics
        return f"kd loss {float(kd):.4f}"

    def monitor(cb: Any, model: nn.Module, trainer: Any) -> str:
        stats, metrics = cb.collect(trainer, model)
        assert all(math.isfinite(v) for v in metrics.values()) and stats.total_params > 0
        return f"{stats.total_params:,} parameters counted, sparsity {stats.sparsity:.3f}"

    def slimmable(cb: Any, model: nn.Module, trainer: Any) -> str:
        assert trainer.global_step == steps
        return f"trained {steps} steps at widths {list(cb.widths)}"

    return {
        "GradualPruning": (
            lambda: lc.GradualPruning(final_sparsity=0.5, start_step=0, end_step=steps // 2, update_every=4),
            pruning,
        ),
        "QuantizationAwareTraining": (
            lambda: lc.QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=steps // 4), quantization
        ),
        "WeightSharing": (lambda: lc.WeightSharing(bits=4, start_step=steps - 8, targets=_FFN), sharing),
        "LowRankFactorization": (
            lambda: lc.LowRankFactorization(rank_ratio=0.25, start_step=steps // 4, targets=_FFN), low_rank
        ),
        "KnowledgeDistillation": (
            lambda: lc.KnowledgeDistillation(teacher=TinyBert(HIDDEN[device], seed=1), temperature=2.0, alpha=0.5), distillation
        ),
        "CompressionMonitor": (lambda: lc.CompressionMonitor(log_every_n_steps=8, print_table=False), monitor),
        "SlimmableTraining": (lambda: lc.SlimmableTraining(widths=[0.5, 1.0], log_accuracy=False), slimmable),
    }


def callbacks(steps: int, device: str) -> dict[str, Any]:
    """Each callback alone on :class:`TinyBert` in bf16-mixed for ``steps`` steps: reached its target or not."""
    rows: dict[str, Any] = {}
    for name, (make, check) in _callback_checks(steps, device).items():
        cb, timer = make(), _StepTimer(sync=device == "cuda")
        try:
            model, trainer = _fit([cb, timer], steps, device)
        except ValueError as err:  # a refusal must come before the first step
            ok = not timer.times and name == "SlimmableTraining"
            rows[name] = {"ok": ok, "reached": f"refused in setup: {err}"[:300]}
        except Exception as err:  # noqa: BLE001 (reported, and the script exits 1)
            rows[name] = {"ok": False, "reached": f"{type(err).__name__}: {err}"[:300]}
        else:
            try:
                rows[name] = {"ok": True, "reached": check(cb, model, trainer)}
            except AssertionError as err:
                rows[name] = {"ok": False, "reached": f"target missed: {err!r}"[:300]}
        print(f"| {name} | {'ok' if rows[name]['ok'] else 'FAILED'} | {rows[name]['reached']} |", flush=True)
    return rows


def overhead(steps: int, rounds: int, device: str, warmup: int = 5) -> dict[str, Any]:
    """Mean step time of plain training, GradualPruning and QAT (interleaved rounds; median over rounds)."""
    import lightning_compress as lc

    makes: dict[str, Callable[[], list[Callback]]] = {
        "plain": lambda: [],
        "GradualPruning": lambda: [lc.GradualPruning(final_sparsity=0.5, start_step=0, end_step=steps, update_every=4)],
        "QuantizationAwareTraining": lambda: [lc.QuantizationAwareTraining(weight_bits=8, activation_bits=8)],
    }
    per_round: dict[str, list[float]] = {k: [] for k in makes}
    for _ in range(rounds):
        for name, make in makes.items():
            timer = _StepTimer(sync=device == "cuda")
            _fit([*make(), timer], steps, device)
            per_round[name].append(statistics.fmean(timer.times[warmup:]))
    plain = statistics.median(per_round["plain"])
    rows = {}
    for name, times in per_round.items():
        ms = statistics.median(times) * 1e3
        rows[name] = {"ms_per_step": ms, "overhead": ms / (plain * 1e3) - 1.0, "rounds_ms": [t * 1e3 for t in times]}
        print(f"| {name} | {ms:.2f} | {rows[name]['overhead']:+.1%} |", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="run the callback checks on CPU (no timings, no JSON)")
    args = parser.parse_args()
    if args.cpu:
        print("on CPU: callback checks only (bf16-mixed)\n| callback | result | reached |\n|---|---|---|")
        rows = callbacks(24, "cpu")
        return 0 if all(r["ok"] for r in rows.values()) else 1
    if not torch.cuda.is_available():
        print("gpu_check.py needs CUDA (no GPU found): nothing measured")
        return 0
    name = torch.cuda.get_device_name()
    results: dict[str, Any] = {"gpu": name, "torch": torch.__version__}
    print(f"{name}, torch {torch.__version__}\n")
    steps = 24 if args.quick else 48
    print(f"every callback on a 2-layer BERT (hidden 256), bf16-mixed, {steps} steps\n")
    print("| callback | result | reached |\n|---|---|---|")
    results["callbacks"] = callbacks(steps, "cuda")
    rounds = 3 if args.quick else 7
    print(f"\nstep time, mean over steps {5}-{steps} (median of {rounds} interleaved rounds)\n")
    print("| run | ms / step | overhead over plain |\n|---|---|---|")
    results["overhead"] = overhead(steps, rounds, "cuda")
    print("\n2:4 semi-structured vs dense nn.Linear 4096x4096, batch 1024 (median forward time)\n")
    print("| dtype | dense (ms) | 2:4 sparse (ms) | speedup | max error / max output |")
    print("|---|---|---|---|---|")
    results["semi_structured"] = semi_structured(20 if args.quick else 200)
    out = ROOT / "benchmarks/results/gpu_check.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out}")
    return 0 if all(r["ok"] for r in results["callbacks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
