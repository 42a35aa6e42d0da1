"""The math of every method as pure tensor functions, one module per method, named after its callback.

- :mod:`~lightning_compress.functional.pruning`: masks from magnitudes / unit norms (``GradualPruning``);
- :mod:`~lightning_compress.functional.quantization`: integer grids, fake quantization, LSQ, power-of-two levels
  (``QuantizationAwareTraining``), with :mod:`~lightning_compress.functional.packing` for sub-byte codes and
  :mod:`~lightning_compress.functional.formats` for fp8 and OCP MX number formats;
- :mod:`~lightning_compress.functional.distillation`: soft-target and feature losses, output selectors
  (``KnowledgeDistillation``);
- :mod:`~lightning_compress.functional.low_rank`: truncated SVD and rank selection (``LowRankFactorization``);
- :mod:`~lightning_compress.functional.weight_sharing`: 1-D k-means codebooks (``WeightSharing``);
- :mod:`~lightning_compress.functional.slimmable`: which channels a width keeps (``SlimmableTraining``);
- :mod:`~lightning_compress.functional.huffman`: Huffman coding for the ``.lcdc`` file.

Nothing here needs a ``Trainer``. Modules a method puts into a model are in :mod:`lightning_compress.layers`.

Example:
    >>> import torch
    >>> from lightning_compress.functional import pruning
    >>> pruning.unstructured_mask(torch.tensor([0.1, -2.0, 0.3, 4.0]), sparsity=0.5).tolist()
    [False, True, False, True]
"""
