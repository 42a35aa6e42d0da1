"""The int8 x int8 -> int32 matrix product of converted layers, with the kernel chosen by what the CPU has.

See :mod:`lightning_compress.export.quantization` for why each kernel is (or is not) used.
"""

from __future__ import annotations

import torch

__all__ = ["INT8_BACKEND", "int8_matmul"]


def _cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (x86 VNNI/AMX) that make ``torch._int_mm`` fast."""
    checks = ("_is_vnni_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


INT8_BACKEND = (
    "int32 matmul" if not hasattr(torch, "_int_mm")
    else "torch._int_mm" if _cpu_has_int8_dot() else "float32 matmul of int8 codes (exact)"
)
_FLOAT_CHUNK = 1024  # 128 * 128 * 1024 = 2**24: every partial sum of a chunk is an exact float32 integer


def _float_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b`` of int8 matrices computed by float32 GEMMs over chunks of the inner dimension."""
    out = None
    for k in range(0, a.shape[1], _FLOAT_CHUNK):
        part = (a[:, k:k + _FLOAT_CHUNK].float() @ b[k:k + _FLOAT_CHUNK].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices ``(M, K) @ (K, N)`` accumulated in int32.

    Runs ``torch._int_mm`` on CUDA and on CPUs with int8 dot-product instructions, otherwise exact float32 GEMMs
    (see :data:`INT8_BACKEND`).

    Example:
        >>> a = torch.tensor([[127, -128]], dtype=torch.int8); b = torch.tensor([[2], [1]], dtype=torch.int8)
        >>> int8_matmul(a, b)
        tensor([[126]], dtype=torch.int32)
    """
    if a.is_cuda or INT8_BACKEND == "torch._int_mm":
        try:
            return torch._int_mm(a, b)
        except RuntimeError:  # pragma: no cover - shape/device the kernel does not take
            pass
    if a.is_cpu and INT8_BACKEND != "int32 matmul":
        return _float_int8_matmul(a, b)
    return a.to(torch.int32) @ b.to(torch.int32)
