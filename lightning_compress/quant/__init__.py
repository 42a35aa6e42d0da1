"""Fake quantization: uniform affine (per-tensor/per-channel, LSQ) and power-of-two levels, with the STE.

:mod:`~lightning_compress.quant.functional` holds the math as pure tensor functions,
:mod:`~lightning_compress.quant.packing` the bit packing of integer codes, and
:mod:`~lightning_compress.quant.modules` the fake-quantizing layers and :func:`prepare_qat`.
"""

from lightning_compress.quant.modules import (
    ActivationFakeQuantize,
    QuantConfig,
    WeightFakeQuantize,
    find_conv_bn_pairs,
    is_qat_module,
    prepare_qat,
    set_qat_flags,
)

__all__ = [
    "ActivationFakeQuantize",
    "QuantConfig",
    "WeightFakeQuantize",
    "find_conv_bn_pairs",
    "is_qat_module",
    "prepare_qat",
    "set_qat_flags",
]
