"""Low-bit formats: the int4 group-wise kernel against fp32/bf16 Linear, and digits quality of each format against
torchao's QAT.

    python benchmarks/formats.py            # kernel table + 3 seeds x 7 formats x 2 frameworks (~20 min on 2 cores)
    python benchmarks/formats.py --quick    # fewer timing rounds, 1 seed, 10 epochs
    python benchmarks/formats.py --kernel-only
    python benchmarks/formats.py --epochs 15  # the stored run: 3 seeds, 15 epochs (QAT from epoch 5)

1. Kernel: a 4096x4096 Linear at batch 1 and 16, one thread, side by side in one process (alternating rounds,
   median): fp32 ``nn.Linear``, bf16 ``nn.Linear``, and our converted W4 group-128 layer (``GroupwiseLinear`` on
   ``torch.ops.aten._weight_int4pack_mm_for_cpu``, bf16 activations), with its error against the fake-quantized
   fp32 layer it came from.
2. Quality: DigitsMLP 64-256-128-10 (every in_features a multiple of 32, as groups of 32 and MX blocks need),
   30 epochs (the stored run: 15, see --epochs), Adam 1e-3, one thread; QAT rows train in float for 10 epochs, then fake-quantize (observers frozen at 25 for the
   static row). Accuracy (%) on the held-out test split, mean ± std over seeds, of our fake-quantized and converted
   models; bits per weight counted from the converted layers' stored tensors (codes + scales + zero points) over
   the quantized layers; torchao 0.18's QAT (``quantize_(model, QATConfig(..., step="prepare"))`` at the same
   epoch, same data, same seed) for the same format, fake-quantized accuracy. The g128 rows leave the first layer
   (64 inputs, fewer than one group) in float in both frameworks.

3. MiniLM: the same formats on the pretrained all-MiniLM-L6-v2, ours and torchao's, are in
   ``benchmarks/formats_minilm.py`` (the ``minilm`` section of the same JSON, kept when this script rewrites it).

Timings share a 2-core machine with other work: read the ratios (measured side by side), not the absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import median_times, quiet_trainer, test_accuracy
from lightning.pytorch import Callback, seed_everything
from torch import nn

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.export.low_bit import LOW_BIT_LAYERS, weight_storage_bits
from lightning_compress.export.quantization import Int8Linear, PackedLinear, convert
from lightning_compress.functional.quantization import sqnr_db
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

ROOT = Path(__file__).resolve().parents[1]
START, FREEZE = 10, 25
ROWS: dict[str, dict[str, Any]] = {
    "W8A8 static": dict(weight_bits=8, activation_bits=8),
    "W8A8 per-token dynamic": dict(weight_bits=8, activation_bits=8, activation_granularity="per_token", dynamic=True),
    "W4A16 g128": dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=128, exclude=["net.1"]),
    "W4A16 g32": dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=32),
    "fp8 e4m3 (weights, per channel)": dict(scheme="fp8_e4m3", activation_bits=None),
    "MXFP8 (weights + inputs)": dict(scheme="mxfp8", activation_bits=8, dynamic=True),
    "MXFP4 (weights + inputs)": dict(scheme="mxfp4", weight_bits=4, activation_bits=4, dynamic=True),
}


@torch.no_grad()
def kernel_table(rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp32 = nn.Linear(4096, 4096).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    qat = nn.Sequential(copy.deepcopy(fp32))
    prepare_qat(qat, ["0"], QuantConfig(weight_bits=4, activation_bits=None, granularity="per_group", group_size=128))
    set_qat_flags(qat, fake_quant=True)
    int4 = convert(qat)[0]
    out: dict[str, Any] = {"threads": 1, "shape": [4096, 4096], "group_size": 128, "kernel": int4.kernel,
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for batch in (1, 16):
        x = torch.randn(batch, 4096)
        xb = x.to(torch.bfloat16)
        ref = qat(x)
        y = int4(x)
        packed, sz = int4._kernel_weight(x.device)  # the kernel alone, on the same packed weight: our layer's overhead
        t = median_times({"fp32": lambda x=x: fp32(x), "bf16": lambda xb=xb: bf16(xb),
                           "int4 g128 (ours)": lambda x=x: int4(x),
                           "int4 kernel alone": lambda xb=xb, p=packed, s=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, 128, s)},
                          rounds, inner=10 if batch == 1 else 4)
        out[f"batch_{batch}"] = {
            "ms": {k: 1e3 * v for k, v in t.items()},
            "speedup_vs_fp32": {k: t["fp32"] / v for k, v in t.items()},
            "max_rel_err_vs_fake_quant": ((y - ref).abs().max() / ref.abs().max()).item(),
            "sqnr_db_vs_fake_quant": sqnr_db(ref, y),
        }
    out["bits_per_weight"] = weight_storage_bits(int4)
    return out


class _TorchaoQAT(Callback):
    """Applies torchao's QAT prepare (``quantize_``) to the model at the start of epoch ``start``."""

    def __init__(self, configs: dict[str, Any], start: int, skip: tuple[str, ...] = ()) -> None:
        self.configs, self.start, self.skip = configs, start, skip

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if trainer.current_epoch == self.start:
            from torchao.quantization import quantize_
            from torchao.quantization.qat import QATConfig

            quantize_(pl_module, QATConfig(**self.configs, step="prepare"),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in self.skip)


def _torchao_configs(name: str) -> dict[str, Any] | None:
    from torchao.prototype.qat.mx import MXFakeQuantizeConfig
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.qat import Float8FakeQuantizeConfig, IntxFakeQuantizeConfig

    if name == "W8A8 per-token dynamic":
        return dict(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                    weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"))
    if name.startswith("W4A16"):
        return dict(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=int(name.split("g")[-1])))
    if name.startswith("fp8"):
        return dict(weight_config=Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))
    if name.startswith("MX"):
        dtype = torch.float8_e4m3fn if "MXFP8" in name else torch.float4_e2m1fn_x2
        return dict(activation_config=MXFakeQuantizeConfig(dtype=dtype), weight_config=MXFakeQuantizeConfig(dtype=dtype))
    return None  # static-range activations: torchao's QAT has no observer-based static input quantization


def _bits_per_weight(model: nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, PackedLinear, *LOW_BIT_LAYERS))]
    bits = sum(weight_storage_bits(m) * m.weight.numel() for m in layers)
    return bits / sum(m.weight.numel() for m in layers)


def train_row(name: str | None, seed: int, epochs: int, framework: str) -> dict[str, float]:
    seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    model = DigitsMLP(hidden_sizes=[256, 128])
    start, freeze = (START, FREEZE) if epochs == 30 else (epochs // 3, epochs - epochs // 6)
    callbacks: list[Callback] = []
    if name is not None and framework == "ours":
        cfg = dict(ROWS[name])
        sched = dict(start_epoch=start, convert_on_fit_end=False)
        if not cfg.get("dynamic") and cfg.get("activation_bits"):
            sched["freeze_observers_epoch"] = freeze
        callbacks.append(QuantizationAwareTraining(**cfg, **sched))
    elif name is not None:
        callbacks.append(_TorchaoQAT(_torchao_configs(name), start, tuple(ROWS[name].get("exclude", ()))))
    quiet_trainer(epochs, callbacks, limit_val_batches=0).fit(model, datamodule=dm)
    fake = test_accuracy(model, dm)
    if name is None or framework != "ours":
        return {"fake_acc": fake}
    converted = convert(model)
    return {"fake_acc": fake, "int_acc": test_accuracy(converted, dm), "bits_per_weight": _bits_per_weight(converted)}


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def quality(seeds: list[int], epochs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in [None, *ROWS]:
        row: dict[str, Any] = {}
        frameworks = ["ours"] if name is None else ["ours", "torchao"]
        for fw in frameworks:
            if fw == "torchao" and _torchao_configs(name) is None:
                row["torchao"] = "n/a: torchao QAT has no static (observed-range) activation quantization"
                continue
            try:
                runs = [train_row(name, s, epochs, fw) for s in seeds]
            except Exception as e:  # noqa: BLE001 - report the peer's failure in the table instead of aborting
                row[fw] = f"error: {type(e).__name__}: {e}"[:300]
                continue
            row[fw] = {k: _mean_std([r[k] for r in runs]) for k in runs[0]}
        results[name or "fp32"] = row
        print(name or "fp32", json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kernel-only", action="store_true")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run (QAT from a third of them)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {"torch": torch.__version__, "quick": args.quick}
    out["kernel"] = kernel_table(rounds=5 if args.quick else 11)
    k = out["kernel"]
    print(f"CPU capability: {k['cpu_capability']}")
    print("| 4096x4096 Linear, 1 thread | fp32 (ms) | bf16 (ms) | W4 g128 ours (ms) | kernel alone (ms) | ours vs fp32 "
          "| ours vs bf16 | ours vs kernel alone |")
    print("|---|---|---|---|---|---|---|---|")
    for b in (1, 16):
        ms = k[f"batch_{b}"]["ms"]
        ours = ms["int4 g128 (ours)"]
        print(f"| batch {b} | {ms['fp32']:.2f} | {ms['bf16']:.2f} | {ours:.2f} | {ms['int4 kernel alone']:.2f} | "
              f"{ms['fp32'] / ours:.2f}x | {ms['bf16'] / ours:.2f}x | {ours / ms['int4 kernel alone']:.3f}x time |")
    if not args.kernel_only:
        import torchao

        out["torchao"] = torchao.__version__
        seeds = [0] if args.quick else [0, 1, 2]
        out["epochs"] = 10 if args.quick else args.epochs
        out["quality"] = quality(seeds, epochs=out["epochs"])
        out["seeds"] = seeds
        print("| format | bits/weight | ours fake-quant (%) | ours converted (%) | torchao QAT (%) |")
        print("|---|---|---|---|---|")
        for name, row in out["quality"].items():
            o, t = row["ours"], row.get("torchao")
            bpw = f"{o['bits_per_weight'][0]:.3f}" if "bits_per_weight" in o else "32"
            conv = f"{o['int_acc'][0]:.2f} ± {o['int_acc'][1]:.2f}" if "int_acc" in o else "—"
            tao = f"{t['fake_acc'][0]:.2f} ± {t['fake_acc'][1]:.2f}" if isinstance(t, dict) else (t or "—")
            print(f"| {name} | {bpw} | {o['fake_acc'][0]:.2f} ± {o['fake_acc'][1]:.2f} | {conv} | {tao} |")
    path = ROOT / "benchmarks" / "results" / ("formats_quick.json" if args.quick else "formats.json")
    if args.kernel_only and path.exists():  # keep the stored quality rows, replace the kernel table
        out = {**json.loads(path.read_text()), "kernel": out["kernel"]}
    elif path.exists() and "minilm" in (stored := json.loads(path.read_text())):  # formats_minilm.py's section
        out["minilm"] = stored["minilm"]
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
