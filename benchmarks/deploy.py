"""Deployable artefacts in onnxruntime: size, latency and accuracy of our QAT int8 ONNX against onnxruntime's own PTQ.

    python benchmarks/deploy.py            # 3 seeds, 30 epochs; MiniLM 12 steps, 1 seed
    python benchmarks/deploy.py --quick    # 3 seeds, 8 epochs; MiniLM with fewer timing rounds
    python benchmarks/deploy.py --only minilm   # the MiniLM section only (the MLP results in the JSON are kept)

Models: DigitsMLP (64-300-100-10) and a 1024-wide 4-layer MLP (64-1024-1024-1024-10) trained on the digits data.
Per seed: one fp32 run and one W8A8 QAT run (per-channel weights, static 8-bit inputs; float for the first third of
the epochs, as in the recipes). Rows, all run by onnxruntime (CPU provider):

- ``fp32``: :func:`to_onnx` of the float model;
- ``QAT int8 (ours)``: :func:`to_onnx` of the QAT model (default uint8 weight storage: uint8 x uint8 kernels);
- ``QAT int8 (ours, s8 weights)``: the same with ``weight_dtype="int8"`` (uint8 x int8 kernels, may saturate on AVX2);
- ``QAT W7A8 (ours, s8 weights)``: a QAT run with 7-bit weights (codes in [-63, 63]) and the same inputs, whose int8
  weights take onnxruntime's uint8 x int8 kernels without saturating (pairs of products stay within int16);
- ``ORT quantize_dynamic``: onnxruntime's dynamic PTQ of the fp32 file (int8 weights, defaults);
- ``ORT quantize_static``: onnxruntime's static PTQ of the fp32 file (QDQ, per-channel int8 weights, uint8
  activations, calibrated on 512 training images);
- ``QAT W4 int4 (ours)``: :func:`to_onnx` of a 4-bit weight-only QAT model (per channel, symmetric): INT4
  initializers + DequantizeLinear, which onnxruntime fuses to ``MatMulNBits``;
- ``QAT W4 g128 int4 (ours)``: the same with groups of 128 inputs (``granularity="per_group"``; blocked
  DequantizeLinear), 1024-wide MLP only, its first layer (64 inputs: no group of 128) left in float.

The int4 rows run in a default session (``MatMulNBits`` accuracy level 4: inputs quantized to int8 per block);
``... exact session`` rows run the same file with ``EXACT_NBITS_CONFIG`` (float32 compute, exact to the model).

MiniLM (``minilm`` in the JSON): the pretrained all-MiniLM-L6-v2 (SentenceEncoder, 32 tokens, batch 32, 1600
sentences) exported as fp32 ONNX; our W8A8 QAT (per-channel int8 weights, static uint8 inputs, every encoder
Linear) after a short fine-tune (``--minilm-steps``, default 12, one seed) toward the original's embeddings; the same
model exported with ``embeddings="int8"`` (``QAT int8 + int8 embeddings (ours)``: the embedding tables rounded to int8
per row at export time, post-training, beside the QAT layers); and onnxruntime's ``quantize_dynamic`` /
``quantize_static`` (QDQ, per channel, 4 calibration batches) of the fp32 file. Fidelity: mean cosine to the
original's embeddings on the test split; latency: batch 32, 1 thread.

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
import time
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
from lightning_compress.export.onnx import EXACT_NBITS_CONFIG

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"DigitsMLP": (300, 100), "MLP 1024x4": (1024, 1024, 1024)}
ROWS = ["fp32", "QAT int8 (ours)", "QAT int8 (ours, s8 weights)", "QAT W7A8 (ours, s8 weights)", "ORT quantize_dynamic", "ORT quantize_static",
        "QAT W4 int4 (ours)", "QAT W4 int4 (ours, exact session)", "QAT W4 g128 int4 (ours)",
        "QAT W4 g128 int4 (ours, exact session)"]
EXACT = " (ours, exact session)"
EMB_ROW = "QAT int8 + int8 embeddings (ours)"


def _session(path: str, threads: int, exact: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in (EXACT_NBITS_CONFIG if exact else {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _accuracy(path: str, dm: DigitsDataModule, exact: bool = False) -> float:
    s = _session(path, 1, exact)
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
    """Train fp32, W8A8, W7A8 and W4 QAT models from ``seed``; write the ONNX files; return paths and test accuracies."""
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    dm.setup("test")
    models = {}
    grouped = all(h % 128 == 0 for h in hidden)  # every layer after the first has in_features divisible by 128
    qat = {"qat": dict(weight_bits=8, activation_bits=8), "w7": dict(weight_bits=7, activation_bits=8),
           "w4": dict(weight_bits=4, activation_bits=None),
           "w4g128": dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=128, exclude=["net.1"])}
    for kind in ["fp32", "qat", "w7", "w4"] + (["w4g128"] if grouped else []):
        seed_everything(seed, verbose=False)
        model = DigitsMLP(hidden_sizes=hidden)
        cbs = [] if kind == "fp32" else [QuantizationAwareTraining(
            **qat[kind], start_epoch=epochs // 3, convert_on_fit_end=False)]
        quiet_trainer(epochs, cbs, limit_val_batches=0).fit(model, datamodule=dm)
        models[kind] = model.eval()
    example = torch.zeros(1, 1, 8, 8)
    paths = {"fp32": to_onnx(models["fp32"], os.path.join(out_dir, "fp32.onnx"), example),
             "QAT int8 (ours)": to_onnx(models["qat"], os.path.join(out_dir, "ours.onnx"), example),
             "QAT int8 (ours, s8 weights)": to_onnx(models["qat"], os.path.join(out_dir, "ours_s8.onnx"), example,
                                                    weight_dtype="int8"),
             "QAT W7A8 (ours, s8 weights)": to_onnx(models["w7"], os.path.join(out_dir, "ours_w7.onnx"), example)}
    paths.update(_ort_ptq(paths["fp32"], out_dir, dm))
    paths["QAT W4 int4 (ours)"] = to_onnx(models["w4"], os.path.join(out_dir, "w4.onnx"), example)
    if grouped:
        paths["QAT W4 g128 int4 (ours)"] = to_onnx(models["w4g128"], os.path.join(out_dir, "w4g128.onnx"), example)
    for k in [k for k in paths if "W4" in k]:
        paths[k.replace(" (ours)", EXACT)] = paths[k]
    acc = {k: _accuracy(p, dm, EXACT in k) for k, p in paths.items()}
    with torch.no_grad():
        acc["QAT fake-quant (PyTorch)"] = 100.0 * float(np.mean([
            float((models["qat"](x).argmax(1) == y).float().mean()) for x, y in dm.test_dataloader()]))
    return paths, acc


def latency(paths: dict[str, str], rounds: int, inner: int) -> dict[str, dict[str, float]]:
    """Median ms per run for each (threads, batch), sessions measured in alternating rounds."""
    out: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(0)
    for threads in (1, 0):
        sessions = {k: _session(p, threads, EXACT in k) for k, p in paths.items()}
        for batch in (1, 32):
            x = rng.random((batch, 1, 8, 8), dtype=np.float32)
            feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
            fns = {k: (lambda s=s, feed=feeds[k]: s.run(None, feed)) for k, s in sessions.items()}
            times = median_times(fns, rounds, inner)
            key = f"{'1 thread' if threads == 1 else 'all threads'}, batch {batch}"
            out[key] = {k: 1e3 * v for k, v in times.items()}
    return out


class _SentenceCalibration:
    """CalibrationDataReader over the first ``n`` training batches of the sentence data."""

    def __init__(self, names: list[str], dm: Any, n: int = 4) -> None:
        batches = [b for _, b in zip(range(n), dm.train_dataloader(), strict=False)]
        self._it = iter([{names[0]: b["input_ids"].numpy(), names[1]: b["attention_mask"].numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def minilm(steps: int, rounds: int, out_dir: str) -> dict[str, Any]:
    """The MiniLM section: fp32 ONNX, our W8A8 QAT ONNX, onnxruntime's PTQ; size, latency, embedding fidelity."""
    import copy

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from lightning_compress.examples.sentence import SentenceDataModule, SentenceEncoder

    dm = SentenceDataModule(batch_size=32, max_length=32, max_sentences=1600)
    dm.setup("fit")
    base = SentenceEncoder(max_length=32).eval()
    batch = next(iter(dm.test_dataloader()))
    example = (batch["input_ids"], batch["attention_mask"])
    paths = {"fp32": to_onnx(base, os.path.join(out_dir, "minilm_fp32.onnx"), example)}
    seed_everything(0, verbose=False)
    model = copy.deepcopy(base)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, granularity="per_channel", start_step=0,
                                    freeze_observers_epoch=2, convert_on_fit_end=False)
    t0 = time.perf_counter()
    quiet_trainer(3, [qat], limit_train_batches=max(1, steps // 3), limit_val_batches=0).fit(model, dm)
    train_s = time.perf_counter() - t0
    paths["QAT int8 (ours)"] = to_onnx(model.eval(), os.path.join(out_dir, "minilm_ours.onnx"), example)
    paths[EMB_ROW] = to_onnx(model, os.path.join(out_dir, "minilm_ours_emb8.onnx"), example, embeddings="int8")
    fp32 = paths["fp32"]
    names = [i.name for i in _session(fp32, 1).get_inputs()]
    paths["ORT quantize_dynamic"] = os.path.join(out_dir, "minilm_ort_dynamic.onnx")
    quantize_dynamic(fp32, paths["ORT quantize_dynamic"], weight_type=QuantType.QInt8)
    paths["ORT quantize_static"] = os.path.join(out_dir, "minilm_ort_static.onnx")
    quantize_static(fp32, paths["ORT quantize_static"], _SentenceCalibration(names, dm), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    fidelity = {}
    for k, p in paths.items():
        s = _session(p, 1)
        cos = [torch.nn.functional.cosine_similarity(torch.from_numpy(s.run(None, dict(zip(names, (
            b["input_ids"].numpy(), b["attention_mask"].numpy()), strict=True)))[0]), b["target"], dim=-1)
            for b in dm.test_dataloader()]
        fidelity[k] = float(torch.cat(cos).mean())
    with torch.no_grad():
        fidelity["QAT fake-quant (PyTorch)"] = float(torch.cat([torch.nn.functional.cosine_similarity(
            model(b["input_ids"], b["attention_mask"]), b["target"], dim=-1) for b in dm.test_dataloader()]).mean())
    sessions = {k: _session(p, 1) for k, p in paths.items()}
    feed = dict(zip(names, (batch["input_ids"].numpy(), batch["attention_mask"].numpy()), strict=True))
    times = median_times({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, rounds, 1, warmup=2)
    sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    r = {"steps": steps, "seeds": 1, "train_seconds": round(train_s, 1), "batch": 32, "max_length": 32, "threads": 1,
         "test_sentences": len(dm.sentences["test"]), "bytes": sizes,
         "size_vs_fp32": {k: v / sizes["fp32"] for k, v in sizes.items()}, "fidelity": fidelity,
         "latency_ms": {k: 1e3 * v for k, v in times.items()},
         "speedup_vs_fp32": {k: times["fp32"] / v for k, v in times.items()}}
    print(f"\nMiniLM (all-MiniLM-L6-v2, 32 tokens, batch 32, 1 thread; QAT {steps} steps, 1 seed; shared machine)")
    print(f"{'row':34s} {'MB':>7s} {'x fp32':>7s} {'fidelity':>9s} {'ms':>8s} {'speedup':>8s}")
    for k in paths:
        print(f"{k:34s} {sizes[k] / 1e6:7.2f} {r['size_vs_fp32'][k]:7.3f} {fidelity[k]:9.5f} "
              f"{r['latency_ms'][k]:8.1f} {r['speedup_vs_fp32'][k]:7.2f}x")
    print(f"{'QAT fake-quant (PyTorch)':34s} {'':7s} {'':7s} {fidelity['QAT fake-quant (PyTorch)']:9.5f}")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=["mlp", "minilm"], help="run one section (the JSON keeps the other's)")
    parser.add_argument("--minilm-steps", type=int, default=12)
    parser.add_argument("--epochs", type=int, help="override the MLP epochs (smoke runs)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    epochs, rounds, inner = (8, 15, 30) if args.quick else (30, 15, 30)
    epochs = args.epochs or epochs
    out = ROOT / "benchmarks" / "results" / "deploy.json"
    results: dict[str, Any] = {"quick": args.quick, "epochs": epochs, "seeds": args.seeds, "threads_all": os.cpu_count(),
                               "onnxruntime": ort.__version__, "torch": torch.__version__, "models": {}}
    if args.only:
        results = json.loads(out.read_text()) if out.exists() else results
    if args.only != "mlp":
        with tempfile.TemporaryDirectory() as root:
            results["minilm"] = minilm(args.minilm_steps, 7 if args.quick else 15, root)
        out.write_text(json.dumps(results, indent=2))
    if args.only == "minilm":
        print(f"\nwrote {out}")
        return
    results.update({"quick": args.quick, "epochs": epochs, "seeds": args.seeds})
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
        for k in [k for k in ROWS if k in sizes]:
            a = r["accuracy"][k]
            ms = " ".join(f"{lat[c][k]:8.3f} ms ({r['speedup_vs_fp32'][c][k]:4.2f}x)" for c in cols)
            print(f"{k:30s} {sizes[k] / 1024:8.1f} {r['size_vs_fp32'][k]:7.3f} {a['mean']:6.2f} ± {a['std']:4.2f} {ms}")
        a = r["accuracy"]["QAT fake-quant (PyTorch)"]
        print(f"{'QAT fake-quant (PyTorch)':30s} {'':8s} {'':7s} {a['mean']:6.2f} ± {a['std']:4.2f}")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
