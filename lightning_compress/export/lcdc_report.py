"""What :func:`~lightning_compress.export.lcdc.save_compressed` reports: per tensor and in total, the bytes after
pruning, weight sharing and Huffman coding, in the shape of Deep Compression's table (Han et al. 2016).

Example:
    >>> report = CompressionReport([TensorReport("w", 100, 10, 4, 5, 400, 47, 12, 9)], file_bytes=40)
    >>> report.ratio, report.stage_totals()["shared"]
    (10.0, 12)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CompressionReport", "TensorReport"]


@dataclass(frozen=True)
class TensorReport:
    """Sizes of one tensor at each stage (bytes) and what it holds."""

    name: str
    numel: int
    nonzero: int
    codebook: int  # codebook entries (0: values stored at full precision)
    rel_bits: int  # bits of a relative index in the file (0: dense, no index)
    dense_bytes: int  # numel * 4 (fp32)
    pruned_bytes: int  # non-zeros at 32 bits + fixed-width relative indices (or dense, if smaller)
    shared_bytes: int  # + codebook indices at ceil(log2 k) bits and the codebook instead of the values
    huffman_bytes: int  # the bytes this tensor takes in the file


@dataclass
class CompressionReport:
    """What :func:`save_compressed` wrote: per-tensor stages, file size and ratios against dense fp32."""

    tensors: list[TensorReport] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        """Dense fp32 bytes of all tensors / bytes of the whole file (headers included)."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else float("inf")

    def stage_totals(self) -> dict[str, int]:
        """Total bytes per stage; ``huffman`` is the file size (headers included)."""
        return {
            "dense": self.dense_bytes,
            "pruned": sum(t.pruned_bytes for t in self.tensors),
            "shared": sum(t.shared_bytes for t in self.tensors),
            "huffman": self.file_bytes,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensors": [asdict(t) for t in self.tensors],
            "file_bytes": self.file_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "stages": self.stage_totals(),
        }

    def format(self) -> str:
        """A markdown table: per tensor and total, bytes and ratio after pruning, sharing and Huffman coding."""
        head = (
            "| tensor | params | non-zero | codebook | rel. idx bits | dense fp32 B | pruned B (x) "
            "| +shared B (x) | +Huffman B (x) |"
        )
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def cell(b: int, dense: int) -> str:
            return f"{b:,} ({dense / b:.1f}x)" if b else "0"

        for t in self.tensors:
            lines.append(
                f"| {t.name} | {t.numel:,} | {t.nonzero:,} | {t.codebook or '-'} | {t.rel_bits or '-'} | "
                f"{t.dense_bytes:,} | {cell(t.pruned_bytes, t.dense_bytes)} | {cell(t.shared_bytes, t.dense_bytes)} "
                f"| {cell(t.huffman_bytes, t.dense_bytes)} |"
            )
        s = self.stage_totals()
        lines.append(
            f"| **total** (file, headers incl.) | {sum(t.numel for t in self.tensors):,} | "
            f"{sum(t.nonzero for t in self.tensors):,} | | | {s['dense']:,} | {cell(s['pruned'], s['dense'])} | "
            f"{cell(s['shared'], s['dense'])} | {cell(s['huffman'], s['dense'])} |"
        )
        return "\n".join(lines)
