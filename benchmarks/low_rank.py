"""LowRankFactorization: accuracy and size on the digits MLP, and CPU inference latency of factorized layers.

    python benchmarks/low_rank.py            # 3 seeds, latency at batch 1, 32, 256
    python benchmarks/low_rank.py --quick    # 1 seed, fewer timing rounds

Accuracy: DigitsMLP (64-300-100-10), 30 epochs, Adam lr 1e-3, batch 64 (the settings of ``digits_baseline.yaml``),
test split of the bundled digits, seeds 0..2, dense vs the recipe ``digits_low_rank.yaml``: dense for 10 epochs,
then the two hidden layers (``net.1``, ``net.3``) factorized by ``LowRankFactorization(param_ratio=0.25)`` and
fine-tuned for 20 epochs. Parameters are counted from the trained models.

Latency: a 1024-wide MLP (four ``Linear(1024, 1024)`` + ReLU) and the same MLP with every layer factorized at rank
128 by :func:`lightning_compress.layers.low_rank.factorize` (the function the callback calls); forward passes under
``torch.inference_mode`` with ``torch.set_num_threads(1)``, the two models timed alternately in this process
(median over rounds of the mean time per forward). The FLOP reduction counts multiply-adds of the linear layers:
``1024 * 1024`` against ``128 * (1024 + 1024)`` per layer, 4.0x. Target: speedup >= 0.8 x FLOP reduction.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import quiet_trainer
from lightning.pytorch import seed_everything
from torch import nn

from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.layers.low_rank import factorize, is_factorized

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, START_EPOCH, PARAM_RATIO, TARGETS = 30, 10, 0.25, ["net.1", "net.3"]
WIDTH, DEPTH, RANK = 1024, 4, 128

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning_compress").setLevel(logging.ERROR)


def _layer_params(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def train(seed: int, low_rank: bool) -> dict[str, Any]:
    seed_everything(seed)
    model = DigitsMLP(hidden_sizes=[300, 100], lr=1e-3)
    dense_layer_params = _layer_params(model, TARGETS)
    callbacks = [LowRankFactorization(param_ratio=PARAM_RATIO, start_epoch=START_EPOCH, targets=TARGETS)] if low_rank else []
    trainer = quiet_trainer(EPOCHS, callbacks)
    data = DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)
    acc = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    if low_rank:
        assert all(is_factorized(model.get_submodule(n)) for n in TARGETS)
    return {
        "seed": seed,
        "test_acc": 100 * acc,
        "params": sum(p.numel() for p in model.parameters()),
        "layer_params": _layer_params(model, TARGETS),
        "dense_layer_params": dense_layer_params,
        "ranks": {n: getattr(model.get_submodule(n), "rank", None) for n in TARGETS},
    }


def _mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers).eval()


@torch.inference_mode()
def latency(batch: int, rounds: int, target_s: float = 0.2) -> dict[str, float]:
    torch.manual_seed(0)
    dense = _mlp()
    low = copy.deepcopy(dense)
    for i in range(0, 2 * DEPTH, 2):
        low[i] = factorize(dense[i], RANK)
    x = torch.randn(batch, WIDTH)
    for m in (dense, low):  # warm-up
        for _ in range(5):
            m(x)
    t0 = time.perf_counter()
    dense(x)
    iters = max(5, int(target_s / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {"dense": [], "low_rank": []}
    for _ in range(rounds):
        for name, m in (("dense", dense), ("low_rank", low)):
            t0 = time.perf_counter()
            for _ in range(iters):
                m(x)
            times[name].append((time.perf_counter() - t0) / iters)
    d, r = statistics.median(times["dense"]), statistics.median(times["low_rank"])
    macs_dense = DEPTH * WIDTH * WIDTH
    macs_low = DEPTH * RANK * (WIDTH + WIDTH)
    return {"batch": batch, "dense_ms": 1e3 * d, "low_rank_ms": 1e3 * r, "speedup": d / r,
            "flop_reduction": macs_dense / macs_low}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    runs = {kind: [train(s, kind == "low_rank") for s in seeds] for kind in ("dense", "low_rank")}

    dense_acc = _mean_sd([r["test_acc"] for r in runs["dense"]])
    low_acc = _mean_sd([r["test_acc"] for r in runs["low_rank"]])
    gap = dense_acc[0] - low_acc[0]
    layer_reduction = runs["dense"][0]["layer_params"] / runs["low_rank"][0]["layer_params"]
    print(f"### Digits MLP, hidden layers factorized to {PARAM_RATIO:.0%} of their parameters ({len(seeds)} seeds)\n")
    print("| model | test acc (%) | params (model) | params (net.1 + net.3) | ranks |")
    print("|---|---|---|---|---|")
    for kind, (mean, sd) in (("dense", dense_acc), ("low_rank", low_acc)):
        r = runs[kind][0]
        ranks = ", ".join(f"{n}: {v}" for n, v in r["ranks"].items()) if kind == "low_rank" else "full"
        print(f"| {kind} | {mean:.2f} ± {sd:.2f} | {r['params']:,} | {r['layer_params']:,} | {ranks} |")
    acc_ok, size_ok = gap <= 1.0, layer_reduction >= 4.0 - 1e-9
    print(f"\naccuracy gap {gap:+.2f} points (target <= 1.0: {'met' if acc_ok else 'MISSED'}), "
          f"{layer_reduction:.2f}x fewer parameters in the factorized layers (target 4x: {'met' if size_ok else 'MISSED'})\n")

    rounds = 3 if args.quick else 7
    lat = [latency(b, rounds) for b in (1, 32, 256)]
    print(f"### CPU inference latency, {DEPTH} x Linear({WIDTH}, {WIDTH}) dense vs rank {RANK}, 1 thread\n")
    print("| batch | dense (ms) | low-rank (ms) | speedup | FLOP reduction | target (>= 0.8x FLOP red.) |")
    print("|---|---|---|---|---|---|")
    for row in lat:
        ok = row["speedup"] >= 0.8 * row["flop_reduction"]
        row["target_met"] = ok
        print(f"| {row['batch']} | {row['dense_ms']:.3f} | {row['low_rank_ms']:.3f} | {row['speedup']:.2f}x | "
              f"{row['flop_reduction']:.1f}x | {'met' if ok else 'MISSED'} |")

    out = ROOT / "benchmarks/results/low_rank.json"
    out.write_text(json.dumps({
        "settings": {"epochs": EPOCHS, "start_epoch": START_EPOCH, "param_ratio": PARAM_RATIO, "targets": TARGETS,
                     "latency_mlp": {"width": WIDTH, "depth": DEPTH, "rank": RANK, "threads": 1}},
        "seeds": seeds,
        "accuracy": runs,
        "accuracy_gap_points": gap,
        "layer_param_reduction": layer_reduction,
        "latency": lat,
        "torch": torch.__version__,
    }, indent=2))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
