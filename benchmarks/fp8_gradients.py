"""Which weights fp8 QAT actually trains: the weight gradients of the pretrained all-MiniLM-L6-v2's encoder Linear
layers under our fp8 e4m3 fake quantization and under torchao 0.18's, against the unquantized model.

    python benchmarks/fp8_gradients.py            # one batch of 32 sentences, then 6 optimizer steps (~1 min)

Same model, batch and loss as ``benchmarks/formats_minilm.py`` (the row "fp8 e4m3 (weights, per channel)": ours
``QuantizationAwareTraining(scheme="fp8_e4m3", activation_bits=None)``, torchao
``QATConfig(weight_config=Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))`` on every Linear). For one
training batch (train mode, seed 0) it reports, over the 36 encoder Linear weights: the fraction of weight entries
whose gradient is exactly zero, and the gradient norm relative to the unquantized model's. Then it fine-tunes each
for 6 steps (AdamW 5e-5) and reports the mean |change| of those weights. Writes
``benchmarks/results/fp8_gradients.json``.

Why it matters: torchao's fake quantization casts the scaled weight to ``torch.float8_e4m3fn`` and back, and the
backward of the cast back to float32 rounds the incoming gradient (``grad * scale``) to e4m3, whose smallest
subnormal is 2**-9: gradients of a pretrained model's weights are far below that, so they become zero and the
weights do not train. Ours rounds in float32 with a straight-through gradient.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from minilm import fit
from torch import nn

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.examples.sentence import SentenceDataModule, SentenceEncoder, embedding_loss
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fp8_gradients.json"
OURS = dict(scheme="fp8_e4m3", activation_bits=None)


def encoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder Linear weights by name (torchao's FakeQuantizedLinear is an ``nn.Linear`` too)."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")}


def prepared(base: SentenceEncoder, framework: str) -> tuple[SentenceEncoder, list[Any]]:
    model = copy.deepcopy(base)
    if framework == "ours":
        return model, [QuantizationAwareTraining(**OURS, start_step=0, convert_on_fit_end=False)]
    if framework == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.qat import Float8FakeQuantizeConfig, QATConfig

        config = QATConfig(weight_config=Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()), step="prepare")
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return model, []


def one_batch_gradients(base: SentenceEncoder, dm: SentenceDataModule, framework: str) -> dict[str, torch.Tensor]:
    model, callbacks = prepared(base, framework)
    if callbacks:  # ours: prepared as the callback prepares it at fit start
        prepare_qat(model, list(encoder_weights(model)), QuantConfig(weight_bits=8, **OURS))
        set_qat_flags(model, fake_quant=True)
    batch = next(iter(dm.train_dataloader()))
    seed_everything(0, verbose=False)
    model.train()
    loss = embedding_loss(model(batch["input_ids"], batch["attention_mask"]), batch["target"])
    loss.backward()
    return {n: w.grad.detach().clone() for n, w in encoder_weights(model).items()}


def main() -> None:
    torch.set_num_threads(2)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torchao

    dm = SentenceDataModule(batch_size=32, max_length=32, max_sentences=1600)
    dm.setup("fit")
    base = SentenceEncoder(max_length=32).eval()
    grads = {fw: one_batch_gradients(base, dm, fw) for fw in ("fp32", "ours", "torchao")}
    ref_norm = torch.stack([g.norm() for g in grads["fp32"].values()]).norm()
    result: dict[str, Any] = dict(model="all-MiniLM-L6-v2 (pretrained)", torch=torch.__version__,
                                  torchao=torchao.__version__, batch_size=32, steps=6, rows={})
    original = {n: w.detach().clone() for n, w in encoder_weights(base).items()}
    for fw, g in grads.items():
        total = sum(t.numel() for t in g.values())
        zero = sum(int((t == 0).sum()) for t in g.values())
        norm = torch.stack([t.norm() for t in g.values()]).norm()
        seed_everything(0, verbose=False)
        model, callbacks = prepared(base, fw)
        fit(model, dm, 6, callbacks)
        moved = [(w.detach() - original[n]).abs().mean() for n, w in encoder_weights(model).items()]
        result["rows"][fw] = dict(zero_grad_fraction=zero / total, grad_norm_vs_fp32=float(norm / ref_norm),
                                  mean_abs_weight_change_6_steps=float(torch.stack(moved).mean()))
    print("\n| fp8 e4m3 QAT | weight gradients exactly 0 | gradient norm / fp32 | mean abs weight change, 6 steps |"
          "\n|---|---|---|---|")
    for fw, r in result["rows"].items():
        print(f"| {fw} | {r['zero_grad_fraction']:.1%} | {r['grad_norm_vs_fp32']:.3f} "
              f"| {r['mean_abs_weight_change_6_steps']:.2e} |")
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
