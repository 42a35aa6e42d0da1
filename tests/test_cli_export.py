"""`lightning-compress export --format onnx|safetensors`: a real QAT checkpoint through the real command,
loaded back by onnxruntime and compared with the integer model the library converts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_export_onnx_embeddings_int8_stores_the_table_as_int8(tmp_path, make_trainer) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from tests.helpers import TinyTokenModule

    config = tmp_path / "config.yaml"
    config.write_text("model: {class_path: tests.helpers.TinyTokenModule}\n")
    trainer = make_trainer(max_steps=2)
    trainer.fit(TinyTokenModule())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(SystemExit) as exit_info:  # the option is for onnx only
        main(["export", "--ckpt", str(ckpt), "--format", "lcdc", "--onnx-embeddings", "int8", "--out", str(tmp_path / "m.lcdc")])
    assert exit_info.value.code == 2 and not (tmp_path / "m.lcdc").exists()
    out = tmp_path / "model.onnx"
    argv = ["export", "--ckpt", str(ckpt), "--config", str(config), "--format", "onnx", "--out", str(out)]
    assert main([*argv, "--onnx-embeddings", "int8"]) == 0
    tables = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert tables["emb.weight_int8"].dtype == np.int8 and tables["emb.weight_int8"].shape == (64, 16)
    assert "emb.weight" not in tables
    model = TinyTokenModule()
    model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    x = torch.randint(0, 64, (8, 6))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    # each table value within half its row's step; the mean over tokens and the head keep that bound
    bound = float(tables["emb.weight_scale"].max()) / 2 * model.head.weight.detach().abs().sum(1)
    err = (torch.from_numpy(got) - want).abs()
    assert bool((err <= bound + 1e-6).all()) and float(err.max()) > 0
