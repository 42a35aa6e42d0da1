"""Low-rank math: a layer's weight as a matrix, its singular values, rank selection and truncated SVD.

A ``Linear`` weight ``W`` (``out x in``) is approximated by ``U_r S_r V_r^T``, the ``r`` largest singular triplets
(Eckart-Young: the best rank-``r`` approximation in Frobenius norm). A ``Conv2d`` weight is read as the matrix
``out x (in * kh * kw)``.

Whitened (SVD-LLM, Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
Model Compression"): with the Gram matrix ``H = X X^T`` of the layer's inputs and its Cholesky factor
``H = L L^T`` (:func:`whitening`), the SVD of ``W L`` truncated at rank ``r`` and mapped back by ``L^-1`` is the
rank-``r`` matrix closest to ``W`` in *output* error ``||(W - W_r) X||_F`` on those inputs, not in weight error;
the singular values of ``W L`` are the output error each rank removes. The factorized modules built from these factors are in
:mod:`lightning_compress.layers.low_rank`; the callback
(:class:`lightning_compress.callbacks.low_rank.LowRankFactorization`) decides when and what to factorize.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> lin = nn.Linear(32, 16)
    >>> dense_params(lin), factorized_params(lin, 4), full_rank(lin)
    (528, 208, 16)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "dense_params",
    "factorized_params",
    "full_rank",
    "kept_energy",
    "rank_for_energy",
    "rank_for_params",
    "rank_for_ratio",
    "singular_values",
    "truncated_svd",
    "weight_matrix",
    "whitening",
]


def _check_layer(module: nn.Module) -> None:
    if type(module) not in (nn.Linear, nn.Conv2d):
        raise TypeError(f"only nn.Linear and nn.Conv2d can be factorized, got {type(module).__name__}")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"a grouped Conv2d (groups={module.groups}) cannot be factorized; only groups=1")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a matrix: ``out x in`` for a Linear, ``out x (in * kh * kw)`` for a Conv2d."""
    _check_layer(module)
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def full_rank(module: nn.Module) -> int:
    """The largest rank the layer's weight matrix can have: ``min(rows, columns)``.

    Example:
        >>> full_rank(nn.Linear(64, 300)), full_rank(nn.Conv2d(3, 32, 3))
        (64, 27)
    """
    rows, cols = weight_matrix(module).shape
    return min(rows, cols)


def dense_params(module: nn.Module) -> int:
    """Parameters of the layer as it is (weight and bias)."""
    _check_layer(module)
    return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)


def factorized_params(module: nn.Module, rank: int) -> int:
    """Parameters of the layer factorized at ``rank``: ``rank * (rows + columns)`` plus the bias."""
    rows, cols = weight_matrix(module).shape
    return rank * (rows + cols) + (module.bias.numel() if module.bias is not None else 0)


def singular_values(module: nn.Module, whiten: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of the layer's weight matrix (times ``whiten``, see :func:`whitening`), largest first
    (float64, on the CPU)."""
    matrix = weight_matrix(module).double().cpu()
    return torch.linalg.svdvals(matrix if whiten is None else matrix @ whiten.double().cpu())


def whitening(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The lower Cholesky factor ``L`` of ``gram + damp * mean(diag(gram)) * I`` (float64, CPU): ``L L^T`` is the
    inputs' Gram matrix, damped as SparseGPT damps its Hessian so that channels that carried no signal keep
    ``L`` invertible. An all-zero ``gram`` gives the identity (plain SVD).

    Example:
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> L = whitening(x.T @ x, damp=0.0)
        >>> torch.allclose(L @ L.T, x.T @ x)
        True
    """
    h = gram.detach().double().cpu()
    mean = float(torch.diagonal(h).mean())
    if mean <= 0:
        return torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(h + damp * mean * torch.eye(h.shape[0], dtype=torch.float64))


def kept_energy(singular: torch.Tensor, rank: int) -> float:
    """Fraction of the squared spectrum the ``rank`` largest singular values hold (1.0 for a zero matrix).

    Example:
        >>> round(kept_energy(torch.tensor([3.0, 2.0, 1.0]), 1), 4)  # 9 / 14
        0.6429
    """
    sq = singular.double() ** 2
    total = float(sq.sum())
    return float(sq[:rank].sum()) / total if total > 0 else 1.0


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold at least ``energy`` of the squared spectrum (at least 1).

    Example:
        >>> s = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14
        >>> rank_for_energy(s, 0.5), rank_for_energy(s, 0.9), rank_for_energy(s, 1.0)
        (1, 2, 3)
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy` must be in (0, 1], got {energy!r}")
    sq = singular.double() ** 2
    total = float(sq.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(sq, 0) / total
    # a relative slack of 1e-12 so that energy=1.0 is not missed by float rounding of the cumulative sum
    rank = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype))) + 1
    return max(1, min(rank, len(singular)))


def rank_for_ratio(full: int, ratio: float) -> int:
    """``ratio`` of the full rank, rounded, at least 1.

    Example:
        >>> rank_for_ratio(64, 0.25), rank_for_ratio(10, 0.01), rank_for_ratio(10, 1.0)
        (16, 1, 10)
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`rank_ratio` must be in (0, 1], got {ratio!r}")
    return max(1, min(full, int(round(ratio * full))))


def rank_for_params(module: nn.Module, ratio: float) -> int:
    """Largest rank whose factor weights hold at most ``ratio`` of the layer's weight parameters (at least 1).

    Example:
        >>> rank_for_params(nn.Linear(300, 100), 0.25)  # 18 * (300 + 100) = 7,200 <= 7,500
        18
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`param_ratio` must be in (0, 1], got {ratio!r}")
    rows, cols = weight_matrix(module).shape
    return max(1, min(min(rows, cols), math.floor(ratio * rows * cols / (rows + cols) + 1e-9)))


def truncated_svd(matrix: torch.Tensor, rank: int, whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``matrix`` (``m x n``).

    ``up = U_r S_r^(1/2)`` is ``m x rank``, ``down = S_r^(1/2) V_r^T`` is ``rank x n``; computed in float64 and
    returned in ``matrix``'s dtype and device. With ``whiten`` (``L`` of :func:`whitening`, ``n x n``) the SVD is of
    ``matrix @ L`` and ``down`` is multiplied by ``L^-1``: best in output error on the inputs ``L`` came from.

    Example:
        >>> m = torch.randn(6, 4, dtype=torch.float64)
        >>> up, down = truncated_svd(m, 4)
        >>> up.shape, down.shape, torch.allclose(up @ down, m)
        (torch.Size([6, 4]), torch.Size([4, 4]), True)
    """
    if rank < 1 or rank > min(matrix.shape):
        raise ValueError(f"`rank` must be in [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix, got {rank}")
    m = matrix.detach().double().cpu()
    L = None if whiten is None else whiten.double().cpu()
    u, s, vh = torch.linalg.svd(m if L is None else m @ L, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if L is not None:  # down @ L^-1, by a triangular solve
        down = torch.linalg.solve_triangular(L, down, upper=False, left=False)
    return up.to(matrix), down.to(matrix)
