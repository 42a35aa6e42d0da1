"""Huffman coding: round trips, optimality against the entropy, length limits, corruption, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lightning_compress.functional import huffman


def _streams() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "geometric": rng.geometric(0.3, size=5000) - 1,
        "uniform": rng.integers(0, 256, size=3000),
        "two": rng.integers(0, 2, size=777),
        "skewed": np.concatenate([np.zeros(1000, dtype=np.int64), np.arange(40)]),
        "single": np.full(50, 7),
        "one": np.array([3]),
        "empty": np.zeros(0, dtype=np.int64),
    }


@pytest.mark.parametrize("name", list(_streams()))
def test_stream_round_trip(name: str) -> None:
    symbols = _streams()[name]
    buf = huffman.encode_stream(symbols)
    out, end = huffman.decode_stream(buf)
    assert end == len(buf)
    np.testing.assert_array_equal(out, symbols)


def test_consecutive_streams_and_offsets() -> None:
    streams = list(_streams().values())
    buf = b"".join(huffman.encode_stream(s) for s in streams)
    offset = 0
    for s in streams:
        out, offset = huffman.decode_stream(buf, offset)
        np.testing.assert_array_equal(out, s)
    assert offset == len(buf)


def test_code_is_optimal_and_complete() -> None:
    counts = np.bincount(_streams()["geometric"])
    lengths = huffman.code_lengths(counts)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    mean = float((lengths * counts).sum() / counts.sum())
    assert entropy <= mean < entropy + 1
    assert np.isclose(np.sum(2.0 ** -lengths[lengths > 0]), 1.0)  # a full binary tree


def test_canonical_codes_are_prefix_free() -> None:
    lengths = huffman.code_lengths(np.array([50, 20, 10, 10, 5, 3, 1, 1]))
    codes = huffman.canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True)]
    for i, a in enumerate(words):
        for j, b in enumerate(words):
            assert i == j or not b.startswith(a)


def test_length_limit_keeps_streams_decodable() -> None:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)
    # the unlimited code is deeper
    assert huffman.code_lengths(counts, max_length=64).max() > huffman.MAX_CODE_LENGTH
    lengths = huffman.code_lengths(counts)
    assert lengths.max() <= huffman.MAX_CODE_LENGTH
    symbols = np.repeat(np.arange(30), np.minimum(counts, 300))
    payload, _ = huffman.encode(symbols, lengths)
    np.testing.assert_array_equal(huffman.decode(payload, len(symbols), lengths), symbols)


def test_huffman_beats_fixed_width_on_skewed_data() -> None:
    symbols = _streams()["geometric"]
    coded = huffman.encode_stream(symbols)
    raw = huffman.encode_stream(symbols, huffman=False)
    assert len(coded) < 0.8 * len(raw)


def test_truncated_or_corrupted_streams_raise() -> None:
    symbols = _streams()["geometric"]
    buf = huffman.encode_stream(symbols)
    with pytest.raises(ValueError, match="truncated"):
        huffman.decode_stream(buf[: len(buf) // 2])
    with pytest.raises(ValueError, match="unknown stream mode"):
        huffman.decode_stream(b"\x09" + buf[1:])
    lengths = huffman.code_lengths(np.bincount(symbols))
    payload, _ = huffman.encode(symbols, lengths)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        huffman.decode(payload[:-50], len(symbols), lengths)
    with pytest.raises(ValueError, match="cannot fit"):  # a count no payload can hold: refused, not allocated
        huffman.decode(payload, 10**15, lengths)
    # a sparse code table over a 2**28 alphabet using symbols 1 and 2 (codes 0 and 1), payload 0b010: [1, 2, 1]
    sparse_table = b"\x02\x03" + b"\xff\xff\xff\x7f" + b"\x01\x02\x01\x00\x11" + b"\x01\x40"
    np.testing.assert_array_equal(huffman.decode_stream(sparse_table)[0], [1, 2, 1])  # huge alphabet, 2 used


def test_encode_rejects_symbols_without_code() -> None:
    with pytest.raises(ValueError, match="no code"):
        huffman.encode(np.array([0, 3]), np.array([1, 1, 0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        huffman.encode_stream(np.array([1, -1]))


def test_varints() -> None:
    for v in (0, 1, 127, 128, 300, 2**40):
        assert huffman.read_varint(huffman.write_varint(v), 0) == (v, len(huffman.write_varint(v)))
    with pytest.raises(ValueError, match=">= 0"):
        huffman.write_varint(-1)
    with pytest.raises(ValueError, match="truncated"):
        huffman.read_varint(b"\x80", 0)


def test_millions_of_symbols_round_trip_in_seconds() -> None:
    symbols = np.random.default_rng(1).geometric(0.25, size=2_000_000) - 1
    t0 = time.perf_counter()
    buf = huffman.encode_stream(symbols)
    out, _ = huffman.decode_stream(buf)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(out, symbols)
    assert elapsed < 15, f"2M symbols took {elapsed:.1f}s: not vectorised?"
