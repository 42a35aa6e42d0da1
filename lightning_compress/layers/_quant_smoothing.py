"""SmoothQuant (Xiao et al. 2023) inside a fake-quantized ``Linear``: per-input-channel factors ``s`` that move the
outliers of a layer's input into its weight before both are quantized.

``y = (x / s) @ (W * s)^T`` is the float layer exactly; quantized, the input ``x / s`` has no channel far larger than
the rest (one per-tensor 8-bit step fits it) and ``W * s`` stays easy to quantize per output channel. With migration
strength ``alpha``::

    s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha), clipped to [q10(s), 100]

where ``max|x_j|`` is input channel ``j``'s largest magnitude in the first training batch that runs with fake
quantization (under DDP: the largest over the ranks, over the group the layer's input range is reduced over), ``max|W_:,j|`` the weight's column maximum and ``q10(s)`` the
10 % quantile of the factors (NNCF's clipping; it keeps channels that never fire from getting factors near zero).
The factors are then fixed (a buffer: checkpoints and resume keep them); until they are set the layer is the plain
float layer. Conversion divides the input by ``s`` in front of the integer layer and quantizes ``W * s``.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 50.0], [-2.0, 10.0]])
    >>> w = torch.tensor([[0.5, 0.01], [0.2, -0.02]])
    >>> s = smoothing_factors(x.abs().amax(0), w, alpha=0.5)
    >>> torch.allclose((x / s) @ (w * s).T, x @ w.T)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.layers._quant_sharded import reduce_input_max

__all__ = ["InputSmoothing", "smoothing_factors"]


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|x_j|^alpha / max|W_:,j|^(1-alpha)`` per input channel ``j``, clipped to ``[q10, 100]`` (see above)."""
    w_max = weight.detach().abs().float().amax(0).clamp_min(1e-8)
    s = act_max.float().clamp_min(1e-8).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=float(torch.quantile(s, 0.1)), max=100.0)


class InputSmoothing(nn.Module):
    """The factors ``s`` of one Linear layer (buffer ``factor``, ``in_features`` long) and whether they are set."""

    def __init__(self, in_features: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("factor", torch.ones(in_features))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, weight: torch.Tensor, input_quant: nn.Module) -> None:
        """Set the factors from the input ``x`` (last dim = channels) and the layer's float ``weight``; the input
        maxima are reduced over the processes the layer's ``input_quant`` reduces its range over (DDP: all)."""
        act_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        act_max = reduce_input_max(input_quant, act_max)  # every rank: the same factors
        self.factor.copy_(smoothing_factors(act_max, weight, self.alpha))
        self.initialized.fill_(1)

    def divide(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s`` once the factors are set, else ``x``."""
        return x / self.factor.to(x.dtype) if bool(self.initialized) else x

    def scale_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W * s`` (each input column) once the factors are set, else ``W``."""
        return weight * self.factor.to(weight.dtype) if bool(self.initialized) else weight

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, in_features={self.factor.numel()}, set={bool(self.initialized)}"


class SmoothedInput(nn.Module):
    """A converted layer behind its SmoothQuant division: ``layer(x / factor)`` (see :func:`convert`)."""

    def __init__(self, layer: nn.Module, factor: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("factor", factor.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight of the float layer it stands for: ``(W * s) / s``."""
        return self.layer.weight / self.factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x / self.factor.to(x.dtype))
