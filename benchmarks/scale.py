"""What one compression update costs at 10M, 100M and 1B fp32 parameters: time, extra memory, linearity.

    python benchmarks/scale.py --quick        # 10M and 100M parameters, and the 2-process FSDP2 row at 100M
    python benchmarks/scale.py                # 10M, 100M and 1B (about 10 GB of RAM at the peak)
    python benchmarks/scale.py --only fsdp    # the 2-process row alone

Single process, CPU. The model is a stack of 4096-column fp32 weights (as many 4096 x 4096 tensors as the size
needs, the last one cut short), filled with random normal values. Each measurement runs in a fresh subprocess: it
builds the weights (and the state the update reads), drops the high-water mark of its resident memory
(``/proc/self/clear_refs``), runs the update once, and reports wall time and ``VmHWM - VmRSS before`` from
``/proc/self/status``: the peak memory the update needs beyond the weights and the state already held, outputs
included (a new bool mask is 1 byte per parameter; new int64 assignments are 8). glibc's mmap threshold is pinned
at its 128 KB default (``MALLOC_MMAP_THRESHOLD_``; else it grows after the first large free and freed buffers stay
resident): the CPU tensors' memory is then what is live, which the peak measures.

- ``prune``: one global GradualPruning mask update, 50 % -> 70 % magnitude, through the callback's own update
  path (``callbacks._pruning_sharded.compute_masks``, the exact chunked select of ``functional/_selection.py``),
  previous ``bool`` masks given; the output is the new masks;
- ``prune (torch.nn.utils.prune)``: the peer a user would pick, ``prune.global_unstructured`` with
  ``L1Unstructured`` over the same tensors (it concatenates every score; 10M and 100M only);
- ``qat per-channel`` / ``qat per-tensor``: QuantizationAwareTraining's weight observer update for 8-bit
  symmetric weights (``functional.quantization.uniform_qparams``: min/max per output channel or per tensor);
- ``weight sharing``: WeightSharing's assignment of every weight to its nearest of 16 centroids
  (``functional.weight_sharing.assign``, int64 indices), the assignments of every tensor kept;
- ``weight sharing (uint8 codes)``: the same assignment by ``functional.weight_sharing.assign_codes`` (chunked,
  ``uint8`` codes: 1 byte per value);
- ``weight sharing (callback state)``: the callback itself, ``WeightSharing(bits=4).cluster()`` after its
  ``setup`` on a module of these weights: 1-D k-means per layer (its sort of the layer's non-zeros in float64 and
  int64 labels are transient, one layer at a time), the weights tied, and the state it then holds for training
  (``uint8`` codes per weight, 1 byte per parameter; ``state_bytes_per_param`` in the JSON).

``--only fsdp``: 2 gloo processes, the same 100M weights as ``DTensor`` row shards (``Shard(0)``, as ``fully_shard``
makes): per rank, the mask update through the same path (histograms and tie counts all-reduced) against the
single-process figure, and the mask state each rank holds.

Targets (issue 19): time linear in the parameters (time per parameter about constant across sizes), extra memory
<= 1.5 bytes per parameter, no Python loop over elements; FSDP2 per-rank memory about half of one process's.
Other work shared this machine's 2 cores while these figures were taken: times are noisy, ratios more telling.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_compress.callbacks._pruning_sharded import compute_masks  # imported before any peak is taken

ROOT = Path(__file__).resolve().parent
COLS = 4096
SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000}
OPS = ["prune", "prune (torch.nn.utils.prune)", "qat per-channel", "qat per-tensor", "weight sharing",
       "weight sharing (uint8 codes)", "weight sharing (callback state)"]
PEER_MAX = 100_000_000  # the peer concatenates every score: 1B would need > 8 GB more


def _status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    """Drop the resident-memory high-water mark to the current RSS; return that RSS."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _weights(n: int, seed: int = 0) -> list[torch.Tensor]:
    """fp32 tensors of 4096 columns, ``n`` entries in all (rows of a full 4096 x 4096 block each, the last cut)."""
    g = torch.Generator().manual_seed(seed)
    out, left = [], n
    while left > 0:
        rows = min(COLS, -(-left // COLS))
        out.append(torch.randn(rows, COLS, generator=g))
        left -= rows * COLS
    return out


def _prune_update(weights: dict, previous: dict) -> dict:
    names = list(weights)
    return compute_masks(weights, {f: [] for f in names}, names, previous, {}, "magnitude", "unstructured", 1,
                         None, {f: 0.7 for f in names}, 0.0)


def child(op: str, n: int, warm: bool = True) -> dict:
    """One measurement in this (fresh) process, after one on a 64 x 4096 model: the kernels' code is paged in
    (resident, file-backed) before the peak is taken, so the peak counts data alone."""
    if warm:
        child(op, 64 * COLS, warm=False)
    ws = _weights(n)
    numel = sum(w.numel() for w in ws)
    params = {f"layers.{i}.weight": torch.nn.Parameter(w, requires_grad=False) for i, w in enumerate(ws)}
    del ws
    state: object = None
    if op == "prune":
        from lightning_compress.functional.pruning import global_unstructured_masks

        previous = global_unstructured_masks(params, 0.5)  # the masks of the previous update (state held)
        before = _reset_peak()
        t0 = time.perf_counter()
        state = _prune_update(params, previous)
        seconds = time.perf_counter() - t0
    elif op.startswith("prune (torch"):
        from torch.nn.utils import prune

        mods = []
        for p in params.values():
            m = torch.nn.Module()
            m.weight = p
            mods.append((m, "weight"))
        before = _reset_peak()
        t0 = time.perf_counter()
        prune.global_unstructured(mods, pruning_method=prune.L1Unstructured, amount=round(0.7 * numel))
        seconds = time.perf_counter() - t0
    elif op.startswith("qat"):
        from lightning_compress.functional.quantization import uniform_qparams

        per_channel = op == "qat per-channel"
        before = _reset_peak()
        t0 = time.perf_counter()
        state = [uniform_qparams(p, 8, True, per_channel) for p in params.values()]
        seconds = time.perf_counter() - t0
    elif op == "weight sharing (callback state)":
        from lightning.pytorch import Trainer

        from lightning_compress import WeightSharing

        module = torch.nn.Sequential(*[torch.nn.Linear(COLS, p.shape[0], bias=False) for p in params.values()])
        for layer, p in zip(module, params.values(), strict=True):
            layer.weight = p.requires_grad_()
        sharing = WeightSharing(bits=4)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        sharing.setup(trainer, module, "fit")  # targets every Linear, as a fit would
        before = _reset_peak()
        t0 = time.perf_counter()
        sharing.cluster()
        seconds = time.perf_counter() - t0
        held = sum(a.numel() * a.element_size() for a in sharing._assignments.values())
        held += sum(t.held_bytes for t in sharing._ties.values())
        state = sharing
    else:
        from lightning_compress.functional.weight_sharing import assign, assign_codes

        nearest = assign_codes if op.endswith("(uint8 codes)") else assign
        centroids = [torch.linspace(float(p.min()), float(p.max()), 16) for p in params.values()]
        before = _reset_peak()
        t0 = time.perf_counter()
        state = [nearest(p.detach(), c) for p, c in zip(params.values(), centroids, strict=True)]
        seconds = time.perf_counter() - t0
    extra = _status("VmHWM") - before
    if op == "prune" and sum(m.numel() - int(torch.count_nonzero(m)) for m in state.values()) != round(0.7 * numel):
        raise RuntimeError("the update did not prune exactly 70 %")
    del state
    out = {"op": op, "params": numel, "seconds": seconds, "extra_bytes": extra, "bytes_per_param": extra / numel}
    return out if op != "weight sharing (callback state)" else {**out, "state_bytes_per_param": held / numel}


def fsdp_worker(rank: int, n: int, port: int, queue: object) -> None:
    """One of 2 gloo ranks: 100M weights as row shards, one sharded mask update."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    params, previous, local_numel = {}, {}, 0
    g = torch.Generator().manual_seed(rank)
    left, i = n, 0
    while left > 0:
        rows = min(COLS, -(-left // COLS))
        size = -(-rows // 2)
        start = min(rank * size, rows)
        piece = torch.randn(min(start + size, rows) - start, COLS, generator=g)
        d = DTensor.from_local(piece, mesh, [Shard(0)], run_check=False, shape=(rows, COLS), stride=(COLS, 1))
        params[f"layers.{i}.weight"] = torch.nn.Parameter(d, requires_grad=False)
        previous[f"layers.{i}.weight"] = piece.abs() > 0.6745  # about 50 % kept
        local_numel += piece.numel()
        left -= rows * COLS
        i += 1
    dist.barrier()
    before = _reset_peak()
    t0 = time.perf_counter()
    new = _prune_update(params, previous)
    seconds = time.perf_counter() - t0
    extra = _status("VmHWM") - before
    pruned = torch.tensor([sum(m.numel() - int(torch.count_nonzero(m)) for m in new.values())])
    dist.all_reduce(pruned)
    queue.put({"rank": rank, "seconds": seconds, "extra_bytes": extra, "local_params": local_numel,
               "mask_state_bytes": sum(m.numel() for m in new.values()), "pruned_all_ranks": int(pruned)})
    dist.destroy_process_group()


def run_fsdp(n: int) -> list[dict]:
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # as for the single-process children
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=fsdp_worker, args=(r, n, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return out


def measure(op: str, n: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", op, str(n)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]),
               MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        return {"op": op, "params": n, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10M and 100M only")
    parser.add_argument("--only", choices=["single", "fsdp"], default=None)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="rerun these sizes only (others kept)")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="rerun these updates only (others kept)")
    parser.add_argument("--child", nargs=2, metavar=("OP", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    sizes = args.sizes or (["10M", "100M"] if args.quick else list(SIZES))
    results: dict = {"single": [], "fsdp": {}}
    out_path = ROOT / "results" / "scale.json"
    if out_path.exists():  # keep the part not rerun
        results.update({k: v for k, v in json.loads(out_path.read_text()).items() if k in ("single", "fsdp")})
    if args.only in (None, "single"):
        ops = args.ops or OPS
        results["single"] = [r for r in results["single"] if not (r.get("size") in sizes and r["op"] in ops)]
        for size in sizes:
            for op in ops:
                if op.startswith("prune (torch") and SIZES[size] > PEER_MAX:
                    continue
                r = measure(op, SIZES[size], args.timeout)
                r["size"] = size
                results["single"].append(r)
                print(json.dumps(r), flush=True)
        base = {r["op"]: r["seconds"] / r["params"] for r in results["single"] if r.get("size") == "10M" and "seconds" in r}
        results["single"].sort(key=lambda r: (SIZES[r["size"]], OPS.index(r["op"])))
        for r in results["single"]:
            if "seconds" in r and r["op"] in base:
                r["time_per_param_vs_10M"] = (r["seconds"] / r["params"]) / base[r["op"]]
    if args.only in (None, "fsdp"):
        n = SIZES["100M"]
        single = measure("prune", n, args.timeout)
        ranks = run_fsdp(n)
        results["fsdp"] = {"params": n, "single": single, "ranks": ranks,
                           "per_rank_vs_single": [r["extra_bytes"] / single["extra_bytes"] for r in ranks]}
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"\n{'op':<30}{'size':>6}{'seconds':>10}{'extra MB':>11}{'B/param':>9}{'t/param vs 10M':>16}")
    for r in results["single"]:
        if "error" in r:
            print(f"{r['op']:<30}{r['size']:>6}  failed: {r['error']}")
            continue
        ratio = r.get("time_per_param_vs_10M")
        print(f"{r['op']:<30}{r['size']:>6}{r['seconds']:>10.2f}{r['extra_bytes'] / 2**20:>11.1f}"
              f"{r['bytes_per_param']:>9.2f}{'' if ratio is None else f'{ratio:.2f}':>16}")
    if results["fsdp"]:
        f = results["fsdp"]
        print(f"\nFSDP2, 2 gloo processes, 100M: one process {f['single']['extra_bytes'] / 2**20:.1f} MB extra "
              f"({f['single']['seconds']:.2f} s)")
        for r, ratio in zip(f["ranks"], f["per_rank_vs_single"], strict=True):
            print(f"  rank {r['rank']}: {r['extra_bytes'] / 2**20:.1f} MB extra ({ratio:.2f} of one process), "
                  f"{r['seconds']:.2f} s, masks held {r['mask_state_bytes'] / 2**20:.1f} MB for "
                  f"{r['local_params']:,} parameters")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
