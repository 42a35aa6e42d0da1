"""Hugging Face safetensors in the compressed-tensors layout: ``save_pretrained`` / ``load_safetensors``.

:func:`save_pretrained` writes a ``transformers`` model (the ``PreTrainedModel`` itself, or a LightningModule holding
exactly one) as a Hugging Face directory: ``config.json`` with a ``quantization_config`` in the compressed-tensors
layout, ``model.safetensors`` and the tokenizer files of the source directory, so that
``transformers.AutoModel.from_pretrained(directory)`` loads it with the ``compressed-tensors`` package installed and
nothing of ours imported. Each quantized layer is written in the compressed-tensors format :data:`CT_FORMATS` gives
for its scheme and activations (the one table of format choices):

================  ===========  ====================  ===============================================================
scheme            activations  format                tensors per layer
================  ===========  ====================  ===============================================================
uniform, 8 bits   static       ``int-quantized``     ``weight`` int8, ``weight_scale`` (out, 1) or (1,),
                                                     ``weight_zero_point`` if asymmetric, ``input_scale`` and
                                                     ``input_zero_point`` (int8: our uint8 zero point - 128)
uniform, 8 bits   none         ``naive-quantized``   ``weight`` int8 and its scale (weight-only)
uniform, 2-7 bits none/static  ``pack-quantized``    symmetric only: ``weight_packed`` (int32, compressed-tensors' packer),
                                                     ``weight_shape``, ``weight_scale``, input qparams if static
================  ===========  ====================  ===============================================================

Power-of-two levels have no compressed-tensors encoding (a ``ValueError`` names the layer); ONNX carries them exactly
(:func:`~lightning_compress.export.onnx.to_onnx`). Pruned or thinned float models are saved dense with no
``quantization_config`` (compressed-tensors and vLLM removed their sparse formats; no ``sparsity_config``). New schemes
(group-wise int4 with ``group_size``, fp8, ...) are added as rows of :data:`CT_FORMATS`.

For a plain ``nn.Module``, :func:`save_pretrained` writes ``model.safetensors`` plus ``quantization_config.json`` with
the same metadata, and :func:`load_safetensors` reads both back into the model (dequantized float weights, input
quantizers restored as in training).

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> d = save_pretrained(net, tempfile.mkdtemp())
    >>> sorted(os.listdir(d))
    ['model.safetensors', 'quantization_config.json']
    >>> fresh = nn.Sequential(nn.Linear(4, 3))
    >>> torch.equal(load_safetensors(d, fresh)[0].weight, net[0].weight)
    True
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.export._common import copy_model
from lightning_compress.export.onnx import _READERS, QuantizedWeight
from lightning_compress.export.quantization import convert
from lightning_compress.layers.quantization import ActivationFakeQuantize, is_qat_module

__all__ = ["CT_FORMATS", "CtFormat", "load_safetensors", "save_pretrained"]

SIDECAR = "quantization_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                    "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")


@dataclass(frozen=True)
class CtFormat:
    """One compressed-tensors encoding: its format name, the weight bit widths it takes, and whether an asymmetric
    weight grid (a zero point per channel) loads back."""

    format: str
    bits: frozenset[int]
    asymmetric: bool = True


#: (scheme, activations) -> compressed-tensors format; activations "static" (trained input scale) or "none".
CT_FORMATS: dict[tuple[str, str, bool], CtFormat] = {
    ("uniform", "static", True): CtFormat("int-quantized", frozenset({8})),
    ("uniform", "none", True): CtFormat("naive-quantized", frozenset({8})),
    # packed zero points: transformers 5.25 + compressed-tensors 0.20 refuse them at load (size mismatch)
    ("uniform", "static", False): CtFormat("pack-quantized", frozenset(range(2, 8)), asymmetric=False),
    ("uniform", "none", False): CtFormat("pack-quantized", frozenset(range(2, 8)), asymmetric=False),
}


def _find_hf_model(model: nn.Module) -> nn.Module | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    if isinstance(model, PreTrainedModel):
        return model
    found = [m for m in model.children() if isinstance(m, PreTrainedModel)]
    if len(found) > 1:
        raise ValueError(f"`model` holds {len(found)} transformers models ({[type(m).__name__ for m in found]}); "
                         "pass the one to save")
    return found[0] if found else None


def _ct_args(q: QuantizedWeight, name: str) -> tuple[CtFormat, dict[str, Any]]:
    row = CT_FORMATS.get((q.scheme, q.activations, q.bits == 8))
    symmetric = not bool((q.zero_point != 0).any())
    if row is None or q.bits not in row.bits or q.conv or not (symmetric or row.asymmetric):
        raise ValueError(
            f"layer {name!r} ({q.scheme}, {q.bits} bits, {'symmetric' if symmetric else 'asymmetric'}, "
            f"{q.activations} activations{', conv' if q.conv else ''}) has no compressed-tensors encoding; "
            f"supported: Linear layers with uniform weights, 8 bits (static or no input quantization) or 2-7 bits "
            f"symmetric (use to_onnx for the others)"
        )
    weights = {"num_bits": q.bits, "type": "int", "symmetric": symmetric,
               "strategy": "tensor" if q.scale.numel() == 1 else "channel", "dynamic": False}
    if not symmetric:
        weights["zp_dtype"] = "torch.int8"
    scheme: dict[str, Any] = {"weights": weights, "input_activations": None, "output_activations": None,
                              "format": row.format}
    if q.activations == "static":
        scheme["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                                       "dynamic": False, "zp_dtype": "torch.int8"}
    return row, scheme


def _layer_tensors(q: QuantizedWeight, fmt: str, prefix: str) -> dict[str, torch.Tensor]:
    per_tensor = q.scale.numel() == 1
    out = {prefix + "weight_scale": q.scale.float().reshape(1) if per_tensor else q.scale.float().reshape(-1, 1)}
    codes = q.codes.to(torch.int8)
    if fmt == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        out[prefix + "weight_packed"] = pack_to_int32(codes, q.bits)
        out[prefix + "weight_shape"] = torch.tensor(list(codes.shape))
    else:
        out[prefix + "weight"] = codes
    if bool((q.zero_point != 0).any()):
        zp = q.zero_point.to(torch.int8).reshape(out[prefix + "weight_scale"].shape)
        out[prefix + "weight_zero_point"] = zp if fmt != "pack-quantized" else pack_to_int32(zp, q.bits, packed_dim=0)
    if q.bias is not None:
        out[prefix + "bias"] = q.bias.float()
    if q.input_qparams is not None:
        out[prefix + "input_scale"] = q.input_qparams[0].float().reshape(1)
        out[prefix + "input_zero_point"] = (q.input_qparams[1].reshape(1) - 128).to(torch.int8)
    return out


def compressed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The compressed-tensors state dict of ``model`` and its ``quantization_config`` (None for a float model).

    Raises:
        ValueError: a quantized layer without a compressed-tensors encoding (named), or a prepared layer whose input
            range was never observed.
    """
    work = copy_model(model).eval()
    if any(is_qat_module(m) for m in work.modules()):
        convert(work, inplace=True, dynamic_activations=False)
    quantized = {n: m for n, m in work.named_modules() if type(m) in _READERS}
    state = {k: v for k, v in work.state_dict().items()
             if not any(k.startswith(n + ".") for n in quantized) and not k.endswith(".qparams")}
    if not quantized:
        return {k: v.detach().clone().contiguous() for k, v in state.items()}, None
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in quantized.items():
        q = _READERS[type(layer)](layer)
        row, scheme = _ct_args(q, name)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(name)
        state.update(_layer_tensors(q, row.format, name + "."))
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": sorted(n for n, m in work.named_modules() if isinstance(m, nn.Linear)),
    }
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, config


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write ``model`` as safetensors in the compressed-tensors layout (see the module docstring).

    Args:
        model: a ``transformers.PreTrainedModel``, a LightningModule holding exactly one, or any ``nn.Module``;
            float, prepared by ``QuantizationAwareTraining`` or converted by :func:`convert_quantized`.
        directory: the output folder (created if missing; its parent must exist). Files are written to a temporary
            folder beside it and moved in once complete.

    Returns:
        ``directory`` as a string.

    Raises:
        ValueError: an unwritable ``directory``, several transformers models inside ``model``, or a layer without a
            compressed-tensors encoding (named); nothing is written then.
    """
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or os.path.isfile(directory):
        raise ValueError(f"`directory` {directory!r} cannot be written (its parent {parent!r} must be a writable folder)")
    hf = _find_hf_model(model)
    target = hf if hf is not None else model
    state, qconfig = compressed_state(target)
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp(prefix=".lc-save-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if hf is not None:
            config = hf.config.to_dict()
            config.pop("quantization_config", None)
            if qconfig is not None:
                config["quantization_config"] = qconfig
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            source = getattr(hf.config, "_name_or_path", "") or getattr(hf, "name_or_path", "")
            for name in _TOKENIZER_FILES if os.path.isdir(source) else ():
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        else:
            with open(os.path.join(tmp, SIDECAR), "w") as f:
                json.dump({"quantization_config": qconfig}, f, indent=2, sort_keys=True)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _dequantized(state: Mapping[str, torch.Tensor], prefix: str, weights: Mapping[str, Any]) -> torch.Tensor:
    scale = state[prefix + "weight_scale"].float()
    if prefix + "weight_packed" in state:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = torch.Size(state[prefix + "weight_shape"].tolist())
        codes = unpack_from_int32(state[prefix + "weight_packed"], weights["num_bits"], shape)
    else:
        codes = state[prefix + "weight"]
    zp = state.get(prefix + "weight_zero_point")
    if zp is not None and prefix + "weight_packed" in state:
        zp = unpack_from_int32(zp, weights["num_bits"], torch.Size([scale.shape[0], 1]), packed_dim=0)
    zp = torch.zeros_like(scale) if zp is None else zp.float().reshape(scale.shape)
    return (codes.float() - zp) * scale


def load_safetensors(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load what :func:`save_pretrained` wrote for a plain ``nn.Module`` into ``model`` (same architecture).

    Quantized layers get their dequantized weights (exactly the trained levels); a layer saved with a static input
    scale gets an 8-bit input quantizer with that scale (as ``input_quant`` runs in training), so ``model``
    computes what the saved model computed.

    Raises:
        ValueError: ``directory`` lacks ``model.safetensors``, or the tensors do not fit ``model`` (names listed).
    """
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"`directory` {directory!r} has no model.safetensors")
    state = load_file(path)
    sidecar = os.path.join(directory, SIDECAR)
    qconfig = json.load(open(sidecar))["quantization_config"] if os.path.isfile(sidecar) else None
    for group in (qconfig or {}).get("config_groups", {}).values():
        for name in group["targets"]:
            p = name + "."
            state[p + "weight"] = _dequantized(state, p, group["weights"])
            layer = model.get_submodule(name)
            if group.get("input_activations"):
                iq = ActivationFakeQuantize(8)
                iq.scale.copy_(state.pop(p + "input_scale"))
                iq.zero_point.copy_(state.pop(p + "input_zero_point").float() + 128)
                iq.initialized.fill_(1)
                iq.fake_quant_enabled.fill_(1)
                iq.observer_enabled.fill_(0)  # the saved range, also if the model is in training mode
                layer.register_forward_pre_hook(lambda m, args, iq=iq: (iq(args[0]),) + tuple(args[1:]))
                layer.input_quant_loaded = iq
            for k in ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape"):
                state.pop(p + k, None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"the tensors in {path!r} do not fit {type(model).__name__}: {err}") from err
    if missing or unexpected:
        raise ValueError(f"the tensors in {path!r} do not fit {type(model).__name__}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model
