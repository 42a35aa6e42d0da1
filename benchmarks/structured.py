"""Structured compression that makes models physically smaller: thinning after structured pruning, and slimmable
training, on the bundled digits.

    python benchmarks/structured.py            # 3 seeds, 30 epochs
    python benchmarks/structured.py --quick    # 1 seed, 4 epochs (a smoke run; numbers meaningless)

Thinning: DigitsCNN (conv 32-64, fc 128) and a 1024-wide MLP (64-1024-1024-10), each trained dense and with
GradualPruning in ``structured`` mode (50% of the output units of every hidden layer, ranked by L1 norm in each
layer, cubic ramp from epoch 1 to epoch 15, then fine-tuned at 50%), then ``export.thin``. Accuracy is on the test
split (359 digits). Latency: the seed-0 dense and thinned models side by side in this process, eval mode,
``torch.inference_mode()``, ``torch.set_num_threads(1)``, median of 15 alternating rounds, at batch 1 and 256.
The FLOP reduction counts multiply-accumulates of the Linear/Conv layers on the same input.
Target: latency speedup >= 0.8x the FLOP reduction; thinned accuracy within 1.5 points of dense.

Slimmable: DigitsCNN trained once with SlimmableTraining (widths 0.25/0.5/0.75/1.0, sandwich rule with one random
middle width, in-place distillation, private BatchNorm statistics) and exported at each width with
``export.slice_width``; against the same architecture at that width (channels and hidden units scaled by the
width) trained alone with the same recipe. Target: within 1 point at every width.
Every training run: Adam, lr 2e-3, batch 64, 30 epochs (the DigitsCNN defaults).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import quiet_trainer, test_accuracy
from lightning.pytorch import seed_everything
from torch import nn

from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.slimmable import SlimmableTraining
from lightning_compress.examples import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_compress.export.pruning import thin
from lightning_compress.export.slimmable import slice_width
from lightning_compress.graph import channels_at

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [0.25, 0.5, 0.75, 1.0]

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _fit(model: nn.Module, epochs: int, callbacks: list[Any]) -> tuple[nn.Module, DigitsDataModule]:
    data = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(epochs, callbacks, check_val_every_n_epoch=max(1, epochs))
    trainer.fit(model, datamodule=data)
    return model, data


def _cnn(width: float = 1.0) -> DigitsCNN:
    return DigitsCNN(
        channels=[channels_at(width, 32), channels_at(width, 64)], hidden=channels_at(width, 128)
    )


def _models(kind: str) -> tuple[nn.Module, list[str]]:
    if kind == "DigitsCNN":
        return _cnn(), ["net.0", "net.3", "net.8"]
    return DigitsMLP(hidden_sizes=[1024, 1024]), ["net.1", "net.3"]


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the Linear/Conv layers of ``model`` on ``x``."""
    total = 0

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        else:
            total += (
                out.numel()
                * module.in_channels
                // module.groups
                * int(torch.tensor(module.kernel_size).prod())
            )

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@torch.inference_mode()
def latency_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int = 15) -> tuple[float, float]:
    """Median seconds per forward of ``a`` and of ``b`` on ``x``, measured in alternating rounds."""
    a.eval(), b.eval()
    reps = max(5, int(2000 / max(1, x.shape[0])))
    for m in (a, b):
        for _ in range(10):
            m(x)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(rounds):
        for i, m in enumerate((a, b)):
            t0 = time.perf_counter()
            for _ in range(reps):
                m(x)
            times[i].append((time.perf_counter() - t0) / reps)
    return statistics.median(times[0]), statistics.median(times[1])


def thinning(seeds: list[int], epochs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("DigitsCNN", "MLP-1024"):
        dense_acc, thin_acc, masked_acc, kept = [], [], [], []
        for seed in seeds:
            seed_everything(seed, verbose=False)
            dense, data = _fit(_models(kind)[0], epochs, [])
            dense_acc.append(test_accuracy(dense, data))
            seed_everything(seed, verbose=False)
            model, targets = _models(kind)
            pruning = GradualPruning(
                final_sparsity=0.5,
                start_epoch=1,
                end_epoch=epochs // 2,
                update_every=5,
                mode="structured",
                scope="layer",
                targets=targets,
            )
            masked, data = _fit(model, epochs, [pruning])
            masked_acc.append(test_accuracy(masked, data))
            small = thin(masked, data.test_set.tensors[0])
            thin_acc.append(test_accuracy(small, data))
            kept.append({t: int(dict(small.named_modules())[t].weight.shape[0]) for t in targets})
            if seed == seeds[0]:
                x1, x256 = data.test_set.tensors[0][:1], data.test_set.tensors[0][:256]
                flops = macs(dense, x1) / macs(small, x1)
                torch.set_num_threads(1)
                lat = {}
                for name, x in (("batch1", x1), ("batch256", x256)):
                    t_dense, t_thin = latency_pair(dense, small, x)
                    lat[name] = {
                        "dense_ms": 1e3 * t_dense,
                        "thin_ms": 1e3 * t_thin,
                        "speedup": t_dense / t_thin,
                    }
                params = (
                    sum(p.numel() for p in dense.parameters()),
                    sum(p.numel() for p in small.parameters()),
                )
        out[kind] = {
            "dense_acc": _stats(dense_acc),
            "masked_acc": _stats(masked_acc),
            "thin_acc": _stats(thin_acc),
            "units_kept": kept,
            "flop_reduction": flops,
            "latency": lat,
            "params_dense": params[0],
            "params_thin": params[1],
            "acc_target_met": statistics.mean(dense_acc) - statistics.mean(thin_acc) <= 1.5,
            "latency_target_met": {k: v["speedup"] >= 0.8 * flops for k, v in lat.items()},
        }
    return out


def slimmable(seeds: list[int], epochs: int) -> dict[str, Any]:
    slim_acc: dict[float, list[float]] = {w: [] for w in WIDTHS}
    alone_acc: dict[float, list[float]] = {w: [] for w in WIDTHS}
    wall: dict[str, list[float]] = {"slimmable": [], "alone_total": []}
    for seed in seeds:
        seed_everything(seed, verbose=False)
        callback = SlimmableTraining(widths=WIDTHS, num_random=1, distill=True)
        t0 = time.perf_counter()
        model, data = _fit(_cnn(), epochs, [callback])
        wall["slimmable"].append(time.perf_counter() - t0)
        for w in WIDTHS:
            slim_acc[w].append(test_accuracy(slice_width(model, w, bn_stats=callback.bn_stats(w)), data))
        t0 = time.perf_counter()
        for w in WIDTHS:
            seed_everything(seed, verbose=False)
            alone, data = _fit(_cnn(w), epochs, [])
            alone_acc[w].append(test_accuracy(alone, data))
        wall["alone_total"].append(time.perf_counter() - t0)
    rows = {}
    for w in WIDTHS:
        gap = statistics.mean(slim_acc[w]) - statistics.mean(alone_acc[w])
        rows[str(w)] = {
            "slimmable": _stats(slim_acc[w]),
            "alone": _stats(alone_acc[w]),
            "gap": gap,
            "target_met": gap >= -1.0,
        }
    return {"widths": rows, "wall_s": {k: statistics.mean(v) for k, v in wall.items()}}


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["thin", "slim", "all"], default="all")
    args = parser.parse_args()
    seeds, epochs = ([0], 4) if args.quick else ([0, 1, 2], 30)
    path = ROOT / "benchmarks" / "results" / ("structured_quick.json" if args.quick else "structured.json")
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result.update({"seeds": seeds, "epochs": epochs, "torch": torch.__version__})
    if args.part in ("thin", "all"):
        result["thinning"] = thinning(seeds, epochs)
    if args.part in ("slim", "all"):
        result["slimmable"] = slimmable(seeds, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))

    if "thinning" in result:
        print(
            "| model | dense acc (%) | 50% structured, thinned acc (%) | params dense -> thin | FLOP reduction "
            "| speedup batch 1 | speedup batch 256 |"
        )
        print("|---|---|---|---|---|---|---|")
        for kind, r in result["thinning"].items():
            lat = r["latency"]
            print(
                f"| {kind} | {_fmt(r['dense_acc'])} | {_fmt(r['thin_acc'])} | {r['params_dense']:,} -> "
                f"{r['params_thin']:,} | {r['flop_reduction']:.2f}x | {lat['batch1']['speedup']:.2f}x "
                f"({lat['batch1']['dense_ms']:.3f} -> {lat['batch1']['thin_ms']:.3f} ms) | "
                f"{lat['batch256']['speedup']:.2f}x ({lat['batch256']['dense_ms']:.2f} -> "
                f"{lat['batch256']['thin_ms']:.2f} ms) |"
            )
    if "slimmable" in result:
        print("\n| width | slimmable DigitsCNN acc (%) | same width alone (%) | gap (points) |")
        print("|---|---|---|---|")
        for w, r in result["slimmable"]["widths"].items():
            print(f"| {w} | {_fmt(r['slimmable'])} | {_fmt(r['alone'])} | {r['gap']:+.2f} |")
        print(
            f"wall time per seed: slimmable {result['slimmable']['wall_s']['slimmable']:.0f} s, four widths alone "
            f"{result['slimmable']['wall_s']['alone_total']:.0f} s"
        )
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
