"""What a pruning criterion needs from training, gathered for :class:`~lightning_compress.GradualPruning`.

- ``activation`` (Wanda, Sun et al. 2023): the squared L2 norm of every input channel of each pruned layer,
  summed by forward pre-hooks over the training batches the model sees anyway (forwards with gradients on: no
  extra data pass; validation and ``no_grad`` forwards are not counted; the module's train/eval mode does not
  matter, since Lightning trains a model passed in eval mode in eval mode), from the previous mask update (or the
  start of training) to the next. Each rank sums its own batches; the sums are added across DDP ranks through
  ``trainer.strategy.reduce`` when the masks are computed (and when a checkpoint is written), so every rank
  computes the same masks.
- ``movement`` (Sanh et al. 2020): ``-w * dL/dw`` added up at every optimizer step (before the step, on the
  gradients DDP already averaged) from the start of training; pruned entries add nothing.
- ``magnitude``: nothing.

With ``token_mask`` (the key of a mapping batch holding a (batch, tokens) mask, e.g. ``"attention_mask"``) the
input statistics (and the Gram matrices of ``reconstruct``/``whiten``) count the tokens it marks only, not padding:
a padded position's hidden state feeds no output the model is trained on (pooling and the loss leave it out), and
on the pretrained MiniLM it is 38 % of the rows (one-shot 50 %: 0.9207 fidelity with padding, 0.9387 without).

Gathering stops after the schedule's last mask update (the hooks are removed, the sums dropped), so a model
fine-tuning at its final sparsity pays nothing for it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(2, 1)
    >>> stats = CriterionStats("activation")
    >>> stats.attach({"weight": [lin]})
    >>> _ = lin(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    >>> stats.statistic("weight", None)
    tensor([5., 1.])
    >>> stats.remove()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_compress import _sharding
from lightning_compress._validation import check_choice, check_number
from lightning_compress.functional import pruning as masks
from lightning_compress.graph import output_layers
from lightning_compress.targets import match, validate_patterns

__all__: list[str] = []  # private to GradualPruning

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class CriterionStats:
    """Statistics of one pruning criterion per weight (fully-qualified name), with their hooks.

    Args:
        criterion: ``magnitude``, ``activation`` or ``movement``.
        token_mask: the batch key of the token mask that selects the inputs gathered (``None``: every input row).
        cumulative: activation sums add up over every update (``statistics="cumulative"``) instead of starting over.
    """

    def __init__(self, criterion: str, token_mask: str | None = None, cumulative: bool = False) -> None:
        self.criterion, self.token_mask, self.cumulative = criterion, token_mask, cumulative
        self._tokens: torch.Tensor | None = None  # this training batch's token mask
        self.label, self.instead = f"criterion={criterion!r}", "criterion='magnitude'"  # for the error below
        self.sums: dict[str, torch.Tensor] = {}  # this rank's input sums of squares / movement scores
        self.restored: dict[str, torch.Tensor] = {}  # activation sums from a checkpoint (already reduced)
        self._waiting_since: int | None = None  # first step a mask update waited for statistics
        self._handles: list[Any] = []

    @property
    def signed(self) -> bool:
        """Whether the scores can be negative (movement)."""
        return self.criterion == "movement"

    def ready(self, step: int) -> bool:
        """Whether masks can be computed at ``step``: magnitude always, the others once a training batch was seen.

        Raises:
            RuntimeError: a later step is still without statistics: the pruned layers saw no training input with
                gradients on (or no gradient), so the criterion cannot rank them; it never trains on unpruned.
        """
        if self.criterion == "magnitude" or self.sums or self.restored:
            self._waiting_since = None
            return True
        since = self._waiting_since
        if since is not None and step > since:
            what = "inputs (forward pre-hooks)" if self.criterion == "activation" else "gradients"
            raise RuntimeError(
                f"GradualPruning({self.label}) has gathered no {what} of the pruned layers from "
                f"step {since} to step {step}: they are not run in `training_step` with gradients enabled. Use "
                f"{self.instead} or make the targeted layers part of the training forward."
            )
        self._waiting_since = step if since is None else since
        return False

    def attach(self, layers: dict[str, list[nn.Module]]) -> None:
        """Hook every layer's input (``activation``); ``layers`` maps a weight to the modules using it."""
        self.remove()
        if self.criterion != "activation":
            return
        for fqn, modules in layers.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._hook(fqn, isinstance(module, _CONV))))

    def _hook(self, fqn: str, conv: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not torch.is_grad_enabled():
                return
            x = args[0].detach()
            if conv:  # channels at dim 1 ((N, C, ...)), or dim 0 for an unbatched input
                x = x.movedim(1 if x.dim() == module.weight.dim() else 0, -1)
            squares = torch.linalg.vector_norm(self.rows(x, fqn).float(), dim=0).square()
            total = self.sums.get(fqn)
            self.sums[fqn] = squares if total is None else total.add_(squares)

        return hook

    def see_batch(self, batch: Any) -> None:
        """Keep ``batch[token_mask]`` (a training batch's) for the hooks; nothing without a ``token_mask``.

        Raises:
            ValueError: the batch is not a mapping with that key.
        """
        if self.token_mask is None:
            return
        if not isinstance(batch, Mapping) or self.token_mask not in batch:
            has = f"keys {list(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}, not a mapping"
            raise ValueError(f"`token_mask`={self.token_mask!r} names no entry of the training batch ({has})")
        self._tokens = batch[self.token_mask]

    def rows(self, x: torch.Tensor, fqn: str) -> torch.Tensor:
        """A layer's input ``(..., features)`` as rows ``(n, features)``: those of the tokens the token mask marks.

        Raises:
            RuntimeError: with a token mask, an input that is not ``(batch, tokens, features)`` of its shape.
        """
        if self._tokens is None:
            return x.reshape(-1, x.shape[-1])
        if tuple(x.shape[:-1]) != tuple(self._tokens.shape):
            raise RuntimeError(f"`token_mask`={self.token_mask!r}: the input of {fqn!r} is {tuple(x.shape)}, not "
                               f"(batch, tokens, features) for the mask's {tuple(self._tokens.shape)}")
        return x[self._tokens.to(x.device) != 0]

    @torch.no_grad()
    def accumulate(self, weights: dict[str, nn.Parameter]) -> None:
        """Add ``-w * grad`` to the movement scores (call before the optimizer step)."""
        if self.criterion != "movement":
            return
        for fqn, param in weights.items():
            if param.grad is None:
                continue
            weight, grad = _sharding.local(param), _sharding.local(param.grad)  # sharded: this rank's rows
            score = self.sums.get(fqn)
            if score is None or score.device != weight.device:
                score = torch.zeros_like(weight, dtype=torch.float32) if score is None else score.to(weight.device)
                self.sums[fqn] = score
            score.addcmul_(weight.detach().float(), grad.float(), value=-1.0)

    def _reduced(self, strategy: Any) -> dict[str, torch.Tensor]:
        sums = {fqn: s if strategy is None else strategy.reduce(s.clone(), reduce_op="sum") for fqn, s in self.sums.items()}
        for fqn, restored in self.restored.items():
            sums[fqn] = sums[fqn] + restored.to(sums[fqn].device) if fqn in sums else restored.clone()
        return sums

    def statistic(self, fqn: str, strategy: Any) -> torch.Tensor | None:
        """Input norms (``activation``, summed over ranks) or movement scores of ``fqn``; ``None`` for magnitude."""
        if self.criterion == "movement":
            return self.sums.get(fqn)
        if self.criterion == "activation":
            total = self._reduced(strategy).get(fqn)
            return None if total is None else total.sqrt()
        return None

    def all_statistics(self, fqns: list[str], strategy: Any) -> dict[str, torch.Tensor]:
        """:meth:`statistic` for several weights, with one reduction across ranks."""
        if self.criterion == "activation":
            return {fqn: s.sqrt() for fqn, s in self._reduced(strategy).items() if fqn in fqns}
        return {fqn: s for fqn, s in self.sums.items() if fqn in fqns} if self.criterion == "movement" else {}

    def updated(self, last: bool) -> None:
        """Masks were just computed: activation sums start over unless ``cumulative`` (movement scores always keep
        adding up); after the ``last`` update of the schedule nothing more is gathered."""
        if (self.criterion == "activation" and not self.cumulative) or last:
            self.sums, self.restored = {}, {}
        if last:
            self.remove()

    def remove(self) -> None:
        """Remove the hooks (the sums stay: they are checkpointed state)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Remove the hooks and drop every sum."""
        self.remove()
        self.sums, self.restored = {}, {}

    def state_dict(self, strategy: Any, weights: dict[str, nn.Parameter] | None = None) -> dict[str, torch.Tensor]:
        """Sums to checkpoint: activation sums added across ranks, movement scores of sharded ``weights`` gathered
        whole (every rank must call it, as Lightning does)."""
        sums = self._reduced(strategy) if self.criterion == "activation" else self.full(weights or {})
        return {fqn: s.detach().cpu().clone() for fqn, s in sums.items()}

    def full(self, weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Movement scores of the whole weights (a collective for sharded ones); pieces of weights not given, as
        they are."""
        if self.criterion != "movement":
            return dict(self.sums)
        return {f: _sharding.full(s, weights[f]) if f in weights else s for f, s in self.sums.items()}

    def localize(self, weights: dict[str, nn.Parameter]) -> None:
        """Cut full movement scores (restored, or gathered at the end of a fit) to this rank's pieces."""
        if self.criterion == "movement":
            self.sums = {f: _sharding.local_like(s, weights[f]) if f in weights and s.shape == weights[f].shape
                         else s for f, s in self.sums.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s sums."""
        self.sums, self.restored = {}, {}
        if self.criterion == "activation":
            self.restored = {fqn: s.float() for fqn, s in state.items()}
        else:
            self.sums = {fqn: s.float() for fqn, s in state.items()}


def check_token_mask(token_mask: Any, uses_inputs: bool, needs: str) -> None:
    """Raise unless ``token_mask`` is ``None`` or a batch key, and only given where inputs are gathered."""
    if token_mask is not None and (not isinstance(token_mask, str) or not token_mask):
        raise ValueError(f"`token_mask` must be None or the key of the batch's token mask, got {token_mask!r}")
    if token_mask is not None and not uses_inputs:
        raise ValueError(f"`token_mask`={token_mask!r} selects the inputs gathered for {needs}; nothing is gathered "
                         f"here: set it with those, or leave it None")


def check_statistics(statistics: Any, criterion: str, reconstruct: Any) -> None:
    """Raise unless ``statistics`` is a choice and something is gathered for it to apply to."""
    check_choice(statistics, "statistics", ("since_update", "cumulative"))
    if statistics == "cumulative" and criterion != "activation" and not reconstruct:
        raise ValueError(f"`statistics`='cumulative' keeps adding up the input statistics of criterion='activation' "
                         f"and reconstruct; with criterion={criterion!r} and reconstruct=False nothing is gathered "
                         f"(movement scores add up over the run anyway): leave statistics='since_update'")


def check_restored_masks(restored: dict[str, torch.Tensor], weights: dict[str, nn.Parameter]) -> None:
    """Raise unless the masks from a checkpoint are for exactly these weights, shape for shape."""
    if set(restored) != set(weights):
        raise ValueError(
            f"GradualPruning: the checkpoint's masks are for {sorted(restored)}, but this run prunes "
            f"{sorted(weights)}; resume with the same `targets`/`exclude`"
        )
    for fqn, mask in restored.items():
        if mask.shape != weights[fqn].shape:
            raise ValueError(f"GradualPruning: mask for {fqn!r} has shape {tuple(mask.shape)}, weight has "
                             f"{tuple(weights[fqn].shape)}")


def check_arguments(final_sparsity: Any, initial_sparsity: Any, update_every: Any, mode: Any, norm: Any, scope: Any,
                    targets: Any, exclude: Any, layer_sparsity: Any, reconstruct: Any) -> None:
    """Raise ``ValueError``/``TypeError`` for a bad ``GradualPruning`` argument (the schedule's are checked apart)."""
    check_number(final_sparsity, "final_sparsity", low=0, high=1, high_open=True)
    check_number(initial_sparsity, "initial_sparsity", low=0, high=1, high_open=True)
    if initial_sparsity > final_sparsity:
        raise ValueError(f"`initial_sparsity` must be <= `final_sparsity`, got {initial_sparsity} > {final_sparsity}")
    check_number(update_every, "update_every", low=1, integer=True)
    check_choice(mode, "mode", ("unstructured", "structured"))
    check_choice(norm, "norm", (1, 2))
    check_scope(scope, mode)
    validate_patterns(targets, "targets")
    validate_patterns(exclude, "exclude")
    check_layer_sparsity(layer_sparsity)
    if not (isinstance(reconstruct, bool) or reconstruct == "adaptive"):
        raise ValueError(f"`reconstruct` must be True, False or 'adaptive', got {reconstruct!r}")
    if reconstruct and mode == "structured":
        raise ValueError("`reconstruct`=True updates the kept entries of partly pruned rows; `mode='structured'` "
                         "prunes whole output units, which leaves it nothing to update: use mode='unstructured'")


def matched_overrides(layer_sparsity: dict[str, float] | None, modules: dict[str, Any]) -> dict[str, float]:
    """``layer_sparsity`` as a dict; raise if one of its patterns matches none of the pruned ``modules``."""
    overrides = dict(layer_sparsity or {})
    unmatched = [p for p in overrides if not any(match(p, m) for m in modules)]
    if unmatched:
        raise ValueError(f"`layer_sparsity`: pattern(s) {unmatched} match no pruned layer; pruned layers: {list(modules)}")
    return overrides


def check_scope(scope: Any, mode: str) -> None:
    """Raise unless ``scope`` is ``global``, ``layer`` or ``row`` (``row`` in ``unstructured`` mode only)."""
    check_choice(scope, "scope", ("global", "layer", "row"))
    if scope == "row" and mode == "structured":
        raise ValueError("`scope='row'` ranks the entries of each output unit among themselves, but `mode='structured'` "
                         "prunes whole units: use scope 'global' or 'layer' with it")


def check_layer_sparsity(layer_sparsity: Any) -> None:
    """Raise unless ``layer_sparsity`` is ``None`` or maps valid layer patterns to sparsities in [0, 1)."""
    if layer_sparsity is None:
        return
    if not isinstance(layer_sparsity, dict):
        raise TypeError(f"`layer_sparsity` must map layer patterns to sparsities, got {layer_sparsity!r}")
    validate_patterns(list(layer_sparsity), "layer_sparsity")
    for key, value in layer_sparsity.items():
        check_number(value, f"layer_sparsity[{key!r}]", low=0, high=1, high_open=True)


def check_pattern(
    pattern: str | None, mode: str, layer_sparsity: Any, layer: str | None = None, weight: torch.Tensor | None = None
) -> tuple[int, int] | None:
    """``(N, M)`` of ``pattern`` (``None`` without one), refusing what it cannot combine with, or a ``layer``
    whose input size does not divide by M."""
    if pattern is None:
        return None
    n, m = masks.parse_pattern(pattern)
    if mode == "structured" or layer_sparsity:
        raise ValueError(f"`pattern`={pattern!r} prunes within rows: it takes neither `mode='structured'` nor "
                         "`layer_sparsity`")
    if weight is not None and weight.shape[1] % m:
        raise ValueError(f"`pattern`={pattern!r}: {layer!r} has {weight.shape[1]} inputs, not a multiple of {m}; "
                         "leave it out with `exclude`")
    return n, m


def layer_numel(model: nn.Module) -> int:
    """Entries of all layer weights (tensors with >= 2 dims, tied ones once), as the monitor counts them."""
    weights = {id(w): w for m in model.modules() if isinstance(w := getattr(m, "weight", None), torch.Tensor)}
    return sum(w.numel() for w in weights.values() if w.dim() >= 2)


def without_output_layers(
    model: nn.Module, modules: dict[str, nn.Module], targets: list[str] | None
) -> dict[str, nn.Module]:
    """Structured mode leaves out the layers whose output units are the model's outputs (classes, ...).

    Raises:
        ValueError: ``targets`` names such a layer explicitly.
    """
    outputs = [name for name in output_layers(model) if name in modules]
    if outputs and targets is not None:
        raise ValueError(
            f"GradualPruning: `targets` {targets} select {outputs}, whose output units are the output of "
            "the model: structured pruning would remove them (whole classes); leave them out of `targets` or add them "
            "to `exclude`"
        )
    if outputs:
        rank_zero_info(f"GradualPruning: structured mode leaves the model's output layer(s) {outputs} whole")
    return {name: module for name, module in modules.items() if name not in outputs}


def check_keeps_a_unit(argument: str, sparsity: float, layer: str, units: int) -> None:
    """Raise ``ValueError`` when structured ``sparsity`` would prune every output unit of ``layer``."""
    if masks.num_to_prune(sparsity, units) >= units:
        raise ValueError(
            f"`{argument}`={sparsity} in structured mode would prune all {units} output units of {layer!r} "
            f"(round({sparsity} * {units}) = {units}), cutting the network there; at most {(units - 1) / units:g} "
            "keeps one: lower it, leave the layer out with `exclude`, or give it its own `layer_sparsity`"
        )

