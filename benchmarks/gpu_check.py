"""Checks that need a CUDA GPU: run this on one, put the figures (with the GPU's name) in the README.

    python benchmarks/gpu_check.py            # every check
    python benchmarks/gpu_check.py --quick    # fewer timing repetitions

Without CUDA it prints that it needs CUDA and exits 0 (this project's machines have no GPU; nothing here has
been run yet).

Checks:
- ``semi_structured``: a 2:4-sparse ``nn.Linear`` (4096 x 4096, bias, float16 and bfloat16, batch 1024) stored by
  :func:`lightning_compress.export.to_semi_structured` (``torch.sparse.to_sparse_semi_structured``) against the
  same dense layer: the outputs agree, and the median time of a forward (CUDA events, after warm-up) of each.
  The weights are pruned to 2:4 by :func:`lightning_compress.functional.pruning.nm_mask`, as
  ``GradualPruning(pattern="2:4")`` leaves them. Sparse tensor cores need compute capability >= 8.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.export import to_semi_structured
from lightning_compress.functional.pruning import nm_mask

ROOT = Path(__file__).resolve().parents[1]


def _time_ms(fn: Any, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def semi_structured(repeats: int, size: int = 4096, batch: int = 1024) -> dict[str, Any]:
    """Dense vs 2:4 semi-structured ``nn.Linear`` at ``size`` x ``size``, batch ``batch``, in fp16 and bf16."""
    rows: dict[str, Any] = {}
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        dense = nn.Linear(size, size).to("cuda", dtype)
        dense.weight.mul_(nm_mask(dense.weight.float(), 2, 4).to(dtype))
        sparse = nn.Sequential(nn.Linear(size, size)).to("cuda", dtype)
        sparse[0].load_state_dict(dense.state_dict())
        converted = to_semi_structured(sparse)
        x = torch.randn(batch, size, device="cuda", dtype=dtype)
        error = float((sparse(x) - dense(x)).abs().max() / dense(x).abs().max())
        dense_ms = _time_ms(lambda d=dense, x=x: d(x), repeats)
        sparse_ms = _time_ms(lambda s=sparse, x=x: s(x), repeats)
        rows[str(dtype).removeprefix("torch.")] = {
            "converted": converted, "relative_max_error": error, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
        }
        print(f"| {dtype} | {dense_ms:.3f} | {sparse_ms:.3f} | {dense_ms / sparse_ms:.2f}x | {error:.1e} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py needs CUDA (no GPU found): nothing measured")
        return
    name = torch.cuda.get_device_name()
    results: dict[str, Any] = {"gpu": name, "torch": torch.__version__}
    print(f"{name}, torch {torch.__version__}\n")
    print("2:4 semi-structured vs dense nn.Linear 4096x4096, batch 1024 (median forward time)\n")
    print("| dtype | dense (ms) | 2:4 sparse (ms) | speedup | max error / max output |")
    print("|---|---|---|---|---|")
    results["semi_structured"] = semi_structured(20 if args.quick else 200)
    out = ROOT / "benchmarks/results/gpu_check.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
