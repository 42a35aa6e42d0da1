"""all-MiniLM-L6-v2 compressed by our recipes and by the peers a user would pick instead, side by side.

    python benchmarks/minilm.py            # 120 steps, 3 seeds, 32 tokens (long on 2 shared cores)
    python benchmarks/minilm.py --quick    # 12 steps, 1 seed, 16 tokens, 400 sentences
    python benchmarks/minilm.py --steps 60 --seeds 1 --only distillation   # adds its rows to a stored run of the same settings
    python benchmarks/minilm.py --steps 120 --only pruning --out benchmarks/results/minilm_120steps.json  # other settings

Every training row fine-tunes the packaged pretrained all-MiniLM-L6-v2 on the same data (SentenceDataModule:
standard-library docstring sentences, target = the original model's embedding), the same step budget (3 epochs of
``steps / 3`` batches) and the same seeds. Our rows are the callbacks of ``recipes/minilm_*.yaml`` as written
there, their step windows scaled from the recipes' 120 steps to ``--steps``. A reference row ``finetune`` runs
the same fine-tuning with no callback (what the budget and dropout alone cost), at the model's defaults (Adam 5e-5,
MiniLM's dropout 0.1); ``finetune_dropout0`` the same with dropout off, as the recipes that set ``dropout: 0.0``. A training peer fine-tunes with the ``lr`` and ``dropout`` of the recipe it is compared with
(``PEER_RECIPE``), so that a setting a recipe chose is not counted as the method's gain. Peers:

- ``torch.ao`` dynamic int8 post-training quantization of the original's Linear layers (no training);
- Lightning's ``ModelPruning`` (``l1_unstructured``, 50 % of every encoder Linear weight, once at the end of the
  first epoch, no lottery-ticket reset), then the remaining epochs of fine-tuning;
- NNCF (3.x, torch backend) ``nncf.quantize`` (int8 weights and activations, fake-quantized, ``model_type=TRANSFORMER``
  as NNCF advises for transformers) then fine-tuning (QAT);
- torchao 0.18 ``QATConfig`` (int8 dynamic activations + int4 weights, group 32) prepare, fine-tuning, convert.

Reported per row: test cosine fidelity to the original's embeddings and top-1 nearest-neighbour agreement (mean and
std over seeds), stored weight elements (and nonzero), bytes of ``torch.save(state_dict)``, and CPU latency of a
batch of 32 sentences (seed 0's model) against the fp32 original measured in the same process (interleaved rounds, median). The
machine is shared: read the ratios. Writes ``benchmarks/results/minilm.json`` and a plot ``minilm.png`` (fidelity
against bytes) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import logging
import math
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from _common import median_times, quiet_trainer
from lightning.pytorch import seed_everything
from torch import nn

from lightning_compress.examples.sentence import (
    SentenceDataModule,
    SentenceEncoder,
    retrieval_agreement,
    set_dropout,
)

ROOT = Path(__file__).resolve().parents[1]
OURS = ["qat_int8", "pruning", "prune_qat_kd", "distillation", "low_rank", "qat_int4_weights"]
PEERS = ["torch_ao_dynamic_int8", "lightning_model_pruning", "torchao_qat_int8da_int4w", "nncf_qat_int8"]
PEER_RECIPE = {"lightning_model_pruning": "pruning", "nncf_qat_int8": "qat_int8", "torchao_qat_int8da_int4w": "qat_int4_weights"}
MERGE_KEYS = ("steps", "max_length", "quick")  # a run merges into a stored one only where these agree
ORDER = ["finetune", "finetune_dropout0", "torch_ao_dynamic_int8", "qat_int8", "lightning_model_pruning", "pruning", "torchao_qat_int8da_int4w",
         "prune_qat_kd", "distillation", "low_rank", "qat_int4_weights", "nncf_qat_int8"]  # cheapest answers first


def recipe_callbacks(name: str, steps: int, teacher: nn.Module) -> tuple[list[Any], dict[str, Any]]:
    """The callbacks and model init_args of ``recipes/minilm_<name>.yaml``, ``*_step`` values scaled to ``steps``."""
    cfg = yaml.safe_load((ROOT / "recipes" / f"minilm_{name}.yaml").read_text())
    callbacks = []
    for spec in cfg["trainer"]["callbacks"]:
        mod, _, cls = spec["class_path"].rpartition(".")
        args = dict(spec.get("init_args") or {})
        for k, v in list(args.items()):
            if k.endswith("_step") and isinstance(v, int):
                args[k] = round(v * steps / 120)
        if "teacher" in args:  # the recipe builds the original; reuse the one loaded (same weights)
            args["teacher"] = copy.deepcopy(teacher)
        if cls == "CompressionMonitor":
            continue
        callbacks.append(getattr(importlib.import_module(mod), cls)(**args))
    return callbacks, dict(cfg["model"].get("init_args") or {})


@torch.no_grad()
def evaluate(model: nn.Module, dm: SentenceDataModule) -> tuple[float, float]:
    model.eval()
    embs, targets = [], []
    for b in dm.test_dataloader():
        embs.append(model(b["input_ids"], b["attention_mask"]).float())
        targets.append(b["target"])
    emb, target = torch.cat(embs), torch.cat(targets)
    return float(F.cosine_similarity(emb, target, dim=-1).mean()), retrieval_agreement(emb, target)


def stored(model: nn.Module) -> tuple[int, int, int]:
    """(weight elements, nonzero ones, bytes of torch.save(state_dict))."""
    state = model.state_dict()
    total = nonzero = 0
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and (k.endswith("weight") or k.endswith("bias")) and v.numel() > 1:
            total += v.numel()
            try:
                nonzero += int(torch.count_nonzero(v.dequantize() if v.is_quantized else v))
            except NotImplementedError:  # a tensor subclass without count_nonzero (torchao): count it dense
                nonzero += v.numel()
    buf = io.BytesIO()
    torch.save(state, buf)
    return total, nonzero, buf.getbuffer().nbytes


def fit(model: SentenceEncoder, dm: SentenceDataModule, steps: int, callbacks: list[Any]) -> None:
    model.train()  # as the CLI trains it (dropout on); Lightning would keep a model passed in eval mode in eval mode
    quiet_trainer(3, callbacks, limit_train_batches=max(1, steps // 3), limit_val_batches=0).fit(model, dm)


def run_ours(name: str, base: SentenceEncoder, dm: SentenceDataModule, steps: int, seed: int) -> nn.Module:
    callbacks, init = recipe_callbacks(name, steps, base)
    seed_everything(seed)
    model = copy.deepcopy(base)
    if init.get("depth", 1.0) != 1.0:
        from lightning_compress.export.scaling import scale

        model.bert = scale(model.bert, depth=init["depth"], example_input=model.example_input_array,
                           blocks=init.get("depth_blocks", "first"))
        model.bert.config.num_hidden_layers = len(model.bert.encoder.layer)
    train_like(model, init)
    fit(model, dm, steps, callbacks)
    return model


def train_like(model: SentenceEncoder, init: dict[str, Any]) -> None:
    """The recipe's fine-tuning settings (``lr``, ``dropout``) on ``model``."""
    model.lr = init.get("lr", model.lr)
    if init.get("dropout") is not None:
        set_dropout(model.bert, init["dropout"])


def run_peer(name: str, base: SentenceEncoder, dm: SentenceDataModule, steps: int, seed: int) -> nn.Module:
    seed_everything(seed)
    model = copy.deepcopy(base)
    if name in PEER_RECIPE:  # a training peer fine-tunes as the recipe it is compared with does (lr, dropout)
        train_like(model, recipe_callbacks(PEER_RECIPE[name], steps, base)[1])
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    if name in ("finetune", "finetune_dropout0"):  # the same fine-tuning, nothing compressed: what the budget costs
        if name == "finetune_dropout0":  # as the recipes that set `dropout: 0.0` fine-tune
            set_dropout(model.bert, 0.0)
        fit(model, dm, steps, [])
        return model
    if name == "torch_ao_dynamic_int8":
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)
    if name == "lightning_model_pruning":
        from lightning.pytorch.callbacks import ModelPruning

        pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(m, "weight") for m in linears],
                               amount=lambda epoch: 0.5 if epoch == 0 else 0.0, use_global_unstructured=False,
                               use_lottery_ticket_hypothesis=False, verbose=0)
        fit(model, dm, steps, [pruning])
        return model
    if name == "nncf_qat_int8":
        os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "240")
        import nncf

        calib = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in dm.train_dataloader()]
        model.bert = nncf.quantize(model.bert, nncf.Dataset(calib[:8]), subset_size=min(len(calib), 8) * dm.batch_size,
                                   model_type=nncf.ModelType.TRANSFORMER)  # NNCF's advice for transformer models
        fit(model, dm, steps, [])
        model.bert = nncf.strip(model.bert, example_input=calib[0])  # NNCF 3.x traces the model to strip it
        return model
    if name == "torchao_qat_int8da_int4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.qat import QATConfig

        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
        quantize_(model.bert.encoder, QATConfig(config, step="prepare"))
        fit(model, dm, steps, [])
        quantize_(model.bert.encoder, QATConfig(config, step="convert"))
        return model
    raise ValueError(name)


@torch.no_grad()
def latencies(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    """Median seconds per forward of each model, rounds interleaved across models."""
    for m in models.values():
        m.eval()
    fns = {k: (lambda m=m: m(batch["input_ids"], batch["attention_mask"])) for k, m in models.items()}
    return median_times(fns, rounds, inner=1, warmup=1)


def load(quick: bool, threads: int) -> tuple[SentenceDataModule, SentenceEncoder, int]:
    """The data (32 tokens, 1,600 sentences; quick: 16 and 400), the pretrained original and the token length,
    with torch on ``threads`` threads and Lightning's chatter off."""
    length, sentences = (16, 400) if quick else (32, 1600)
    torch.set_num_threads(threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    dm = SentenceDataModule(batch_size=32, max_length=length, max_sentences=sentences)
    dm.setup("fit")
    return dm, SentenceEncoder(max_length=length).eval(), length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="print the table and plot of the saved JSON only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "minilm.json",
                        help="the JSON to write (the plot goes beside it, same name, .png)")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.out.read_text())
        table(saved["rows"])
        plot(saved["rows"], args.out.with_suffix(".png"))
        return
    steps = args.steps or (12 if args.quick else 120)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    settings = dict(steps=steps, max_length=16 if args.quick else 32, quick=args.quick)
    stored = json.loads(args.out.read_text()) if args.only and args.out.exists() else settings
    if any(stored.get(k) != settings[k] for k in MERGE_KEYS):  # its rows would replace a run they cannot join
        parser.error(f"{args.out} holds a run of {({k: stored.get(k) for k in MERGE_KEYS})}; an --only run of "
                     f"{settings} cannot be merged into it: write it elsewhere with --out")
    dm, base, length = load(args.quick, args.threads)
    batch = next(iter(dm.test_dataloader()))
    rows: list[dict[str, Any]] = []
    fid, ret = evaluate(base, dm)
    rows.append(dict(name="fp32 original", kind="reference", fidelity=[fid], retrieval=[ret]))
    measure(rows[0], base, base, batch, rounds=1)  # first: a run cut short still has the reference's size
    names = [n for n in ORDER if not args.only or n in args.only]
    kinds = {n: "ours" if n in OURS else "reference" if n.startswith("finetune") else "peer" for n in names}
    by_name = {n: dict(name=n, kind=kinds[n], fidelity=[], retrieval=[], seconds=[]) for n in names}
    rows += by_name.values()
    for i, seed in enumerate(seeds):  # seed-major: a run cut short still has every row at least once
        for name in names:
            row = by_name[name]
            if "error" in row or (name == "torch_ao_dynamic_int8" and i > 0):  # no training: one seed
                continue
            t = time.perf_counter()
            try:
                model = (run_ours if row["kind"] == "ours" else run_peer)(name, base, dm, steps, seed)
            except Exception as err:  # a peer that cannot run here: its error goes in the table
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                traceback.print_exc(limit=-2)
                continue
            row["seconds"].append(round(time.perf_counter() - t, 1))
            f, r = evaluate(model, dm)
            row["fidelity"].append(f)
            row["retrieval"].append(r)
            # sizes and latency of the first seed's model; scores' mean/std over the seeds run so far
            measure(row, model if i == 0 else None, base, batch, rounds=3 if args.quick else 10)
            print(name, seed, {k: v for k, v in row.items() if k != "kind"}, flush=True)
            write(rows, steps, seeds, length, dm, args)  # after every run: a cut-short run keeps what it measured
    table(rows)
    plot(write(rows, steps, seeds, length, dm, args), args.out.with_suffix(".png"))  # with stored rows


def measure(row: dict[str, Any], model: nn.Module | None, base: nn.Module, batch: dict[str, torch.Tensor],
            rounds: int) -> None:
    """Sizes, and latency against the fp32 original in interleaved rounds; mean/std of the seeds' scores."""
    if model is not None and "error" not in row:
        try:
            row["weights"], row["nonzero"], row["bytes"] = stored(model)
        except Exception as err:
            row["bytes_error"] = f"{type(err).__name__}: {err}"
        lat = latencies({"fp32": base, "row": model}, batch, rounds)
        row["latency_ms"] = 1000 * lat["row"]
        row["speedup_vs_fp32"] = lat["fp32"] / lat["row"]
    for key in ("fidelity", "retrieval"):
        vals = row[key]
        row[f"{key}_mean"] = statistics.fmean(vals) if vals else None
        row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None


def write(rows: list[dict[str, Any]], steps: int, seeds: list[int], length: int, dm: SentenceDataModule,
          args: argparse.Namespace) -> list[dict[str, Any]]:
    """Save the run to ``args.out`` (an ``--only`` run merged into the stored one); returns the rows saved."""
    out = dict(steps=steps, seeds=seeds, max_length=length, sentences={k: len(v) for k, v in dm.sentences.items()},
               batch_size=32, threads=args.threads, quick=args.quick, rows=rows,
               note="2 CPU cores shared with other jobs while measured: latencies are noisy, read the ratios")
    path = args.out
    stored = json.loads(path.read_text()) if args.only and path.exists() else {}
    if all(stored.get(k) == out[k] for k in MERGE_KEYS) and stored:
        # an --only run adds its rows to a stored run of the same settings (rows it did not run are kept)
        ran = {r["name"] for r in rows}
        merged = rows + [r for r in stored["rows"] if r["name"] not in ran]
        out["rows"] = sorted(merged, key=lambda r: -1 if r["name"] == "fp32 original" else ORDER.index(r["name"]))
        out["seeds"] = sorted(set(stored.get("seeds", [])) | set(seeds))
    path.write_text(json.dumps(out, indent=1))
    return out["rows"]


def table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'row':28} {'kind':9} {'fidelity':>15} {'retrieval':>15} {'weights':>10} {'nonzero':>10} "
          f"{'MB':>7} {'ms/b32':>8} {'x fp32':>7}")
    for r in rows:
        if "error" not in r and r.get("fidelity_mean") is None:
            continue  # not run yet (a run cut short)
        if "error" in r:
            print(f"{r['name']:28} {r['kind']:9} cannot run here: {r['error']}")
            continue
        fm = f"{r['fidelity_mean']:.4f}±{r['fidelity_std']:.4f}"
        rm = f"{r['retrieval_mean']:.3f}±{r['retrieval_std']:.3f}"
        mb = r.get("bytes", math.nan) / 1e6
        print(f"{r['name']:28} {r['kind']:9} {fm:>15} {rm:>15} {r.get('weights', 0):>10,} {r.get('nonzero', 0):>10,} "
              f"{mb:>7.1f} {r.get('latency_ms', math.nan):>8.1f} {r.get('speedup_vs_fp32', math.nan):>7.2f}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"ours": ("o", "tab:blue"), "peer": ("x", "tab:red"), "reference": ("s", "black")}
    for kind, (marker, color) in style.items():
        pts = [r for r in rows if r["kind"] == kind and r.get("bytes") and r.get("fidelity_mean") is not None]
        ax.scatter([r["bytes"] / 1e6 for r in pts], [r["fidelity_mean"] for r in pts], marker=marker, color=color,
                   label={"ours": "lightning-compress", "peer": "peers", "reference": "fp32 (original, fine-tuned)"}[kind])
        for r in pts:
            ax.annotate(r["name"], (r["bytes"] / 1e6, r["fidelity_mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("bytes of torch.save(state_dict) (MB)")
    ax.set_ylabel("test cosine fidelity to the original")
    ax.set_title("all-MiniLM-L6-v2: fidelity vs size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
