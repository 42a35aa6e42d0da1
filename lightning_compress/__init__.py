"""lightning-compress: compress PyTorch models while they train, as PyTorch Lightning callbacks.

Example:
    >>> import lightning_compress as lc
    >>> isinstance(lc.CompressionMonitor(), lc.CompressionMonitor)
    True
"""

from lightning_compress.callbacks import (
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankFactorization,
    QuantizationAwareTraining,
    SlimmableTraining,
    WeightSharing,
)
from lightning_compress.checkpoints import (
    load_bn_stats,
    load_factorized_checkpoint,
    load_quantized_checkpoint,
)
from lightning_compress.export import load_compressed, save_compressed, scale, slice_width, thin
from lightning_compress.export.quantization import convert as convert_quantized
from lightning_compress.schedules import Schedule
from lightning_compress.stats import model_stats
from lightning_compress.targets import select_modules

__version__ = "0.1.0"

__all__ = [
    "CompressionMonitor",
    "GradualPruning",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "QuantizationAwareTraining",
    "Schedule",
    "SlimmableTraining",
    "WeightSharing",
    "__version__",
    "convert_quantized",
    "load_bn_stats",
    "load_compressed",
    "load_factorized_checkpoint",
    "load_quantized_checkpoint",
    "model_stats",
    "save_compressed",
    "scale",
    "select_modules",
    "slice_width",
    "thin",
]
