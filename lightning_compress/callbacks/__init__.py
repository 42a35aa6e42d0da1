"""Every compression method is a Lightning ``Callback``; one file per method."""

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.low_rank import LowRankFactorization, load_factorized_checkpoint
from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining, load_quantized_checkpoint
from lightning_compress.callbacks.slimmable import SlimmableTraining, load_bn_stats
from lightning_compress.callbacks.weight_sharing import WeightSharing

__all__ = [
    "CompressionMonitor",
    "GradualPruning",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "QuantizationAwareTraining",
    "SlimmableTraining",
    "WeightSharing",
    "load_bn_stats",
    "load_factorized_checkpoint",
    "load_quantized_checkpoint",
]
