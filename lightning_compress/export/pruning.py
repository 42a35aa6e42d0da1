"""thin: remove the output units that structured pruning zeroed, giving a physically smaller model.

A unit (a ``Linear`` output neuron or a ``Conv`` filter) is *dead* when its whole weight row is zero, as
:class:`~lightning_compress.GradualPruning` leaves it in ``mode="structured"``. Removing it also removes the
matching entries of the ``BatchNorm`` after it and the matching inputs of every layer that consumes it (across
activations, pooling and ``flatten``), found by tracing the model (:mod:`lightning_compress.graph`). Units joined
by a residual ``add`` are removed only when they are dead on every side; ``cat`` slices each part.

A dead unit is not always silent: its layer's bias and the ``BatchNorm`` shift after it make it a constant,
which the next layer still adds. ``thin`` measures that constant on ``example_input`` and folds it into the
consumer's bias (a ``Linear``, or a ``Conv`` without padding; a bias is added if the layer had none). A zero-padded
``Conv`` sees the constant only inside the image, which no bias can express: there the dead units of the group
are merged into one of them, which is kept (one channel instead of all). The thinned model is checked against
the original on ``example_input`` before it is returned: it never returns a model that computes something else.

Limits: outputs are equal in eval mode (``BatchNorm`` running statistics; in training mode the batch statistics
of the kept channels are unchanged too). Grouped/depthwise convs, ``LayerNorm``, attention and any operation
:mod:`lightning_compress.graph` does not understand keep their channels; with ``strict=True`` a layer whose dead
units cannot be removed for such a reason is an error that names it. The model's own outputs are never thinned.
The returned model is a copy (the original is untouched) of the same classes with smaller weights; its
constructor arguments (e.g. ``hidden_sizes``) are stale, so save it whole (``torch.save(model)``) or
rebuild the structure with ``thin`` before loading a thinned ``state_dict``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> with torch.no_grad():
    ...     net[0].weight[:3] = 0.0  # three dead units (their biases still feed the next layer)
    >>> x = torch.randn(5, 4)
    >>> small = thin(net, x)
    >>> small[0].out_features, small[2].in_features
    (3, 3)
    >>> torch.allclose(small(x), net(x), atol=1e-6)
    True
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lightning_compress.export._common import (
    copy_model,
    max_difference,
    output_scale,
    resolve_example,
    run_eval,
    tensors,
)
from lightning_compress.functional.pruning import unit_scores
from lightning_compress.graph import ChannelGraph, analyze
from lightning_compress.slicing import index_plan, slice_modules

__all__ = ["dead_units", "thin", "to_semi_structured"]

log = logging.getLogger(__name__)
_OUTPUT = "is a model output"


def dead_units(model: nn.Module, cg: ChannelGraph | None = None) -> dict[int, torch.Tensor]:
    """Per channel group of ``model``, a bool tensor: which channels are zero rows in every producer.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight[1].zero_()
        >>> dead_units(net)
        {0: tensor([False,  True, False]), 1: tensor([False])}
    """
    cg = cg or analyze(model)
    modules = dict(model.named_modules())
    out: dict[int, torch.Tensor] = {}
    for root, names in cg.groups().items():
        dead = None
        for name in names:
            rows = unit_scores(modules[name].weight, norm=1).eq(0).cpu()
            dead = rows if dead is None else dead & rows
        out[root] = dead
    return out


def _is_padded(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return False
    padding = module.padding
    return padding != "valid" and (isinstance(padding, str) or any(int(p) != 0 for p in padding))


def _consumer_inputs(model: nn.Module, names: list[str], example_input: Any) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            seen[name] = args[0].detach()

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        run_eval(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def _constants(
    name: str, module: nn.Module, x: torch.Tensor, channels: list[int], spatial: int
) -> torch.Tensor:
    """Per channel (Linear: per column), the constant value the removed unit feeds this consumer."""
    if isinstance(module, nn.Linear):
        flat = x.reshape(-1, x.shape[-1]).float()
        cols = (torch.tensor(channels)[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
        values = flat[:, cols]
    else:
        values = x.float().transpose(0, 1)[channels].reshape(len(channels), -1).T  # (N * positions, channels)
    ref = values[0]
    tol = 1e-5 * max(1.0, float(values.abs().max()) if values.numel() else 1.0)
    varying = (values - ref).abs().amax(dim=0) > tol
    if bool(varying.any()):
        raise ValueError(
            f"thin: the zeroed units reaching layer {name!r} do not feed it a constant (they vary over samples"
            f"{'' if isinstance(module, nn.Linear) else ' or positions'}), so removing them would change the model"
        )
    return ref.reshape(len(channels), spatial) if isinstance(module, nn.Linear) else ref


@torch.no_grad()
def thin(
    model: nn.Module, example_input: Any = None, *, strict: bool = True, atol: float = 1e-4
) -> nn.Module:
    """A physically smaller copy of ``model`` without the output units whose weights are all zero.

    Args:
        model: a model with dead units (e.g. after :class:`~lightning_compress.GradualPruning` in ``structured``
            mode). It is not modified.
        example_input: one input batch for ``model.forward`` (a tensor, a tuple of positional arguments or a
            dict of keyword arguments); default: the LightningModule's ``example_input_array``. It is used to
            measure what removed units still contribute and to check the result, so real data is best.
        strict: raise if a layer has dead units that cannot be removed (they reach an operation that cannot be
            sliced); with ``False`` they are kept and logged.
        atol: largest difference allowed between the outputs of the thinned and original model, relative to
            the largest output magnitude (at least 1); for a bf16/fp16 model at least 16 steps of its precision
            (16 x its machine epsilon), as the folded biases are rounded to it.

    Returns:
        the thinned model (a copy, same classes, smaller ``weight``/``bias``/``BatchNorm`` tensors).

    Raises:
        ValueError: no ``example_input``, a forward that cannot be traced, dead units that cannot be removed
            (``strict``), or a removed unit whose contribution is not a constant.
        RuntimeError: the thinned model's outputs differ from the original's (a graph this function misread).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[4:] = 0
        ...     net[0].bias[4:] = 0  # hidden units 4-7 are dead
        >>> small = thin(net, torch.randn(3, 4))
        >>> small[0].out_features, small[2].in_features
        (4, 4)
    """
    example_input = resolve_example(model, example_input)
    cg = analyze(model)
    dead = dead_units(model, cg)
    modules = dict(model.named_modules())
    groups = cg.groups()
    removable: dict[int, list[int]] = {}
    for root, mask in dead.items():
        if not bool(mask.any()):
            continue
        reason = cg.pin_reason(root)
        if reason is None:
            removable[root] = [int(i) for i in torch.nonzero(mask).flatten()]
        elif reason != _OUTPUT:
            msg = (
                f"thin: layer {groups[root][0]!r} has {int(mask.sum())} zeroed units, but its output {reason}"
            )
            if strict:
                raise ValueError(msg + "; pass strict=False to keep them")
            log.warning("%s; they are kept", msg)
    if not removable:
        return copy_model(model)

    users = [n for n, c in cg.consumers.items() if any(cg.root(g) in removable for g, _ in c.segments)]
    inputs = _consumer_inputs(model, users, example_input)
    # (consumer, group, offset of its segment) -> constants of the removable channels; a group may reach one
    # consumer in several segments (``cat([h, 2 * h])``), each folded on its own
    consts: dict[tuple[str, int, int], torch.Tensor] = {}
    for name in users:
        consumer = cg.consumers[name]
        offset = 0
        for g, size in consumer.segments:
            root = cg.root(g)
            if root in removable:
                channels = [offset + j for j in removable[root]]
                values = _constants(name, modules[name], inputs[name], channels, consumer.spatial)
                consts[(name, g, offset)] = values
            offset += size

    keepers = _choose_keepers(cg, modules, removable, consts)
    # a layer whose every unit is dead keeps one (it cannot have none): that one stays, so it is not folded
    survivors = {
        root: channels[0]
        for root, channels in removable.items()
        if len(channels) == cg.sizes[root] and root not in keepers
    }
    copy = copy_model(model)
    new_modules = dict(copy.named_modules())
    for (name, g, offset), values in consts.items():
        root = cg.root(g)
        keeper = keepers.get(root)
        if keeper is None and not _is_padded(new_modules[name]):
            keeper = survivors.get(
                root
            )  # (a padded conv folds nothing without a keeper: its constants are 0)
        _fold(new_modules[name], offset, removable[root], values, keeper, cg.consumers[name].spatial, name)

    keep: dict[int, torch.Tensor] = {}
    for root, channels in removable.items():
        stays = keepers.get(root, survivors.get(root))
        kept = [i for i in range(cg.sizes[root]) if i not in set(channels) or i == stays]
        keep[root] = torch.tensor(kept)
    slice_modules(copy, index_plan(cg, keep))

    reference, result = run_eval(model, example_input), run_eval(copy, example_input)
    diff = max_difference(reference, result)
    # folded biases round at the model's own precision: allow a few of its steps (bf16/fp16), never less than atol
    rounding = 16 * _coarsest_eps(model, reference)
    if not diff <= max(atol, rounding) * max(1.0, output_scale(reference)):
        raise RuntimeError(
            f"thin: the thinned {type(model).__name__} differs from the original by {diff:.3g} on "
            "example_input; refusing to return it (please report this model)"
        )
    return copy


def _coarsest_eps(model: nn.Module, output: Any) -> float:
    """Machine epsilon of the least precise floating dtype among ``model``'s tensors and ``output``."""
    dtypes = {
        t.dtype for t in [*model.parameters(), *model.buffers(), *tensors(output)] if t.is_floating_point()
    }
    return max((torch.finfo(d).eps for d in dtypes), default=0.0)


def _choose_keepers(
    cg: ChannelGraph,
    modules: dict[str, nn.Module],
    removable: dict[int, list[int]],
    consts: dict[tuple[str, int, int], torch.Tensor],
) -> dict[int, int]:
    """For groups whose constants reach a zero-padded conv: the dead channel to keep and merge the others into."""
    needs: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for (name, g, _), values in consts.items():
        module = modules[name]
        if _is_padded(module) and float(values.abs().max()) > 1e-7 * max(1.0, float(values.abs().max())):
            needs.setdefault(cg.root(g), []).append((name, values.abs()))
    keepers: dict[int, int] = {}
    for root, uses in needs.items():
        worst = torch.stack([v for _, v in uses]).amin(dim=0)
        best = int(worst.argmax())
        if float(worst[best]) <= 1e-6 * max(float(v.max()) for _, v in uses):
            raise ValueError(
                f"thin: the zeroed units reaching the padded conv {uses[0][0]!r} carry constants that "
                "no single kept unit can stand for; this model cannot be thinned exactly"
            )
        keepers[root] = removable[root][best]
    return keepers


def _fold(
    module: nn.Module,
    offset: int,
    channels: list[int],
    values: torch.Tensor,
    keeper: int | None,
    spatial: int,
    name: str,
) -> None:
    """Add what the removed ``channels`` fed ``module`` to its bias, or (padded conv) to the keeper's weights."""
    w = module.weight
    if _is_padded(module):
        if keeper is not None:  # all constants share the image-shaped pattern: scale them onto the keeper
            k = channels.index(keeper)
            for i, j in enumerate(channels):
                if j != keeper:
                    w[:, offset + keeper] += w[:, offset + j] * (values[i] / values[k]).to(w.dtype)
        return  # keeper None: every constant reaching this conv is zero
    if keeper is not None:  # the keeper stays: only the others are folded
        rows = [i for i, j in enumerate(channels) if j != keeper]
        channels, values = [channels[i] for i in rows], values[rows]
    if isinstance(module, nn.Linear):
        cols = (torch.tensor(channels, dtype=torch.long)[:, None] + offset) * spatial + torch.arange(spatial)[
            None, :
        ]
        delta = w[:, cols.reshape(-1)] @ values.reshape(-1).to(w.dtype)
    else:
        dims = tuple(range(2, w.dim()))
        delta = (w[:, [offset + j for j in channels]].sum(dim=dims) * values.to(w.dtype)).sum(dim=1)
    if not bool(delta.abs().gt(0).any()):
        return
    if module.bias is None:
        module.bias = nn.Parameter(delta.clone(), requires_grad=w.requires_grad)
        log.info("thin: %r gets a bias (the constant its removed inputs fed it)", name)
    else:
        module.bias += delta.to(module.bias.dtype)


_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def to_semi_structured(model: nn.Module) -> list[str]:
    """Store the 2:4-sparse ``Linear`` weights of ``model`` as CUDA semi-structured sparse tensors, in place.

    ``GradualPruning(pattern="2:4")`` leaves dense weights with exactly two zeros in every four inputs; this
    explicit call hands the qualifying ones to ``torch.sparse.to_sparse_semi_structured``, whose matmul runs on
    the sparse tensor cores of Ampere and later GPUs. A ``Linear`` qualifies when its weight is on a CUDA device,
    in float16 or bfloat16, with both sizes multiples of 64, and 2:4 in every group (counted from the weight);
    the others are left dense (logged). Inference only: the converted weights do not train.

    Not run by this project's suite (no CUDA machine); ``benchmarks/gpu_check.py`` times it against dense.

    Returns:
        The names of the converted layers.

    Raises:
        RuntimeError: CUDA is not available (semi-structured sparse kernels exist only there).

    Example:
        >>> import torch
        >>> if not torch.cuda.is_available():
        ...     print("needs CUDA")
        ... else:
        ...     print(to_semi_structured(torch.nn.Sequential(torch.nn.Linear(8, 8))))  # 8 is below 64: left dense
        needs CUDA
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs CUDA: torch.sparse.to_sparse_semi_structured runs only on NVIDIA GPUs "
            "(compute capability >= 8.0); on CPU keep the dense weights with their zeros"
        )
    from torch.sparse import to_sparse_semi_structured

    from lightning_compress.functional.pruning import nm_fraction

    converted = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        reason = (
            "not on a CUDA device" if w.device.type != "cuda"
            else f"dtype {w.dtype} (float16/bfloat16 only)" if w.dtype not in _SEMI_STRUCTURED_DTYPES
            else f"shape {tuple(w.shape)} (multiples of 64 only)" if w.shape[0] % 64 or w.shape[1] % 64
            else "not 2:4 sparse in every group" if nm_fraction(w, 2, 4) < 1.0
            else None
        )
        if reason is not None:
            log.info("to_semi_structured: %r left dense: %s", name, reason)
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        converted.append(name)
    return converted
