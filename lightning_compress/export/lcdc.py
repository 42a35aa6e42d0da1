"""The Deep Compression artefact: sparse positions, shared-weight indices and codebooks, all Huffman-coded.

:func:`save_compressed` writes every tensor of a model's ``state_dict`` to one file; :func:`load_compressed` reads
it back bit-exactly (every non-zero value identical; zeros come back as ``+0.0``). Each floating tensor is stored as

- its **sparse positions** as relative indices (Han et al. 2016): the count of zeros since the previous non-zero,
  in ``b`` bits, where the largest value ``2**b - 1`` is a *filler* entry that skips ``2**b - 1`` positions without
  a weight (so a long gap costs a few fillers). ``b`` is chosen per tensor, the one giving the smallest coded
  stream; a dense tensor costs nothing here (a constant stream);
- its **non-zero values**, either as indices into a **codebook** (when the tensor holds at most 256 distinct
  non-zero values, e.g. after :class:`~lightning_compress.callbacks.weight_sharing.WeightSharing`; the codebook is
  written at the tensor's own precision) or, for unshared tensors (biases, unpruned layers), at their own
  precision as ``itemsize`` byte planes (byte ``j`` of every value is one stream, so exponent bytes code well).

Every stream gets its own Huffman code (or fixed-width bits or a constant, whichever is smaller; see
:mod:`lightning_compress.functional.huffman`). Integer/bool buffers are stored as byte planes too.

File layout (version 1), little-endian::

    b"LCDC" | u8 version | u32 header bytes | u32 payload bytes | u32 CRC-32 of header+payload | header | payload

The header is zlib-compressed JSON: the tensors' names, dtypes, shapes and kinds, in payload order. A file whose
length does not match, whose CRC differs, or whose streams do not decode raises ``ValueError``: never a silently
wrong model.

:func:`save_compressed` returns (and prints) a :class:`CompressionReport` in the shape of the paper's table: per
tensor and in total, the bytes after pruning (fp32 non-zeros + fixed-width relative indices), after weight sharing
(codebook indices at ``ceil(log2 k)`` bits + the codebook) and after Huffman coding (the real bytes in the file),
each with its ratio to dense fp32.

Example:
    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> net = nn.Linear(64, 32)
    >>> with torch.no_grad():
    ...     w = torch.randn(32, 64)
    ...     _ = net.weight.copy_(torch.where(w.abs() > 1.5, w.sign() * 0.5, torch.zeros(())))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.lcdc")
    >>> report = save_compressed(net, path, verbose=False)
    >>> report.file_bytes == os.path.getsize(path), report.ratio > 5
    (True, True)
    >>> net2 = nn.Linear(64, 32)
    >>> _ = load_compressed(path, net2)
    >>> torch.equal(net2.weight, net.weight), torch.equal(net2.bias, net.bias)
    (True, True)
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.export.lcdc_report import CompressionReport, TensorReport
from lightning_compress.functional import huffman

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CompressionReport",
    "TensorReport",
    "load_compressed",
    "save_compressed",
]

MAGIC = b"LCDC"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<4sBIII")
_MAX_CODEBOOK = 256
_MAX_REL_BITS = 12
_RAW_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # itemsize -> same-size integer


# -- relative indices ----------------------------------------------------------------------------------
def _gaps(positions: np.ndarray) -> np.ndarray:
    """Zeros before each non-zero since the previous one (``positions`` sorted)."""
    return np.diff(np.concatenate([[-1], positions])) - 1


def _rel_counts(gaps: np.ndarray, bits: int) -> np.ndarray:
    """Symbol counts of the relative-index stream in ``bits`` bits (symbol ``2**bits - 1`` is the filler)."""
    filler = (1 << bits) - 1
    counts = np.bincount(gaps % filler, minlength=filler + 1)
    counts[filler] = int((gaps // filler).sum())
    return counts


def _rel_entries(gaps: np.ndarray, bits: int) -> np.ndarray:
    filler = (1 << bits) - 1
    fills = gaps // filler
    ends = np.cumsum(fills + 1) - 1
    entries = np.full(int(ends[-1]) + 1 if len(ends) else 0, filler, dtype=np.int64)
    entries[ends] = gaps % filler
    return entries


def _rel_positions(entries: np.ndarray, bits: int) -> np.ndarray:
    filler = (1 << bits) - 1
    is_fill = entries == filler
    pos = np.cumsum(np.where(is_fill, filler, entries + 1)) - 1
    return pos[~is_fill]


def _best_rel_bits(gaps: np.ndarray, coded: bool) -> int:
    """Relative-index width with the fewest bytes: Huffman-coded with its code table (``coded``), or fixed width."""
    best, best_cost = 1, math.inf
    for bits in range(1, _MAX_REL_BITS + 1):
        counts = _rel_counts(gaps, bits)
        if coded:
            lengths = huffman.code_lengths(counts)
            cost = float((lengths * counts).sum()) + 8 * len(huffman.table_bytes(lengths))
        else:
            cost = float(counts.sum() * bits)
        if cost < best_cost:
            best, best_cost = bits, cost
    return best


# -- tensors -------------------------------------------------------------------------------------------
def _planes(t: torch.Tensor) -> list[np.ndarray]:
    """Byte ``j`` of every element, for ``j < itemsize``."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).reshape(-1, t.element_size()).numpy()
    return [raw[:, j] for j in range(raw.shape[1])]


def _read_planes(buf: bytes, offset: int, dtype: torch.dtype, count: int, mismatch: str) -> tuple[torch.Tensor, int]:
    """Decode ``itemsize`` Huffman-coded byte planes of ``count`` values; ``mismatch`` names a wrong count."""
    planes = []
    for _ in range(torch.empty(0, dtype=dtype).element_size()):
        plane, offset = huffman.decode_stream(buf, offset)
        planes.append(plane)
    if any(len(plane) != count for plane in planes):
        raise ValueError(f"compressed file is corrupted: {mismatch}")
    return _from_planes(planes, dtype), offset


def _from_planes(planes: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    raw = (
        np.stack([np.asarray(p, dtype=np.uint8) for p in planes], axis=1)
        if planes
        else np.zeros((0, 1), np.uint8)
    )
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1).view(dtype)


def _encode_tensor(name: str, t: torch.Tensor) -> tuple[list[Any], bytes, TensorReport]:
    flat = t.detach().cpu().reshape(-1)
    dtype = str(t.dtype).removeprefix("torch.")
    dense = flat.numel() * 4
    if not flat.is_floating_point():
        body = b"".join(huffman.encode_stream(p, 256) for p in _planes(flat))
        report = TensorReport(
            name,
            flat.numel(),
            int(torch.count_nonzero(flat)),
            0,
            0,
            dense,
            flat.numel() * flat.element_size(),
            flat.numel() * flat.element_size(),
            len(body),
        )
        return [name, dtype, list(t.shape), "r"], body, report
    positions = torch.nonzero(flat != 0, as_tuple=True)[0].numpy()
    values = flat[torch.from_numpy(positions)]
    nnz = len(positions)
    gaps = _gaps(positions)
    parts: list[bytes] = []
    if nnz == flat.numel():  # dense: a one-symbol relative stream (costs only its header)
        rel_bits = 1
    else:
        rel_bits = _best_rel_bits(gaps, coded=True)
    parts.append(bytes([rel_bits]) + huffman.encode_stream(_rel_entries(gaps, rel_bits), 1 << rel_bits))
    # distinct values by their bits (torch.unique has no float8 kernels; bits also keep NaN payloads apart)
    bits = values.contiguous().view(_RAW_INT[values.element_size()])
    codebook, labels = torch.unique(bits, sorted=True, return_inverse=True)
    codebook = codebook.view(values.dtype)
    shared = 0 < len(codebook) <= _MAX_CODEBOOK and 2 * len(codebook) <= nnz
    if shared:
        parts.append(
            huffman.write_varint(len(codebook)) + codebook.contiguous().view(torch.uint8).numpy().tobytes()
        )
        parts.append(huffman.encode_stream(labels.numpy(), len(codebook)))
    else:
        parts.extend(huffman.encode_stream(p, 256) for p in _planes(values))
    body = b"".join(parts)
    # the paper's stages, fixed width, fp32 values: pruning (values + indices), then sharing (indices + codebook)
    fixed_bits = _best_rel_bits(gaps, coded=False)
    index_bytes = (
        math.ceil(int(_rel_counts(gaps, fixed_bits).sum()) * fixed_bits / 8) if nnz < flat.numel() else 0
    )
    pruned = min(dense, nnz * 4 + index_bytes)
    if shared:
        k = len(codebook)
        shared_bytes = min(pruned, index_bytes + math.ceil(nnz * max(1, math.ceil(math.log2(k))) / 8) + 4 * k)
    else:
        shared_bytes = pruned
    report = TensorReport(
        name,
        flat.numel(),
        nnz,
        len(codebook) if shared else 0,
        rel_bits if nnz < flat.numel() else 0,
        dense,
        pruned,
        shared_bytes,
        len(body),
    )
    return [name, dtype, list(t.shape), "s" if shared else "f"], body, report


def _decode_tensor(entry: Sequence[Any], buf: memoryview, offset: int) -> tuple[torch.Tensor, int]:
    try:
        name, dtype_name, shape, kind = entry
        dtype = getattr(torch, dtype_name)
        if not isinstance(dtype, torch.dtype):
            raise TypeError
        numel = math.prod(int(s) for s in shape)
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"compressed file is corrupted: bad tensor entry {entry!r} in its header") from None
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if kind == "r":
        values, offset = _read_planes(buf, offset, dtype, numel, f"tensor {name!r} has the wrong number of elements")
        return values.reshape(shape).clone(), offset
    if offset >= len(buf):
        raise ValueError("compressed file is truncated")
    rel_bits = buf[offset]
    if not 1 <= rel_bits <= _MAX_REL_BITS:
        raise ValueError(f"compressed file is corrupted: tensor {name!r} has relative index width {rel_bits}")
    entries, offset = huffman.decode_stream(buf, offset + 1)
    positions = _rel_positions(entries, rel_bits)
    nnz = len(positions)
    if nnz and positions[-1] >= numel:
        raise ValueError(f"compressed file is corrupted: tensor {name!r} has a position past its end")
    if kind == "s":
        k, offset = huffman.read_varint(buf, offset)
        size = k * itemsize
        if offset + size > len(buf):
            raise ValueError("compressed file is truncated (codebook)")
        codebook = torch.frombuffer(bytearray(buf[offset : offset + size]), dtype=torch.uint8).view(dtype)
        labels, offset = huffman.decode_stream(buf, offset + size)
        if len(labels) != nnz or (nnz and labels.max() >= k):
            raise ValueError(f"compressed file is corrupted: tensor {name!r} codebook indices do not match")
        values = codebook[torch.from_numpy(labels)]
    elif kind == "f":
        values, offset = _read_planes(buf, offset, dtype, nnz, f"tensor {name!r} values do not match its positions")
    else:
        raise ValueError(f"compressed file is corrupted: unknown tensor kind {kind!r}")
    out = torch.zeros(numel, dtype=dtype)
    out[torch.from_numpy(positions)] = values
    return out.reshape([int(s) for s in shape]), offset


# -- files ---------------------------------------------------------------------------------------------
def save_compressed(
    model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, verbose: bool = True
) -> CompressionReport:
    """Write ``model``'s ``state_dict`` (or a state dict) to ``path`` in the compressed format.

    Args:
        model: the module (its ``state_dict()`` is written) or a mapping name -> tensor.
        path: file to write (parent folders are created).
        verbose: print the stage table.

    Returns:
        The :class:`CompressionReport` (per-tensor stages, file size, ratio).

    Raises:
        TypeError: ``model`` is neither a module nor a mapping of tensors.

    Example:
        >>> import os, tempfile
        >>> from torch import nn
        >>> path = os.path.join(tempfile.mkdtemp(), "net.lcdc")
        >>> report = save_compressed(nn.Linear(64, 32), path, verbose=False)
        >>> report.file_bytes == os.path.getsize(path)
        True
    """
    if isinstance(model, nn.Module):
        state = model.state_dict()
    elif isinstance(model, Mapping):
        state = dict(model)
    else:
        raise TypeError(f"`model` must be an nn.Module or a state dict, got {type(model).__name__}")
    entries, bodies, reports = [], [], []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`model` state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        entry, body, report = _encode_tensor(name, tensor)
        entries.append(entry)
        bodies.append(body)
        reports.append(report)
    header = zlib.compress(json.dumps({"t": entries}, separators=(",", ":")).encode(), 9)
    payload = b"".join(bodies)
    crc = zlib.crc32(payload, zlib.crc32(header))
    blob = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), len(payload), crc) + header + payload
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    overhead = len(blob) - sum(len(b) for b in bodies)
    report = CompressionReport(reports, len(blob))
    if verbose:
        print(
            f"compressed {len(reports)} tensors to {path} ({len(blob):,} B, headers {overhead} B, "
            f"{report.ratio:.1f}x smaller than dense fp32)"
        )
        print(report.format())
    return report


def load_compressed(
    path: str | Path, model: nn.Module | None = None, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_compressed`; load it into ``model`` if given.

    Args:
        path: the compressed file.
        model: a module to load the tensors into (``load_state_dict``); ``None`` to only return them.
        strict: passed to ``load_state_dict``.

    Returns:
        The state dict (name -> tensor) held in the file.

    Raises:
        ValueError: not such a file, an unsupported version, a truncated or corrupted file.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> net, path = nn.Linear(8, 4), os.path.join(tempfile.mkdtemp(), "net.lcdc")
        >>> _ = save_compressed(net, path, verbose=False)
        >>> restored = nn.Linear(8, 4)
        >>> sorted(load_compressed(path, restored)), torch.equal(restored.weight, net.weight)
        (['bias', 'weight'], True)
    """
    blob = Path(path).read_bytes()
    if len(blob) < _PREAMBLE.size or blob[:4] != MAGIC:
        raise ValueError(f"{path}: not a lightning-compress compressed file (bad magic or too short)")
    _, version, header_len, payload_len, crc = _PREAMBLE.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {version} is not supported (this reader knows {FORMAT_VERSION})"
        )
    expected = _PREAMBLE.size + header_len + payload_len
    if len(blob) != expected:
        what = "truncated" if len(blob) < expected else "longer than its header says"
        raise ValueError(f"{path}: file is {what}: {len(blob)} bytes, expected {expected}")
    header = blob[_PREAMBLE.size : _PREAMBLE.size + header_len]
    payload = memoryview(blob)[_PREAMBLE.size + header_len :]
    if zlib.crc32(payload, zlib.crc32(header)) != crc:
        raise ValueError(f"{path}: file is corrupted (CRC-32 mismatch)")
    try:
        entries = json.loads(zlib.decompress(header))["t"]
    except (zlib.error, ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: file is corrupted (unreadable header)") from None
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in entries:
        tensor, offset = _decode_tensor(entry, payload, offset)
        state[entry[0]] = tensor
    if offset != len(payload):
        raise ValueError(f"{path}: file is corrupted ({len(payload) - offset} unread payload bytes)")
    if model is not None:
        model.load_state_dict(state, strict=strict)
    return state
