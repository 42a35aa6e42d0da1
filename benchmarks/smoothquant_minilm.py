"""W8A8 on the pretrained all-MiniLM-L6-v2 without training: what the quantizers alone cost, with and without
SmoothQuant, side by side with NNCF's post-training quantization (which applies SmoothQuant in transformer mode).

    python benchmarks/smoothquant_minilm.py        # ~3 min on 2 cores

Every row quantizes every encoder Linear layer (8-bit per-channel symmetric weights, 8-bit per-tensor affine
inputs) of the packaged model and calibrates on the same 8 training batches of 32 sentences (32 tokens), then
reports test cosine fidelity to the original's embeddings and top-1 retrieval agreement. Ours: ``prepare_qat`` with
``QuantConfig(smooth_quant=alpha)``, the calibration batches run in training mode with dropout off (the first sets
the SmoothQuant factors, as the first training batch of ``QuantizationAwareTraining`` does; every batch updates the
observed input ranges), no optimizer step. NNCF: ``nncf.quantize(model.bert, ..., model_type=TRANSFORMER)`` on the
same batches. No fine-tuning anywhere: ``benchmarks/minilm.py`` has the trained rows. Writes
``benchmarks/results/smoothquant_minilm.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from minilm import evaluate, load
from torch import nn

from lightning_compress.examples.sentence import set_dropout
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "smoothquant_minilm.json"
ALPHAS = (None, 0.5, 0.8, 0.95)


def ours(base: nn.Module, batches: list[dict[str, torch.Tensor]], alpha: float | None) -> nn.Module:
    model = copy.deepcopy(base)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    prepare_qat(model, names, QuantConfig(weight_bits=8, activation_bits=8, smooth_quant=alpha))
    set_qat_flags(model, fake_quant=True, observe=True)
    set_dropout(model.bert, 0.0)
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b["input_ids"], b["attention_mask"])
    set_qat_flags(model, observe=False)
    return model.eval()


def nncf_ptq(base: nn.Module, batches: list[dict[str, torch.Tensor]]) -> nn.Module:
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "240")
    import nncf

    model = copy.deepcopy(base)
    calib = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    model.bert = nncf.quantize(model.bert, nncf.Dataset(calib), subset_size=len(calib) * len(calib[0]["input_ids"]),
                               model_type=nncf.ModelType.TRANSFORMER)
    return model.eval()


def main() -> None:
    for name in ("lightning", "lightning.pytorch", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    dm, base, length = load(False, 2)
    batches = [b for _, b in zip(range(8), dm.train_dataloader(), strict=False)]
    rows: dict[str, Any] = {}
    for alpha in ALPHAS:
        name = "ours, no smoothing" if alpha is None else f"ours, smooth_quant={alpha}"
        fidelity, retrieval = evaluate(ours(base, batches, alpha), dm)
        rows[name] = dict(fidelity=fidelity, retrieval=retrieval)
        print(name, rows[name], flush=True)
    try:
        fidelity, retrieval = evaluate(nncf_ptq(base, batches), dm)
        rows["NNCF PTQ (TRANSFORMER: SmoothQuant alpha 0.95)"] = dict(fidelity=fidelity, retrieval=retrieval)
    except Exception as err:  # noqa: BLE001 -- a peer that cannot run is reported with its error
        rows["NNCF PTQ (TRANSFORMER: SmoothQuant alpha 0.95)"] = f"error: {type(err).__name__}: {err}"
    print("\n| W8A8, no training (8 calibration batches) | test fidelity | retrieval |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fidelity']:.4f} | {r['retrieval']:.3f} |" if isinstance(r, dict) else f"| {name} | {r} | |")
    OUT.write_text(json.dumps(dict(model="all-MiniLM-L6-v2 (pretrained)", max_length=length, calibration_batches=8,
                                   batch_size=32, torch=torch.__version__, rows=rows), indent=2) + "\n")
    print(f"\nwrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
