"""Quantization-aware training: accuracy, artefact size, int8 CPU speed and training overhead.

    python benchmarks/quantization.py            # 3 seeds (a few minutes on 2 CPU cores)
    python benchmarks/quantization.py --quick    # 1 seed, fewer timing repeats

1. Accuracy (mean ± std over seeds) on the digits test split, DigitsMLP 64-300-100-10, 30 epochs for every
   row (the fp32 run's length; QAT rows: float for 10 epochs, fake quantization from epoch 10, observers frozen at
   25, as in the recipes). For each row: the fake-quantized model's accuracy, the converted integer model's
   accuracy, and the bytes of ``torch.save(state_dict)`` of the converted model. DigitsCNN (BatchNorm folded)
   the same for fp32 and W8A8.
2. Inference latency, 1024-wide MLP (1024-1024-1024-1024-10), batch 64, one thread, measured side by side in one
   process (interleaved repeats, median): fp32, our converted int8 model, torch.ao dynamic int8 for reference.
3. Training-step time (forward + backward + SGD step) on the same MLP: fp32, our W8A8 fake quantization,
   torch.ao ``prepare_qat`` (x86 default QAT qconfig).

Every timing uses ``torch.set_num_threads(1)``; the machine is shared, so ratios (measured side by side) are the
numbers to read, not absolute times.
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
from _common import median_times, test_accuracy
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.examples import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_compress.export.quantization import INT8_BACKEND, convert, serialized_size
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 30
QAT_SCHEDULE = dict(start_epoch=10, freeze_observers_epoch=25, convert_on_fit_end=False)
ROWS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "W8A8": dict(weight_bits=8, activation_bits=8, granularity="per_tensor"),
    "W8A8 per-channel": dict(weight_bits=8, activation_bits=8, granularity="per_channel"),
    "W4A8 LSQ": dict(weight_bits=4, activation_bits=8, learn_scale=True),
    "W4 power-of-two": dict(weight_bits=4, activation_bits=None, scheme="power_of_two"),
    "W3 power-of-two": dict(weight_bits=3, activation_bits=None, scheme="power_of_two"),
}
CNN_ROWS = {"fp32": None, "W8A8": dict(weight_bits=8, activation_bits=8, granularity="per_tensor", freeze_bn_epoch=25)}


def train_row(make_model: Any, cfg: dict[str, Any] | None, seed: int) -> dict[str, float]:
    seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    model = make_model()
    callbacks = [] if cfg is None else [QuantizationAwareTraining(**cfg, **QAT_SCHEDULE)]
    trainer = Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.callbacks.extend(callbacks)
    trainer.fit(model, datamodule=dm)
    fake = test_accuracy(model, dm)
    if cfg is None:
        return {"fake_acc": fake, "int_acc": fake, "bytes": serialized_size(model)}
    int_model = convert(model)
    return {"fake_acc": fake, "int_acc": test_accuracy(int_model, dm), "bytes": serialized_size(int_model)}


def _mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def latency(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    fp32 = _mlp().eval()
    x = torch.relu(torch.randn(64, 1024))
    qat = copy.deepcopy(fp32)
    prepare_qat(qat, ["0", "2", "4", "6"], QuantConfig(weight_bits=8, activation_bits=8, granularity="per_tensor"))
    set_qat_flags(qat, fake_quant=True)
    qat.train()
    with torch.no_grad():
        for _ in range(4):
            qat(torch.relu(torch.randn(64, 1024)))
    int8 = convert(qat.eval())
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in torch 2.13 (DeprecationWarning)
        warnings.simplefilter("ignore")
        import torch.ao.quantization as tq

        ao_dynamic = tq.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        err = (int8(x) - qat(x)).abs().max().item()
        t = median_times({"fp32": lambda: fp32(x), "int8 (ours)": lambda: int8(x), "torch.ao dynamic": lambda: ao_dynamic(x)},
                   repeats, inner=20)
    return {**t, "max_abs_diff_vs_fake_quant": err,
            "fp32_bytes": serialized_size(fp32), "int8_bytes": serialized_size(int8)}


def training_overhead(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1024), torch.randint(0, 10, (64,))
    fp32 = _mlp()
    ours = copy.deepcopy(fp32)
    prepare_qat(ours, ["0", "2", "4", "6"], QuantConfig(weight_bits=8, activation_bits=8))
    set_qat_flags(ours, fake_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.quantization as tq

        ao = copy.deepcopy(fp32)
        ao.qconfig = tq.get_default_qat_qconfig("x86")
        ao = tq.prepare_qat(ao.train())
    steps = {}
    for name, model in (("fp32", fp32), ("fake quant (ours)", ours), ("torch.ao prepare_qat", ao)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return median_times(steps, repeats, inner=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    t_start = time.perf_counter()

    results: dict[str, Any] = {"seeds": seeds, "epochs": EPOCHS, "int8_backend": INT8_BACKEND, "mlp": {}, "cnn": {}}
    for group, make, rows in (("mlp", DigitsMLP, ROWS), ("cnn", DigitsCNN, CNN_ROWS)):
        for name, cfg in rows.items():
            runs = [train_row(make, cfg, s) for s in seeds]
            results[group][name] = {k: [r[k] for r in runs] for k in runs[0]}

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"

    print(f"\nDigits test accuracy (%), {len(seeds)} seeds, {EPOCHS} epochs; size = bytes of torch.save(state_dict)\n")
    print("| model | scheme | fake-quant acc | converted acc | Δ vs fp32 (converted) | size (B) | size / fp32 |")
    print("|---|---|---|---|---|---|---|")
    for group in ("mlp", "cnn"):
        base = results[group]["fp32"]
        for name, r in results[group].items():
            delta = statistics.mean(r["int_acc"]) - statistics.mean(base["int_acc"])
            ratio = statistics.mean(r["bytes"]) / statistics.mean(base["bytes"])
            model = "DigitsMLP" if group == "mlp" else "DigitsCNN (BN folded)"
            print(f"| {model} | {name} | {ms(r['fake_acc'])} | {ms(r['int_acc'])} | {delta:+.2f} | "
                  f"{int(statistics.mean(r['bytes'])):,} | {ratio:.3f} |")

    reps = 5 if args.quick else 15
    lat = latency(reps)
    results["latency_s"] = lat
    print("\nInference, MLP 1024-1024-1024-1024-10, batch 64, 1 thread (median of interleaved repeats)\n")
    print("| model | ms / batch | speed-up vs fp32 | size (B) |")
    print("|---|---|---|---|")
    for k in ("fp32", "int8 (ours)", "torch.ao dynamic"):
        size = {"fp32": f"{lat['fp32_bytes']:,}", "int8 (ours)": f"{lat['int8_bytes']:,}"}.get(k, "-")
        print(f"| {k} | {1e3 * lat[k]:.3f} | {lat['fp32'] / lat[k]:.2f}x | {size} |")
    print(f"\nint8 backend: {INT8_BACKEND}; max |int8 - fake-quant| output difference {lat['max_abs_diff_vs_fake_quant']:.2e}")

    tr = training_overhead(reps)
    results["train_step_s"] = tr
    print("\nTraining step (forward + backward + SGD), same MLP, batch 64, 1 thread\n")
    print("| model | ms / step | vs fp32 |")
    print("|---|---|---|")
    for k, v in tr.items():
        print(f"| {k} | {1e3 * v:.2f} | {v / tr['fp32']:.2f}x |")

    mlp = results["mlp"]
    fp = statistics.mean(mlp["fp32"]["int_acc"])
    targets = {
        "W8A8 within 0.3 of fp32": fp - statistics.mean(mlp["W8A8"]["int_acc"]) <= 0.3,
        "W4A8 LSQ within 1.0 of fp32": fp - statistics.mean(mlp["W4A8 LSQ"]["int_acc"]) <= 1.0,
        "W4 power-of-two within 1.5 of fp32": fp - statistics.mean(mlp["W4 power-of-two"]["int_acc"]) <= 1.5,
        "int8 artefact <= 0.27x fp32 bytes": statistics.mean(mlp["W8A8"]["bytes"]) <= 0.27 * statistics.mean(mlp["fp32"]["bytes"]),
        "int8 >= 1.8x faster than fp32": lat["fp32"] / lat["int8 (ours)"] >= 1.8,
        "converted within 0.3 of fake-quant (every row)": all(
            abs(statistics.mean(r["fake_acc"]) - statistics.mean(r["int_acc"])) <= 0.3
            for g in ("mlp", "cnn") for r in results[g].values()
        ),
    }
    results["targets"] = targets
    print("\n" + "\n".join(f"- {k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    results["wall_s"] = time.perf_counter() - t_start
    out = ROOT / "benchmarks/results/quantization.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
