"""``QuantConfig``: the validated settings of quantization-aware training (re-exported by ``layers.quantization``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightning_compress._validation import check_bool, check_choice, check_number
from lightning_compress.functional.formats import ELEMENTS, MX_ELEMENT, MX_SCALE_ROUNDINGS

SCHEMES = ("uniform", "power_of_two", "fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp6", "mxfp4", "mxint8")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
SYMMETRIC_RANGES = ("auto", "restricted", "full")


@dataclass(frozen=True)
class QuantConfig:
    """How weights (and layer inputs) are fake-quantized; see ``QuantizationAwareTraining`` for the meaning.

    Raises:
        ValueError: bits out of range, an unknown scheme/granularity, or a combination the levels cannot
            represent (power-of-two is symmetric by construction, its step is not learned, and activations
            are quantized uniformly at 8 bits or not at all; groups only for uniform levels; fp8/MX element
            widths fixed by the format).
        TypeError: a value of the wrong type.

    Example:
        >>> QuantConfig(weight_bits=9)
        Traceback (most recent call last):
        ...
        ValueError: `weight_bits` must be an integer in [2, 8], got 9
        >>> QuantConfig(weight_bits=4, scheme="mxfp4", activation_bits=None).element
        'fp4_e2m1'
        >>> QuantConfig(weight_bits=4).full_range, QuantConfig(weight_bits=8).full_range
        (True, False)
        >>> QuantConfig(weight_bits=8, symmetric_range="full")
        Traceback (most recent call last):
        ...
        ValueError: `symmetric_range`='full' is for 2-7 bits: 8-bit symmetric weights stay on [-127, 127], which the int8 kernels and exports rely on; allowed: 'auto' or 'restricted'
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    scheme: str = "uniform"
    granularity: str = "per_channel"
    symmetric: bool = True
    learn_scale: bool = False
    group_size: int | None = None
    activation_granularity: str = "per_tensor"
    dynamic: bool = False
    symmetric_range: str = "auto"
    smooth_quant: float | None = None
    mx_scale: str = "floor"

    def __post_init__(self) -> None:
        check_number(self.weight_bits, "weight_bits", low=2, high=8, integer=True)
        check_choice(self.scheme, "scheme", SCHEMES)
        check_choice(self.granularity, "granularity", GRANULARITIES)
        check_choice(self.activation_granularity, "activation_granularity", ACTIVATION_GRANULARITIES)
        check_choice(self.symmetric_range, "symmetric_range", SYMMETRIC_RANGES)
        check_choice(self.mx_scale, "mx_scale", MX_SCALE_ROUNDINGS)
        if self.mx_scale != "floor" and not self.is_mx:
            raise ValueError(f"`mx_scale`={self.mx_scale!r} chooses the shared scale of MX blocks: leave it at 'floor' "
                             f"with `scheme`={self.scheme!r}")
        for name in ("symmetric", "learn_scale", "dynamic"):
            check_bool(getattr(self, name), name)
        self._check_weights()
        self._check_activations()

    def _check_activations(self) -> None:
        ab, fmt_bits = self.activation_bits, self.format_bits
        allowed = 8 if fmt_bits is None else fmt_bits
        if ab is not None and (isinstance(ab, bool) or ab != allowed):
            raise ValueError(
                f"`activation_bits` must be {allowed} ("
                + ("uniform 8-bit layer inputs" if fmt_bits is None else f"inputs in the {self.scheme} format")
                + f") or None (weight-only), got {ab!r}"
                + ("; power-of-two levels are for weights only" if self.scheme == "power_of_two" else "")
            )
        if self.activation_granularity == "per_token" and not self.dynamic:
            raise ValueError("`activation_granularity`='per_token' ranges exist only at run time: set `dynamic`=True")
        if self.dynamic and ab is None:
            raise ValueError("`dynamic`=True quantizes layer inputs at run time: set `activation_bits`, or `dynamic`=False")
        if fmt_bits is not None and ab is not None and not self.dynamic:
            raise ValueError(f"inputs in the {self.scheme} format are scaled at run time: set `dynamic`=True")
        sq = self.smooth_quant
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, (int, float)) or not 0 < sq < 1):
            raise ValueError(f"`smooth_quant` must be None or a migration strength in (0, 1), got {sq!r}")
        if sq is not None and ab is None:
            raise ValueError("`smooth_quant` moves input outliers into the weights for quantized inputs: set "
                             "`activation_bits`, or `smooth_quant`=None for weight-only quantization")
        if self.scheme in ("uniform", "power_of_two") and self.dynamic and self.activation_granularity != "per_token":
            raise ValueError("`dynamic`=True 8-bit integer inputs are quantized per token: set `activation_granularity`='per_token'")

    def _check_weights(self) -> None:
        s, g = self.scheme, self.group_size
        if self.granularity == "per_group":
            if s not in ("uniform", "mxfp8", "mxfp6", "mxfp4", "mxint8"):
                raise ValueError(f"`granularity`='per_group' needs `scheme`='uniform' (or an MX scheme), got {s!r}")
            if s == "uniform" and (isinstance(g, bool) or not isinstance(g, int) or g < 2):
                raise ValueError(f"`granularity`='per_group' needs `group_size`, an integer >= 2, got {g!r}")
        elif g is not None and not self.is_mx:
            raise ValueError(f"`group_size`={g!r} applies to `granularity`='per_group' only, got {self.granularity!r}")
        self._check_range()
        if s == "power_of_two" and not self.symmetric:
            raise ValueError("`scheme`='power_of_two' has levels +/- s*2^-k, symmetric around 0: set `symmetric`=True")
        if s == "power_of_two" and self.learn_scale:
            raise ValueError("`learn_scale`=True (LSQ) learns a uniform step; it is not available with `scheme`='power_of_two'")
        if self.format_bits is None:
            return
        if self.weight_bits != self.format_bits:
            raise ValueError(f"`scheme`={s!r} has {self.format_bits}-bit elements: set `weight_bits`={self.format_bits}")
        if not self.symmetric or self.learn_scale:
            raise ValueError(f"`scheme`={s!r} has a fixed symmetric grid and a computed scale: set `symmetric`=True, `learn_scale`=False")
        if self.is_mx and (self.granularity == "per_tensor" or g not in (None, 32)):
            raise ValueError(
                f"`scheme`={s!r} shares one scale per block of 32 inputs: leave `granularity`/`group_size` at "
                f"per_channel/None or set per_group/32, got {self.granularity!r}/{g!r}"
            )

    def _check_range(self) -> None:
        r = self.symmetric_range
        if r != "auto" and (self.scheme != "uniform" or not self.symmetric):
            raise ValueError(f"`symmetric_range`={r!r} chooses the codes of symmetric uniform weights: leave it at "
                             f"'auto' with `scheme`={self.scheme!r}, `symmetric`={self.symmetric}")
        if r == "full" and self.weight_bits == 8:
            raise ValueError("`symmetric_range`='full' is for 2-7 bits: 8-bit symmetric weights stay on [-127, 127], "
                             "which the int8 kernels and exports rely on; allowed: 'auto' or 'restricted'")

    @property
    def full_range(self) -> bool:
        """Whether symmetric uniform weights use all ``2**bits`` codes (``[-8, 7]`` at 4 bits, step ``max / 7.5``)
        rather than the restricted ``[-7, 7]`` (step ``max / 7``): ``symmetric_range`` 'full', or 'auto' below 8 bits."""
        auto = self.symmetric_range == "auto" and self.weight_bits < 8
        return self.scheme == "uniform" and self.symmetric and (self.symmetric_range == "full" or auto)

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    @property
    def per_group(self) -> bool:
        """One uniform step per group of ``group_size`` inputs of each output channel."""
        return self.granularity == "per_group" and self.scheme == "uniform"

    @property
    def is_fp8(self) -> bool:
        return self.scheme.startswith("fp8_")

    @property
    def is_mx(self) -> bool:
        return self.scheme in MX_ELEMENT

    @property
    def element(self) -> str | None:
        """The element format of an fp8/MX scheme (a key of ``functional.formats.ELEMENTS``), else ``None``."""
        return self.scheme if self.is_fp8 else MX_ELEMENT.get(self.scheme)

    @property
    def format_bits(self) -> int | None:
        """Bits per element of an fp8/MX scheme (``None`` for integer schemes, whose width is ``weight_bits``)."""
        return None if self.element is None else ELEMENTS[self.element].bits

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
