"""Pruning + quantization + distillation (+ weight sharing) in one Trainer, at full size: does each keep its target?

    python benchmarks/composition.py            # 3 seeds (a few minutes on 2 busy cores)
    python benchmarks/composition.py --quick    # 1 seed, a third of the epochs (schedules scaled), not saved

Settings: DigitsMLP 64-300-100-10 on the bundled digits (split seed 0: 359 test digits), Adam lr 3e-3 for every
row, dense included (the pruning benchmark's rate: sparse nets need it), one thread.

- **full**: all 1,168 training digits, 30 epochs, batch 64 (the pruning and quantization benchmarks' setting);
- **100 digits**: the first 100 training digits, 200 epochs, batch 32 (the distillation benchmark's small-data
  setting, where KD's own target was measured), only the rows needed for the KD comparisons.

Each callback with its own benchmark's settings (epochs below are those of the 30-epoch run; the 200-epoch
setting and ``--quick`` scale every schedule point by the same factor):

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

Rows: dense; GP 90% alone; QAT W8A8 alone; GP + QAT; GP + QAT + KD; GP + WS (Deep Compression); GP + WS + KD;
and, to tell a composition failure from KD's own effect, KD on the dense and on the pruned student (GP + KD).

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
from _common import quiet_trainer, test_accuracy
from lightning.pytorch import Callback, seed_everything
from torch import nn

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.callbacks.weight_sharing import WeightSharing
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.export.lcdc import load_compressed, save_compressed
from lightning_compress.export.quantization import convert, serialized_size
from lightning_compress.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "composition.json"
TEACHER = yaml.safe_load((ROOT / "recipes/digits_teacher.yaml").read_text())
KD_RECIPE = yaml.safe_load((ROOT / "recipes/digits_distillation.yaml").read_text())
KD_ARGS = {k: KD_RECIPE["trainer"]["callbacks"][0]["init_args"][k] for k in ("temperature", "alpha")}
EPOCHS, LR, SPARSITY = 30, 3e-3, 0.9  # schedules below are in epochs of a 30-epoch run (scaled to others)
ROWS: dict[str, tuple[str, ...]] = {  # row -> its callbacks, in list order
    "dense": (),
    "dense + KD": ("KD",),
    "GP 90%": ("GP",),
    "GP 90% + KD": ("GP", "KD"),
    "QAT W8A8": ("QAT",),
    "GP 90% + QAT W8A8": ("GP", "QAT"),
    "GP 90% + QAT W8A8 + KD": ("GP", "QAT", "KD"),
    "GP 90% + WS 4-bit": ("GP", "WS"),
    "GP 90% + WS 4-bit + KD": ("GP", "WS", "KD"),
}
KD_PAIRS = {
    "dense + KD": "dense",
    "GP 90% + KD": "GP 90%",
    "GP 90% + QAT W8A8 + KD": "GP 90% + QAT W8A8",
    "GP 90% + WS 4-bit + KD": "GP 90% + WS 4-bit",
}
ORDER_CHECK = "GP 90% + QAT W8A8 + KD"
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"epochs": EPOCHS, "batch_size": 64, "train_subset": None, "rows": list(ROWS)},
    # the distillation benchmark's small-data setting, where KD's own target was measured
    "100 digits": {
        "epochs": 200,
        "batch_size": 32,
        "train_subset": 100,
        "rows": [r for r in ROWS if r in KD_PAIRS or r in KD_PAIRS.values()],
    },
}

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _callback(kind: str, scale: float, teacher: nn.Module) -> Callback:
    """One callback with its benchmark's settings; epoch points multiplied by ``scale`` (1 in the full run)."""
    if kind == "GP":
        return GradualPruning(
            final_sparsity=SPARSITY,
            start_epoch=2 * scale,
            end_epoch=20 * scale,
            update_every=5,
            schedule="cubic",
            scope="global",
        )
    if kind == "QAT":
        return QuantizationAwareTraining(
            weight_bits=8,
            activation_bits=8,
            granularity="per_tensor",
            symmetric=True,
            start_epoch=10 * scale,
            freeze_observers_epoch=25 * scale,
            convert_on_fit_end=False,
        )
    if kind == "WS":
        return WeightSharing(bits=4, init="density", start_epoch=21 * scale, verbose=False)
    return KnowledgeDistillation(teacher=teacher, **KD_ARGS)


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
    return {
        "torch_save_bytes": serialized_size(model),
        "lcdc_bytes": report.file_bytes,
        "lcdc_bit_exact": exact,
    }


def train_teacher(seed: int, epochs: int) -> tuple[DigitsMLP, float]:
    seed_everything(seed, verbose=False)
    teacher = DigitsMLP(**TEACHER["model"]["init_args"])
    dm = DigitsDataModule(**TEACHER["data"]["init_args"])
    quiet_trainer(epochs, [], limit_val_batches=0).fit(teacher, datamodule=dm)
    return teacher, test_accuracy(teacher, dm)


def train_row(
    kinds: tuple[str, ...], seed: int, setting: dict[str, Any], teacher: nn.Module, path: Path
) -> tuple[dict[str, Any], DigitsMLP]:
    """Train one student row of ``setting`` (epochs, batch size, training subset); measure it and its artefacts."""
    seed_everything(1000 + seed, verbose=False)
    model = DigitsMLP(hidden_sizes=[300, 100], lr=LR)
    dm = DigitsDataModule(batch_size=setting["batch_size"], train_subset=setting["train_subset"])
    callbacks = [_callback(k, setting["epochs"] / EPOCHS, teacher) for k in kinds]
    t0 = time.perf_counter()
    quiet_trainer(setting["epochs"], callbacks, limit_val_batches=0).fit(model, datamodule=dm)
    out: dict[str, Any] = {"fit_s": time.perf_counter() - t0, "acc": test_accuracy(model, dm)}
    zeros, total = _zeros(model)
    out.update(zeros=zeros, weights=total, sparsity=zeros / total)
    final: nn.Module = model
    if "QAT" in kinds:
        final = convert(model)
        out["int_acc"] = test_accuracy(final, dm)
        out["int_sparsity"] = _zeros(final)[0] / total
    if "WS" in kinds:
        out["max_distinct_nonzero"] = max(
            len(torch.unique(m.weight[m.weight != 0])) for m in model.modules() if isinstance(m, nn.Linear)
        )
    out.update(_artefacts(final, path))
    return out, model


def run_seed(
    seed: int, settings: dict[str, dict[str, Any]], workdir: Path, order_check: bool
) -> dict[str, Any]:
    """Every row of every setting for one seed (one teacher, trained on the full split, for all of them)."""
    teacher, teacher_acc = train_teacher(seed, settings["full"]["epochs"])
    out: dict[str, Any] = {"teacher": {"acc": teacher_acc}}
    for label, setting in settings.items():
        res: dict[str, Any] = {}
        models = {}
        for name in setting["rows"]:
            path = workdir / f"{label}_{name}_{seed}.lcdc".replace(" ", "_").replace("%", "")
            res[name], models[name] = train_row(ROWS[name], seed, setting, teacher, path)
            r = res[name]
            extra = f", int8 {r['int_acc']:.2f}" if "int_acc" in r else ""
            print(
                f"seed {seed} [{label}] {name}: {r['acc']:.2f}{extra}, sparsity {r['sparsity']:.4f}, "
                f"{r['lcdc_bytes']:,} B file ({r['fit_s']:.0f} s)",
                flush=True,
            )
        if order_check and label == "full":
            _, rev = train_row(
                tuple(reversed(ROWS[ORDER_CHECK])), seed, setting, teacher, workdir / "rev.lcdc"
            )
            a, b = models[ORDER_CHECK].state_dict(), rev.state_dict()
            res["reversed order identical"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
            print(f"seed {seed} {ORDER_CHECK}, list reversed: identical {res['reversed order identical']}")
        out[label] = res
    return out


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _mean(runs: list[dict[str, Any]], row: str, key: str) -> float:
    return statistics.mean(r[row][key] for r in runs)


def _table(runs: list[dict[str, Any]], rows: list[str], dense_bytes: float) -> dict[str, Any]:
    """Print one setting's accuracy/size table; return its per-row values over seeds."""
    print(
        "| model | test acc (%) | converted int8 acc (%) | weight sparsity | torch.save bytes (ratio) "
        "| compressed file bytes (ratio) |"
    )
    print("|---|---|---|---|---|---|")
    table: dict[str, Any] = {}
    for row in rows:
        acc = [r[row]["acc"] for r in runs]
        intacc = [r[row]["int_acc"] for r in runs] if "int_acc" in runs[0][row] else None
        sp = f"{_mean(runs, row, 'sparsity'):.2%}"
        if intacc:
            sp += f" ({_mean(runs, row, 'int_sparsity'):.2%} of the int8 codes)"
        ts, lc = _mean(runs, row, "torch_save_bytes"), _mean(runs, row, "lcdc_bytes")
        print(
            f"| {row} | {_ms(acc)} | {_ms(intacc) if intacc else '—'} | {sp} | {ts:,.0f} "
            f"({dense_bytes / ts:.2f}x) | {lc:,.0f} ({dense_bytes / lc:.1f}x) |"
        )
        table[row] = {k: [r[row][k] for r in runs] for k in runs[0][row]}
        table[row].update(ratio_torch_save=dense_bytes / ts, ratio_file=dense_bytes / lc)
    return table


def _kd_gains(runs: list[dict[str, Any]], rows: list[str]) -> dict[str, Any]:
    """Per-seed accuracy difference of each KD row to the same row without KD (the integer model for QAT rows)."""
    print("| KD gain (same composition with − without KD) | per seed (points) | mean ± sd | mean / sd |")
    print("|---|---|---|---|")
    diffs: dict[str, Any] = {}
    for with_kd, without in KD_PAIRS.items():
        if with_kd not in rows:
            continue
        key = "int_acc" if "int_acc" in runs[0][with_kd] else "acc"
        d = [r[with_kd][key] - r[without][key] for r in runs]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        mean = statistics.mean(d)
        diffs[with_kd] = {"vs": without, "on": key, "diffs": d, "mean": mean, "sd": sd}
        diffs[with_kd]["target_met"] = mean > 2 * sd if len(d) > 1 else None  # undecided on one seed
        per_seed = ", ".join(f"{x:+.2f}" for x in d)
        print(f"| {with_kd} | {per_seed} | {_ms(d)} | {mean / sd if sd else float('nan'):.1f} |")
    return diffs


def summarize(runs: list[dict[str, Any]], settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the tables; return the per-row values, KD differences and target checks."""
    full = [r["full"] for r in runs]
    dense_bytes = _mean(full, "dense", "torch_save_bytes")
    tables: dict[str, Any] = {}
    diffs: dict[str, Any] = {}
    for label, setting in settings.items():
        sruns = [r[label] for r in runs]
        print(
            f"\n{label}: {setting['train_subset'] or 'all 1,168'} training digits, {setting['epochs']} epochs, "
            f"batch {setting['batch_size']}, {len(runs)} seed(s); teacher {_ms([r['teacher']['acc'] for r in runs])} %"
            "; ratios vs the dense row's fp32 torch.save bytes\n"
        )
        tables[label] = _table(sruns, setting["rows"], dense_bytes)
        print()
        diffs[label] = _kd_gains(sruns, setting["rows"])

    every = [(r[label], row) for r in runs for label, s in settings.items() for row in s["rows"]]
    want = round(SPARSITY * full[0]["dense"]["weights"])
    gp_vs = _mean(full, "GP 90% + QAT W8A8", "int_acc") - _mean(full, "GP 90%", "acc")
    targets = {
        f"GP: exactly {want:,} of {full[0]['dense']['weights']:,} weights zero (90%) in every GP row": all(
            res[row]["zeros"] == want for res, row in every if "GP" in ROWS[row]
        ),
        "GP: the pruned zeros stay zero in the int8 codes": all(
            res[row]["int_sparsity"] >= res[row]["sparsity"] for res, row in every if "QAT" in ROWS[row]
        ),
        "QAT: converted within 0.3 points of fake-quant (every QAT row, mean)": all(
            abs(_mean([r[label] for r in runs], row, "int_acc") - _mean([r[label] for r in runs], row, "acc"))
            <= 0.3
            for label, s in settings.items()
            for row in s["rows"]
            if "QAT" in ROWS[row]
        ),
        f"QAT: GP+QAT int8 within 0.3 points of GP fp32 ({gp_vs:+.2f})": gp_vs >= -0.3,
        "QAT: int8 torch.save artefact <= 0.27x dense fp32 (every QAT row)": all(
            res[row]["torch_save_bytes"] <= 0.27 * dense_bytes for res, row in every if "QAT" in ROWS[row]
        ),
        "WS: at most 16 distinct non-zero values per layer": all(
            res[row]["max_distinct_nonzero"] <= 16 for res, row in every if "WS" in ROWS[row]
        ),
        "every compressed file reads back bit-exact": all(res[row]["lcdc_bit_exact"] for res, row in every),
    }
    for label, d in diffs.items():
        targets.update({f"KD [{label}]: {k} − {v['vs']} > 2 sd": v["target_met"] for k, v in d.items()})
    if "reversed order identical" in full[0]:
        targets[f"{ORDER_CHECK} with the list reversed: identical weights (seed 0)"] = full[0][
            "reversed order identical"
        ]
    verdict = {True: "met", False: "MISSED", None: "n/a (needs 2 or more seeds)"}
    print("\n" + "\n".join(f"- {k}: {verdict[v]}" for k, v in targets.items()))
    return {
        "tables": tables,
        "kd_differences": diffs,
        "targets": targets,
        "dense_torch_save_bytes": dense_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, a third of the epochs, not saved")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    seeds = list(range(1 if args.quick else args.seeds))
    settings = {
        k: {**v, "epochs": v["epochs"] // 3 if args.quick else v["epochs"]} for k, v in SETTINGS.items()
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(s, settings, Path(tmp), order_check=s == 0) for s in seeds]
    wall = time.perf_counter() - t0
    summary = summarize(runs, settings)
    print(f"\n{wall:.0f} s")
    result = {
        "seeds": seeds,
        "lr": LR,
        "settings": settings,
        "rows_callbacks": ROWS,
        "kd_args": KD_ARGS,
        "teacher_recipe": TEACHER,
        "runs": runs,
        **summary,
        "wall_s": wall,
    }
    if args.quick:
        print("(--quick: not saved)")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
