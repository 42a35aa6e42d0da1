"""Modules that a method puts into the user's model, one module per method, named after its callback.

- :mod:`~lightning_compress.layers.quantization`: fake-quantizing ``QAT*`` layers and :func:`prepare_qat`
  (``QuantizationAwareTraining``; their integer counterparts are in :mod:`lightning_compress.export.quantization`);
- :mod:`~lightning_compress.layers.low_rank`: ``LowRankLinear`` / ``LowRankConv2d`` (``LowRankFactorization``).

Example:
    >>> from torch import nn
    >>> from lightning_compress.layers.low_rank import factorize
    >>> factorize(nn.Linear(8, 4), rank=2).rank
    2
"""
