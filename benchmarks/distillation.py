"""KnowledgeDistillation: does a small student learn more from a wide teacher than from the labels alone?

    python benchmarks/distillation.py            # 5 seeds (about 5 minutes on 2 busy cores)
    python benchmarks/distillation.py --quick    # 2 seeds, fewer timing steps

Setting (the two recipes, read from their YAML so the numbers are theirs): the teacher is the digits MLP at
64-1200-1200-10 with dropout 0.2 (``recipes/digits_teacher.yaml``: full training split of 1,168 digits, 30 epochs);
the student is a 64-128-10 MLP (1/159 of the teacher's parameters) that sees only the first 100 digits of the
training split, 200 epochs, Adam (``recipes/digits_distillation.yaml``: temperature 4, alpha 0.9). Each seed ``s``
draws its own split (``split_seed=s``, so also its own 100 digits and test set of 359), teacher and student
initialisation; within a seed every student row starts from the same weights and sees the same batches, so rows
are compared pairwise. Rows: teacher; student alone; distilled (logits); distilled with features (the student's
hidden Linear ``net.1`` hinted towards the teacher's first Linear ``net.1`` through a learned 128->1200 projection,
``feature_weight`` 1); and the student pruned to 90% (GradualPruning: global magnitude, cubic ramp from epoch 10 to
100, masks updated every epoch) alone and distilled. Target: distilled beats alone by more than two standard
deviations of the per-seed difference.

Overhead: milliseconds per training step (``on_train_batch_start`` to ``on_train_batch_end``: forward, teacher,
losses, backward, optimizer step), median over steps, of the student alone, distilled, and distilled with features,
in alternating rounds side by side in this process with ``torch.set_num_threads(1)``; and the teacher's forward
alone on the same batch.
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
import yaml
from _common import quiet_trainer
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.examples import DigitsDataModule, DigitsMLP

ROOT = Path(__file__).resolve().parents[1]
TEACHER = yaml.safe_load((ROOT / "recipes/digits_teacher.yaml").read_text())
STUDENT = yaml.safe_load((ROOT / "recipes/digits_distillation.yaml").read_text())
KD_ARGS = {k: v for k, v in STUDENT["trainer"]["callbacks"][0]["init_args"].items()
           if k not in ("teacher", "teacher_checkpoint")}
FEATURES = {"feature_pairs": {"net.1": "net.1"}, "feature_weight": 1.0}

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.set_num_threads(1)


def _test_acc(trainer: Trainer, model: DigitsMLP, dm: DigitsDataModule) -> float:
    return 100 * float(trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"])


def _sparsity(model: DigitsMLP) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return 100 * float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def run_seed(seed: int) -> dict[str, float]:
    t_data = {**TEACHER["data"]["init_args"], "split_seed": seed}
    s_data = {**STUDENT["data"]["init_args"], "split_seed": seed}
    seed_everything(seed)
    teacher = DigitsMLP(**TEACHER["model"]["init_args"])
    dm_t = DigitsDataModule(**t_data)
    trainer = quiet_trainer(TEACHER["trainer"]["max_epochs"], [], limit_val_batches=0)
    trainer.fit(teacher, datamodule=dm_t)
    out = {"teacher": _test_acc(trainer, teacher, dm_t)}
    epochs = STUDENT["trainer"]["max_epochs"]
    rows: dict[str, list[Callback]] = {
        "student alone": [],
        "student distilled (logits)": [KnowledgeDistillation(teacher=teacher, **KD_ARGS)],
        "student distilled (logits + features)": [KnowledgeDistillation(teacher=teacher, **KD_ARGS, **FEATURES)],
        "student pruned 90%, alone": [_pruning()],
        "student pruned 90%, distilled": [_pruning(), KnowledgeDistillation(teacher=teacher, **KD_ARGS)],
    }
    for name, callbacks in rows.items():
        seed_everything(1000 + seed)
        student = DigitsMLP(**STUDENT["model"]["init_args"])
        dm = DigitsDataModule(**s_data)
        trainer = quiet_trainer(epochs, callbacks, limit_val_batches=0)
        trainer.fit(student, datamodule=dm)
        out[name] = _test_acc(trainer, student, dm)
        if "pruned" in name:
            out[name + " sparsity"] = _sparsity(student)
    return out


def _pruning() -> GradualPruning:
    return GradualPruning(final_sparsity=0.9, start_epoch=10, end_epoch=100, update_every=4, schedule="cubic")


class _StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


def overhead(steps: int, rounds: int = 3) -> dict[str, float]:
    seed_everything(0)
    teacher = DigitsMLP(**TEACHER["model"]["init_args"]).eval()
    variants: dict[str, list[Any]] = {
        "student alone": [],
        "distilled (logits)": [KnowledgeDistillation(teacher=teacher, **KD_ARGS)],
        "distilled (logits + features)": [KnowledgeDistillation(teacher=teacher, **KD_ARGS, **FEATURES)],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    dm = DigitsDataModule(**STUDENT["data"]["init_args"])
    for _ in range(rounds):
        for name, callbacks in variants.items():
            timer = _StepTimer()
            student = DigitsMLP(**STUDENT["model"]["init_args"])
            quiet_trainer(10_000, [*callbacks, timer], max_steps=steps, limit_val_batches=0).fit(student, datamodule=dm)
            times[name] += timer.times[5:]  # skip warm-up
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))[0]
    teacher_times = []
    with torch.no_grad():
        for _ in range(rounds * steps):
            t0 = time.perf_counter()
            teacher(x)
            teacher_times.append(time.perf_counter() - t0)
    out = {name: 1000 * statistics.median(t) for name, t in times.items()}
    out["teacher forward only"] = 1000 * statistics.median(teacher_times)
    return out


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    seeds = list(range(2 if args.quick else args.seeds))
    t0 = time.perf_counter()
    results = [run_seed(s) for s in seeds]
    names = [k for k in results[0] if not k.endswith("sparsity")]
    acc = {k: [r[k] for r in results] for k in names}
    base = {"student distilled (logits)": "student alone", "student distilled (logits + features)": "student alone",
            "student pruned 90%, distilled": "student pruned 90%, alone"}
    print("| model | params | seeds | test acc (%) | distilled − alone (pp), mean ± sd | mean / sd |")
    print("|---|---|---|---|---|---|")
    n_teacher = sum(p.numel() for p in DigitsMLP(**TEACHER["model"]["init_args"]).parameters())
    n_student = sum(p.numel() for p in DigitsMLP(**STUDENT["model"]["init_args"]).parameters())
    diffs_out: dict[str, Any] = {}
    for name in names:
        params = n_teacher if name == "teacher" else n_student
        if "pruned" in name:
            sp = statistics.mean(r[name + " sparsity"] for r in results)
            params_s = f"{n_student:,} at {sp:.1f}% zeros"
        else:
            params_s = f"{params:,}"
        diff_s = ratio_s = ""
        if name in base:
            d = [a - b for a, b in zip(acc[name], acc[base[name]], strict=True)]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            ratio = statistics.mean(d) / sd if sd else float("inf")
            diff_s, ratio_s = _mean_sd(d), f"{ratio:.1f}"
            diffs_out[name] = {"vs": base[name], "diffs": d, "mean": statistics.mean(d), "sd": sd,
                               "target_met": statistics.mean(d) > 2 * sd}
        print(f"| {name} | {params_s} | {len(seeds)} | {_mean_sd(acc[name])} | {diff_s} | {ratio_s} |")
    train_s = time.perf_counter() - t0

    timing = overhead(steps=40 if args.quick else 150)
    print()
    print(f"| step time, batch {STUDENT['data']['init_args']['batch_size']}, 1 thread | ms / step | × student alone |")
    print("|---|---|---|")
    for name, ms in timing.items():
        print(f"| {name} | {ms:.2f} | {ms / timing['student alone']:.2f} |")
    print(f"\naccuracy runs took {train_s:.0f} s")
    out = ROOT / "benchmarks/results/distillation.json"
    out.write_text(json.dumps({
        "seeds": seeds, "teacher_recipe": TEACHER, "student_recipe": STUDENT, "features": FEATURES,
        "test_acc": acc, "sparsity": {k: [r[k] for r in results] for k in results[0] if k.endswith("sparsity")},
        "differences": diffs_out, "step_ms": timing, "accuracy_wall_s": train_s,
    }, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
