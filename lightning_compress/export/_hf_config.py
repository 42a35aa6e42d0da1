"""A Hugging Face ``config.json`` whose shapes match the weights of a thinned model.

:func:`~lightning_compress.export.pruning.thin` removes the dead feed-forward units of each layer, but leaves
``config.intermediate_size`` as it was, so ``AutoModel.from_pretrained`` would build larger layers than the saved
weights. :func:`fitted_config` builds the model class from its config on the ``meta`` device (no memory, no
weights), compares every module's weight shape with the model's, and sets ``intermediate_size`` to the one width
every thinned feed-forward layer has. Transformers configs hold one ``intermediate_size`` for all layers, so layers
thinned to different widths cannot be described: a ``ValueError`` names them and their widths. Attention heads are
never thinned (``thin`` keeps attention's channels), so ``num_attention_heads`` is not touched.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

WIDTH_KEY = "intermediate_size"
log = logging.getLogger(__name__)


def _weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)  # converted layers dequantize here: the float shape
            if isinstance(w, torch.Tensor):
                out[name] = tuple(w.shape)
    return out


def _mismatches(model: nn.Module, config: Any, ours: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple, tuple]]:
    with torch.device("meta"):
        reference = type(model)(config)
    ref = _weight_shapes(reference)
    return {n: (ref[n], s) for n, s in ours.items() if n in ref and ref[n] != s}


def fitted_config(model: nn.Module) -> dict[str, Any]:
    """``model.config`` as a dict (without a ``quantization_config``), ``intermediate_size`` set to the width of
    thinned feed-forward layers.

    Raises:
        ValueError: the thinned layers have different widths (named with their widths), or weights differ from
            what the config builds in a way ``intermediate_size`` does not explain (named with both shapes).
    """
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    ours = _weight_shapes(model)
    try:
        wrong = _mismatches(model, model.config, ours)
    except Exception as err:  # a class that cannot be built from its config alone: nothing to compare with
        log.warning("save_pretrained: %s cannot be built from its config (%s); config.json is written unchanged",
                    type(model).__name__, err)
        return config
    if not wrong:
        return config
    size = config.get(WIDTH_KEY)
    widths = {n: got[0] for n, (ref, got) in wrong.items() if size is not None and ref[0] == size and got[0] != size}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{n} ({w})" for n, w in sorted(widths.items()))
        raise ValueError(
            f"the thinned feed-forward layers have different widths: {listed}; a {type(model).__name__} config has "
            f"one `{WIDTH_KEY}` for every layer (was {size}): thin every layer to the same width, or save with "
            "torch.save / to_onnx"
        )
    if widths:
        fitted = copy.deepcopy(model.config)
        setattr(fitted, WIDTH_KEY, next(iter(widths.values())))
        still = _mismatches(model, fitted, ours)
        if not still:
            config[WIDTH_KEY] = getattr(fitted, WIDTH_KEY)
            return config
        wrong = still
    listed = ", ".join(f"{n} {tuple(got)} (config builds {tuple(ref)})" for n, (ref, got) in sorted(wrong.items()))
    raise ValueError(f"the weights of {type(model).__name__} do not match its config: {listed}; only "
                     f"`{WIDTH_KEY}` is adjusted to thinned layers")
