"""Every compression method is a Lightning ``Callback``; one file per method."""

from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.callbacks.pruning import GradualPruning

__all__ = ["CompressionMonitor", "GradualPruning"]
