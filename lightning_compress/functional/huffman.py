"""Huffman coding of integer symbol streams, vectorised with numpy (no Python loop over the symbols).

Codes are canonical and length-limited to :data:`MAX_CODE_LENGTH` bits, so a code is described by its
code lengths alone. Building the code loops over the *distinct* symbols (a heap); encoding and decoding
are array operations over the whole stream:

- encoding writes bit ``j`` of every code at once, for ``j < MAX_CODE_LENGTH`` (at most 15 passes);
- decoding looks up, for *every* bit position, which symbol a code starting there would be and how long
  it is (one table lookup on a 15-bit window), then finds the positions where codes really start by
  pointer doubling from position 0 (``log2(n)`` gather passes), and reads the symbols there.

A *stream* (:func:`encode_stream` / :func:`decode_stream`) is self-describing: a mode byte, the symbol count
and either nothing (a constant stream), a fixed bit width (raw), or the code-length table and the Huffman
payload, whichever of raw and Huffman is smaller. Counts are LEB128 varints.

Example:
    >>> import numpy as np
    >>> symbols = np.array([0, 0, 0, 0, 1, 1, 2, 3, 0, 0])
    >>> lengths = code_lengths(np.bincount(symbols))
    >>> lengths.tolist()
    [1, 2, 3, 3]
    >>> payload, n_bits = encode(symbols, lengths)
    >>> n_bits, decode(payload, len(symbols), lengths).tolist() == symbols.tolist()
    (16, True)
    >>> buf = encode_stream(symbols)
    >>> out, end = decode_stream(buf)
    >>> out.tolist() == symbols.tolist(), end == len(buf)
    (True, True)
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = [
    "MAX_CODE_LENGTH",
    "canonical_codes",
    "code_lengths",
    "decode",
    "decode_stream",
    "encode",
    "encode_stream",
    "read_varint",
    "stream_bits",
    "table_bytes",
    "write_varint",
]

MAX_CODE_LENGTH = 15
_CONST, _RAW, _HUFFMAN = 0, 1, 2


# -- varints ---------------------------------------------------------------------------------------
def write_varint(value: int) -> bytes:
    """``value >= 0`` as an unsigned LEB128 varint (7 bits per byte).

    Example:
        >>> write_varint(5), write_varint(300)
        (b'\\x05', b'\\xac\\x02')
    """
    if value < 0:
        raise ValueError(f"varint `value` must be >= 0, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes | memoryview, offset: int) -> tuple[int, int]:
    """Read a varint at ``offset``; return ``(value, next offset)``. Raises ``ValueError`` past the end."""
    value = shift = 0
    while True:
        if offset >= len(buf):
            raise ValueError("compressed stream is truncated (a length field runs past the end)")
        byte = buf[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise ValueError("compressed stream is corrupted (a length field is too long)")


# -- the code ----------------------------------------------------------------------------------------
def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of every symbol from its count (0 for symbols that never occur).

    A single used symbol gets length 1. If the optimal code is longer than ``max_length``, the counts are
    halved (keeping every used symbol at least 1) until it fits: slightly suboptimal, always decodable.

    Raises:
        ValueError: ``max_length`` too small for the number of used symbols.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    if len(used) > 2**max_length:
        raise ValueError(f"`max_length`={max_length} cannot code {len(used)} symbols")
    weights = counts[used].copy()
    while True:
        depth = _huffman_depths(weights)
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = np.maximum(weights // 2, 1)


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over ``weights`` (loop over the distinct symbols only)."""
    n = len(weights)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for i in range(2 * n - 3, -1, -1):  # the root is the last node; children have smaller ids than parents
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values for ``lengths`` (shorter codes first, then by symbol).

    Example:
        >>> [bin(c) for c in canonical_codes(np.array([1, 2, 3, 3]))]
        ['0b0', '0b10', '0b110', '0b111']
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code = 0
    prev = int(lengths[order[0]]) if len(order) else 0
    for i, sym in enumerate(order):  # loop over distinct symbols
        length = int(lengths[sym])
        if i:
            code = (code + 1) << (length - prev)
        codes[sym] = code
        prev = length
    return codes


def _check_lengths(lengths: np.ndarray) -> None:
    used = lengths[lengths > 0]
    if len(used) and (used.max() > MAX_CODE_LENGTH or np.sum(2.0 ** -used.astype(np.float64)) > 1.0 + 1e-12):
        raise ValueError("compressed stream is corrupted (invalid Huffman code-length table)")


# -- bit packing -------------------------------------------------------------------------------------
def _write_bits(values: np.ndarray, widths: np.ndarray) -> tuple[bytes, int]:
    """Concatenate the low ``widths[i]`` bits of ``values[i]`` (most significant first)."""
    widths = widths.astype(np.int64)
    ends = np.cumsum(widths)
    n_bits = int(ends[-1]) if len(ends) else 0
    starts = ends - widths
    bits = np.zeros(n_bits, dtype=np.uint8)
    passes = int(widths.max()) if len(widths) else 0  # at most MAX_CODE_LENGTH (or the raw width)
    for j in range(passes):
        sel = widths > j
        shift = widths[sel] - 1 - j
        bits[starts[sel] + j] = (values[sel] >> shift) & 1
    return np.packbits(bits).tobytes(), n_bits


def _windows(payload: bytes, n_bits: int, width: int) -> np.ndarray:
    """The ``width``-bit integer starting at every bit position ``0..n_bits`` (zero-padded past the end)."""
    data = np.frombuffer(payload, dtype=np.uint8).astype(np.int64)
    data = np.concatenate([data, np.zeros(4, dtype=np.int64)])
    v = (data[:-3] << 24) | (data[1:-2] << 16) | (data[2:-1] << 8) | data[3:]  # 32 bits from each byte
    pos = np.arange(n_bits + 1, dtype=np.int64)
    v = np.concatenate([v, np.zeros(1, dtype=np.int64)])
    word = v[np.minimum(pos >> 3, len(v) - 1)]
    return (word >> (32 - width - (pos & 7))) & ((1 << width) - 1)


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Huffman-encode ``symbols`` with the canonical code of ``lengths``; return ``(payload, n_bits)``."""
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any()):
        raise ValueError("`symbols` holds a symbol that has no code in `lengths`")
    codes = canonical_codes(lengths)
    return _write_bits(codes[symbols], lengths[symbols])


def decode(payload: bytes, n_symbols: int, lengths: np.ndarray, n_bits: int | None = None) -> np.ndarray:
    """Decode ``n_symbols`` symbols of the canonical code of ``lengths`` from ``payload``.

    Raises:
        ValueError: the payload ends before ``n_symbols`` codes, or holds bit patterns that are no code.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_lengths(lengths)
    if n_symbols == 0:
        return np.zeros(0, dtype=np.int64)
    n_bits = len(payload) * 8 if n_bits is None else n_bits
    if n_symbols > n_bits:  # every code is at least one bit: a count this large is a corrupted header
        raise ValueError(f"compressed stream is corrupted ({n_symbols} symbols cannot fit in {n_bits} bits)")
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    used = np.flatnonzero(lengths)
    # lookup table over all `width`-bit windows: symbol and code length of the code they start with
    span = 1 << (width - lengths[used])
    table_sym = np.full(1 << width, -1, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    first = codes[used] << (width - lengths[used])
    idx = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    table_sym[idx] = np.repeat(used, span)
    table_len[idx] = np.repeat(lengths[used], span)
    window = _windows(payload, n_bits, width)
    step = table_len[window]
    nxt = np.minimum(np.arange(n_bits + 1) + np.maximum(step, 1), n_bits)
    nxt[n_bits] = n_bits
    # pointer doubling: starts of codes 0..2^k-1, then follow jumps of 2^k codes
    starts = np.zeros(1, dtype=np.int64)
    jump = nxt
    while len(starts) < n_symbols:
        starts = np.concatenate([starts, jump[starts]])
        if len(starts) < n_symbols:
            jump = jump[jump]
    starts = starts[:n_symbols]
    symbols = table_sym[window[starts]]
    end = int(starts[-1] + table_len[window[starts[-1]]])
    if (starts >= n_bits).any() or end > n_bits or (symbols < 0).any():
        raise ValueError("compressed stream is corrupted or truncated (Huffman payload does not decode)")
    return symbols


def _read_bits(payload: bytes, n: int, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(n, dtype=np.int64)
    bits = (
        np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[: n * width].reshape(n, width).astype(np.int64)
    )
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


# -- self-describing streams -------------------------------------------------------------------------
def _nibbles(values: np.ndarray) -> bytes:
    """Values < 16 packed two to a byte (high nibble first)."""
    bits = np.unpackbits(np.asarray(values, dtype=np.uint8)[:, None], axis=1)[:, 4:]
    return np.packbits(bits.reshape(-1)).tobytes()


def table_bytes(lengths: np.ndarray) -> bytes:
    """Code-length table: alphabet size, then 4-bit lengths, dense or (used symbols as deltas) sparse."""
    used = np.flatnonzero(lengths)
    dense = _nibbles(lengths)
    deltas = np.diff(np.concatenate([[-1], used])) - 1
    sparse = b"".join(write_varint(int(d)) for d in deltas) + _nibbles(lengths[used])
    if len(sparse) + len(write_varint(len(used))) < len(dense):
        return write_varint(len(lengths)) + b"\x01" + write_varint(len(used)) + sparse
    return write_varint(len(lengths)) + b"\x00" + dense


def _read_table(buf: bytes | memoryview, offset: int) -> tuple[np.ndarray, int]:
    alphabet, offset = read_varint(buf, offset)
    if offset >= len(buf):
        raise ValueError("compressed stream is truncated (code table)")
    kind = buf[offset]
    offset += 1

    def nibbles(count: int, at: int) -> tuple[np.ndarray, int]:
        size = (count + 1) // 2
        if at + size > len(buf):
            raise ValueError("compressed stream is truncated (code table)")
        raw = np.frombuffer(bytes(buf[at : at + size]), dtype=np.uint8)
        vals = np.stack([raw >> 4, raw & 15], axis=1).reshape(-1)[:count]
        return vals.astype(np.int64), at + size

    if kind == 0:
        lengths, offset = nibbles(alphabet, offset)
    elif kind == 1:
        n_used, offset = read_varint(buf, offset)
        symbols, sym = [], -1
        for _ in range(n_used):  # loop over distinct symbols
            delta, offset = read_varint(buf, offset)
            sym += delta + 1
            symbols.append(sym)
        vals, offset = nibbles(n_used, offset)
        if symbols and symbols[-1] >= alphabet:
            raise ValueError("compressed stream is corrupted (code table symbol out of range)")
        lengths = np.zeros(symbols[-1] + 1 if symbols else 0, dtype=np.int64)  # past the last used: no code
        lengths[np.asarray(symbols, dtype=np.int64)] = vals
    else:
        raise ValueError(f"compressed stream is corrupted (unknown code table kind {kind})")
    return lengths, offset


def encode_stream(symbols: np.ndarray, alphabet_size: int | None = None, huffman: bool = True) -> bytes:
    """Self-describing bytes for a stream of non-negative integer ``symbols``.

    A constant stream costs only its header; otherwise the smaller of fixed-width raw bits and a Huffman code
    (with its table) is written (``huffman=False``: always raw).
    """
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    n = len(symbols)
    if n and symbols.min() < 0:
        raise ValueError("`symbols` must be non-negative integers")
    head = write_varint(n)
    if n == 0 or (symbols == symbols[0]).all():
        return bytes([_CONST]) + head + write_varint(int(symbols[0]) if n else 0)
    top = int(symbols.max())
    width = max(1, top.bit_length())
    payload, _ = _write_bits(symbols, np.full(n, width, dtype=np.int64))
    raw = bytes([_RAW]) + head + bytes([width]) + payload
    if not huffman:
        return raw
    alphabet = max(top + 1, alphabet_size or 0)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    payload, n_bits = encode(symbols, lengths)
    coded = bytes([_HUFFMAN]) + head + table_bytes(lengths) + write_varint(len(payload)) + payload
    return coded if len(coded) < len(raw) else raw


def decode_stream(buf: bytes | memoryview, offset: int = 0) -> tuple[np.ndarray, int]:
    """Read one stream written by :func:`encode_stream` at ``offset``; return ``(symbols, next offset)``.

    Raises:
        ValueError: the buffer ends inside the stream, or the stream is not a valid encoding.
    """
    if offset >= len(buf):
        raise ValueError("compressed stream is truncated (missing stream)")
    mode = buf[offset]
    n, offset = read_varint(buf, offset + 1)
    if mode == _CONST:
        value, offset = read_varint(buf, offset)
        return np.full(n, value, dtype=np.int64), offset
    if mode == _RAW:
        if offset >= len(buf):
            raise ValueError("compressed stream is truncated (raw stream)")
        width = buf[offset]
        size = (n * width + 7) // 8
        if width == 0 or width > 62 or offset + 1 + size > len(buf):
            raise ValueError("compressed stream is corrupted or truncated (raw stream)")
        return _read_bits(bytes(buf[offset + 1 : offset + 1 + size]), n, width), offset + 1 + size
    if mode == _HUFFMAN:
        lengths, offset = _read_table(buf, offset)
        size, offset = read_varint(buf, offset)
        if offset + size > len(buf):
            raise ValueError("compressed stream is truncated (Huffman payload)")
        return decode(bytes(buf[offset : offset + size]), n, lengths), offset + size
    raise ValueError(f"compressed stream is corrupted (unknown stream mode {mode})")


def stream_bits(symbols: np.ndarray) -> int:
    """Bits a Huffman code would spend on the payload of ``symbols`` (no table), for choosing encodings."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if len(symbols) == 0:
        return 0
    counts = np.bincount(symbols)
    return int((code_lengths(counts) * counts).sum()) if (counts > 0).sum() > 1 else 0
