"""QuantizationAwareTraining: fake quantization while the model trains, then a real integer model."""

from __future__ import annotations

import logging
import weakref
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress import claims
from lightning_compress._sharding import is_sharded
from lightning_compress._validation import check_bool, check_number, check_state_version
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._quant_reload import reload_fake_quant_states
from lightning_compress.export.low_bit import LOW_BIT_LAYERS
from lightning_compress.export.quantization import (
    Int8Conv2d,
    Int8Linear,
    PackedConv,
    PackedLinear,
    convert,
    serialized_size,
)
from lightning_compress.layers._quant_observing import mark_training_batch
from lightning_compress.layers._quant_sharded import (
    attach_input_groups,
    check_tensor_parallel,
    detach_input_groups,
)
from lightning_compress.layers.quantization import (
    ActivationFakeQuantize,
    QuantConfig,
    find_conv_bn_pairs,
    is_qat_module,
    observe_weights,
    prepare_qat,
    set_qat_flags,
)
from lightning_compress.schedules import check_starts_in_run, epochs_to_steps
from lightning_compress.targets import select_modules, tied_elsewhere, validate_patterns

__all__ = ["QuantizationAwareTraining"]

log = logging.getLogger(__name__)

_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_VERSION = 1
_CONFIG_VERSION = 1  # of the saved `quantization_config` (the settings `load_quantized_checkpoint` prepares with)


class QuantizationAwareTraining(_ReleasesModelOnException):
    """Train with fake-quantized weights (and layer inputs), then convert to a real integer model.

    In ``setup`` each targeted ``Linear``/``Conv{1,2,3}d`` is replaced by a fake-quantizing twin that shares its
    ``weight``/``bias`` parameters (state-dict keys unchanged, quantizer state added as buffers), so every
    checkpoint written mid-QAT resumes with ``ckpt_path=`` and loads for evaluation with
    :func:`lightning_compress.checkpoints.load_quantized_checkpoint`. From ``start_*`` on, the forward uses quantized values with the
    straight-through estimator. Input ranges are observed in every training batch whatever the module's train/eval
    mode (Lightning trains a model handed to ``fit`` in eval mode in eval mode); validation, test and predict
    forwards never change them. At the end of fit (``convert_on_fit_end``) or by calling
    :func:`lightning_compress.export.quantization.convert`, the layers become integer layers: int8 kernel-backed
    for 8-bit uniform weights, packed 2/4/8-bit codes + scales otherwise.

    A ``BatchNorm`` right after a targeted conv (same parent) is folded into the conv's quantized weight during
    training and for good at conversion. Zero is always a level, so weights pruned to zero (e.g. by
    ``GradualPruning`` in the same Trainer, in any order) stay exactly zero.

    Sharded training: under ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) in ``configure_model`` the
    prepared layers are sharded like the user's ``Linear`` layers; input ranges are reduced over the ranks (the
    range one process sees on the whole batch), LSQ steps are initialised from the weight shards, and conversion
    gathers one layer at a time, so every rank ends with the same integer model. FSDP1, DeepSpeed and tensor
    parallelism are refused in ``setup``.

    Args:
        weight_bits: bits per weight, 2 to 8.
        activation_bits: ``8`` to quantize each targeted layer's input (unsigned affine, EMA min/max observer),
            ``None`` for weight-only quantization.
        scheme: ``uniform`` (affine integer levels) or ``power_of_two`` (levels ``0, +/- s * 2^-k``, Miyashita
            et al. 2016; weights only, symmetric); ``fp8_e4m3``/``fp8_e5m2`` (fp8 with an amax scale per channel
            or tensor) or the OCP MX formats ``mxfp8``/``mxfp6``/``mxfp4``/``mxint8`` (blocks of 32 inputs sharing
            a power-of-two E8M0 scale); for these ``weight_bits`` is the element width, Linear layers only.
        granularity: one step per output channel (``per_channel``), per layer (``per_tensor``) or per group of
            ``group_size`` consecutive inputs of each output channel (``per_group``, Linear layers only).
        symmetric: symmetric weight grid (zero point 0; codes see ``symmetric_range``); ``False``: affine with
            an integer zero point.
        learn_scale: learn the weight step as a parameter (LSQ, Esser et al. 2020); it joins the optimizer,
            since the layers are prepared before ``configure_optimizers``.
        start_epoch: train in float until this epoch (fractions allowed), then quantize.
        start_step: the same in optimizer steps (give one of the two; default: from the start).
        freeze_observers_epoch: stop updating weight and activation ranges from this epoch.
        freeze_observers_step: the same in optimizer steps.
        freeze_bn_epoch: from this epoch BatchNorm layers use and keep their running statistics.
        freeze_bn_step: the same in optimizer steps.
        targets: layer names/globs/``re:`` patterns to quantize (default: every supported layer, except, with a
            warning, layers whose weight is tied to another module's; named in ``targets`` those are an error).
        exclude: layer patterns to leave in float.
        convert_on_fit_end: convert the LightningModule in place when fit ends (a following ``test`` runs the
            integer model; ``trainer.test(model, ckpt_path="last")`` loads that fake-quantized checkpoint and runs
            its integer model). A run stopped before quantization started (e.g. by ``EarlyStopping``) stays in
            float, with a warning.
        group_size: inputs per weight step with ``granularity="per_group"`` (it must divide each in_features).
        activation_granularity: ``per_tensor`` (one observed range per layer) or ``per_token`` (each row of
            the input at run time; needs ``dynamic``).
        dynamic: quantize layer inputs at run time from their own ranges (no observer): 8-bit per token for
            integer schemes, the weight's fp8/MX format otherwise.
        symmetric_range: the codes of symmetric uniform weights. ``restricted``: ``[-(2^(b-1)-1), 2^(b-1)-1]``
            with step ``max|w| / (2^(b-1)-1)`` (``[-127, 127]`` at 8 bits, what int8 kernels expect); ``full``:
            all ``2^b`` codes, ``[-2^(b-1), 2^(b-1)-1]`` with step ``max|w| / (2^(b-1)-0.5)`` (``[-8, 7]``,
            ``max / 7.5`` at 4 bits: torchao's symmetric intx QAT and compressed-tensors' symmetric convention;
            one more level, +0.003-0.005 fidelity on a fake-quantized MiniLM at 4 bits); ``auto`` (default):
            ``full`` below 8 bits, ``restricted`` at 8. ``full`` at 8 bits is refused. Each weight quantizer
            records its grid (buffer ``full_range``), so a checkpoint resumes on the grid it was trained on; one
            written before that buffer existed resumes on ``restricted`` (its steps were computed for it).
        smooth_quant: SmoothQuant migration strength ``alpha`` in (0, 1) (Xiao et al. 2023; ``None``: off). Each
            quantized Linear's input is divided per channel by ``s = max|x|^alpha / max|W|^(1-alpha)`` (from the
            first training batch with fake quantization, then fixed) and its weight multiplied by ``s``: the same
            float layer, with the input's outlier channels (BERT's LayerNorm outputs) moved into the weight before
            8-bit per-tensor quantization. Needs ``activation_bits``; DDP yes, FSDP2 not yet (refused in ``setup``).
            Converted layers divide their input by ``s``; ``to_onnx`` exports that division, ``save_pretrained``
            refuses (compressed-tensors has no place for it). See ``layers._quant_smoothing``.
        mx_scale: how an MX scheme picks each block's shared power-of-two scale, for weights and inputs alike:
            ``floor`` (default), the OCP MX spec's ``2**(floor(log2 amax) - emax_elem)``, which saturates a block's
            largest values (MXFP8: up to 512 onto e4m3's 448); ``rceil``, the smallest scale at which nothing
            saturates, ``2**ceil(log2(amax / max_elem))`` (torchao's and NVIDIA's default). Converted layers store
            the trained scales and quantize inputs by the same rule. See ``functional.formats``.

    Raises:
        ValueError: bits out of range, an unknown scheme/granularity, power-of-two with an asymmetric grid, LSQ
            or activations it cannot represent, a window given in steps and epochs, or (in ``setup``/at train
            start) targeted layers of unsupported types, patterns matching nothing, a start after the run ends.
        TypeError: a pattern list given as a single string.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, learn_scale=True, start_epoch=1)
        >>> trainer = Trainer(callbacks=[qat], logger=False, max_epochs=2)
        >>> QuantizationAwareTraining(weight_bits=4, scheme="power_of_two", symmetric=False)
        Traceback (most recent call last):
        ...
        ValueError: `scheme`='power_of_two' has levels +/- s*2^-k, symmetric around 0: set `symmetric`=True
    """

    _sharding_refusal, _sharding_support = "its fake-quantizers follow FSDP2 (DTensor) row shards only", ("ModelParallelStrategy",)

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        scheme: Literal["uniform", "power_of_two", "fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp6", "mxfp4", "mxint8"] = "uniform",
        granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel",
        symmetric: bool = True,
        learn_scale: bool = False,
        start_epoch: float | None = None,
        start_step: int | None = None,
        freeze_observers_epoch: float | None = None,
        freeze_observers_step: int | None = None,
        freeze_bn_epoch: float | None = None,
        freeze_bn_step: int | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        convert_on_fit_end: bool = True,
        group_size: int | None = None,
        activation_granularity: Literal["per_tensor", "per_token"] = "per_tensor",
        dynamic: bool = False,
        symmetric_range: Literal["auto", "restricted", "full"] = "auto",
        smooth_quant: float | None = None,
        mx_scale: Literal["floor", "rceil"] = "floor",
    ) -> None:
        super().__init__()
        self._config = QuantConfig(weight_bits, activation_bits, scheme, granularity, symmetric, learn_scale,
                                   group_size, activation_granularity, dynamic, symmetric_range, smooth_quant, mx_scale)
        for what in ("start", "freeze_observers", "freeze_bn"):
            _check_point(locals()[f"{what}_step"], locals()[f"{what}_epoch"], what)
        validate_patterns(targets, "targets")
        validate_patterns(exclude, "exclude")
        check_bool(convert_on_fit_end, "convert_on_fit_end")
        self.weight_bits, self.activation_bits, self.scheme = weight_bits, activation_bits, scheme
        self.granularity, self.symmetric, self.learn_scale = granularity, symmetric, learn_scale
        self.start_epoch, self.start_step = start_epoch, start_step
        self.freeze_observers_epoch, self.freeze_observers_step = freeze_observers_epoch, freeze_observers_step
        self.freeze_bn_epoch, self.freeze_bn_step = freeze_bn_epoch, freeze_bn_step
        self.targets, self.exclude = targets, exclude
        self.convert_on_fit_end = convert_on_fit_end
        self.group_size, self.activation_granularity, self.dynamic = group_size, activation_granularity, dynamic
        self.symmetric_range, self.smooth_quant, self.mx_scale = symmetric_range, smooth_quant, mx_scale
        self._layers: list[str] = []
        self._bn_pairs: dict[str, str] = {}
        self._steps: dict[str, int | None] = {}
        self._model_ref: weakref.ref | None = None
        self._converted = self._sharded = False
        self.converted_bytes: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model_ref"] = None  # a weak reference does not pickle; the next setup finds the model again
        return state

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(targets=self.targets, exclude=self.exclude)

    # -- prepare -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_tensor_parallel(trainer.strategy, "QuantizationAwareTraining")
        if self.smooth_quant is not None and type(trainer.strategy).__name__ == "ModelParallelStrategy":
            raise ValueError("QuantizationAwareTraining: `smooth_quant` cannot run under ModelParallelStrategy (FSDP2) "
                             "yet (its factors need whole weight columns); use DDP or `smooth_quant`=None")
        if self._model_ref is None or self._model_ref() is not pl_module:
            if _is_converted(pl_module):  # e.g. `trainer.validate(convert_quantized(model))`: nothing to prepare
                self._model_ref = weakref.ref(pl_module)
                self._converted = True
                return
            chosen = select_modules(pl_module, self.targets, self.exclude, types=_TYPES)
            chosen = self._drop_tied(pl_module, chosen)
            self._layers = list(chosen)
            self._bn_pairs = find_conv_bn_pairs(pl_module, self._layers)
            prepare_qat(pl_module, self._layers, self._config, self._bn_pairs)
            self._model_ref = weakref.ref(pl_module)
            self._converted = not any(is_qat_module(pl_module.get_submodule(n)) for n in self._layers)
        claims.claim(pl_module, [f"{n}.weight" for n in self._layers], "quantize", self.state_key)

    def _drop_tied(self, pl_module: nn.Module, chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Leave out layers whose weight another module also holds (tied weights): the fake-quantized twin and the
        integer layer of conversion would quantize one use and leave the other in float, untying them."""
        tied = {n: others for n in chosen if (others := tied_elsewhere(pl_module, n))}
        if not tied:
            return chosen
        if self.targets is not None:
            raise ValueError(
                f"`targets`: the weight of {list(tied)} is tied to {sorted({o for v in tied.values() for o in v})} "
                "(one parameter in several modules); quantizing one use would untie them: leave them out with `exclude`"
            )
        for name, others in tied.items():
            rank_zero_warn(f"QuantizationAwareTraining: skipping {name!r}, its weight is tied to {others}")
        left = {n: m for n, m in chosen.items() if n not in tied}
        if not left:
            raise ValueError(f"QuantizationAwareTraining: every targeted layer has a tied weight: {list(tied)}")
        return left

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        claims.release(pl_module, self.state_key)
        detach_input_groups(pl_module)
        mark_training_batch(pl_module, False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model`: under FSDP2 the prepared layers may now hold row-sharded DTensor parameters; input
        # ranges are reduced over the processes that each see part of a batch (DDP too)
        self._sharded = attach_input_groups(pl_module, "QuantizationAwareTraining", trainer.world_size > 1) > 0 or any(
            is_sharded(pl_module.get_submodule(n).weight) for n in self._layers if is_qat_module(pl_module.get_submodule(n)))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = {}
        for what in ("start", "freeze_observers", "freeze_bn"):
            step, epoch = getattr(self, f"{what}_step"), getattr(self, f"{what}_epoch")
            steps[what] = step if step is not None else (epochs_to_steps(epoch, trainer) if epoch is not None else None)
        steps["start"] = steps["start"] or 0
        given = "start_step" if self.start_step is not None else "start_epoch"
        check_starts_in_run(trainer, steps["start"], given, "starts quantization", "the model would never be quantized")
        fo = steps["freeze_observers"]
        if fo is not None and fo <= steps["start"]:
            raise ValueError(
                f"observers would freeze (step {fo}) before quantization starts (step {steps['start']}): "
                "freeze them after `start_step`/`start_epoch`"
            )
        self._steps = steps
        if self._converted:
            raise ValueError("the model was already converted to integers; fit a float or fake-quantized model")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        s = self._steps
        fo, fb = s.get("freeze_observers"), s.get("freeze_bn")
        set_qat_flags(pl_module, fake_quant=step >= s.get("start", 0), observe=fo is None or step < fo)
        mark_training_batch(pl_module, True)  # input ranges are observed in this batch whatever the module's mode
        if self._sharded and self.learn_scale and step >= s.get("start", 0):
            observe_weights(pl_module, uninitialized_only=True)  # an LSQ step set in forward would be lost (FSDP2)
        if fb is not None and step >= fb:
            for bn in self._batchnorms(pl_module):
                bn.eval()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mark_training_batch(pl_module, False)

    def _batchnorms(self, pl_module: nn.Module) -> list[nn.Module]:
        if self._bn_pairs:
            return [pl_module.get_submodule(b) for b in self._bn_pairs.values()]
        return [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # DDP broadcasts buffers from rank 0 before each forward, so rank 0's observed input ranges are the ones
        # in use; after the last step every rank has updated its own: take rank 0's before converting.
        if trainer.world_size > 1:
            observers = {n: m for n, m in pl_module.named_modules() if isinstance(m, ActivationFakeQuantize)}
            states = {
                n: {k: b.detach().cpu() for k, b in m.named_buffers(recurse=False)} for n, m in observers.items()
            }
            states = trainer.strategy.broadcast(states, src=0)
            with torch.no_grad():
                for n, m in observers.items():
                    own = dict(m.named_buffers(recurse=False))
                    for k, b in states[n].items():
                        own[k].copy_(b)

    # -- convert -----------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.convert_on_fit_end or self._converted:
            return
        start = self._steps.get("start") or 0
        if trainer.global_step <= start:  # stopped early (EarlyStopping, max_time, ...): nothing was quantized
            rank_zero_warn(
                f"QuantizationAwareTraining: training stopped at optimizer step {trainer.global_step} before "
                f"quantization started (at step {start}); the model stays in float, prepared but not converted"
            )
            return
        prepared = {n: m for n, m in pl_module.named_modules() if is_qat_module(m)}
        bns = {m.__dict__["_bn_name"]: pl_module.get_submodule(m.__dict__["_bn_name"])
               for m in prepared.values() if m.__dict__.get("_bn_name") is not None}
        convert(pl_module, inplace=True)
        reload_fake_quant_states(pl_module, prepared, bns)
        self._converted = True
        self.converted_bytes = serialized_size(pl_module)
        if trainer.is_global_zero:
            log.info("converted to an integer model: %d bytes serialized", self.converted_bytes)
            for logger in trainer.loggers:
                logger.log_metrics({"compression/size_bytes/serialized_int": float(self.converted_bytes)},
                                   step=trainer.global_step)

    # -- reporting ---------------------------------------------------------------------------------
    def compression_bits(self, pl_module: pl.LightningModule) -> dict[str, int]:
        """Bit width of each quantized weight (parameter fully-qualified name -> bits), for CompressionMonitor."""
        return {f"{n}.weight": self.weight_bits for n in self._layers}

    def compression_sizes(self, pl_module: pl.LightningModule) -> dict[str, int]:
        """Serialized bytes of the integer model once converted (``{}`` before)."""
        return {"serialized_int": self.converted_bytes} if self.converted_bytes is not None else {}

    # -- state -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "quantization_config": {**self._config.as_dict(), "version": _CONFIG_VERSION},
            "layers": list(self._layers),
            "bn_pairs": dict(self._bn_pairs),
            "converted": self._converted,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "QuantizationAwareTraining")
        saved = dict(state_dict.get("quantization_config", {}))
        check_state_version(saved, _CONFIG_VERSION, "QuantizationAwareTraining (`quantization_config`)")
        saved.pop("version", None)
        mine = self._config.as_dict()
        diff = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
        if diff:
            raise ValueError(
                "the checkpoint was written by a QuantizationAwareTraining with other settings "
                + ", ".join(f"`{k}`={a!r} (this callback: {b!r})" for k, (a, b) in diff.items())
            )
        layers = state_dict.get("layers")
        if layers is not None and self._layers and list(layers) != self._layers:
            raise ValueError(f"the checkpoint quantized layers {layers}, this callback targets {self._layers}")
        if not self._layers and self._model_ref is None:  # not set up yet: keep the state (setup recomputes it)
            self._layers = list(layers or [])
            self._bn_pairs = dict(state_dict.get("bn_pairs", {}))
            self._converted = bool(state_dict.get("converted", False))


def _is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds integer layers made by ``convert`` and no fake-quantized one."""
    modules = list(model.modules())
    integer = (Int8Linear, Int8Conv2d, PackedLinear, PackedConv, *LOW_BIT_LAYERS)
    return any(isinstance(m, integer) for m in modules) and not any(is_qat_module(m) for m in modules)


def _check_point(step: int | None, epoch: float | None, what: str) -> None:
    if step is not None and epoch is not None:
        raise ValueError(f"give `{what}_step` or `{what}_epoch`, not both")
    check_number(step, f"{what}_step", low=0, integer=True, optional=True)
    check_number(epoch, f"{what}_epoch", low=0, optional=True)
