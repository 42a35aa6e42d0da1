"""GradualPruning on the pretrained all-MiniLM-L6-v2: criterion x sparsity, and 2:4 against 50 % unstructured.

    python benchmarks/minilm_pruning.py                  # 60 steps; criteria on seed 0, N:M rows on 3 seeds
    python benchmarks/minilm_pruning.py --quick          # 6 steps, 16 tokens, 400 sentences, 1 seed
    python benchmarks/minilm_pruning.py --only nm --seeds 3
    python benchmarks/minilm_pruning.py --rows "activation 2:4 gradual adaptive" --seeds 3 --resume

Same data, model and budget as ``benchmarks/minilm.py`` (the packaged pretrained encoder fine-tuned to reproduce
its own embeddings of standard-library docstring sentences, 3 epochs of ``steps / 3`` batches, Adam 5e-5) with the
pruning of ``recipes/minilm_pruning.yaml``: every encoder Linear layer (``scope="layer"``), the sparsity ramped
(cubic) over the first two epochs, masks updated every 10 steps (the recipe's value, kept as ``benchmarks/minilm.py``
keeps it), the last epoch at the final sparsity.

- criteria (seed 0 only, to keep the run short: 7 fine-tunings): magnitude and activation (Wanda) at 50, 70 and
  90 %, movement at 50 %;
- per row (``--only row``, seed 0): ``scope="row"``, each output row's entries ranked among themselves (Wanda's
  comparison group), activation at 50 and 70 %, magnitude at 50 %;
- reconstruct (``--only recon``, seed 0): ``reconstruct=True`` (SparseGPT's update of the kept weights at every
  mask update) on activation 50 % per layer and per row, and on 2:4 gradual and one-shot; one-shot 50 % per row at
  step 10; ``reconstruct="adaptive"`` (the sweep chooses the entries) on 50 % per row and 2:4 gradual;
- sensitivity (``--only sensitivity``): one-shot 50 % per row of one layer type at a time (and of all), no training,
  the fidelity each keeps: what ``recipes/minilm_pruning.yaml``'s ``layer_sparsity`` spreads its 50 % by; the row
  ``activation per row@0.5 adaptive by type`` trains with that spread;
- N:M (``--seeds``): activation-ranked 2:4 ramped the same way (the fraction of groups held to 2:4 follows the
  schedule) and 2:4 one-shot at step 0 then fine-tuned (NVIDIA's recipe; seed 0), against 50 % unstructured.

Reported: test cosine fidelity to the original's embeddings and top-1 retrieval agreement (mean ± std over the
seeds run), and the sparsity reached over the pruned layers. Writes ``benchmarks/results/minilm_pruning.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import seed_everything
from minilm import MERGE_KEYS, evaluate, fit, load
from torch import nn

from lightning_compress import GradualPruning
from lightning_compress.callbacks._pruning_reconstruct import InputGram, reconstruct_weight
from lightning_compress.examples.sentence import SentenceDataModule, SentenceEncoder
from lightning_compress.functional import pruning as masks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "minilm_pruning.json"


def criteria_runs() -> dict[str, dict[str, Any]]:
    runs = {f"{c}@{s}": dict(criterion=c, final_sparsity=s) for c in ("magnitude", "activation") for s in (0.5, 0.7, 0.9)}
    runs["movement@0.5"] = dict(criterion="movement", final_sparsity=0.5)
    return runs


def row_runs() -> dict[str, dict[str, Any]]:  # Wanda's comparison group: each output row ranked on its own
    return {f"{c} per row@{s}": dict(criterion=c, final_sparsity=s, scope="row")
            for c, s in (("activation", 0.5), ("magnitude", 0.5), ("activation", 0.7))}


def nm_runs() -> dict[str, dict[str, Any]]:
    return {
        "activation@0.5": dict(criterion="activation", final_sparsity=0.5),
        "activation 2:4 gradual": dict(criterion="activation", pattern="2:4"),
        "activation 2:4 one-shot": dict(criterion="activation", pattern="2:4", schedule="one_shot", start_step=0,
                                        end_step=0),
    }


def recon_runs() -> dict[str, dict[str, Any]]:  # the same, with the kept weights updated at every mask update
    return {"activation@0.5 reconstruct": dict(criterion="activation", final_sparsity=0.5, reconstruct=True),
            "activation per row@0.5 reconstruct": dict(criterion="activation", final_sparsity=0.5, scope="row",
                                                       reconstruct=True),
            "activation 2:4 gradual reconstruct": dict(criterion="activation", pattern="2:4", reconstruct=True),
            "activation 2:4 one-shot reconstruct": dict(criterion="activation", pattern="2:4", schedule="one_shot",
                                                        start_step=0, end_step=0, reconstruct=True),
            # one-shot after 10 batches (320 sentences) of statistics, then fine-tuned
            "activation per row@0.5 one-shot@10 reconstruct": dict(criterion="activation", final_sparsity=0.5,
                                                                   scope="row", schedule="one_shot", start_step=10,
                                                                   end_step=10, reconstruct=True),
            # SparseGPT's mask: the sweep picks which entries go, in the numbers the criterion's mask sets
            "activation per row@0.5 adaptive": dict(criterion="activation", final_sparsity=0.5, scope="row",
                                                    reconstruct="adaptive"),
            "activation 2:4 gradual adaptive": dict(criterion="activation", pattern="2:4", reconstruct="adaptive"),
            # the statistics behind each update over every batch since the start (statistics="cumulative")
            "activation per row@0.5 adaptive cumulative": dict(criterion="activation", final_sparsity=0.5,
                                                               scope="row", reconstruct="adaptive",
                                                               statistics="cumulative"),
            "activation 2:4 gradual adaptive cumulative": dict(criterion="activation", pattern="2:4",
                                                               reconstruct="adaptive", statistics="cumulative"),
            # 50 % in all, spread over the layer types by their one-shot cost (--only sensitivity): the recipe's
            "activation per row@0.5 adaptive by type": dict(criterion="activation", final_sparsity=0.5, scope="row",
                                                            reconstruct="adaptive", layer_sparsity=recipe_sparsity())}


def recipe_sparsity() -> dict[str, float]:
    """The ``layer_sparsity`` of ``recipes/minilm_pruning.yaml``."""
    cfg = yaml.safe_load((ROOT / "recipes" / "minilm_pruning.yaml").read_text())
    (pruning,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("GradualPruning")]
    return dict(pruning["init_args"]["layer_sparsity"])


TYPES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
         "attention output": "attention.output.dense", "feed-forward in": "intermediate.dense",
         "feed-forward out": "output.dense"}


@torch.no_grad()
def sensitivity(base: SentenceEncoder, dm: SentenceDataModule, batches: int = 10) -> dict[str, float]:
    """Test fidelity after one-shot pruning (no training) of one layer type (or all) of every block at 50 % per
    row: activation criterion, then the kept weights updated from the Gram matrix of ``batches`` training batches
    (the update of ``reconstruct=True``), as one mask update of the recipe would."""
    layers = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")}
    gathered = InputGram()  # the callback's gathering, from forwards with gradients on as in training
    gathered.attach({n: [m] for n, m in layers.items()})
    with torch.enable_grad():
        for _, b in zip(range(batches), dm.train_dataloader(), strict=False):
            base(b["input_ids"], b["attention_mask"])
    gathered.remove()
    grams = gathered.grams(None)
    out = {}
    for kind, suffix in {**TYPES, "all": ""}.items():
        model = copy.deepcopy(base)
        for name, module in model.named_modules():
            if name in layers and name.endswith(suffix) and (kind != "feed-forward out" or "attention" not in name):
                w, gram = module.weight, grams[name]
                keep = masks.row_mask(w, 0.5, scores=masks.importance(w, "activation", gram.diagonal().sqrt()))  # per row
                w.copy_(reconstruct_weight(w, gram, keep))
        out[kind] = evaluate(model, dm)[0]
        print(f"one-shot 50 % of {kind}: fidelity {out[kind]:.4f}", flush=True)
    return out


def encoder_sparsity(model: nn.Module) -> float:
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def prune_run(base: SentenceEncoder, dm: SentenceDataModule, steps: int, seed: int, **kwargs: Any) -> dict[str, float]:
    window = {} if "start_step" in kwargs else dict(start_epoch=0, end_epoch=2)
    pruning = GradualPruning(update_every=10, **{"scope": "layer", **window, **kwargs})
    seed_everything(seed, verbose=False)
    model = copy.deepcopy(base)
    fit(model, dm, steps, [pruning])
    fidelity, retrieval = evaluate(model, dm)
    return dict(fidelity=fidelity, retrieval=retrieval, sparsity=encoder_sparsity(model))


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f} (n={len(values)})"


def table(results: dict[str, Any]) -> None:
    rows = results["rows"]
    cell = lambda k: _fmt([r["fidelity"] for r in rows[k]]) if k in rows else "—"  # noqa: E731
    print(f"\nall-MiniLM-L6-v2, {results['steps']} fine-tuning steps, test cosine fidelity to the original")
    print("\n| sparsity | magnitude | activation (Wanda) | movement | magnitude per row | activation per row |"
          "\n|---|---|---|---|---|---|")
    for s in (0.5, 0.7, 0.9):
        print(f"| {s:.0%} | {cell(f'magnitude@{s}')} | {cell(f'activation@{s}')} | {cell(f'movement@{s}')} "
              f"| {cell(f'magnitude per row@{s}')} | {cell(f'activation per row@{s}')} |")
    print("\n| 50 % unstructured | 2:4 gradual | 2:4 one-shot + fine-tune | 2:4 gradual - 50 % |\n|---|---|---|---|")
    if "activation 2:4 gradual" in rows and "activation@0.5" in rows:
        gap = (statistics.mean(r["fidelity"] for r in rows["activation 2:4 gradual"])
               - statistics.mean(r["fidelity"] for r in rows["activation@0.5"]))
        print(f"| {cell('activation@0.5')} | {cell('activation 2:4 gradual')} | {cell('activation 2:4 one-shot')} "
              f"| {gap:+.4f} |")
    if "sensitivity" in results:
        print("\n| one-shot 50 % per row of | " + " | ".join(results["sensitivity"]) + " |\n|---|"
              + "---|" * len(results["sensitivity"]) + "\n| fidelity (no training) | "
              + " | ".join(f"{v:.4f}" for v in results["sensitivity"].values()) + " |")
    print("\n| with reconstruct=True | fidelity |\n|---|---|")
    for name in recon_runs():
        print(f"| {name} | {cell(name)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--only", nargs="+", choices=["criteria", "nm", "row", "recon", "sensitivity"],
                        help="tables to run (default: all of them; with --rows: none but those rows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="skip the runs already in the stored JSON")
    parser.add_argument("--rows", nargs="+", help="run only these rows (any table's), on every seed of --seeds")
    args = parser.parse_args()
    if args.only is None:  # --rows alone runs those rows only (the one-shot sensitivity table too would be rerun)
        args.only = [] if args.rows else ["criteria", "nm", "row", "recon", "sensitivity"]
    steps = args.steps or (6 if args.quick else 60)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    dm, base, length = load(args.quick, args.threads)
    results: dict[str, Any] = dict(steps=steps, max_length=length, sentences={k: len(v) for k, v in dm.sentences.items()},
                                   quick=args.quick, rows={})
    crit, nm, row = criteria_runs(), nm_runs(), row_runs()
    # most telling first (a run cut short keeps them): the 50 % and 2:4 targets, then the rest of the table, then seeds
    first = [("activation@0.5", crit["activation@0.5"], 0), ("activation 2:4 gradual", nm["activation 2:4 gradual"], 0)]
    plan: list[tuple[str, dict[str, Any], int]] = first if "nm" in args.only else first[:1]
    if "row" in args.only:
        plan += [(name, kw, 0) for name, kw in row.items()]
    if "recon" in args.only:
        plan += [(name, kw, 0) for name, kw in recon_runs().items()]
    if "criteria" in args.only:
        plan += [(name, kw, 0) for name, kw in crit.items()]
    if "nm" in args.only:
        plan += [(name, kw, s) for s in seeds for name, kw in nm.items() if s == 0 or "one-shot" not in name]
    if args.rows:
        every = {**crit, **nm, **row, **recon_runs()}
        unknown = [r for r in args.rows if r not in every]
        if unknown:
            parser.error(f"--rows: unknown {unknown}; known: {list(every)}")
        plan = [(name, every[name], s) for s in seeds for name in args.rows]
    if args.resume and OUT.exists():  # keep the runs of a stored run with the same settings
        stored = json.loads(OUT.read_text())
        if all(stored.get(k) == results[k] for k in MERGE_KEYS):
            results["rows"] = stored["rows"]
            results.update({k: v for k, v in stored.items() if k == "sensitivity"})
    if "sensitivity" in args.only:
        results["sensitivity"] = sensitivity(base, dm)
        OUT.write_text(json.dumps(results, indent=1))
    done = {(name, r["seed"]) for name, rs in results["rows"].items() for r in rs}
    for name, kwargs, seed in plan:
        if (name, seed) in done:
            continue
        done.add((name, seed))
        row = dict(seed=seed, **prune_run(base, dm, steps, seed, **kwargs))
        results["rows"].setdefault(name, []).append(row)
        print(name, row, flush=True)
        OUT.write_text(json.dumps(results, indent=1))  # after every run: a cut-short run keeps what it measured
    table(results)


if __name__ == "__main__":
    main()
