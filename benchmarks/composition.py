"""Pruning + quantization + distillation (+ weight sharing) in one Trainer, at full size: does each keep its target?

    python benchmarks/composition.py            # 3 seeds, 30 epochs (a few minutes on 2 busy cores)
    python benchmarks/composition.py --quick    # 1 seed, 10 epochs (every schedule scaled by 1/3), not saved

Setting: DigitsMLP 64-300-100-10 on the bundled digits (split seed 0: 1,168 training, 359 test digits), 30 epochs,
batch 64, Adam lr 3e-3 for every row, dense included (the pruning benchmark's rate: sparse nets need it), one
thread. Each callback with its own benchmark's settings:

- GradualPruning (``benchmarks/pruning.py``): 90 %, one global magnitude ranking over all Linear weights, cubic
  ramp from epoch 2 to 20, masks every 5 steps;
- QuantizationAwareTraining (``benchmarks/quantization.py``): W8A8 per tensor, symmetric, fake quantization from
  epoch 10, observers frozen at 25; converted after fit with ``convert`` (the function ``convert_on_fit_end``
  calls), and that integer model's accuracy and bytes are what the row reports;
- KnowledgeDistillation (``recipes/digits_distillation.yaml``): temperature 4, alpha 0.9, logits only, from a
  teacher trained per seed in this script as ``recipes/digits_teacher.yaml`` trains it (64-1200-1200-10, dropout
  0.2, Adam 1e-3, batch 32, 30 epochs, same split as the students);
- WeightSharing (``recipes/digits_deep_compression.yaml``): 4-bit codebooks, density init, shared at epoch 21
  (pruning's last mask update is at the start of epoch 20) — it cannot share a weight QAT quantizes (refused,
  see the README's "Composing methods"), so it composes with pruning and distillation: Deep Compression + KD.

The callbacks are listed as "Composing methods" says (GradualPruning, then QuantizationAwareTraining or
WeightSharing, then KnowledgeDistillation; no order is required among these). For seed 0 the GP + QAT + KD run is
repeated with the list reversed, and its trained weights are compared with the listed order's, bit for bit.

Within a seed every student row starts from the same initial weights and sees the same batches (seeded before
the model is built), so rows are compared pairwise: a KD gain is the per-seed difference to the same composition
without KD, reported as mean ± sd over seeds (target: mean > 2 sd, as in ``benchmarks/distillation.py``).

Per row: test accuracy (the trained model; for QAT rows also the converted integer model's), weight sparsity
counted from the weights themselves (for QAT rows also from the integer codes, where rounding may add zeros), and
two real artefacts of the final model (the integer model for QAT rows): ``torch.save(state_dict)`` bytes and the
bytes of the file ``save_compressed`` writes (relative sparse indices, codebooks, Huffman coding; read back with
``load_compressed`` and checked bit-exact). Ratios are against the dense row's fp32 ``torch.save`` bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.callbacks.weight_sharing import WeightSharing
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.export.compressed import load_compressed, save_compressed
from lightning_compress.export.quantized import convert, serialized_size
from lightning_compress.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "composition.json"
TEACHER = yaml.safe_load((ROOT / "recipes/digits_teacher.yaml").read_text())
KD_RECIPE = yaml.safe_load((ROOT / "recipes/digits_distillation.yaml").read_text())
KD_ARGS = {k: KD_RECIPE["trainer"]["callbacks"][0]["init_args"][k] for k in ("temperature", "alpha")}
EPOCHS, LR, BATCH, SPARSITY = 30, 3e-3, 64, 0.9
ROWS: dict[str, tuple[str, ...]] = {  # row -> its callbacks, in list order
    "dense": (),
    "GP 90%": ("GP",),
    "QAT W8A8": ("QAT",),
    "GP 90% + QAT W8A8": ("GP", "QAT"),
    "GP 90% + QAT W8A8 + KD": ("GP", "QAT", "KD"),
    "GP 90% + WS 4-bit": ("GP", "WS"),
    "GP 90% + WS 4-bit + KD": ("GP", "WS", "KD"),
}
KD_PAIRS = {"GP 90% + QAT W8A8 + KD": "GP 90% + QAT W8A8", "GP 90% + WS 4-bit + KD": "GP 90% + WS 4-bit"}

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _callback(kind: str, scale: float, teacher: nn.Module) -> Callback:
    """One callback with its benchmark's settings; epoch points multiplied by ``scale`` (1 in the full run)."""
    if kind == "GP":
        return GradualPruning(final_sparsity=SPARSITY, start_epoch=2 * scale, end_epoch=20 * scale, update_every=5,
                              schedule="cubic", scope="global")
    if kind == "QAT":
        return QuantizationAwareTraining(weight_bits=8, activation_bits=8, granularity="per_tensor", symmetric=True,
                                         start_epoch=10 * scale, freeze_observers_epoch=25 * scale,
                                         convert_on_fit_end=False)
    if kind == "WS":
        return WeightSharing(bits=4, init="density", start_epoch=21 * scale, verbose=False)
    return KnowledgeDistillation(teacher=teacher, **KD_ARGS)


def _trainer(epochs: int, callbacks: list[Callback]) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, callbacks=callbacks)


def _accuracy(model: nn.Module, dm: DigitsDataModule) -> float:
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def _zeros(model: nn.Module) -> tuple[int, int]:
    """(zeros, entries) over every layer weight, counted from the weights (dequantized codes for integer layers)."""
    layers = model_stats(model).layers
    return sum(s.numel - s.nonzero for s in layers), sum(s.numel for s in layers)


def _artefacts(model: nn.Module, path: Path) -> dict[str, Any]:
    """Bytes of torch.save(state_dict) and of the save_compressed file, and whether the file reads back bit-exact."""
    report = save_compressed(model, path, verbose=False)
    back = load_compressed(path)
    state = model.state_dict()
    exact = set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    return {"torch_save_bytes": serialized_size(model), "lcdc_bytes": report.file_bytes, "lcdc_bit_exact": exact}


def train_teacher(seed: int, epochs: int) -> tuple[DigitsMLP, float]:
    seed_everything(seed, verbose=False)
    teacher = DigitsMLP(**TEACHER["model"]["init_args"])
    dm = DigitsDataModule(**TEACHER["data"]["init_args"])
    _trainer(epochs, []).fit(teacher, datamodule=dm)
    return teacher, _accuracy(teacher, dm)


def train_row(kinds: tuple[str, ...], seed: int, epochs: int, teacher: nn.Module, workdir: Path,
              name: str) -> tuple[dict[str, Any], DigitsMLP]:
    scale = epochs / EPOCHS
    seed_everything(1000 + seed, verbose=False)
    model = DigitsMLP(hidden_sizes=[300, 100], lr=LR)
    dm = DigitsDataModule(batch_size=BATCH)
    callbacks = [_callback(k, scale, teacher) for k in kinds]
    t0 = time.perf_counter()
    _trainer(epochs, callbacks).fit(model, datamodule=dm)
    out: dict[str, Any] = {"fit_s": time.perf_counter() - t0, "acc": _accuracy(model, dm)}
    zeros, total = _zeros(model)
    out.update(zeros=zeros, weights=total, sparsity=zeros / total)
    final: nn.Module = model
    if "QAT" in kinds:
        final = convert(model)
        out["int_acc"] = _accuracy(final, dm)
        out["int_sparsity"] = _zeros(final)[0] / total
    if "WS" in kinds:
        out["max_distinct_nonzero"] = max(
            len(torch.unique(m.weight[m.weight != 0])) for m in model.modules() if isinstance(m, nn.Linear)
        )
    out.update(_artefacts(final, workdir / f"{name.replace(' ', '_').replace('%', '')}_{seed}.lcdc"))
    return out, model


def run_seed(seed: int, epochs: int, workdir: Path, order_check: bool) -> dict[str, Any]:
    teacher, teacher_acc = train_teacher(seed, epochs)
    out: dict[str, Any] = {"teacher": {"acc": teacher_acc}}
    models = {}
    for name, kinds in ROWS.items():
        out[name], models[name] = train_row(kinds, seed, epochs, teacher, workdir, name)
        r = out[name]
        extra = f", int8 {r['int_acc']:.2f}" if "int_acc" in r else ""
        print(f"seed {seed} {name}: {r['acc']:.2f}{extra}, sparsity {r['sparsity']:.4f}, "
              f"{r['lcdc_bytes']:,} B file ({r['fit_s']:.0f} s)", flush=True)
    if order_check:
        name = "GP 90% + QAT W8A8 + KD"
        _, reversed_model = train_row(tuple(reversed(ROWS[name])), seed, epochs, teacher, workdir, "reversed")
        a, b = models[name].state_dict(), reversed_model.state_dict()
        out["reversed order identical"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        print(f"seed {seed} {name}, list reversed: weights identical {out['reversed order identical']}", flush=True)
    return out


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _mean(runs: list[dict[str, Any]], row: str, key: str) -> float:
    return statistics.mean(r[row][key] for r in runs)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the tables; return the per-row values, KD differences and target checks."""
    dense_bytes = _mean(runs, "dense", "torch_save_bytes")
    table: dict[str, Any] = {}
    print("\n| model | test acc (%) | converted int8 acc (%) | weight sparsity | torch.save bytes (ratio) "
          "| compressed file bytes (ratio) |")
    print("|---|---|---|---|---|---|")
    print(f"| teacher 64-1200-1200-10 | {_ms([r['teacher']['acc'] for r in runs])} | | | | |")
    for row in ROWS:
        acc = [r[row]["acc"] for r in runs]
        intacc = [r[row]["int_acc"] for r in runs] if "int_acc" in runs[0][row] else None
        sp = _mean(runs, row, "sparsity")
        sp_s = f"{sp:.2%}" + (f" ({_mean(runs, row, 'int_sparsity'):.2%} int8 codes)" if intacc else "")
        ts, lc = _mean(runs, row, "torch_save_bytes"), _mean(runs, row, "lcdc_bytes")
        print(f"| {row} | {_ms(acc)} | {_ms(intacc) if intacc else '—'} | {sp_s} | {ts:,.0f} "
              f"({dense_bytes / ts:.2f}x) | {lc:,.0f} ({dense_bytes / lc:.1f}x) |")
        table[row] = {k: [r[row][k] for r in runs] for k in runs[0][row]}
        table[row]["ratio_torch_save"] = dense_bytes / ts
        table[row]["ratio_file"] = dense_bytes / lc

    diffs: dict[str, Any] = {}
    print("\n| KD gain | per-seed difference (points), mean ± sd | mean / sd |")
    print("|---|---|---|")
    for with_kd, without in KD_PAIRS.items():
        key = "int_acc" if "int_acc" in runs[0][with_kd] else "acc"
        d = [r[with_kd][key] - r[without][key] for r in runs]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        ratio = statistics.mean(d) / sd if sd else float("inf")
        diffs[with_kd] = {"vs": without, "on": key, "diffs": d, "mean": statistics.mean(d), "sd": sd,
                          "target_met": len(d) > 1 and statistics.mean(d) > 2 * sd}
        print(f"| {with_kd} − {without} | {_ms(d)} | {ratio:.1f} |")

    gp_rows = [row for row, kinds in ROWS.items() if "GP" in kinds]
    qat_rows = [row for row, kinds in ROWS.items() if "QAT" in kinds]
    want = round(SPARSITY * runs[0]["dense"]["weights"])
    int_vs_float = _mean(runs, "GP 90% + QAT W8A8", "int_acc") - _mean(runs, "GP 90%", "acc")
    targets = {
        f"GradualPruning: exactly {want:,} of {runs[0]['dense']['weights']:,} weights zero (90%) in every GP row "
        "and seed": all(r[row]["zeros"] == want for r in runs for row in gp_rows),
        "GradualPruning: the pruned zeros stay zero in the int8 codes": all(
            r[row]["int_sparsity"] >= r[row]["sparsity"] for r in runs for row in gp_rows if row in qat_rows),
        "QAT: converted within 0.3 points of fake-quant (every QAT row)": all(
            abs(_mean(runs, row, "int_acc") - _mean(runs, row, "acc")) <= 0.3 for row in qat_rows),
        f"QAT: GP+QAT int8 within 0.3 points of GP fp32 ({int_vs_float:+.2f})": int_vs_float >= -0.3,
        "QAT: int8 artefact <= 0.27x fp32 bytes (every QAT row, torch.save)": all(
            _mean(runs, row, "torch_save_bytes") <= 0.27 * dense_bytes for row in qat_rows),
        "WeightSharing: at most 16 distinct non-zero values per layer": all(
            r[row]["max_distinct_nonzero"] <= 16 for r in runs for row in ROWS if "WS" in ROWS[row]),
        "every compressed file reads back bit-exact": all(r[row]["lcdc_bit_exact"] for r in runs for row in ROWS),
        **{f"KD: {k} beats {v['vs']} by > 2 sd": v["target_met"] for k, v in diffs.items()},
    }
    if "reversed order identical" in runs[0]:
        targets["list order: GP+QAT+KD reversed gives identical weights (seed 0)"] = runs[0]["reversed order identical"]
    print("\n" + "\n".join(f"- {k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    return {"rows": table, "kd_differences": diffs, "targets": targets, "dense_torch_save_bytes": dense_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs (schedules scaled), not saved")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    seeds = list(range(1 if args.quick else args.seeds))
    epochs = 10 if args.quick else EPOCHS
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(s, epochs, Path(tmp), order_check=s == 0) for s in seeds]
    wall = time.perf_counter() - t0
    print(f"\nDigitsMLP 64-300-100-10, {epochs} epochs, {len(seeds)} seed(s); ratios vs the dense row's fp32 "
          f"torch.save bytes; {wall:.0f} s")
    summary = summarize(runs)
    result = {"seeds": seeds, "epochs": epochs, "lr": LR, "batch_size": BATCH, "rows_callbacks": ROWS,
              "kd_args": KD_ARGS, "teacher_recipe": TEACHER, "runs": runs, **summary, "wall_s": wall}
    if args.quick:
        print("(--quick: not saved)")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
