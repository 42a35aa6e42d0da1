"""Safetensors in the compressed-tensors layout, loaded back by transformers in a process that imports nothing of ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from safetensors import safe_open
from torch import nn

from lightning_compress.export import load_safetensors, save_pretrained
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

HF_ATOL = 1e-5  # loaded model vs ours, relative to the largest output: the same float ops on the same levels


def _tiny_bert(tmp_path: Path) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    src = tmp_path / "source"
    src.mkdir(exist_ok=True)
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    model.config._name_or_path = str(src)
    return model


def _qat(model: nn.Module, ids: torch.Tensor, **cfg) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder")]
    prepare_qat(model, names, QuantConfig(**cfg))
    set_qat_flags(model, fake_quant=True, observe=True)
    model.train()
    model(input_ids=ids)
    model.eval()
    return names


def _load_back(tmp_path: Path, cases: dict[str, Path], ids: torch.Tensor, weight: str = "") -> dict[str, torch.Tensor]:
    """Load each directory with AutoModel.from_pretrained in a fresh interpreter without our package on the path;
    ``weight``: also return that module's weight after the forward (as compressed-tensors decompressed it)."""
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "cases.json").write_text(json.dumps({"weight": weight, "cases": {k: str(v) for k, v in cases.items()}}))
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch, transformers
        ids = torch.load("ids.pt")
        out = {}
        todo = json.load(open("cases.json"))
        for key, d in todo["cases"].items():
            m = transformers.AutoModel.from_pretrained(d).eval()
            with torch.no_grad():
                out[key] = m(input_ids=ids).last_hidden_state
                if todo["weight"]:
                    out[key + "/weight"] = m.get_submodule(todo["weight"]).weight.detach().clone()
        assert not any(k.startswith("lightning_compress") for k in sys.modules)
        torch.save(out, "out.pt")
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "out.pt")


class _Holder(LightningModule):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def w8a8_w4_float_cases(tmp_path: Path, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """W8A8, W4 and float exports with our outputs. They are loaded back by transformers together with the low-bit
    formats in ``test_safetensors_formats.py::test_transformers_loads_every_format`` (one interpreter start-up:
    starting transformers + compressed-tensors costs ~25 s here), which then calls :func:`check_w8a8_w4_float`."""
    refs, dirs = {}, {}
    for key, cfg in {"w8a8": dict(weight_bits=8, activation_bits=8),
                     "w4": dict(weight_bits=4, activation_bits=None),
                     "float": None}.items():
        model = _tiny_bert(tmp_path)
        if cfg is not None:
            _qat(model, ids, **cfg)
        with torch.no_grad():
            refs[key] = model(input_ids=ids).last_hidden_state
        holder = _Holder(model) if key == "float" else model  # a LightningModule holding exactly one HF model
        dirs[key] = Path(save_pretrained(holder, tmp_path / key))
    return refs, dirs


def check_w8a8_w4_float(loaded: dict[str, torch.Tensor], refs: dict[str, torch.Tensor], dirs: dict[str, Path],
                        ids: torch.Tensor, tmp_path: Path) -> None:
    for key in ("w8a8", "w4", "float"):
        assert (loaded[key] - refs[key]).abs().max() <= HF_ATOL * refs[key].abs().max(), key
    float_bert = _tiny_bert(tmp_path)
    # the quantized models really differ from the float one: the load-back ran the quantized weights/inputs
    assert (loaded["w8a8"] - float_bert(input_ids=ids).last_hidden_state).abs().max() > 1e-4

    qc = _config(dirs["w8a8"])["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["quant_method"] == "compressed-tensors"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "tensor"
    assert len(group["targets"]) == 12 and "pooler.dense" in qc["ignore"]
    with safe_open(dirs["w8a8"] / "model.safetensors", "pt") as f:
        assert f.get_tensor("encoder.layer.0.intermediate.dense.weight").dtype == torch.int8
        assert f.get_tensor("encoder.layer.0.intermediate.dense.input_zero_point").dtype == torch.int8
    assert _config(dirs["w4"])["quantization_config"]["format"] == "pack-quantized"
    assert "quantization_config" not in _config(dirs["float"]) and "sparsity_config" not in _config(dirs["float"])
    assert (dirs["float"] / "vocab.txt").is_file()  # the source's tokenizer files travel along
    size = {k: (d / "model.safetensors").stat().st_size for k, d in dirs.items()}
    assert size["w4"] < size["w8a8"] < size["float"]


def test_plain_module_round_trip_with_sidecar(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    for cfg in (dict(weight_bits=8, activation_bits=8), dict(weight_bits=8, activation_bits=None, granularity="per_tensor")):
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        prepare_qat(net, ["0", "2"], QuantConfig(**cfg))
        set_qat_flags(net, fake_quant=True)
        net.train()
        net(x)
        net.eval()
        d = Path(save_pretrained(net, tmp_path / "plain"))
        meta = json.loads((d / "quantization_config.json").read_text())["quantization_config"]
        assert meta["format"] == ("int-quantized" if cfg["activation_bits"] else "naive-quantized")
        fresh = load_safetensors(d, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
        with torch.no_grad():
            assert torch.allclose(fresh(x), net(x), atol=1e-5)


def test_errors(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    prepare_qat(net, ["0"], QuantConfig(weight_bits=4, activation_bits=None, scheme="power_of_two"))
    with pytest.raises(ValueError, match="layer '0'.*power_of_two.*no compressed-tensors encoding"):
        save_pretrained(net, tmp_path / "out")
    asym = nn.Sequential(nn.Linear(4, 4))
    prepare_qat(asym, ["0"], QuantConfig(weight_bits=4, activation_bits=None, symmetric=False))
    with pytest.raises(ValueError, match="layer '0'.*4 bits, asymmetric.*no compressed-tensors encoding"):
        save_pretrained(asym, tmp_path / "out")
    with pytest.raises(ValueError, match="`directory`"):
        save_pretrained(nn.Linear(2, 2), tmp_path / "missing" / "out")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_safetensors(tmp_path, nn.Linear(2, 2))
    save_pretrained(nn.Linear(2, 2), tmp_path / "lin")
    with pytest.raises(ValueError, match="do not fit"):
        load_safetensors(tmp_path / "lin", nn.Linear(3, 2))

    class Two(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = _tiny_bert(tmp_path / "a"), _tiny_bert(tmp_path / "b")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="holds 2 transformers models"):
        save_pretrained(Two(), tmp_path / "two")
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "lin"]  # nothing half-written
