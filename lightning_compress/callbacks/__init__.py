"""Every compression method is a Lightning ``Callback``; one file per method."""

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.callbacks.slimmable import SlimmableTraining
from lightning_compress.callbacks.weight_sharing import WeightSharing

__all__ = [
    "CompressionMonitor",
    "GradualPruning",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "QuantizationAwareTraining",
    "SlimmableTraining",
    "WeightSharing",
]
