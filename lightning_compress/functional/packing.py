"""Bit packing of integer codes: 2, 4 or 8 bits per code in a ``uint8`` tensor (pure tensor functions).

Codes are non-negative integers below ``2**bits``; a width of 3 is stored in 4-bit slots and 5-7 in 8-bit
slots (:func:`container_bits`). Within a byte the first code takes the lowest bits.

Example:
    >>> import torch
    >>> codes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    >>> packed = pack_codes(codes, bits=2)
    >>> packed.dtype, packed.numel()
    (torch.uint8, 2)
    >>> torch.equal(unpack_codes(packed, bits=2, shape=(2, 4)), codes)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["container_bits", "pack_bits", "pack_codes", "packed_bytes", "unpack_bits", "unpack_codes"]


def container_bits(bits: int) -> int:
    """Slot width used to store ``bits``-wide codes: 2, 4 or 8.

    Example:
        >>> [container_bits(b) for b in range(1, 9)]
        [2, 2, 4, 4, 8, 8, 8, 8]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be in [1, 8], got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` uses for ``numel`` codes of width ``bits``."""
    return math.ceil(numel * container_bits(bits) / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< ``2**bits``) into a flat ``uint8`` tensor.

    Raises:
        ValueError: a code is negative or does not fit in ``bits``.
    """
    width = container_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must be in [0, {2**bits - 1}] for `bits`={bits}, got [{int(flat.min())}, {int(flat.max())}]")
    per = 8 // width
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * width
    return (groups << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``int64`` codes of the given ``shape``."""
    width = container_bits(bits)
    per = 8 // width
    numel = math.prod(shape)
    shifts = torch.arange(per, dtype=torch.int64) * width
    codes = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**width - 1)
    return codes.reshape(-1)[:numel].reshape(tuple(shape))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ``codes`` (< ``2**bits``) at exactly ``bits`` bits each (no slot padding: 6-bit codes
    take 3 bytes per 4), lowest bit first, into a flat ``uint8`` tensor.

    Example:
        >>> packed = pack_bits(torch.tensor([63, 0, 5, 33]), bits=6)
        >>> packed.numel(), unpack_bits(packed, 6, (4,)).tolist()
        (3, [63, 0, 5, 33])
    """
    flat = codes.reshape(-1).to(torch.uint8)
    planes = (flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1
    stream = planes.reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` codes of the given ``shape``."""
    numel = math.prod(shape)
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: numel * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(-1, bits) * weights).sum(1, dtype=torch.int32).to(torch.uint8).reshape(tuple(shape))
