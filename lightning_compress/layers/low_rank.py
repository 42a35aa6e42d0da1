"""Low-rank factorized ``Linear``/``Conv2d`` modules, built by truncated SVD (the math is in
:mod:`lightning_compress.functional.low_rank`).

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

from lightning_compress.functional.low_rank import (
    _check_layer,
    dense_params,  # noqa: F401  (re-exported: the module docstring uses it)
    factorized_params,  # noqa: F401  (re-exported: the module docstring uses it)
    full_rank,
    truncated_svd,
    weight_matrix,
)

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "build_factorized",
    "factorize",
    "is_factorized",
    "rebuild_from_state_dict",
    "replace_module",
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

    @property
    def dense_numel(self) -> int:
        """Parameters of the ``Linear`` this layer replaced (what size and ratio reports compare with)."""
        bias = self.up.bias.numel() if self.up.bias is not None else 0
        return self.in_features * self.out_features + bias

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

    @property
    def dense_numel(self) -> int:
        """Parameters of the ``Conv2d`` this layer replaced (what size and ratio reports compare with)."""
        bias = self.up.bias.numel() if self.up.bias is not None else 0
        return self.in_channels * self.out_channels * math.prod(self.kernel_size) + bias

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, rank={self.rank}"
        )


def is_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is one of this module's factorized layers."""
    return isinstance(module, (LowRankLinear, LowRankConv2d))


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
def factorize(module: nn.Module, rank: int, whiten: torch.Tensor | None = None) -> LowRankLinear | LowRankConv2d:
    """``module`` (a ``Linear`` or ``Conv2d`` with ``groups=1``) factorized by truncated SVD at ``rank``.

    At ``rank = full_rank(module)`` the new module computes the same function (to float tolerance); below it,
    the weight error is the Frobenius norm of the dropped singular values. With ``whiten`` (the Cholesky factor of
    the layer's input Gram matrix, :func:`~lightning_compress.functional.low_rank.whitening`; Linear layers) the
    output error on those inputs is what the truncation minimizes instead.

    Raises:
        TypeError: ``module`` is not exactly an ``nn.Linear`` or ``nn.Conv2d``.
        ValueError: a grouped conv, or ``rank`` outside ``[1, full_rank(module)]``.
    """
    new = build_factorized(module, rank)
    up, down = truncated_svd(weight_matrix(module), rank, whiten)
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
