"""Hugging Face safetensors in the compressed-tensors layout: ``save_pretrained`` / ``load_safetensors``.

:func:`save_pretrained` writes a ``transformers`` model (the ``PreTrainedModel`` itself, or a LightningModule holding
exactly one) as a Hugging Face directory: ``config.json`` with a ``quantization_config`` in the compressed-tensors
layout, ``model.safetensors`` and the tokenizer files of the source directory, so that
``transformers.AutoModel.from_pretrained(directory)`` loads it with the ``compressed-tensors`` package installed and
nothing of ours imported. Each quantized layer is written in the compressed-tensors format :data:`CT_FORMATS` gives
for its weights and inputs (the one table of format choices, in ``_ct_layers.py`` with the tensor layouts):

=======================  ===========  ========================  ===================================================
weights                  inputs       format                    tensors per layer
=======================  ===========  ========================  ===================================================
uniform 8 bits           static       ``int-quantized``         ``weight`` int8, ``weight_scale`` (out, 1) or (1,),
                                                                ``weight_zero_point`` if asymmetric, ``input_scale``,
                                                                ``input_zero_point`` (int8: our uint8 zero point - 128)
uniform 8 bits           per token    ``int-quantized``         the same without input tensors (``dynamic: true,
                                                                strategy: token``: ranges at run time)
uniform 8 bits           none         ``naive-quantized``       ``weight`` int8 and its scale (weight-only)
uniform 2-7 bits         any of these ``pack-quantized``        symmetric only: ``weight_packed`` (int32),
                                                                ``weight_shape``, ``weight_scale``
group-wise 2-8 bits      any of these ``pack-quantized``        the same, ``strategy: group``, ``group_size``,
                                                                ``weight_scale`` (out, in / group_size); symmetric only
fp8 e4m3 (tensor/chan.)  none / fp8   ``float-quantized``       ``weight`` float8_e4m3fn, ``weight_scale``; fp8 inputs
                                                                per token or tensor at run time
MXFP8 / MXFP6 / MXFP4    none         ``mxfp8-quantized``,      ``weight`` fp8 / ``weight_packed`` uint8, and
                                      ``mxfp6-pack-quantized``, ``weight_scale`` uint8 E8M0 (out, in / 32); the
                                      ``mxfp4-pack-quantized``  config asks for a bfloat16 model (see below)
=======================  ===========  ========================  ===================================================

A layer without a compressed-tensors encoding raises a ``ValueError`` naming it and its scheme, before anything is
written: power-of-two levels, asymmetric packed weights (packed zero points do not load in transformers 5.25 +
compressed-tensors 0.20: size mismatch, measured), fp8 e5m2 and MXINT8 (no such compressed-tensors type), MX inputs
(compressed-tensors rounds each block's maximum before taking the shared exponent, OCP MX floors it: other scales),
conv layers. ONNX or ``.lcdc`` carry those. compressed-tensors 0.20 decompresses MX weights to bfloat16, which a
float32 model cannot multiply (dtype error at the first forward, measured), so ``config.json`` of an MX export sets
``dtype: bfloat16``: the MX weights are exact in bfloat16, the rest of the model runs in bfloat16 (outputs within
3 % of ours, measured ~1 %). Pruned or thinned float models are saved dense with no ``quantization_config``
(compressed-tensors and vLLM removed their sparse formats; no ``sparsity_config``); for a model whose feed-forward
layers ``thin`` made narrower, ``config.json`` gets the new ``intermediate_size`` (layers of different widths: a
``ValueError`` naming them). New schemes are added as rows of :data:`CT_FORMATS`.

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
from typing import Any

import torch
from torch import nn

from lightning_compress.export import _ct_layers
from lightning_compress.export._common import copy_model
from lightning_compress.export._ct_layers import CT_FORMATS, CtFormat
from lightning_compress.export._hf_config import fitted_config
from lightning_compress.export._readers import READERS as _READERS
from lightning_compress.export.low_bit import LOW_BIT_LAYERS
from lightning_compress.export.quantization import convert
from lightning_compress.layers._quant_smoothing import SmoothedInput
from lightning_compress.layers.quantization import ActivationFakeQuantize, is_qat_module

__all__ = ["CT_FORMATS", "CtFormat", "load_safetensors", "save_pretrained"]

SIDECAR = "quantization_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                    "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")


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


def compressed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The compressed-tensors state dict of ``model`` and its ``quantization_config`` (None for a float model).

    Raises:
        ValueError: a quantized layer without a compressed-tensors encoding (named), or a prepared layer whose input
            range was never observed.
    """
    work = copy_model(model).eval()
    if any(is_qat_module(m) for m in work.modules()):
        convert(work, inplace=True, dynamic_activations=False)
    smoothed = [n for n, m in work.named_modules() if isinstance(m, SmoothedInput)]
    if smoothed:
        raise ValueError(f"layers {smoothed} divide their input by SmoothQuant factors (`smooth_quant`), which the "
                         "compressed-tensors layout cannot hold: export them with `to_onnx`, or train with `smooth_quant`=None")
    quantized = {n: m for n, m in work.named_modules() if type(m) in _READERS or isinstance(m, LOW_BIT_LAYERS)}
    state = {k: v for k, v in work.state_dict().items()
             if not any(k.startswith(n + ".") for n in quantized) and not k.endswith(".qparams")}
    if not quantized:
        return {k: v.detach().clone().contiguous() for k, v in state.items()}, None
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in quantized.items():
        row, scheme, described = _ct_layers.describe(layer, name)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(name)
        state.update(_ct_layers.layer_tensors(row, described, name + "."))
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": sorted(n for n, m in work.named_modules() if isinstance(m, nn.Linear)),
    }
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, config


def _model_dtype(qconfig: dict[str, Any]) -> dict[str, str]:
    """``{"dtype": ...}`` where a format in ``qconfig`` needs the model in that dtype (MX: bfloat16), else ``{}``."""
    formats = {g["format"] for g in qconfig["config_groups"].values()}
    dtypes = {r.dtype for rows in CT_FORMATS.values() for r in rows if r.format in formats and r.dtype}
    return {"dtype": dtypes.pop()} if dtypes else {}


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
        ValueError: an unwritable ``directory``, several transformers models inside ``model``, a layer without a
            compressed-tensors encoding (named), or thinned layers the transformers config cannot describe (named,
            with their widths); nothing is written then.
    """
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or os.path.isfile(directory):
        raise ValueError(f"`directory` {directory!r} cannot be written (its parent {parent!r} must be a writable folder)")
    hf = _find_hf_model(model)
    target = hf if hf is not None else model
    config = fitted_config(hf) if hf is not None else None  # a thinned model's widths (raises before writing)
    state, qconfig = compressed_state(target)
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp(prefix=".lc-save-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            if qconfig is not None:
                config["quantization_config"] = qconfig
                config.update(_model_dtype(qconfig))
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


def _input_quantizer(inputs: Mapping[str, Any], state: dict[str, torch.Tensor], prefix: str) -> ActivationFakeQuantize:
    """The input quantizer training used: 8-bit with the saved range, or per token / tensor at run time."""
    if inputs["dynamic"]:
        scheme = "fp8_e4m3" if inputs["type"] == "float" else "uniform"
        granularity = "per_token" if inputs["strategy"] == "token" else "per_tensor"
        iq = ActivationFakeQuantize(8, dynamic=True, scheme=scheme, granularity=granularity)
    else:
        iq = ActivationFakeQuantize(8)
        iq.scale.copy_(state.pop(prefix + "input_scale"))
        iq.zero_point.copy_(state.pop(prefix + "input_zero_point").float() + 128)
        iq.observer_enabled.fill_(0)  # the saved range, also if the model is in training mode
    iq.initialized.fill_(1)
    iq.fake_quant_enabled.fill_(1)
    return iq


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
            state[p + "weight"] = _ct_layers.dequantized(state, p, group)
            inputs = group.get("input_activations")
            if inputs:
                iq = _input_quantizer(inputs, state, p)
                layer = model.get_submodule(name)
                layer.register_forward_pre_hook(lambda m, args, iq=iq: (iq(args[0]),) + tuple(args[1:]))
                layer.input_quant_loaded = iq
            for k in _ct_layers.WEIGHT_KEYS:
                state.pop(p + k, None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"the tensors in {path!r} do not fit {type(model).__name__}: {err}") from err
    if missing or unexpected:
        raise ValueError(f"the tensors in {path!r} do not fit {type(model).__name__}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model
