"""Deployable artefacts in onnxruntime: size, latency and accuracy of our QAT int8 ONNX against onnxruntime's own PTQ.

    python benchmarks/deploy.py            # 3 seeds, 30 epochs
    python benchmarks/deploy.py --quick    # 3 seeds, 8 epochs, fewer timing rounds

Models: DigitsMLP (64-300-100-10) and a 1024-wide 4-layer MLP (64-1024-1024-1024-10) trained on the digits data.
Per seed: one fp32 run and one W8A8 QAT run (per-channel weights, static 8-bit inputs; float for the first third of
the epochs, as in the recipes). Rows, all run by onnxruntime (CPU provider):

- ``fp32``: :func:`to_onnx` of the float model;
- ``QAT int8 (ours)``: :func:`to_onnx` of the QAT model (default uint8 weight storage: uint8 x uint8 kernels);
- ``QAT int8 (ours, s8 weights)``: the same with ``weight_dtype="int8"`` (uint8 x int8 kernels, may saturate on AVX2);
- ``ORT quantize_dynamic``: onnxruntime's dynamic PTQ of the fp32 file (int8 weights, defaults);
- ``ORT quantize_static``: onnxruntime's static PTQ of the fp32 file (QDQ, per-channel int8 weights, uint8
  activations, calibrated on 512 training images).

Accuracy: test split, mean ± std over seeds. Latency: seed 0's files, median of alternating rounds in one process
(every session one round in turn), 1 thread and all threads, batch 1 and 32. The machine is shared with other work:
read the ratios, measured side by side, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import median_times, quiet_trainer
from lightning.pytorch import seed_everything

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.export import to_onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"DigitsMLP": (300, 100), "MLP 1024x4": (1024, 1024, 1024)}
ROWS = ["fp32", "QAT int8 (ours)", "QAT int8 (ours, s8 weights)", "ORT quantize_dynamic", "ORT quantize_static"]


def _session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _accuracy(path: str, dm: DigitsDataModule) -> float:
    s = _session(path, 1)
    name = s.get_inputs()[0].name
    correct = total = 0
    for x, y in dm.test_dataloader():
        pred = s.run(None, {name: x.numpy()})[0].argmax(1)
        correct += int((pred == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol: training images, batch by batch."""

    def __init__(self, name: str, dm: DigitsDataModule, n: int = 512) -> None:
        xs = torch.cat([x for x, _ in dm.train_dataloader()])[:n]
        self._it = iter([{name: xs[i : i + 64].numpy()} for i in range(0, len(xs), 64)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _ort_ptq(fp32: str, out_dir: str, dm: DigitsDataModule) -> dict[str, str]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    dyn, sta = os.path.join(out_dir, "ort_dynamic.onnx"), os.path.join(out_dir, "ort_static.onnx")
    quantize_dynamic(fp32, dyn, weight_type=QuantType.QInt8)
    name = _session(fp32, 1).get_inputs()[0].name
    quantize_static(fp32, sta, _Calibration(name, dm), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"ORT quantize_dynamic": dyn, "ORT quantize_static": sta}


def build(hidden: tuple[int, ...], seed: int, epochs: int, out_dir: str) -> tuple[dict[str, str], dict[str, float]]:
    """Train fp32 and W8A8 QAT models from ``seed``; write the five ONNX files; return paths and test accuracies."""
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    dm.setup("test")
    models = {}
    for kind in ("fp32", "qat"):
        seed_everything(seed, verbose=False)
        model = DigitsMLP(hidden_sizes=hidden)
        cbs = [] if kind == "fp32" else [QuantizationAwareTraining(
            weight_bits=8, activation_bits=8, start_epoch=epochs // 3, convert_on_fit_end=False)]
        quiet_trainer(epochs, cbs, limit_val_batches=0).fit(model, datamodule=dm)
        models[kind] = model.eval()
    example = torch.zeros(1, 1, 8, 8)
    paths = {"fp32": to_onnx(models["fp32"], os.path.join(out_dir, "fp32.onnx"), example),
             "QAT int8 (ours)": to_onnx(models["qat"], os.path.join(out_dir, "ours.onnx"), example),
             "QAT int8 (ours, s8 weights)": to_onnx(models["qat"], os.path.join(out_dir, "ours_s8.onnx"), example,
                                                    weight_dtype="int8")}
    paths.update(_ort_ptq(paths["fp32"], out_dir, dm))
    acc = {k: _accuracy(p, dm) for k, p in paths.items()}
    with torch.no_grad():
        acc["QAT fake-quant (PyTorch)"] = 100.0 * float(np.mean([
            float((models["qat"](x).argmax(1) == y).float().mean()) for x, y in dm.test_dataloader()]))
    return paths, acc


def latency(paths: dict[str, str], rounds: int, inner: int) -> dict[str, dict[str, float]]:
    """Median ms per run for each (threads, batch), sessions measured in alternating rounds."""
    out: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(0)
    for threads in (1, 0):
        sessions = {k: _session(p, threads) for k, p in paths.items()}
        for batch in (1, 32):
            x = rng.random((batch, 1, 8, 8), dtype=np.float32)
            feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
            fns = {k: (lambda s=s, feed=feeds[k]: s.run(None, feed)) for k, s in sessions.items()}
            times = median_times(fns, rounds, inner)
            key = f"{'1 thread' if threads == 1 else 'all threads'}, batch {batch}"
            out[key] = {k: 1e3 * v for k, v in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    epochs, rounds, inner = (8, 7, 10) if args.quick else (30, 15, 20)
    results: dict[str, Any] = {"quick": args.quick, "epochs": epochs, "seeds": args.seeds, "threads_all": os.cpu_count(),
                               "onnxruntime": ort.__version__, "torch": torch.__version__, "models": {}}
    for model_name, hidden in MODELS.items():
        accs: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory() as root:
            for seed in range(args.seeds):
                out_dir = os.path.join(root, str(seed))
                os.makedirs(out_dir)
                paths, acc = build(hidden, seed, epochs, out_dir)
                for k, v in acc.items():
                    accs.setdefault(k, []).append(v)
                if seed == 0:
                    sizes = {k: os.path.getsize(p) for k, p in paths.items()}
                    lat = latency(paths, rounds, inner)
        r = {"bytes": sizes, "size_vs_fp32": {k: v / sizes["fp32"] for k, v in sizes.items()},
             "accuracy": {k: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "runs": v} for k, v in accs.items()},
             "latency_ms": lat,
             "speedup_vs_fp32": {c: {k: t["fp32"] / v for k, v in t.items()} for c, t in lat.items()}}
        results["models"][model_name] = r
        print(f"\n{model_name}: {len(accs['fp32'])} seeds, {epochs} epochs (timings under contention: ratios matter)")
        cols = list(lat)
        print(f"{'row':30s} {'KiB':>8s} {'x fp32':>7s} {'accuracy %':>13s} " + " ".join(f"{c:>22s}" for c in cols))
        for k in ROWS:
            a = r["accuracy"][k]
            ms = " ".join(f"{lat[c][k]:8.3f} ms ({r['speedup_vs_fp32'][c][k]:4.2f}x)" for c in cols)
            print(f"{k:30s} {sizes[k] / 1024:8.1f} {r['size_vs_fp32'][k]:7.3f} {a['mean']:6.2f} ± {a['std']:4.2f} {ms}")
        a = r["accuracy"]["QAT fake-quant (PyTorch)"]
        print(f"{'QAT fake-quant (PyTorch)':30s} {'':8s} {'':7s} {a['mean']:6.2f} ± {a['std']:4.2f}")
    out = ROOT / "benchmarks" / "results" / "deploy.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
