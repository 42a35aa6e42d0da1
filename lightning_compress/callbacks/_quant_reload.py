"""After ``convert_on_fit_end``: a model converted in place still loads the checkpoints written before its conversion
(the reload hooks of :class:`~lightning_compress.QuantizationAwareTraining`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_compress.export.quantization import convert
from lightning_compress.layers.quantization import _set_submodule, is_qat_module

__all__ = ["reload_fake_quant_states"]


def reload_fake_quant_states(
    model: nn.Module, prepared: dict[str, nn.Module], bns: dict[str, nn.Module]
) -> None:
    """Let a model converted in place still load checkpoints written before its conversion.

    After ``convert_on_fit_end``, Lightning's own idiom ``trainer.test(model, ckpt_path="last")`` loads a
    checkpoint of the fake-quantized model into the integer one. A ``load_state_dict`` pre-hook sees such a state
    (it has the layers' ``weight_quant.*`` entries), puts the prepared layers (and any BatchNorm folded away) back
    in place so that the state loads into them, and a post-hook converts them again: the model ends as the integer
    model of that checkpoint. States of the converted model itself load as usual. The prepared layers are kept
    in memory for this, but not pickled with the model (``torch.save(model)`` stays the integer model's size).
    """
    reload = _FakeQuantReload(prepared, bns)
    model.register_load_state_dict_pre_hook(reload.pre_hook)
    model.register_load_state_dict_post_hook(reload.post_hook)


class _FakeQuantReload:
    """The two hooks of :func:`reload_fake_quant_states`; pickles as an inert (empty) pair."""

    def __init__(self, prepared: dict[str, nn.Module], bns: dict[str, nn.Module]) -> None:
        self.prepared, self.bns = prepared, bns

    def __getstate__(self) -> dict[str, Any]:
        return {"prepared": {}, "bns": {}}

    def pre_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        names = [n for n in self.prepared if any(k.startswith(f"{prefix}{n}.weight_quant.") for k in state_dict)]
        for name in names:
            if not is_qat_module(module.get_submodule(name)):
                _set_submodule(module, name, self.prepared[name])
        if names:
            for name, bn in self.bns.items():
                if f"{prefix}{name}.running_mean" in state_dict:
                    _set_submodule(module, name, bn)

    def post_hook(self, module: nn.Module, incompatible_keys: Any) -> None:
        if self.prepared and any(is_qat_module(m) for m in module.modules()):
            was_training = module.training
            convert(module, inplace=True)
            module.train(was_training)
