"""Every compression method is a Lightning ``Callback``; one file per method."""

from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining, load_quantized_checkpoint

__all__ = ["CompressionMonitor", "GradualPruning", "QuantizationAwareTraining", "load_quantized_checkpoint"]
