"""Which training strategies a callback runs under, and a clear refusal for the others.

Sharding strategies change what a callback sees: Lightning's ``ModelParallelStrategy`` (FSDP2: the user's
``configure_model`` calls ``fully_shard``, every parameter becomes a row-sharded ``DTensor``), ``FSDPStrategy``
(FSDP1: flat parameters) and ``DeepSpeedStrategy`` (ZeRO partitions). A callback that has not been made to compute
on shards must say so before the first training step instead of training on without compressing. Two checks:

- :func:`refuse_strategy` in ``setup`` (which runs *before* ``configure_model``, so it decides from the
  strategy's type): every sharding strategy except those the callback supports;
- :func:`refuse_sharded_parameters` in ``on_fit_start`` (after ``configure_model``): any ``DTensor`` parameter,
  whatever made it (e.g. ``fully_shard`` called by hand under a plain strategy).

:func:`resolve_parameters` finds parameters again by name after ``configure_model`` replaced them.

Example:
    >>> from lightning.pytorch.strategies import ModelParallelStrategy
    >>> sharding_strategy(ModelParallelStrategy())
    'ModelParallelStrategy'
    >>> sharding_strategy(None) is None
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_compress import _sharding

__all__ = [
    "SHARDING_STRATEGIES",
    "refuse_sharded_parameters",
    "refuse_strategy",
    "resolve_parameters",
    "sharding_strategy",
]

# strategy class names (looked up along the class's MRO, so subclasses count) that shard parameters
SHARDING_STRATEGIES: tuple[str, ...] = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")
_WHAT = {
    "ModelParallelStrategy": "shards parameters into DTensors (FSDP2 / tensor parallel)",
    "FSDPStrategy": "flattens and shards parameters (FSDP1)",
    "DeepSpeedStrategy": "partitions parameters, gradients or optimizer state (ZeRO)",
}


def sharding_strategy(strategy: Any) -> str | None:
    """The name of the sharding strategy ``strategy`` is (or derives from), ``None`` for any other."""
    names = [cls.__name__ for cls in type(strategy).__mro__] if strategy is not None else []
    return next((name for name in names if name in SHARDING_STRATEGIES), None)


def refuse_strategy(strategy: Any, owner: str, reason: str, supported: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming ``owner`` and the strategy when ``strategy`` (``trainer.strategy``) is a sharding
    strategy not in ``supported`` (class names); ``reason``: what the callback cannot do with sharded parameters.

    Example:
        >>> from lightning.pytorch.strategies import FSDPStrategy
        >>> refuse_strategy(FSDPStrategy(), "MyCallback", "it reads whole weights")
        Traceback (most recent call last):
        ...
        ValueError: MyCallback: cannot run under FSDPStrategy, which flattens and shards parameters (FSDP1): it reads whole weights. Supported: a single device, DDP
    """
    name = sharding_strategy(strategy)
    if name is None or name in supported:
        return
    allowed = ", ".join(["a single device", "DDP", *supported])
    raise ValueError(
        f"{owner}: cannot run under {type(strategy).__name__}, which {_WHAT[name]}: {reason}. Supported: {allowed}"
    )


def refuse_sharded_parameters(module: nn.Module, owner: str, reason: str) -> None:
    """Raise ``ValueError`` naming ``owner`` and the first sharded parameters when ``module`` has ``DTensor``
    parameters (call after ``configure_model``: ``on_fit_start``)."""
    names = _sharding.sharded_parameters(module)
    if names:
        raise ValueError(
            f"{owner}: parameters {names[:3]}{' ...' if len(names) > 3 else ''} are sharded DTensors "
            f"(fully_shard / ModelParallelStrategy): {reason}"
        )


def resolve_parameters(module: nn.Module, names: list[str], owner: str) -> dict[str, nn.Parameter]:
    """``module``'s parameters by fully-qualified name, looked up now (``fully_shard`` in ``configure_model``
    replaces the parameter objects seen in ``setup``), each checked with :func:`_sharding.check_supported`."""
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{owner}: parameters {missing} disappeared between setup and fit start")
    for name in names:
        _sharding.check_supported(params[name], name, owner)
    return {name: params[name] for name in names}
