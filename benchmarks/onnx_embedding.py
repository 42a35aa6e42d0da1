"""Which ONNX graph form of an int8 per-row embedding table onnxruntime runs best (``to_onnx(embeddings="int8")``).

    python benchmarks/onnx_embedding.py            # MiniLM's table (30522 x 384), 15 rounds
    python benchmarks/onnx_embedding.py --quick    # 7 rounds

Three one-table graphs, ids (32, 32), onnxruntime CPU provider, 1 thread:

- ``float``: ``Gather(float32 table, ids)`` (what the float export writes);
- ``int8 Gather (ours)``: ``Gather(int8 table, ids) -> Cast -> Mul <- Gather(steps (V, 1), ids)`` (what
  ``to_onnx(embeddings="int8")`` writes);
- ``int8 DequantizeLinear``: ``DequantizeLinear(int8 table, steps, axis=0) -> Gather``.

Latency: median of alternating rounds in one process (ratios are what counts on a shared machine). Memory: resident
set growth over session creation plus one run, each form in its own fresh process. JSON in
``benchmarks/results/onnx_embedding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import median_times
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
VOCAB, DIM = 30522, 384
FORMS = ["float", "int8 Gather (ours)", "int8 DequantizeLinear"]


def build(form: str, path: str) -> str:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((VOCAB, DIM)) * 0.05).astype(np.float32)
    steps = (np.abs(w).max(1, keepdims=True) / 127).astype(np.float32)
    codes = np.clip(np.rint(w / steps), -127, 127).astype(np.int8)
    if form == "float":
        inits, nodes = [numpy_helper.from_array(w, "w")], [helper.make_node("Gather", ["w", "ids"], ["y"], axis=0)]
    elif form == "int8 Gather (ours)":
        inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(steps, "steps")]
        nodes = [helper.make_node("Gather", ["codes", "ids"], ["rows"], axis=0),
                 helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
                 helper.make_node("Gather", ["steps", "ids"], ["row_steps"], axis=0),
                 helper.make_node("Mul", ["rows_f", "row_steps"], ["y"])]
    else:
        inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(steps[:, 0], "steps"),
                 numpy_helper.from_array(np.zeros(VOCAB, np.int8), "zero")]
        nodes = [helper.make_node("DequantizeLinear", ["codes", "steps", "zero"], ["w"], axis=0),
                 helper.make_node("Gather", ["w", "ids"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", DIM])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def memory(path: str) -> dict[str, float]:
    """(run in a fresh process) resident MB added by creating the session, and by it plus one run."""
    ids = np.random.default_rng(1).integers(0, VOCAB, (32, 32)).astype(np.int64)
    r0 = _rss_mb()
    s = _session(path)
    r1 = _rss_mb()
    s.run(None, {"ids": ids})
    return {"session_mb": r1 - r0, "after_run_mb": _rss_mb() - r0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one file in this process
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory(args.memory_of)))
        return
    rounds = 7 if args.quick else 15
    ids = np.random.default_rng(1).integers(0, VOCAB, (32, 32)).astype(np.int64)
    with tempfile.TemporaryDirectory() as root:
        paths = {k: build(k, os.path.join(root, f"{i}.onnx")) for i, k in enumerate(FORMS)}
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
        mem = {k: json.loads(subprocess.run([sys.executable, __file__, "--memory-of", p], capture_output=True,
                                            text=True, check=True, timeout=600).stdout.strip().splitlines()[-1])
               for k, p in paths.items()}
        sessions = {k: _session(p) for k, p in paths.items()}
        ref = sessions["float"].run(None, {"ids": ids})[0]
        err = {k: float(np.abs(s.run(None, {"ids": ids})[0] - ref).max()) for k, s in sessions.items()}
        times = median_times({k: (lambda s=s: s.run(None, {"ids": ids})) for k, s in sessions.items()}, rounds, 20)
    result = {"table": [VOCAB, DIM], "ids": [32, 32], "threads": 1, "rounds": rounds, "onnxruntime": ort.__version__,
              "bytes": sizes, "latency_ms": {k: 1e3 * v for k, v in times.items()}, "memory_mb": mem,
              "max_abs_error_vs_float": err}
    print(f"embedding table {VOCAB} x {DIM}, ids 32 x 32, 1 thread, onnxruntime {ort.__version__} (shared machine)")
    print(f"{'form':24s} {'MB file':>8s} {'ms/run':>8s} {'MB session':>11s} {'MB +run':>8s} {'max err':>9s}")
    for k in FORMS:
        print(f"{k:24s} {sizes[k] / 1e6:8.1f} {1e3 * times[k]:8.3f} {mem[k]['session_mb']:11.1f} "
              f"{mem[k]['after_run_mb']:8.1f} {err[k]:9.2e}")
    out = ROOT / "benchmarks" / "results" / "onnx_embedding.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
