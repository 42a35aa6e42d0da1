"""Which layers :class:`~lightning_compress.LowRankFactorization` factorizes, checked before training."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_compress.functional.low_rank import full_rank
from lightning_compress.layers.low_rank import is_factorized
from lightning_compress.targets import match, select_modules, tied_elsewhere

__all__: list[str] = []  # private to LowRankFactorization

_TYPES = ("Linear", "Conv2d")


def choose_layers(pl_module: nn.Module, targets: list[str] | None, exclude: list[str] | None,
                  ranks: dict[str, int] | None, has_rule: bool) -> list[str]:
    """The layers ``LowRankFactorization`` factorizes (``setup``): the ``Linear``/``Conv2d`` targets not factorized yet,
    the ones it cannot factorize refused when named in ``targets`` (skipped, with a log line, otherwise), and every
    ``ranks`` pattern and rank checked against them."""
    chosen = select_modules(pl_module, targets, exclude, types=_TYPES)
    inside = [n for n, m in pl_module.named_modules() if n and is_factorized(m)]
    names = []
    for name, module in chosen.items():
        if is_factorized(module) or any(name.startswith(f"{f}.") for f in inside):
            continue  # already factorized (a model trained before with this callback)
        problem = None
        if type(module) not in (nn.Linear, nn.Conv2d):
            problem = f"it is a {type(module).__name__}, a subclass of {type(module).__mro__[1].__name__}"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            problem = f"it is a grouped conv (groups={module.groups})"
        elif not module.weight.requires_grad:
            problem = "its weight is frozen (requires_grad=False)"
        elif tied := tied_elsewhere(pl_module, name):
            problem = f"its weight is tied to {tied} (one parameter in several modules), which factors would untie"
        if problem is not None:
            if targets is not None:
                raise ValueError(f"`targets`: layer {name!r} cannot be factorized: {problem}; "
                                 "only nn.Linear and nn.Conv2d with groups=1 can")
            rank_zero_info(f"LowRankFactorization: skipping {name!r}: {problem}")
            continue
        names.append(name)
    if not names:
        raise ValueError(f"LowRankFactorization: nothing to factorize among {list(chosen)}")
    patterns = dict(ranks or {})
    unmatched = [p for p in patterns if not any(match(p, n) for n in names)]
    if unmatched:
        raise ValueError(f"`ranks`: pattern(s) {unmatched} match no factorized layer; layers: {names}")
    for name in names:
        module = pl_module.get_submodule(name)
        pattern = next((p for p in patterns if match(p, name)), None)
        if pattern is None:
            if not has_rule:
                raise ValueError(f"`ranks` gives no rank for layer {name!r} and no `rank_ratio`/`energy`/"
                                 f"`param_ratio` is set; layers: {names}")
            continue
        full = full_rank(module)
        if patterns[pattern] > full:
            raise ValueError(
                f"`ranks[{pattern!r}]`={patterns[pattern]} is larger than possible for layer {name!r} "
                f"({type(module).__name__} with a {'x'.join(map(str, module.weight.shape))} weight): at most {full}"
            )
    return names
