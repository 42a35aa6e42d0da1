"""Which channels of which layers belong together, found by tracing the model with ``torch.fx``.

Structured methods (thinning pruned units, slimmable widths, width scaling) remove or switch off whole
output units of a layer. Every other tensor that carries those channels must change with it: the
``BatchNorm`` that normalizes them, the next layer's matching inputs (also across a ``flatten``), the other
branch of a residual ``add``, the slice of a ``cat``. :func:`analyze` traces ``model.forward`` once and
returns a :class:`ChannelGraph`:

- a **group** is one channel space: the outputs of a ``Linear``/``Conv`` (the *producer*). A residual add
  unites the groups of its two sides, so their channels can only be kept or dropped together;
- a **follower** (``BatchNorm``) and a **consumer** (the next ``Linear``/``Conv``) see a concatenation of
  groups (*segments*); a consumer behind a ``flatten`` sees each channel ``spatial`` times in a row;
- a group is **pinned** (never changed) when it is the model's output, or when it reaches an operation this
  module does not know how to slice (the reason names it). Pinning is always safe: that tensor keeps all
  its channels.

What is understood: ``Linear``, ``Conv1d/2d/3d`` (``groups=1``), ``BatchNorm1d/2d/3d``, element-wise
activations and dropout, pooling, ``flatten`` (module, function, method, or ``view``/``reshape(n, -1)``),
``add`` of two tensors (residual), ``cat`` along the channel dimension, and arithmetic with plain numbers.
Anything else pins what flows into it. A module called more than once in one forward is refused.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> g = analyze(net)
    >>> g.free_groups(), g.group_of("0"), g.consumers["2"].segments
    ([0], 0, ((0, 8),))

Which channel indices each module keeps, and slicing them out of the modules, is in
:mod:`lightning_compress.slicing`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelGraph",
    "Consumer",
    "Segments",
    "analyze",
    "channels_at",
    "output_layers",
]

Segments = tuple[tuple[int, int], ...]  # ((group, number of channels), ...) in channel order

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_PASS_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "type_as"}
_SCALAR_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class _Info:
    """What the channel dimension of a traced tensor holds."""

    segments: Segments
    conv: bool  # channels on dim 1 of an (N, C, *spatial) tensor; else on the last dim of a Linear output
    flat: bool = False  # flattened: each channel appears `spatial` times in a row (spatial size known at use)


@dataclass
class Consumer:
    """A ``Linear``/``Conv`` whose inputs carry the channels of ``segments`` (``spatial`` entries each)."""

    segments: Segments
    spatial: int = 1


@dataclass
class ChannelGraph:
    """The channel dependencies of one model; see the module docstring."""

    model: nn.Module
    sizes: list[int] = field(default_factory=list)  # group -> number of channels
    parent: list[int] = field(default_factory=list)  # union-find over groups
    producers: dict[str, int] = field(default_factory=dict)  # module name -> group of its outputs
    followers: dict[str, Segments] = field(default_factory=dict)  # BatchNorm name -> segments it normalizes
    consumers: dict[str, Consumer] = field(default_factory=dict)  # module name -> its input channels
    pins: dict[int, str] = field(default_factory=dict)  # group -> why it may not change (first reason)

    def root(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def group_of(self, producer: str) -> int:
        """The (united) group of a producer's output channels."""
        return self.root(self.producers[producer])

    def groups(self) -> dict[int, list[str]]:
        """Each united group with the names of its producers, in model order."""
        out: dict[int, list[str]] = {}
        for name, g in self.producers.items():
            out.setdefault(self.root(g), []).append(name)
        return out

    def pin_reason(self, group: int) -> str | None:
        root = self.root(group)
        return next((why for g, why in self.pins.items() if self.root(g) == root), None)

    def free_groups(self) -> list[int]:
        """Groups whose channels may be removed or slimmed."""
        return [g for g in self.groups() if self.pin_reason(g) is None]

    def _new_group(self, size: int) -> int:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _pin(self, info: _Info | None, reason: str) -> None:
        if info is not None:
            for g, _ in info.segments:
                self.pins.setdefault(g, reason)


def channels_at(width: float, channels: int) -> int:
    """Channels kept of ``channels`` at ``width`` (a fraction): ``round(width * channels)``, at least 1.

    Example:
        >>> channels_at(0.25, 32), channels_at(0.5, 3), channels_at(0.01, 10)
        (8, 2, 1)
    """
    return max(1, min(channels, int(math.floor(width * channels + 0.5))))


def analyze(model: nn.Module) -> ChannelGraph:
    """Trace ``model.forward`` with ``torch.fx`` and find its channel groups (see the module docstring).

    Raises:
        ValueError: the forward cannot be traced symbolically (data-dependent control flow, ...), or a
            ``Linear``/``Conv``/``BatchNorm`` module is called more than once.
    """
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... depending on what it met
        raise ValueError(
            f"cannot trace {type(model).__name__}.forward with torch.fx ({type(err).__name__}: {err}); "
            "structured export needs a forward without data-dependent control flow"
        ) from None
    modules = dict(model.named_modules())
    cg = ChannelGraph(model)
    infos: dict[torch.fx.Node, _Info | None] = {}
    seen: set[str] = set()

    def info(arg: Any) -> _Info | None:
        return infos.get(arg) if isinstance(arg, torch.fx.Node) else None

    def pin_inputs(node: torch.fx.Node, reason: str) -> None:
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: cg._pin(infos.get(n), reason))

    for node in graph.nodes:
        out: _Info | None = None
        what = f"{node.op} {getattr(node.target, '__name__', node.target)!s} (node {node.name!r})"
        if node.op == "call_module":
            name, module = str(node.target), modules[str(node.target)]
            x = info(node.args[0]) if node.args else None
            if isinstance(module, (*_PRODUCERS, *_NORMS)):
                if name in seen:
                    raise ValueError(
                        f"layer {name!r} is called more than once in forward; structured export "
                        "cannot give its uses different channels"
                    )
                seen.add(name)
            if isinstance(module, _PRODUCERS) and getattr(module, "groups", 1) == 1:
                out = _producer(cg, name, module, x, what)
            elif isinstance(module, _NORMS) and x is not None:
                if x.flat or sum(s for _, s in x.segments) != module.num_features:
                    cg._pin(x, f"reaches {what}, whose features do not line up with its channels")
                else:
                    cg.followers[name] = x.segments
                    out = x
            elif isinstance(module, _PASS_MODULES) and not isinstance(module, nn.PReLU):
                out = x
            elif isinstance(module, nn.PReLU) and module.num_parameters == 1:
                out = x
            elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
                out = _flatten(x)
            else:
                pin_inputs(node, f"reaches {what} ({type(module).__name__}), which cannot be sliced")
        elif node.op == "call_function":
            out = _function(cg, node, info, pin_inputs, what)
        elif node.op == "call_method":
            out = _method(node, info, pin_inputs, what)
        elif node.op == "output":
            pin_inputs(node, "is a model output")
        infos[node] = out
    return cg


def output_layers(model: nn.Module) -> list[str]:
    """The ``Linear``/``Conv`` layers whose outputs are the model's outputs (no other such layer in between).

    Found by tracing ``model.forward`` with ``torch.fx`` and walking back from its output through everything
    that is not a ``Linear``/``Conv`` (activations, softmax, dict/tuple packing, residual adds). A forward that
    cannot be traced falls back to the last such layer in registration order.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head, self.body = nn.Linear(8, 3), nn.Linear(4, 8)
        ...     def forward(self, x):
        ...         return torch.log_softmax(self.head(torch.relu(self.body(x))), dim=-1)
        >>> output_layers(Net())
        ['head']
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:  # fx raises TraceError, TypeError, ... depending on what it met
        return [name for name, m in modules.items() if isinstance(m, _PRODUCERS)][-1:]
    found, seen, stack = set(), set(), [node for node in graph.nodes if node.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), _PRODUCERS):
            found.add(str(node.target))
        else:
            stack.extend(node.all_input_nodes)
    return [name for name in modules if name in found]


def _producer(cg: ChannelGraph, name: str, module: nn.Module, x: _Info | None, what: str) -> _Info:
    if x is not None:
        total = sum(s for _, s in x.segments)
        expected = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        # a flattened (N, C, *spatial) tensor holds each channel `spatial` times in a row; a flattened Linear
        # output (N, *, C) interleaves them (t * C + c), which the plan cannot express unless there is one position
        if (
            isinstance(module, nn.Linear)
            and x.flat
            and total
            and expected % total == 0
            and (x.conv or expected == total)
        ):
            cg.consumers[name] = Consumer(x.segments, expected // total)
        elif not x.flat and total == expected and x.conv == (not isinstance(module, nn.Linear)):
            cg.consumers[name] = Consumer(x.segments)
        else:
            cg._pin(x, f"reaches {what}, whose inputs do not line up with its channels")
    size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    group = cg._new_group(size)
    cg.producers[name] = group
    return _Info(((group, size),), conv=not isinstance(module, nn.Linear))


def _flatten(x: _Info | None) -> _Info | None:
    return None if x is None else _Info(x.segments, x.conv, flat=True)


def _function(cg: ChannelGraph, node: torch.fx.Node, info: Any, pin_inputs: Any, what: str) -> _Info | None:
    target, args = node.target, node.args
    if target in _PASS_FUNCTIONS and args:
        others = [a for a in list(args[1:]) + list(node.kwargs.values()) if info(a) is not None]
        if not others:
            return info(args[0])
    if target is torch.flatten and args and (args[1:2] == (1,) or node.kwargs.get("start_dim") == 1):
        if len(args) < 3 and node.kwargs.get("end_dim", -1) == -1:
            return _flatten(info(args[0]))
    if target in _SCALAR_FUNCTIONS and len(args) == 2 and not node.kwargs:
        a, b = args
        tensors = [v for v in (a, b) if isinstance(v, torch.fx.Node)]
        if len(tensors) == 1 and isinstance(a if a not in tensors else b, (int, float)):
            return info(tensors[0])
        if target in _ADD_FUNCTIONS and len(tensors) == 2:
            ia, ib = info(a), info(b)
            if ia is None and ib is None:
                return None
            if (
                ia is not None
                and ib is not None
                and ia.flat == ib.flat
                and ia.conv == ib.conv
                and [s for _, s in ia.segments] == [s for _, s in ib.segments]
            ):
                for (ga, _), (gb, _) in zip(ia.segments, ib.segments, strict=True):
                    cg._union(ga, gb)
                return ia
    if target in (torch.cat, torch.concat) and args and isinstance(args[0], (list, tuple)):
        parts = [info(a) for a in args[0]]
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        if parts and all(p is not None and not p.flat and p.conv == parts[0].conv for p in parts):
            if dim == (1 if parts[0].conv else -1):
                return _Info(tuple(s for p in parts for s in p.segments), parts[0].conv)
    if target is getattr:
        return None
    pin_inputs(node, f"reaches {what}, which cannot be sliced")
    return None


def _method(node: torch.fx.Node, info: Any, pin_inputs: Any, what: str) -> _Info | None:
    target, args = node.target, node.args
    x = info(args[0]) if args else None
    if target in ("size", "dim"):
        return None
    if target in _PASS_METHODS:
        return x
    if target == "flatten" and (args[1:] == (1,) or node.kwargs == {"start_dim": 1}):
        return _flatten(x)
    if target in ("view", "reshape") and len(args) == 3 and args[2] == -1 and not isinstance(args[1], int):
        return _flatten(x)  # x.view(x.size(0), -1)
    pin_inputs(node, f"reaches {what}, which cannot be sliced")
    return None
