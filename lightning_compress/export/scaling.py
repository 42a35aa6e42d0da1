"""scale: a smaller student of the same architecture, narrower and shallower (compound scaling, Tan & Le 2019).

EfficientNet scales a network by width (channels per layer) and depth (blocks per stage) together. ``scale``
goes the other way from a trained model, to get a student to train with
:class:`~lightning_compress.KnowledgeDistillation`:

- **width**: every hidden channel group (see :mod:`lightning_compress.graph`; the model's input and output stay
  full) keeps its ``round(width * n)`` most important channels, scored by the L1 norm of their weight rows (each
  producer's norms divided by their mean, summed over the producers of a residual-joined group) times the
  magnitude of the BatchNorm scale after them (relative to its mean), as in network slimming (Liu et al. 2017).
  The kept channels keep their trained weights.
- **depth**: in every ``nn.Sequential`` and ``nn.ModuleList``, a run of two or more consecutive repeated
  blocks (a block is 1 to 4 consecutive children; repeated = same classes and parameter shapes) keeps
  ``ceil(depth * repeats)`` blocks: its first ones (``blocks="first"``), or ones spread evenly from the first to
  the last (``blocks="spread"``: block ``round(i * (repeats - 1) / (keep - 1))`` for ``i < keep``, e.g. layers
  0, 3 and 5 of 6, as DistilBERT initializes its student from every other teacher layer). A pretrained
  transformer's output comes from its last layers, so a student keeping them starts closer to it (all-MiniLM-L6-v2
  at half depth: 0.67 cosine fidelity of its embeddings to the original's with layers 0, 3, 5, 0.29 with 0, 1,
  2, before any training). A block is dropped only if ``example_input`` shows that it returns a tensor of the shape
  it receives.

What can be scaled in depth: stacks of identical, shape-preserving blocks held in an ``nn.Sequential`` or
``nn.ModuleList`` that the forward runs in order: the non-downsampling blocks of a ResNet stage, ``[Linear(h, h),
ReLU]`` repeats of an MLP (``DigitsMLP(hidden_sizes=[h, h, h])``), a ``ModuleList`` of transformer layers.
What cannot: blocks kept as separate attributes (``self.block1``, ``self.block2``), blocks that change the shape
(the first, downsampling block of a stage, conv + pooling repeats), and a ``ModuleList`` whose forward indexes
fixed positions (that one fails the check on ``example_input`` and is an error). A model with no repeated stack
(``DigitsCNN``, ``DigitsMLP`` with distinct widths) is returned at its depth.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
    ...                     nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> small = scale(net, width=0.5, depth=0.5, example_input=torch.zeros(2, 4))
    >>> [m.out_features for m in small if isinstance(m, nn.Linear)]
    [8, 8, 8, 3]
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from lightning_compress._validation import check_number
from lightning_compress.export._common import copy_model, run_eval, tensors
from lightning_compress.functional.pruning import unit_scores
from lightning_compress.graph import ChannelGraph, analyze, channels_at
from lightning_compress.slicing import index_plan, slice_modules

__all__ = ["BLOCK_CHOICES", "channel_importance", "kept_blocks", "repeated_blocks", "scale"]

BLOCK_CHOICES = ("first", "spread")


def _check_fraction(name: str, value: Any) -> None:
    check_number(value, name, low=0, low_open=True, high=1, noun="a fraction")


@torch.no_grad()
def scale(
    model: nn.Module, width: float = 1.0, depth: float = 1.0, *, example_input: Any = None,
    blocks: Literal["first", "spread"] = "first",
) -> nn.Module:
    """A narrower (``width``) and shallower (``depth``) copy of ``model`` that keeps its most important parts.

    Args:
        model: the trained model (not modified).
        width: fraction of the channels of each hidden layer to keep, in (0, 1].
        depth: fraction of the repeated blocks of each stack to keep, in (0, 1].
        example_input: one input batch; required when ``depth < 1`` (to check that dropped blocks preserve
            shapes) and, when given, used to check that the student runs and gives outputs of the original shapes.
        blocks: which repeated blocks ``depth < 1`` keeps: ``"first"`` or ``"spread"`` (first to last, evenly).

    Raises:
        ValueError: ``width``/``depth`` outside (0, 1], an unknown ``blocks``, ``depth < 1`` without
            ``example_input``, a model that cannot be traced, or a student that no longer runs on ``example_input``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> small = scale(net, width=0.5)  # the 8 hidden units that matter most
        >>> small[0].out_features, small[2].in_features, small[2].out_features
        (8, 8, 2)
    """
    _check_fraction("width", width)
    _check_fraction("depth", depth)
    if blocks not in BLOCK_CHOICES:
        raise ValueError(f"`blocks` must be one of {list(BLOCK_CHOICES)}, got {blocks!r}")
    if depth < 1.0 and example_input is None:
        example_input = getattr(model, "example_input_array", None)
        if example_input is None:
            raise ValueError(
                f"`example_input` is required when `depth` < 1 (got depth={depth}): dropped blocks must "
                "be checked to keep the shapes"
            )
    student = copy_model(model)
    if depth < 1.0:
        _drop_blocks(student, depth, example_input, blocks)
    if width < 1.0:
        cg = analyze(student)
        scores = channel_importance(student, cg)
        keep = {}
        for g in cg.free_groups():
            k = channels_at(width, cg.sizes[g])
            keep[g] = torch.sort(torch.topk(scores[g], k).indices).values
        slice_modules(student, index_plan(cg, keep))
    if example_input is not None:
        reference = run_eval(model, example_input)
        try:
            result = run_eval(student, example_input)
        except Exception as err:  # the student no longer runs: say which scaling broke it
            raise ValueError(
                f"the scaled {type(model).__name__} (width={width}, depth={depth}) fails on "
                f"example_input ({type(err).__name__}: {err})"
            ) from None
        if [t.shape for t in tensors(reference)] != [t.shape for t in tensors(result)]:
            raise ValueError(
                f"the scaled {type(model).__name__} gives outputs of other shapes on example_input"
            )
    return student


def channel_importance(model: nn.Module, cg: ChannelGraph | None = None) -> dict[int, torch.Tensor]:
    """Per channel group, a score per channel: relative L1 norms of the producers' rows times relative |BN scale|.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.1, 0.0], [2.0, 0.0]]))
        >>> channel_importance(net)[0].argsort().tolist()
        [1, 0, 2]
    """
    cg = cg or analyze(model)
    modules = dict(model.named_modules())
    scores: dict[int, torch.Tensor] = {}
    for root, names in cg.groups().items():
        total = torch.zeros(cg.sizes[root])
        for name in names:
            rows = unit_scores(modules[name].weight, norm=1).cpu()
            total += rows / rows.mean().clamp_min(1e-12)
        scores[root] = total
    for name, segments in cg.followers.items():
        gamma = modules[name].weight
        if gamma is None:
            continue
        gamma = gamma.detach().float().abs().cpu()
        gamma = gamma / gamma.mean().clamp_min(1e-12)
        offset = 0
        for g, size in segments:
            scores[cg.root(g)] = scores[cg.root(g)] * gamma[offset : offset + size]
            offset += size
    return scores


def _signature(module: nn.Module) -> tuple[Any, ...]:
    return (type(module), tuple((n, tuple(p.shape)) for n, p in module.state_dict().items()))


def repeated_blocks(container: nn.Module) -> list[tuple[int, int, int]]:
    """Runs of repeated blocks among a container's children: ``(first child, block length, repeats)``.

    Example:
        >>> from torch import nn
        >>> seq = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        >>> repeated_blocks(seq)
        [(1, 2, 2)]
    """
    children = _entries(container)
    if any(c is None for c in children):
        return []
    sigs = [_signature(c) for c in children]
    n, i, runs = len(children), 0, []
    while i < n:
        best: tuple[int, int] | None = None
        for p in range(1, 5):
            if not any(sum(x.numel() for x in c.parameters()) for c in children[i : i + p]):
                continue
            r = 1
            while i + (r + 1) * p <= n and sigs[i + r * p : i + (r + 1) * p] == sigs[i : i + p]:
                r += 1
            if r >= 2 and (best is None or r * p > best[0] * best[1]):
                best = (p, r)
        if best is None:
            i += 1
        else:
            runs.append((i, *best))
            i += best[0] * best[1]
    return runs


def _entries(container: nn.Module) -> list[Any]:
    """The container's entries by position (one module reused at several positions appears at each of them)."""
    return list(container._modules.values())


def kept_blocks(keep: int, repeats: int, blocks: Literal["first", "spread"] = "first") -> list[int]:
    """The indices of the ``keep`` blocks of ``repeats`` that :func:`scale` keeps (see the module docstring).

    Example:
        >>> kept_blocks(3, 6), kept_blocks(3, 6, "spread"), kept_blocks(1, 4, "spread")
        ([0, 1, 2], [0, 3, 5], [0])
    """
    if blocks == "first" or keep == 1:
        return list(range(keep))
    return [math.floor(i * (repeats - 1) / (keep - 1) + 0.5) for i in range(keep)]


def _drop_blocks(model: nn.Module, depth: float, example_input: Any, blocks: Literal["first", "spread"]) -> None:
    containers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Sequential, nn.ModuleList)]
    shapes: dict[int, list[tuple[Any, Any]]] = {}
    inputs: dict[int, list[Any]] = {}  # Sequential -> the inputs of its calls
    handles = []
    for _, container in containers:
        # a Sequential's forward runs its entries in order: its call is replayed position by position below
        if type(container) is nn.Sequential:

            def seq_pre(module: nn.Module, args: Any) -> None:
                inputs.setdefault(id(module), []).append(args[0] if args else None)

            handles.append(container.register_forward_pre_hook(seq_pre))
            continue
        for child in container.children():

            def pre(module: nn.Module, args: Any) -> None:
                shapes.setdefault(id(module), []).append((_shape(args[0] if args else None), None))

            def post(module: nn.Module, args: Any, output: Any) -> None:
                calls = shapes[id(module)]
                calls[-1] = (calls[-1][0], _shape(output))

            handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    try:
        run_eval(model, example_input)
    finally:
        for h in handles:
            h.remove()
    for _, container in containers:
        children = _entries(container)
        at = _sequential_shapes(model, container, inputs) if type(container) is nn.Sequential else None
        drop: list[int] = []
        for start, length, repeats in repeated_blocks(container):
            kept = set(kept_blocks(max(1, math.ceil(depth * repeats - 1e-9)), repeats, blocks))
            for b in (b for b in range(repeats) if b not in kept):
                i, j = start + b * length, start + (b + 1) * length - 1
                if at is not None:  # shapes at these positions of the Sequential's one call
                    ok = at[i][0] is not None and at[i][0] == at[j][1]
                else:  # ModuleList: from the modules' own calls, when each was called once
                    ins, outs = shapes.get(id(children[i]), []), shapes.get(id(children[j]), [])
                    ok = (
                        len(ins) == 1 and len(outs) == 1 and ins[0][0] is not None and ins[0][0] == outs[0][1]
                    )
                if ok:
                    drop += range(start + b * length, start + (b + 1) * length)
        for index in sorted(drop, reverse=True):
            del container[index]


@torch.no_grad()
def _sequential_shapes(
    model: nn.Module, container: nn.Module, inputs: dict[int, list[Any]]
) -> list[tuple[Any, Any]] | None:
    """(input shape, output shape) at each position of a Sequential called once, by replaying its entries in eval
    mode; ``None`` if it was not called exactly once with a tensor (then nothing in it is dropped)."""
    calls = inputs.get(id(container), [])
    if len(calls) != 1 or not isinstance(calls[0], torch.Tensor):
        return None
    was_training = model.training
    model.eval()
    try:
        h, out = calls[0], []
        for entry in _entries(container):
            before = _shape(h)
            h = entry(h)
            out.append((before, _shape(h)))
            if not isinstance(h, torch.Tensor):
                break
        return out if len(out) == len(container) else None
    finally:
        model.train(was_training)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None
