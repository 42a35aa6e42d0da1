"""Low-bit formats on the pretrained all-MiniLM-L6-v2: cosine fidelity and bits per weight of each format under
our QAT and under torchao 0.18's QAT, side by side (the MiniLM rows of ``benchmarks/formats.py``).

    python benchmarks/formats_minilm.py                    # 30 steps, 3 seeds, 8 rows x 2 frameworks (~45 min, 2 cores)
    python benchmarks/formats_minilm.py --quick            # 3 steps, 1 seed: every row end to end (formats_quick.json)
    python benchmarks/formats_minilm.py --minilm-steps 60 --minilm-seeds 5 --only "W4A16 g128"
    python benchmarks/formats_minilm.py --quick --tiny     # a random 2-layer BERT instead of MiniLM (seconds)
    python benchmarks/formats_minilm.py --w4-asymmetric --only "W4A16 g128" "W4A16 g32"   # affine W4 grids
    python benchmarks/formats_minilm.py --mx-scale rceil --only "MXFP8 (weights + inputs)"   # MX scales by RCEIL
    python benchmarks/formats_minilm.py --mx-sqnr     # SQNR of the pretrained weights per MX format and scale rule

Every row fine-tunes the packaged all-MiniLM-L6-v2 (``SentenceEncoder(max_length=32)``, AdamW 5e-5) on
``SentenceDataModule(batch_size=32, max_length=32, max_sentences=1600)`` (target: the original's embedding of each
sentence) for ``--minilm-steps`` optimizer steps (3 epochs of ``steps / 3`` batches, as ``benchmarks/minilm.py``),
same data order for every row of a seed. Quantization is on from the first step in both frameworks (a pretrained
model: no float warm-up), on every Linear layer of the encoder (the default targets of
``recipes/minilm_qat_*.yaml``; MiniLM's in_features 384 and 1536 are multiples of 128 and of the MX block of 32, so
no layer is left out). The static W8A8 row freezes its observed input ranges for the last epoch, as
``recipes/minilm_qat_int8.yaml``. No learned step sizes (torchao's QAT learns none either). The formats and
torchao's configuration for each are ``formats.ROWS`` and ``formats._torchao_configs`` (torchao is prepared with
``quantize_(model, QATConfig(..., step="prepare"))`` before fit).

Reported per row (mean ± std over ``--minilm-seeds`` seeds): test cosine fidelity to the original's embeddings of
the fake-quantized model; for ours also of the converted model (``export.quantization.convert``: int8 kernels,
int4-pack kernels with bf16 activations, fp8 / MX codes) and the largest |converted - fake-quantized| difference
of an embedding element (unit-norm embeddings; bf16 rounding for W4), and bits per weight counted from the
converted layers' stored tensors (codes + scales + zero points). The row "fp32 fine-tuned" is the same budget
without quantization: what fine-tuning alone does to fidelity. Targets (issue 17): W8A8 per-token dynamic >= 0.99,
W4A16 g128 >= 0.97, every row at least torchao's. Writes the section ``minilm`` of
``benchmarks/results/formats.json`` (``formats_quick.json`` with ``--quick``), leaving the other sections as stored;
an ``--only`` run with the same settings replaces just its rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from formats import ROWS, _bits_per_weight, _torchao_configs
from lightning.pytorch import seed_everything
from minilm import evaluate, fit
from torch import nn

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.examples.sentence import SentenceDataModule, SentenceEncoder
from lightning_compress.export.quantization import convert
from lightning_compress.functional import formats as ff
from lightning_compress.functional.quantization import sqnr_db

ROOT = Path(__file__).resolve().parents[1]
FP32 = "fp32 fine-tuned"
TARGETS = {"W8A8 per-token dynamic": 0.99, "W4A16 g128": 0.97}
# a random BERT whose in_features (128, 256) hold whole groups of 128 and MX blocks of 32 (a smoke run, not results)
TINY = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=64)


ASYMMETRIC_W4 = False  # --w4-asymmetric: the W4A16 rows on an affine grid (16 levels + zero point) in both frameworks
ASYM = " asymmetric"  # the suffix of those rows' names
MX_SCALE = "floor"  # --mx-scale: our MX rows' shared-scale rule (torchao's MX QAT rounds with RCEIL)
RCEIL = " (mx_scale rceil)"  # the suffix of our MX rows trained with mx_scale="rceil"


def minilm_config(name: str) -> dict[str, Any]:
    """Our QAT arguments for the format ``name`` on MiniLM: ``formats.ROWS`` without the digits model's
    layer exclusions (every MiniLM Linear holds whole groups)."""
    cfg = {k: v for k, v in ROWS[name].items() if k != "exclude"}
    if MX_SCALE != "floor" and name.startswith("MX"):
        cfg["mx_scale"] = MX_SCALE
    return {**cfg, "symmetric": False} if ASYMMETRIC_W4 and name.startswith("W4A16") else cfg


def torchao_config(name: str) -> dict[str, Any] | None:
    """torchao's QAT arguments for the format ``name`` (``formats._torchao_configs``, asymmetric W4 if asked)."""
    if ASYMMETRIC_W4 and name.startswith("W4A16"):
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        group = int(name.split("g")[-1])
        return dict(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=group, is_symmetric=False))
    return _torchao_configs(name)


@torch.no_grad()
def embeddings(model: nn.Module, dm: SentenceDataModule) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b["input_ids"], b["attention_mask"]).float() for b in dm.test_dataloader()])


def run_ours(name: str | None, base: SentenceEncoder, dm: SentenceDataModule, steps: int, seed: int) -> dict[str, float]:
    seed_everything(seed, verbose=False)
    model = copy.deepcopy(base)
    callbacks = []
    if name is not None:
        cfg = minilm_config(name)
        sched: dict[str, Any] = dict(start_step=0, convert_on_fit_end=False)
        if not cfg.get("dynamic") and cfg.get("activation_bits"):
            sched["freeze_observers_epoch"] = 2  # ranges fixed for the last of the 3 epochs
        callbacks.append(QuantizationAwareTraining(**cfg, **sched))
    fit(model, dm, steps, callbacks)
    fidelity, retrieval = evaluate(model, dm)
    out = {"fidelity": fidelity, "retrieval": retrieval}
    if name is None:
        return out
    fake = embeddings(model, dm)
    converted = convert(model)
    out["converted_fidelity"], out["converted_retrieval"] = evaluate(converted, dm)
    out["converted_vs_fake_max_abs"] = float((embeddings(converted, dm) - fake).abs().max())
    out["bits_per_weight"] = _bits_per_weight(converted)
    return out


def run_torchao(name: str, base: SentenceEncoder, dm: SentenceDataModule, steps: int, seed: int) -> dict[str, float]:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    seed_everything(seed, verbose=False)
    model = copy.deepcopy(base)
    quantize_(model, QATConfig(**torchao_config(name), step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    fit(model, dm, steps, [])
    fidelity, retrieval = evaluate(model, dm)
    return {"fidelity": fidelity, "retrieval": retrieval}


@torch.no_grad()
def mx_weight_sqnr(model: nn.Module) -> dict[str, float]:
    """SQNR (dB) of the pretrained encoder's Linear weights, all of them together, in each MX format under each
    shared-scale rule (``mx_scale``), without training."""
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and "encoder" in n]
    ref = torch.cat([w.reshape(-1) for w in ws])
    return {f"{fmt} {rule}": round(sqnr_db(ref, torch.cat([ff.fake_quantize_mx(w, fmt, rule).reshape(-1) for w in ws])), 2)
            for fmt in ff.MX_ELEMENT for rule in ff.MX_SCALE_ROUNDINGS}


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def quality(names: list[str | None], base: SentenceEncoder, dm: SentenceDataModule, steps: int,
            seeds: list[int], on_row: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        row: dict[str, Any] = {}
        for fw in ["ours"] if name is None else ["ours", "torchao"]:
            if fw == "torchao" and torchao_config(name) is None:
                row["torchao"] = "n/a: torchao's QAT has no static (observed-range) input quantization"
                continue
            try:
                runs = [(run_ours if fw == "ours" else run_torchao)(name, base, dm, steps, s) for s in seeds]
            except Exception as e:  # noqa: BLE001 - a row that cannot run here: its error goes in the table
                traceback.print_exc(limit=-3)
                row[fw] = f"error: {type(e).__name__}: {e}"[:300]
                continue
            row[fw] = {k: _mean_std([r[k] for r in runs]) for k in runs[0]}
        key = name or FP32
        key += ASYM if ASYMMETRIC_W4 and key.startswith("W4A16") else ""
        key += RCEIL if MX_SCALE == "rceil" and key.startswith("MX") else ""
        results[key] = row
        print(key, json.dumps(row), flush=True)
        on_row(results)
    return results


def verdicts(rows: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against the measured means: fidelity thresholds and ours >= torchao per format."""
    out: dict[str, Any] = {}
    for target, threshold in TARGETS.items():
        for name in (target, target + ASYM):
            o = rows.get(name, {}).get("ours")
            if isinstance(o, dict):
                out[f"{name} >= {threshold}"] = min(o["fidelity"][0], o["converted_fidelity"][0]) >= threshold
    for name, row in rows.items():
        o, t = row.get("ours"), row.get("torchao")
        if isinstance(o, dict) and isinstance(t, dict):
            out[f"{name}: ours >= torchao"] = o["fidelity"][0] >= t["fidelity"][0]
    return out


def _cell(stat: dict[str, Any] | str | None, key: str, digits: int = 4) -> str:
    if not isinstance(stat, dict):
        return (stat or "—")[:70]
    return f"{stat[key][0]:.{digits}f} ± {stat[key][1]:.{digits}f}" if key in stat else "—"


def table(section: dict[str, Any]) -> None:
    print(f"\nMiniLM, {section['steps']} steps, seeds {section['seeds']}: test cosine fidelity to the original")
    print("| format | bits/weight | ours fake-quant | ours converted | max abs conv-fake | torchao QAT |")
    print("|---|---|---|---|---|---|")
    for name, row in section["rows"].items():
        o, t = row.get("ours"), row.get("torchao")
        bpw = f"{o['bits_per_weight'][0]:.3f}" if isinstance(o, dict) and "bits_per_weight" in o else "32"
        diff = f"{o['converted_vs_fake_max_abs'][0]:.1e}" if isinstance(o, dict) and "bits_per_weight" in o else "—"
        print(f"| {name} | {bpw} | {_cell(o, 'fidelity')} | {_cell(o, 'converted_fidelity')} | {diff} | "
              f"{_cell(t, 'fidelity') if name != FP32 else '—'} |")
    for what, ok in section["targets_met"].items():
        print(f"{'met    ' if ok else 'NOT met'}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 seed, written to formats_quick.json")
    parser.add_argument("--minilm-steps", type=int, help="optimizer steps per run (default 30; --quick: 3)")
    parser.add_argument("--minilm-seeds", type=int, help="seeds per row (default 3; --quick: 1)")
    parser.add_argument("--only", nargs="*", help="format names to run (default: all, and the fp32 row)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer BERT instead of MiniLM (smoke run; quick defaults)")
    parser.add_argument("--w4-asymmetric", action="store_true",
                        help="W4A16 rows on an affine grid (zero point) in both frameworks (default: symmetric)")
    parser.add_argument("--mx-scale", choices=ff.MX_SCALE_ROUNDINGS, default="floor",
                        help="our MX rows' shared-scale rule (QuantizationAwareTraining(mx_scale=...)); rows named with it")
    parser.add_argument("--mx-sqnr", action="store_true",
                        help="only the SQNR of the pretrained weights in each MX format under each mx_scale rule")
    parser.add_argument("--report", action="store_true", help="print the table of the saved JSON only")
    parser.add_argument("--lr", type=float, help="Adam's learning rate for every row, both frameworks (default: 5e-5)")
    parser.add_argument("--dropout", type=float, help="the encoder's dropout while fine-tuning (default: MiniLM's 0.1)")
    args = parser.parse_args()
    path = ROOT / "benchmarks" / "results" / ("formats_quick.json" if args.quick or args.tiny else "formats.json")
    key = "minilm" if args.lr is None and args.dropout is None else f"minilm_lr{args.lr or 5e-5:g}_dropout{args.dropout}"
    if args.report:
        table(json.loads(path.read_text())[key])
        return
    if args.mx_sqnr:
        sqnr = mx_weight_sqnr(SentenceEncoder(max_length=32))
        print(json.dumps(sqnr, indent=1))
        path.write_text(json.dumps({**json.loads(path.read_text()), "minilm_mx_weight_sqnr_db": sqnr}, indent=2))
        return
    quick = args.quick or args.tiny
    steps = args.minilm_steps or (3 if quick else 30)
    seeds = list(range(args.minilm_seeds or (1 if quick else 3)))
    if steps < 3 or not seeds:
        raise SystemExit(f"--minilm-steps must be >= 3 (3 epochs), --minilm-seeds >= 1; got {steps}, {len(seeds)}")
    unknown = set(args.only or ()) - set(ROWS) - {FP32}
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}; known: {[FP32, *ROWS]}")
    global ASYMMETRIC_W4, MX_SCALE
    ASYMMETRIC_W4, MX_SCALE = args.w4_asymmetric, args.mx_scale
    names: list[str | None] = [n for n in [None, *ROWS] if not args.only or (n or FP32) in args.only]
    torch.set_num_threads(args.threads)
    for logger in ("lightning", "lightning.pytorch"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torchao

    config = TINY if args.tiny else None
    dm = SentenceDataModule(batch_size=32, max_length=32, max_sentences=1600, config=config)
    dm.setup("fit")
    base = SentenceEncoder(config=config, max_length=32, dropout=args.dropout).eval()
    base.lr = args.lr or base.lr
    section: dict[str, Any] = dict(
        model="tiny random BERT " + json.dumps(TINY) if args.tiny else "all-MiniLM-L6-v2 (pretrained)",
        steps=steps, seeds=seeds, max_length=32, batch_size=32, lr=base.lr, dropout=args.dropout, qat_from_step=0,
        threads=args.threads,
        sentences={k: len(v) for k, v in dm.sentences.items()}, torch=torch.__version__, torchao=torchao.__version__,
        note="2 CPU cores shared with other jobs while measured (fidelity does not depend on it)")

    stored = json.loads(path.read_text()) if path.exists() else {}
    same = ("model", "steps", "seeds", "max_length", "lr")
    old = stored.get(key, {})
    kept = old.get("rows", {}) if all(old.get(k) == section[k] for k in same) else {}  # --only: merge rows

    def save(rows: dict[str, Any]) -> None:  # after every row: a cut-short run keeps what it measured
        order = [FP32, *[k for n in ROWS for k in (n, n + ASYM, n + RCEIL)]]
        merged = {n: rows[n] if n in rows else kept[n] for n in order if n in rows or n in kept}
        section.update(rows=merged, targets_met=verdicts(merged))
        path.write_text(json.dumps({**stored, key: section}, indent=2))

    quality(names, base, dm, steps, seeds, save)
    table(section)
    print(f"wrote the {key!r} section of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
