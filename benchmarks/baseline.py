"""Dense digits baseline: the command from the README, timed, over several seeds.

    python benchmarks/baseline.py            # 3 seeds
    python benchmarks/baseline.py --quick    # 1 seed

Runs `lightning-compress fit --config recipes/digits_baseline.yaml --seed_everything=<seed>` as a real
subprocess (wall time includes start-up), parses the test accuracy, prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cwd:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_compress.cli", "fit", "--config", str(ROOT / "recipes/digits_baseline.yaml"),
             f"--seed_everything={seed}"],
            cwd=cwd, capture_output=True, text=True, check=True,
        )
        wall = time.perf_counter() - t0
    acc = float(re.search(r"test/acc\W+([0-9.]+)", proc.stdout).group(1))  # a rich table: `│ test/acc │ 0.97 │`
    return acc, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    rows = [run(s) for s in seeds]
    accs, walls = [100 * a for a, _ in rows], [w for _, w in rows]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print("| recipe | seeds | test acc (%) | wall time (s) |")
    print("|---|---|---|---|")
    print(f"| digits_baseline | {len(accs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | {statistics.mean(walls):.1f} |")
    out = ROOT / "benchmarks/results/baseline.json"
    out.write_text(json.dumps({"seeds": list(seeds), "test_acc": accs, "wall_s": walls}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
