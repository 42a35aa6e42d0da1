"""Every compression method is a Lightning ``Callback``; one file per method."""

from lightning_compress.callbacks.monitor import CompressionMonitor

__all__ = ["CompressionMonitor"]
