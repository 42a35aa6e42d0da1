"""Low-rank factorization by truncated SVD: rank selection and the factorized ``Linear``/``Conv2d`` modules.

A ``Linear`` weight ``W`` (``out x in``) is approximated by ``U_r S_r V_r^T``, the ``r`` largest singular triplets
(Eckart-Young: the best rank-``r`` approximation in Frobenius norm). It becomes two linears, ``down``
(``in -> r``, weight ``S_r^(1/2) V_r^T``, no bias) and ``up`` (``r -> out``, weight ``U_r S_r^(1/2)``, the original
bias), splitting the singular values evenly so both factors train at the same scale. A ``Conv2d`` weight is
read as the matrix ``out x (in * kh * kw)``: ``down`` is a ``kh x kw`` conv with ``r`` output channels (same
stride, padding, dilation), ``up`` a ``1 x 1`` conv to ``out`` channels.

Everything here is a pure function of tensors and modules; the callback
(:class:`lightning_compress.callbacks.low_rank.LowRankFactorization`) decides when and what to factorize.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> lin = nn.Linear(32, 16)
    >>> low = factorize(lin, rank=4)
    >>> low
    LowRankLinear(
      in_features=32, out_features=16, rank=4
      (down): Linear(in_features=32, out_features=4, bias=False)
      (up): Linear(in_features=4, out_features=16, bias=True)
    )
    >>> dense_params(lin), factorized_params(lin, 4)
    (528, 208)
    >>> full = factorize(lin, rank=full_rank(lin))
    >>> x = torch.randn(3, 32)
    >>> torch.allclose(full(x), lin(x), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "build_factorized",
    "dense_params",
    "factorize",
    "factorized_params",
    "full_rank",
    "is_factorized",
    "kept_energy",
    "rank_for_energy",
    "rank_for_params",
    "rank_for_ratio",
    "rebuild_from_state_dict",
    "replace_module",
    "singular_values",
    "truncated_svd",
    "weight_matrix",
]


class LowRankLinear(nn.Sequential):
    """``Linear(in, out)`` as ``up(down(x))``: ``down = Linear(in, rank, bias=False)``, ``up = Linear(rank, out)``.

    State-dict keys are ``down.weight``, ``up.weight`` and ``up.bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                down=nn.Linear(in_features, rank, bias=False, **kw),
                up=nn.Linear(rank, out_features, bias=bias, **kw),
            )
        )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Sequential):
    """``Conv2d(in, out, k)`` as a ``k x k`` conv to ``rank`` channels (``down``) then a ``1 x 1`` conv (``up``).

    ``down`` keeps the original stride, padding, dilation and padding mode; ``up`` holds the original bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        rank: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                down=nn.Conv2d(
                    in_channels, rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                    bias=False, padding_mode=padding_mode, **kw,
                ),
                up=nn.Conv2d(rank, out_channels, 1, bias=bias, **kw),
            )
        )
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size = tuple(kernel_size)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, rank={self.rank}"
        )


def is_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is one of this module's factorized layers."""
    return isinstance(module, (LowRankLinear, LowRankConv2d))


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


def singular_values(module: nn.Module) -> torch.Tensor:
    """Singular values of the layer's weight matrix, largest first (float64, on the CPU)."""
    return torch.linalg.svdvals(weight_matrix(module).double().cpu())


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


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``matrix`` (``m x n``).

    ``up = U_r S_r^(1/2)`` is ``m x rank``, ``down = S_r^(1/2) V_r^T`` is ``rank x n``; computed in float64 and
    returned in ``matrix``'s dtype and device.

    Example:
        >>> m = torch.randn(6, 4, dtype=torch.float64)
        >>> up, down = truncated_svd(m, 4)
        >>> up.shape, down.shape, torch.allclose(up @ down, m)
        (torch.Size([6, 4]), torch.Size([4, 4]), True)
    """
    if rank < 1 or rank > min(matrix.shape):
        raise ValueError(f"`rank` must be in [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix, got {rank}")
    u, s, vh = torch.linalg.svd(matrix.detach().double().cpu(), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    return up.to(matrix), down.to(matrix)


def build_factorized(module: nn.Module, rank: int) -> LowRankLinear | LowRankConv2d:
    """The factorized twin of ``module`` at ``rank``, with uninitialized weights (the structure, to load into).

    The bias ``Parameter`` of ``module`` is reused as ``up.bias`` (the same object).
    """
    _check_layer(module)
    full = full_rank(module)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"`rank` must be an integer in [1, {full}] for this {type(module).__name__}, got {rank!r}")
    kw = {"device": module.weight.device, "dtype": module.weight.dtype}
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        new: LowRankLinear | LowRankConv2d = LowRankLinear(
            module.in_features, module.out_features, rank, bias=has_bias, **kw
        )
    else:
        new = LowRankConv2d(
            module.in_channels, module.out_channels, module.kernel_size, rank, stride=module.stride,
            padding=module.padding, dilation=module.dilation, bias=has_bias, padding_mode=module.padding_mode, **kw,
        )
    if has_bias:
        new.up.bias = module.bias
    new.train(module.training)
    return new


@torch.no_grad()
def factorize(module: nn.Module, rank: int) -> LowRankLinear | LowRankConv2d:
    """``module`` (a ``Linear`` or ``Conv2d`` with ``groups=1``) factorized by truncated SVD at ``rank``.

    At ``rank = full_rank(module)`` the new module computes the same function (to float tolerance); below it,
    the weight error is the Frobenius norm of the dropped singular values.

    Raises:
        TypeError: ``module`` is not exactly an ``nn.Linear`` or ``nn.Conv2d``.
        ValueError: a grouped conv, or ``rank`` outside ``[1, full_rank(module)]``.
    """
    new = build_factorized(module, rank)
    up, down = truncated_svd(weight_matrix(module), rank)
    new.up.weight.copy_(up.reshape(new.up.weight.shape))
    new.down.weight.copy_(down.reshape(new.down.weight.shape))
    return new


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the fully-qualified ``name`` inside ``root``; return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def rebuild_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Give ``model`` the factorized structure that ``state_dict`` was saved from; return the layers rebuilt.

    Every plain ``Linear``/``Conv2d`` whose ``<name>.down.weight`` is in ``state_dict`` (and ``<name>.weight`` is not)
    becomes a factorized layer at the rank of that tensor; a factorized layer at another rank is rebuilt at the
    saved one. Weights are left uninitialized: load ``state_dict`` next.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> saved = nn.Sequential(factorize(nn.Linear(8, 6), 2), nn.ReLU(), nn.Linear(6, 2)).state_dict()
        >>> rebuild_from_state_dict(net, saved)
        ['0']
        >>> net.load_state_dict(saved)
        <All keys matched successfully>
    """
    rebuilt = []
    for name, sub in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        down = state_dict.get(f"{key}down.weight")
        if down is None or f"{key}weight" in state_dict:
            continue
        rank = int(down.shape[0])
        if is_factorized(sub) and sub.rank != rank:
            sub = _plain_twin(sub)
        if type(sub) in (nn.Linear, nn.Conv2d):
            replace_module(model, name, build_factorized(sub, rank))
            rebuilt.append(name)
    return rebuilt


def _plain_twin(module: LowRankLinear | LowRankConv2d) -> nn.Module:
    """A plain layer (uninitialized values) with the shape and settings of a factorized one."""
    down, up = module.down, module.up
    if isinstance(down, nn.Linear):
        plain: nn.Module = nn.Linear(module.in_features, module.out_features, bias=up.bias is not None)
    else:
        plain = nn.Conv2d(module.in_channels, module.out_channels, down.kernel_size, stride=down.stride,
                          padding=down.padding, dilation=down.dilation, bias=up.bias is not None,
                          padding_mode=down.padding_mode)
    return plain.to(up.weight)
