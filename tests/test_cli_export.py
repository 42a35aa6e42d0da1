"""`lightning-compress export --format onnx|safetensors`: a real QAT checkpoint through the real command,
loaded back by onnxruntime and compared with the integer model the library converts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import QuantizationAwareTraining, convert_quantized, load_quantized_checkpoint
from lightning_compress.cli import main
from lightning_compress.examples import DigitsDataModule, DigitsMLP

CONFIG = """
model:
  class_path: lightning_compress.examples.DigitsMLP
  init_args: {hidden_sizes: [16]}
"""


@pytest.fixture
def qat_checkpoint(tmp_path: Path, make_trainer) -> tuple[Path, Path]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=0, convert_on_fit_end=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_steps=4, callbacks=[qat, checkpoint], enable_checkpointing=True)
    trainer.fit(DigitsMLP(hidden_sizes=[16]), datamodule=DigitsDataModule(batch_size=32))
    return tmp_path / "ckpt" / "last.ckpt", config


def test_export_format_onnx_writes_what_onnxruntime_runs_like_the_converted_model(qat_checkpoint, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    ckpt, config = qat_checkpoint
    out = tmp_path / "model.onnx"
    assert main(["export", "--ckpt", str(ckpt), "--config", str(config), "--format", "onnx", "--out", str(out)]) == 0
    reference = convert_quantized(load_quantized_checkpoint(DigitsMLP(hidden_sizes=[16]), ckpt)).eval()
    x = torch.randn(8, *DigitsMLP(hidden_sizes=[16]).example_input_array.shape[1:])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = reference(x)
    # onnxruntime's fused integer kernels round differently: the exporter's stated tolerance is 5 % of the range
    assert torch.allclose(torch.from_numpy(got), want, atol=0.05 * float(want.abs().max()))


def test_export_format_other_than_lcdc_needs_a_config(qat_checkpoint, tmp_path, capsys) -> None:
    ckpt, _ = qat_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2
    assert "--format onnx needs --config" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
