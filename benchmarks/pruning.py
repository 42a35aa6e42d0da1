"""GradualPruning vs Lightning's ModelPruning: accuracy at several sparsities, and per-step overhead.

    python benchmarks/pruning.py                 # 3 seeds, sparsities 0.5 0.8 0.9 0.95 0.98, overhead on ~4M params
    python benchmarks/pruning.py --quick         # 1 seed, 2 sparsities, short overhead run

Accuracy: DigitsMLP (64-300-100-10), 30 epochs, Adam with lr 3e-3 for every run, dense included (at 1e-3, the
baseline recipe's rate, the sparse nets lag: they need the larger steps), batch 64, test split of the bundled digits. Both pruners follow the same cubic schedule from epoch 2 to epoch 20 over all Linear weights with
one global magnitude ranking, then fine-tune at the final sparsity:
- GradualPruning updates the masks every 5 optimizer steps (the recipe ``digits_gradual_pruning.yaml``);
- ModelPruning (``l1_unstructured``, ``use_global_unstructured=True``, weights only) prunes at each epoch end by
  the fraction of the remaining weights that keeps it on the same cubic curve; lottery-ticket rewinding off (its
  default is on, which rewinds the kept weights to their initial values: much worse for gradual pruning).
The sparsity each run reached is counted from the weights.

Overhead (``--only overhead``): seconds per training step over whole epochs (median of 3 alternating rounds, side
by side in this process, ``torch.set_num_threads(1)``) of a 64-2048-2048-10 MLP (4.3M parameters), batch 64 and
256, random data, 20-step epochs (a warm-up epoch, then 2 timed ones), with no callback, with GradualPruning
(global, cubic ramp to 90% from epoch 1 to the end, masks updated every 20 steps) and with ModelPruning (global
l1, 20% of the remaining weights at each epoch end, i.e. every 20 steps).

Pretrained (``--only criteria nm``): a DigitsMLP trained dense first (30 epochs, Adam 3e-3, per seed), then pruned
with a short fine-tuning budget: 3 epochs of Adam 1e-3 (57 steps), the sparsity ramped over the first 2 (cubic,
masks every 5 steps, every layer to the same sparsity: ``scope="layer"``), the last one at the final sparsity.
- criteria: magnitude / activation (Wanda) / movement at 50, 70 and 90 %;
- N:M: 2:4 ramped the same way (the fraction of groups held to 2:4 follows the cubic schedule) and 2:4 one-shot
  at step 0 then fine-tuned (NVIDIA's recipe, Mishra et al. 2021), against 50 % unstructured.
The same rows on the pretrained MiniLM example: ``benchmarks/minilm_pruning.py``.

Masking (``--only masking``): the per-step masking and one global mask update on the same 4.3M weights, the
previous way and this version's, side by side.
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
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.schedules import interpolate

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, START, END, LR = 30, 2, 20, 3e-3

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _trainer(callbacks: list[Any], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


def _model_pruning_amount(final: float) -> Any:
    """Fraction of the *remaining* weights to prune at the end of each epoch, following the cubic schedule."""

    def target_after(epoch: int) -> float:  # sparsity in effect from epoch `epoch + 1` on
        return interpolate("cubic", (epoch + 1 - START) / (END - START), 0.0, final) if epoch + 1 >= START else 0.0

    def amount(epoch: int) -> float:
        before = target_after(epoch - 1) if epoch > 0 else 0.0
        after = target_after(epoch)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)

    return amount


def _linear_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def accuracy_run(method: str, sparsity: float, seed: int) -> tuple[float, float]:
    seed_everything(seed, verbose=False)
    model = DigitsMLP(hidden_sizes=[300, 100], lr=LR)
    data = DigitsDataModule(batch_size=64)
    callbacks: list[Any] = []
    if method == "GradualPruning":
        callbacks = [GradualPruning(final_sparsity=sparsity, start_epoch=START, end_epoch=END, update_every=5)]
    elif method == "ModelPruning":
        callbacks = [ModelPruning("l1_unstructured", parameter_names=["weight"], amount=_model_pruning_amount(sparsity),
                                  use_global_unstructured=True, use_lottery_ticket_hypothesis=False)]
    trainer = _trainer(callbacks, max_epochs=EPOCHS)
    trainer.fit(model, datamodule=data)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return 100.0 * acc, _linear_sparsity(model)


class WideMLP(LightningModule):
    def __init__(self, width: int = 2048) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class TimedGradualPruning(GradualPruning):
    """GradualPruning that adds up the wall time of its own work (mask updates, gradient and weight masking)."""

    own_time = 0.0
    _inside = False  # a mask update applies the masks: time that once, not twice

    def _timed(self, fn: Any, *args: Any) -> Any:
        if self._inside:
            return fn(*args)
        t0, self._inside = time.perf_counter(), True
        try:
            return fn(*args)
        finally:
            self._inside = False
            TimedGradualPruning.own_time += time.perf_counter() - t0

    def update_masks(self, step: int) -> None:
        self._timed(super().update_masks, step)

    def _apply_masks(self, params: Any = None) -> None:
        self._timed(super()._apply_masks, params)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._timed(super().on_before_optimizer_step, trainer, pl_module, optimizer)


class StepTimer(Callback):
    """Wall time from the start of epoch 1 (after a warm-up epoch) to the end of training, per optimizer step."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.t0, self.step0 = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.per_step = (time.perf_counter() - self.t0) / (trainer.global_step - self.step0)


def overhead_run(method: str, epochs: int, batch_size: int, steps_per_epoch: int = 20) -> float:
    """Seconds per step; for GradualPruning also sets ``TimedGradualPruning.own_time`` (seconds in all steps)."""
    seed_everything(0, verbose=False)
    TimedGradualPruning.own_time = 0.0
    g = torch.Generator().manual_seed(0)
    n = batch_size * steps_per_epoch
    loader = DataLoader(TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)),
                        batch_size=batch_size)
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if method == "GradualPruning":
        # masks updated every 20 steps (once per epoch) during the ramp, as often as ModelPruning prunes
        callbacks.insert(0, TimedGradualPruning(final_sparsity=0.9, start_epoch=1, end_epoch=epochs,
                                                update_every=steps_per_epoch))
    elif method == "ModelPruning":
        callbacks.insert(0, ModelPruning("l1_unstructured", parameter_names=["weight"], amount=0.2,
                                         use_global_unstructured=True, use_lottery_ticket_hypothesis=False))
    _trainer(callbacks, max_epochs=epochs).fit(WideMLP(), train_dataloaders=loader)
    return timer.per_step


PRETRAIN_EPOCHS, FINETUNE_EPOCHS, RAMP_EPOCHS = 30, 3, 2


def pretrained(seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """A dense DigitsMLP trained from scratch (the "pretrained" model), and its test accuracy."""
    seed_everything(seed, verbose=False)
    model, data = DigitsMLP(lr=LR), DigitsDataModule(batch_size=64)
    quiet_trainer(PRETRAIN_EPOCHS, []).fit(model, datamodule=data)
    return {k: v.clone() for k, v in model.state_dict().items()}, test_accuracy(model, data)


def finetune(state: dict[str, torch.Tensor], seed: int, **pruning: Any) -> tuple[float, float]:
    """Test accuracy and reached sparsity after the short fine-tuning budget (pruned when ``pruning`` is given)."""
    seed_everything(seed, verbose=False)
    model, data = DigitsMLP(lr=1e-3), DigitsDataModule(batch_size=64)
    model.load_state_dict(state)
    callbacks = [GradualPruning(update_every=5, scope="layer", **pruning)] if pruning else []
    quiet_trainer(FINETUNE_EPOCHS, callbacks).fit(model, datamodule=data)
    return test_accuracy(model, data), _linear_sparsity(model)


def pretrained_runs(seeds: list[int], sections: list[str], results: dict[str, Any]) -> None:
    ramp = {"start_epoch": 0, "end_epoch": RAMP_EPOCHS}
    runs: dict[str, dict[str, Any]] = {"fine-tuned dense": {}}
    if "criteria" in sections:
        for criterion in ("magnitude", "activation", "movement"):
            for sparsity in (0.5, 0.7, 0.9):
                runs[f"{criterion}@{sparsity}"] = dict(final_sparsity=sparsity, criterion=criterion, **ramp)
    if "nm" in sections:
        for criterion in ("magnitude", "activation"):
            runs[f"{criterion}@0.5"] = dict(final_sparsity=0.5, criterion=criterion, **ramp)
            runs[f"{criterion} 2:4 gradual"] = dict(pattern="2:4", criterion=criterion, **ramp)
            runs[f"{criterion} 2:4 one-shot"] = dict(pattern="2:4", criterion=criterion, schedule="one_shot",
                                                        start_step=0, end_step=0)
    table = results.setdefault("pretrained", {"seeds": seeds, "accuracy": {}, "sparsity_reached": {}})
    table["seeds"] = seeds
    for seed in seeds:
        state, dense = pretrained(seed)
        table["accuracy"].setdefault("pretrained dense", []).append(dense)
        for name, kwargs in runs.items():
            acc, reached = finetune(state, seed, **kwargs)
            table["accuracy"].setdefault(name, []).append(acc)
            table["sparsity_reached"].setdefault(name, []).append(reached)
            print(f"seed {seed} {name}: {acc:.2f} ({reached:.3f} sparse)", flush=True)


def print_pretrained(results: dict[str, Any]) -> None:
    table = results.get("pretrained", {}).get("accuracy", {})
    if not table:
        return
    acc = lambda k: _fmt(table[k]) if k in table else "—"  # noqa: E731
    print(f"\nPretrained DigitsMLP pruned with a {FINETUNE_EPOCHS}-epoch budget ({len(results['pretrained']['seeds'])} seeds):"
          f" pretrained {acc('pretrained dense')}, fine-tuned dense {acc('fine-tuned dense')}\n")
    print("| sparsity | magnitude (%) | activation / Wanda (%) | movement (%) |")
    print("|---|---|---|---|")
    for sparsity in (0.5, 0.7, 0.9):
        print(f"| {sparsity:.0%} | " + " | ".join(acc(f"{c}@{sparsity}") for c in ("magnitude", "activation", "movement")) + " |")
    print("\n| criterion | 50 % unstructured | 2:4 gradual | 2:4 one-shot + fine-tune | 2:4 gradual - 50 % |")
    print("|---|---|---|---|---|")
    for c in ("magnitude", "activation"):
        if f"{c} 2:4 gradual" in table:
            gap = statistics.mean(table[f"{c} 2:4 gradual"]) - statistics.mean(table[f"{c}@0.5"])
            print(f"| {c} | {acc(f'{c}@0.5')} | {acc(f'{c} 2:4 gradual')} | {acc(f'{c} 2:4 one-shot')} | {gap:+.2f} |")


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def masking_micro(rounds: int = 7) -> dict[str, float]:
    """Median ms of the per-step masking and of one global mask update on the 64-2048-2048-10 weights, before and
    after this version: separate gradient and weight passes vs one ``torch._foreach_mul_``, and the ranking over
    all scores concatenated (the previous algorithm, kept in the tests as the reference) vs per-tensor counts."""
    from lightning_compress.functional import pruning as P

    g = torch.Generator().manual_seed(0)
    ws = {n: torch.randn(*shape, generator=g) for n, shape in (("a", (2048, 64)), ("b", (2048, 2048)), ("c", (10, 2048)))}
    grads = {n: torch.randn_like(w) for n, w in ws.items()}
    keep = {n: P.unstructured_mask(w, 0.5).float() for n, w in ws.items()}
    weights, factors = list(ws.values()), [keep[n] for n in ws]

    def two_passes() -> None:
        for n in ws:
            grads[n].mul_(keep[n])
        for n in ws:
            ws[n].mul_(keep[n])

    def concatenated() -> None:
        flat = torch.cat([P._masked_scores(w.abs(), keep[n]).reshape(-1) for n, w in ws.items()])
        P._prune_lowest(flat, P.num_to_prune(0.7, flat.numel()))

    cases = {"two passes (before)": two_passes, "one _foreach_mul_ (now)": lambda: torch._foreach_mul_(weights, factors),
             "update, concatenated (before)": concatenated,
             "update, per-tensor counts (now)": lambda: P.global_unstructured_masks(ws, 0.7, keep)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--overhead-only", action="store_true", help="re-measure only the step times")
    parser.add_argument("--only", nargs="+", choices=["accuracy", "overhead", "criteria", "nm", "masking"],
                        help="run these sections only (the others are kept from the saved JSON)")
    args = parser.parse_args()
    sections = args.only or (["overhead"] if args.overhead_only else ["accuracy", "overhead", "criteria", "nm"])
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    sparsities = [0.9, 0.98] if args.quick else [0.5, 0.8, 0.9, 0.95, 0.98]
    results: dict[str, Any] = {"seeds": seeds, "epochs": EPOCHS, "accuracy": {}, "sparsity_reached": {}}

    def record(key: str, acc: float, sp: float) -> None:
        results["accuracy"].setdefault(key, []).append(acc)
        results["sparsity_reached"].setdefault(key, []).append(sp)

    out = ROOT / "benchmarks/results/pruning.json"
    if "accuracy" not in sections:
        results = json.loads(out.read_text())
        seeds, sparsities = [], []
    if "criteria" in sections or "nm" in sections:
        pretrained_runs([0] if args.quick else [0, 1, 2], sections, results)
    for seed in seeds:
        record("dense", *accuracy_run("dense", 0.0, seed))
        for s in sparsities:
            for method in ("GradualPruning", "ModelPruning"):
                record(f"{method}@{s}", *accuracy_run(method, s, seed))
                print(f"seed {seed} {method}@{s}: {results['accuracy'][f'{method}@{s}'][-1]:.2f}", flush=True)

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    dense = statistics.mean(results["accuracy"]["dense"])
    seeds, sparsities = results["seeds"], sorted({float(k.split("@")[1]) for k in results["accuracy"] if "@" in k})
    print(f"\nAccuracy on digits (DigitsMLP, {EPOCHS} epochs, {len(seeds)} seeds; dense {fmt(results['accuracy']['dense'])} %)\n")
    print("| sparsity | GradualPruning acc (%) | ModelPruning acc (%) | GradualPruning - dense | GradualPruning - ModelPruning | sparsity reached (ours / MP) |")
    print("|---|---|---|---|---|---|")
    for s in sparsities:
        ours, theirs = results["accuracy"][f"GradualPruning@{s}"], results["accuracy"][f"ModelPruning@{s}"]
        reached = (statistics.mean(results["sparsity_reached"][f"GradualPruning@{s}"]),
                   statistics.mean(results["sparsity_reached"][f"ModelPruning@{s}"]))
        print(f"| {s:.2f} | {fmt(ours)} | {fmt(theirs)} | {statistics.mean(ours) - dense:+.2f} | "
              f"{statistics.mean(ours) - statistics.mean(theirs):+.2f} | {reached[0]:.4f} / {reached[1]:.4f} |")

    print_pretrained(results)
    if "masking" in sections:
        results["masking_ms"] = masking_micro(3 if args.quick else 7)
        print("\n" + "\n".join(f"| {k} | {v:.2f} ms |" for k, v in results["masking_ms"].items()))
    if "overhead" not in sections:
        out.write_text(json.dumps(results, indent=2))
        print(f"\nsaved {out}")
        return
    epochs, rounds = (2, 1) if args.quick else (3, 3)
    results["step_time_s"], results["callback_own_time_per_step_s"] = {}, {}
    results["overhead_setup"] = {"epochs": epochs, "steps_per_epoch": 20, "rounds": rounds, "timed_epochs": epochs - 1}
    print(f"\nPer-step time, 64-2048-2048-10 MLP (4.3M params), 1 thread, median of {rounds} alternating rounds\n")
    print("| batch | callback | ms / step | vs no callback | GradualPruning's own work per step |")
    print("|---|---|---|---|---|")
    for batch_size in (64, 256):
        times: dict[str, list[float]] = {m: [] for m in ("no callback", "GradualPruning", "ModelPruning")}
        own: list[float] = []
        for _ in range(rounds):  # alternate the methods so that machine noise hits all of them alike
            for method in times:
                times[method].append(overhead_run(method, epochs, batch_size))
                if method == "GradualPruning":
                    # its work happens from epoch 1 on (no masks in the warm-up epoch): per timed step
                    own.append(TimedGradualPruning.own_time / ((epochs - 1) * 20))
        med = {m: statistics.median(v) for m, v in times.items()}
        own_ms = 1000 * statistics.median(own)
        results["step_time_s"][str(batch_size)] = times
        results["callback_own_time_per_step_s"][str(batch_size)] = own
        for m, t in med.items():
            extra = f"{own_ms:.2f} ms ({100 * own_ms / (1000 * med['no callback']):.1f}% of a plain step)" if m == "GradualPruning" else ""
            print(f"| {batch_size} | {m} | {1000 * t:.1f} | {100 * (t / med['no callback'] - 1):+.1f}% | {extra} |")

    out.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
