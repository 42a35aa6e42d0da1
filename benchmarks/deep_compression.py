"""Deep Compression on the digits MLP: accuracy and bytes at each stage, and encode/decode speed at 10M parameters.

    python benchmarks/deep_compression.py            # 3 seeds + the 10M-parameter timing
    python benchmarks/deep_compression.py --quick    # 1 seed, one timing round

Accuracy: every run is ``recipes/digits_deep_compression.yaml`` through the real CLI (``lightning-compress fit``,
in process, logger and checkpoints off), with ``--seed_everything=<seed>``, in three variants that differ only in
their callbacks: **dense** (the recipe without GradualPruning and WeightSharing: same model, optimizer, learning
rate and epochs), **pruned** (without WeightSharing) and **pruned + shared** (the whole recipe, which writes the
compressed file when training ends). **Reloaded** is a fresh DigitsMLP built from the recipe with the file loaded
into it (``load_compressed``, strict). Test accuracy on the 359-digit test split, mean ± std over seeds.

Size: the report ``save_compressed`` returns, in the paper's shape: bytes after pruning (fp32 non-zeros +
fixed-width relative indices), after weight sharing (codebook indices at ``ceil(log2 k)`` bits + codebooks) and
after Huffman coding (the file itself); ratio = fp32 bytes of all parameters (biases included) / file bytes
(headers included). Target: >= 50x at no more than 0.5 points below dense.

Speed: a 3000-2000-2000-10 MLP (10.0M parameters) pruned to 90% by magnitude per layer and shared with 4-bit
k-means codebooks (``kmeans.share``); seconds to ``save_compressed`` (encode + write) and ``load_compressed``
(read + decode + checks), median of 3, ``torch.set_num_threads(1)``; the round trip is checked bit-exact.

Clustering: seconds of the one-off ``kmeans.share`` (4 bits) over that MLP's weights, 90% sparse and dense.

Tied-training overhead: the same 90%-sparse MLP trained by a real Trainer (Adam, batch 64, random data, 1 thread)
without a callback, with GradualPruning holding its zeros (one-shot 90% per layer at step 0), and with GradualPruning
+ WeightSharing (4 bits, shared at step 1), side by side in alternating rounds (median of 5): seconds per optimizer
step after a warm-up epoch, and WeightSharing's own time per step (tying the gradients before the step and the
weights after it), measured inside the same runs. Held-at-zero entries leave Adam's second moments exactly zero,
and ``sqrt`` of zeros is several times slower than of positive floats on this CPU, so a pruned step costs more than
a dense one: the sharing overhead is measured against pruning alone. On a machine shared with other jobs the step
times vary by tens of percent between rounds; the callback's own time is the steadier number.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import quiet_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning
from lightning_compress.callbacks.weight_sharing import WeightSharing
from lightning_compress.cli import model_from_config, run_cli
from lightning_compress.export.lcdc import load_compressed, save_compressed
from lightning_compress.functional import weight_sharing as kmeans

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_deep_compression.yaml"
OUT = ROOT / "benchmarks" / "results" / "deep_compression.json"

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _variant(drop: tuple[str, ...], path: Path) -> Path:
    config = yaml.safe_load(RECIPE.read_text())
    config["trainer"]["callbacks"] = [
        cb for cb in config["trainer"]["callbacks"] if not any(cb["class_path"].endswith(d) for d in drop)
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, seed: int) -> Any:
    args = [
        "fit",
        "--config",
        str(config),
        f"--seed_everything={seed}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
    ]
    return run_cli(args)


def accuracy_runs(seed: int) -> dict[str, Any]:
    """Dense, pruned, pruned + shared and reloaded test accuracy (%) and the report of one seed."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cwd = Path.cwd()
        try:
            os.chdir(tmp_path)
            for name, drop in (
                ("dense", ("GradualPruning", "WeightSharing")),
                ("pruned", ("WeightSharing",)),
                ("pruned + shared", ()),
            ):
                cli = _fit(_variant(drop, tmp_path / f"{len(drop)}.yaml"), seed)
                out[name] = 100 * float(cli.trainer.callback_metrics["test/acc"])
                weights = [m.weight for m in cli.model.modules() if isinstance(m, nn.Linear)]
                out[f"sparsity {name}"] = sum(int((w == 0).sum()) for w in weights) / sum(
                    w.numel() for w in weights
                )
            sharing = next(cb for cb in cli.trainer.callbacks if isinstance(cb, WeightSharing))
            assert sharing.report is not None and sharing.export_path is not None
            reloaded = model_from_config(RECIPE)
            load_compressed(sharing.export_path, reloaded, strict=True)
            same = all(torch.equal(reloaded.state_dict()[k], v) for k, v in cli.model.state_dict().items())
            tester = Trainer(
                accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
            )
            out["reloaded"] = 100 * float(
                tester.test(reloaded, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
            )
            out["reloaded bit-exact"] = same
            out["report"] = sharing.report.as_dict()
            out["table"] = sharing.report.format()
        finally:
            os.chdir(cwd)
    return out


def _mlp_10m(seed: int = 0, prune: bool = True, share: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(3000, 2000), nn.ReLU(), nn.Linear(2000, 2000), nn.ReLU(), nn.Linear(2000, 10)
    )
    with torch.no_grad():
        for m in (net[0], net[2], net[4]):
            w = m.weight
            if prune:
                cut = w.abs().flatten().kthvalue(int(0.9 * w.numel())).values
                w.mul_((w.abs() > cut).to(w.dtype))
            if share:
                codebook, a = kmeans.share(w, 4)
                w.copy_(kmeans.expand(codebook, a))
    return net


def clustering_time() -> dict[str, float]:
    """Seconds of the one-off k-means (4 bits, linear init, at most 50 iterations) over the 10M MLP's weights."""
    out = {}
    for name, prune in (("90% sparse", True), ("dense", False)):
        weights = [m.weight for m in _mlp_10m(prune=prune, share=False) if isinstance(m, nn.Linear)]
        t0 = time.perf_counter()
        for w in weights:
            kmeans.share(w, 4)
        out[name] = time.perf_counter() - t0
    return out


def speed(rounds: int) -> dict[str, Any]:
    net = _mlp_10m()
    params = sum(p.numel() for p in net.parameters())
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp10m.lcdc"
        for _ in range(rounds):
            t0 = time.perf_counter()
            report = save_compressed(net, path, verbose=False)
            t1 = time.perf_counter()
            state = load_compressed(path)
            t2 = time.perf_counter()
            saves.append(t1 - t0)
            loads.append(t2 - t1)
        exact = all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    return {
        "params": params,
        "sparsity": 0.9,
        "bits": 4,
        "file_bytes": report.file_bytes,
        "ratio": report.ratio,
        "encode_s": saves,
        "decode_s": loads,
        "bit_exact": exact,
        "threads": 1,
    }


class _Timed(WeightSharing):
    """WeightSharing that adds the time of its per-step work (gradient and weight tying) to ``own``."""

    own = 0.0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        t0 = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        _Timed.own += time.perf_counter() - t0

    def _retie(self, params: Any = None) -> None:
        t0 = time.perf_counter()
        super()._retie(params)
        _Timed.own += time.perf_counter() - t0


class _StepTimer(Callback):
    """Seconds per optimizer step from the start of epoch 1 (after a warm-up epoch) to the end of training."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.t0, self.step0 = time.perf_counter(), trainer.global_step
            _Timed.own = 0.0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps = trainer.global_step - self.step0
        self.per_step = (time.perf_counter() - self.t0) / self.steps


class _Wide(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp_10m()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def overhead(rounds: int, epochs: int = 3, steps: int = 8, batch_size: int = 64) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    n = steps * batch_size
    data = DataLoader(
        TensorDataset(torch.randn(n, 3000, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=batch_size,
    )
    times: dict[str, list[float]] = {
        "no callback": [],
        "GradualPruning": [],
        "GradualPruning + WeightSharing": [],
    }
    own: list[float] = []
    for _ in range(rounds):  # alternate, so that machine noise hits all alike
        for method in times:
            timer = _StepTimer()
            callbacks: list[Callback] = [timer]
            if (
                method != "no callback"
            ):  # holds the zeros: one-shot 90% at step 0 (the weights are pruned already)
                pruning = GradualPruning(0.9, schedule="one_shot", start_step=0, end_step=0, scope="layer")
                callbacks.insert(0, pruning)
            if method == "GradualPruning + WeightSharing":
                callbacks.insert(1, _Timed(bits=4, start_step=1, verbose=False))
            quiet_trainer(epochs, callbacks).fit(_Wide(), data)
            times[method].append(timer.per_step)
            if method == "GradualPruning + WeightSharing":
                own.append(_Timed.own / timer.steps)
    return {"batch_size": batch_size, "step_s": times, "own_s_per_step": own}


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, one timing round")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread is also what the timings below use
    seeds = list(range(1 if args.quick else args.seeds))
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the CLI's own tables
            runs.append(accuracy_runs(seed))
        r = runs[-1]
        print(
            f"seed {seed}: dense {r['dense']:.2f}, pruned {r['pruned']:.2f}, shared {r['pruned + shared']:.2f}, "
            f"reloaded {r['reloaded']:.2f}, {r['report']['ratio']:.1f}x ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    timing = speed(1 if args.quick else 3)
    tied = overhead(1 if args.quick else 5)
    clustering = clustering_time()

    stages = ("dense", "pruned", "pruned + shared", "reloaded")
    acc = {k: [r[k] for r in runs] for k in stages}
    totals = {k: [r["report"]["stages"][k] for r in runs] for k in ("dense", "pruned", "shared", "huffman")}
    ratio = [r["report"]["ratio"] for r in runs]
    drop = statistics.mean(acc["dense"]) - statistics.mean(acc["reloaded"])
    met = statistics.mean(ratio) >= 50 and drop <= 0.5

    print(f"\nDigitsMLP 64-300-100-10, recipe {RECIPE.name}, {len(seeds)} seeds (test acc %, mean ± std)\n")
    print("| model | test acc (%) | weight sparsity | bytes | ratio vs dense fp32 |")
    print("|---|---|---|---|---|")
    rows = (
        ("dense", "dense", "dense"),
        ("pruned", "pruned", "pruned"),
        ("pruned + shared", "pruned + shared", "shared"),
        ("reloaded from file (Huffman)", "reloaded", "huffman"),
    )
    for label, key, stage in rows:
        sp = (
            [r[f"sparsity {key}"] for r in runs]
            if key != "reloaded"
            else [r["sparsity pruned + shared"] for r in runs]
        )
        b = totals[stage]
        x = [d / v for d, v in zip(totals["dense"], b, strict=True)]
        print(
            f"| {label} | {_ms(acc[key])} | {statistics.mean(sp):.2%} | {statistics.mean(b):,.0f} | {_ms(x)}x |"
        )
    print(
        f"\nreloaded == trained model bit-exactly: {all(r['reloaded bit-exact'] for r in runs)}; "
        f"accuracy drop vs dense {drop:+.2f} points; ratio {_ms(ratio)}x; "
        f"target (>= 50x, <= 0.5 points below dense): {'met' if met else 'MISSED'}"
    )
    print(
        f"\nStage table, seed {seeds[0]} (bytes; pruned/shared stages at fixed width, Huffman = the file):\n"
    )
    print(runs[0]["table"])
    print(
        f"\n{timing['params']:,}-parameter MLP, 90% sparse, 4-bit codebooks, 1 thread: file {timing['file_bytes']:,} B "
        f"({timing['ratio']:.1f}x), save (encode) {statistics.median(timing['encode_s']):.2f} s, "
        f"load (decode) {statistics.median(timing['decode_s']):.2f} s, bit-exact {timing['bit_exact']}"
    )
    plain, pruned, shared = (statistics.median(v) for v in tied["step_s"].values())
    own = statistics.median(tied["own_s_per_step"])
    print(
        f"training that MLP, batch 64, Adam, 1 thread, ms/step: {1000 * plain:.1f} without a callback, "
        f"{1000 * pruned:.1f} with GradualPruning holding the 90% zeros ({100 * (pruned / plain - 1):+.1f}%), "
        f"{1000 * shared:.1f} with GradualPruning + WeightSharing ({100 * (shared / pruned - 1):+.1f}% vs pruning "
        f"alone); WeightSharing's own work {1000 * own:.1f} ms/step ({100 * own / pruned:.1f}% of a pruned step)"
    )
    print(
        f"one-off k-means at 4 bits over that MLP's weights: {clustering['90% sparse']:.2f} s (90% sparse), "
        f"{clustering['dense']:.2f} s (dense)"
    )

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "recipe": str(RECIPE.relative_to(ROOT)),
                "seeds": seeds,
                "test_acc": acc,
                "sparsity": {
                    k: [r[f"sparsity {k}"] for r in runs] for k in ("dense", "pruned", "pruned + shared")
                },
                "stage_bytes": totals,
                "ratio": ratio,
                "accuracy_drop_vs_dense": drop,
                "target_met": met,
                "reloaded_bit_exact": [r["reloaded bit-exact"] for r in runs],
                "reports": [r["report"] for r in runs],
                "speed_10m": timing,
                "tied_training_10m": tied,
                "clustering_10m_s": clustering,
            },
            indent=2,
        )
    )
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
