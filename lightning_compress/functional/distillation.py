"""Knowledge distillation math, output selectors, feature hooks and teacher loading: no Trainer needed.

:class:`~lightning_compress.callbacks.distillation.KnowledgeDistillation` schedules these and holds the
state; everything here is a plain function of tensors and modules.

- :func:`kd_loss`: Hinton et al. (2015) soft-target loss, ``T^2 * KL(softmax(t/T) || softmax(s/T))``.
- :func:`distill_loss`: that loss (``"kl"``), or ``"mse"`` / ``"cosine"`` for embedding and regression outputs.
- :func:`feature_loss`: mean squared error between (projected) student and teacher features (FitNets hints).
- :func:`select_output`: pick the logits out of a tensor, dict, tuple or HF-style output object.
- :func:`layer_width`: the feature width of a layer and the dimension it lives in, for projections.
- :class:`FeatureRecorder`: forward hooks that keep the first output of named layers while active.
- :func:`build_module`, :func:`load_teacher_weights`: a teacher from ``class_path``/``init_args`` and a
  Lightning checkpoint or a plain ``state_dict`` file.

Example:
    >>> import torch
    >>> s, t = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    >>> float(kd_loss(s, t, temperature=2.0))
    0.0
    >>> float(kd_loss(s, -t, temperature=1.0)) > 0
    True
    >>> select_output({"logits": s, "hidden": t}, "logits") is s
    True
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureRecorder",
    "agreement_counts",
    "build_module",
    "distill_loss",
    "feature_loss",
    "kd_loss",
    "layer_width",
    "load_teacher_weights",
    "project_features",
    "select_output",
]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target loss of Hinton et al. (2015): ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    Classes are along the last dimension; every other dimension is a sample (``(N, C)``, or ``(N, L, C)`` for
    sequences), and the KL divergence is averaged over samples. The ``T^2`` factor keeps the gradient scale
    independent of the temperature. Computed in float32 at least (half-precision inputs are upcast).

    Args:
        student_logits: student's logits (with gradient).
        teacher_logits: teacher's logits, same shape.
        temperature: softening temperature ``T > 0``.

    Raises:
        ValueError: the shapes differ or ``temperature <= 0``.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(float(kd_loss(s, s.flip(-1), temperature=1.0)), 4)
        0.4621
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher outputs have different shapes: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; select matching outputs with `student_output`/`teacher_output`"
        )
    c = student_logits.shape[-1]
    dtype = _at_least_float32(student_logits)
    s = student_logits.to(dtype).reshape(-1, c) / temperature
    t = teacher_logits.detach().to(dtype).reshape(-1, c) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl", temperature: float = 1.0
) -> torch.Tensor:
    """The output-matching loss of distillation, by ``kind``:

    - ``"kl"``: :func:`kd_loss` (soft targets of logits, ``T^2``-scaled KL divergence);
    - ``"mse"``: mean squared error between the outputs (regression, embeddings); ``temperature`` is not used;
    - ``"cosine"``: ``1 - cos(student, teacher)`` along the last dimension, averaged over every other
      (embeddings whose direction matters, e.g. sentence encoders); ``temperature`` is not used.

    The teacher is detached; computed in float32 at least.

    Raises:
        ValueError: an unknown ``kind``, different shapes, or ``temperature <= 0`` for ``"kl"``.

    Example:
        >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
        >>> float(distill_loss(s, t, "mse")), float(distill_loss(s, t, "cosine")), float(distill_loss(s, 2 * s, "cosine"))
        (5.0, 1.0, 0.0)
    """
    if kind == "kl":
        return kd_loss(student, teacher, temperature)
    if kind not in ("mse", "cosine"):
        raise ValueError(f"`loss` must be 'kl', 'mse' or 'cosine', got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher outputs have different shapes: {tuple(student.shape)} vs {tuple(teacher.shape)}; "
            "select matching outputs with `student_output`/`teacher_output`"
        )
    dtype = _at_least_float32(student)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher features of the same shape (teacher detached).

    Raises:
        ValueError: the shapes differ.

    Example:
        >>> float(feature_loss(torch.ones(2, 3), torch.zeros(2, 3)))
        1.0
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student and teacher features have different shapes: {tuple(student_features.shape)} vs "
            f"{tuple(teacher_features.shape)} (after projection); pair layers whose outputs differ at most in width"
        )
    dtype = _at_least_float32(student_features)
    return F.mse_loss(student_features.to(dtype), teacher_features.detach().to(dtype))


def _at_least_float32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def project_features(features: torch.Tensor, projection: nn.Module, dim: int) -> torch.Tensor:
    """Apply ``projection`` (an ``nn.Linear``) along dimension ``dim`` of ``features``.

    Example:
        >>> proj = nn.Linear(3, 5)
        >>> project_features(torch.zeros(2, 3, 4, 4), proj, dim=1).shape
        torch.Size([2, 5, 4, 4])
    """
    if dim in (-1, features.dim() - 1):
        return projection(features)
    return projection(features.movedim(dim, -1)).movedim(-1, dim)


def select_output(output: Any, selector: str | int | None, argument: str = "output") -> torch.Tensor:
    """The tensor to distil out of a model's forward output.

    ``selector`` is a dict key or attribute name (``"logits"``), a sequence index (``0``), or a dotted path
    of those (``"out.0"``). ``None`` takes the output itself if it is a tensor, else its ``logits`` entry or
    attribute (HF-style outputs).

    Args:
        output: what the forward returned.
        selector: how to find the tensor, see above.
        argument: the argument name for error messages (``student_output`` / ``teacher_output``).

    Raises:
        ValueError: the selector does not exist in the output, or it does not lead to a tensor.

    Example:
        >>> select_output((torch.zeros(1), torch.ones(1)), 1, "student_output")
        tensor([1.])
        >>> select_output({"a": 1}, "logits", "teacher_output")
        Traceback (most recent call last):
        ...
        ValueError: `teacher_output`='logits' does not exist in the output (dict with keys ['a'])
    """
    if selector is None:
        if isinstance(output, torch.Tensor):
            return output
        if _has(output, "logits"):
            return select_output(output, "logits", argument)
        raise ValueError(
            f"the forward returned {_describe(output)}, not a tensor: set `{argument}` to the key, attribute or "
            "index of the logits"
        )
    value = output
    parts = str(selector).split(".") if isinstance(selector, str) else [selector]
    for part in parts:
        if not _has(value, part):
            raise ValueError(f"`{argument}`={selector!r} does not exist in the output ({_describe(output)})")
        value = _get(value, part)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{argument}`={selector!r} leads to a {type(value).__name__}, not a tensor")
    return value


def _has(obj: Any, key: str | int) -> bool:
    if isinstance(obj, Mapping):
        return key in obj
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        try:
            index = int(key)
        except (TypeError, ValueError):
            return False
        return -len(obj) <= index < len(obj)
    return isinstance(key, str) and hasattr(obj, key) and not isinstance(obj, torch.Tensor)


def _get(obj: Any, key: str | int) -> Any:
    if isinstance(obj, Mapping):
        return obj[key]
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return obj[int(key)]
    return getattr(obj, key)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"{type(obj).__name__} with keys {list(obj)}"
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return f"{type(obj).__name__} of length {len(obj)}"
    return f"a {type(obj).__name__}"


def layer_width(module: nn.Module) -> tuple[int, int]:
    """``(width, dim)`` of a layer's output features: the size that a projection maps and the dimension it is in.

    Linear-like layers have their features in the last dimension, conv and batch-norm layers in dimension 1.

    Raises:
        ValueError: the layer type has no known output width.

    Example:
        >>> layer_width(nn.Linear(4, 7)), layer_width(nn.Conv2d(3, 8, 3))
        ((7, -1), (8, 1))
    """
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, 1
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1]), -1
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, -1
    raise ValueError(
        f"cannot tell the output width of a {type(module).__name__} layer; pair Linear, Conv, BatchNorm, "
        "LayerNorm or Embedding layers in `feature_pairs`"
    )


def agreement_counts(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[int, int]:
    """``(matches, total)``: samples where student and teacher predict the same class (argmax, last dim).

    Example:
        >>> agreement_counts(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
        (1, 2)
    """
    s = student_logits.detach().argmax(-1)
    t = teacher_logits.detach().argmax(-1)
    return int((s == t).sum().item()), int(s.numel())


class FeatureRecorder:
    """Forward hooks on named layers that keep each layer's first output while :meth:`start`-ed.

    Args:
        modules: layer name -> module to watch.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> rec = FeatureRecorder({"0": net[0]})
        >>> rec.start(); _ = net(torch.zeros(1, 2)); rec.stop()
        >>> rec.outputs["0"].shape
        torch.Size([1, 3])
        >>> rec.remove()
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active and name not in self.outputs:
                self.outputs[name] = select_output(output, None if isinstance(output, torch.Tensor) else 0, name)

        return hook

    def start(self) -> None:
        """Forget what was recorded and record the next outputs."""
        self.outputs = {}
        self._active = True

    def stop(self) -> None:
        """Stop recording (the outputs stay until the next :meth:`start`)."""
        self._active = False

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}


def build_module(spec: Mapping[str, Any], argument: str = "teacher") -> nn.Module:
    """Instantiate ``{"class_path": "pkg.Class", "init_args": {...}}`` (the LightningCLI form).

    Raises:
        ValueError: no ``class_path``, a class that cannot be imported or is not an ``nn.Module``.
        TypeError: ``init_args`` is not a mapping.

    Example:
        >>> build_module({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 3}})
        Linear(in_features=2, out_features=3, bias=True)
    """
    cls = resolve_class(spec, argument)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise TypeError(f"`{argument}.init_args` must be a mapping, got {type(init_args).__name__}")
    return cls(**dict(init_args))


def resolve_class(spec: Mapping[str, Any], argument: str = "teacher") -> type[nn.Module]:
    """The ``nn.Module`` class named by ``spec["class_path"]``; errors as in :func:`build_module`."""
    path = spec.get("class_path")
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"`{argument}` accepts the keys 'class_path' and 'init_args', got also {unknown}")
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"`{argument}` needs a 'class_path' like 'my_pkg.MyModel', got {path!r}")
    mod_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(f"`{argument}.class_path`: cannot import {path!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"`{argument}.class_path`: {path!r} is not an nn.Module class")
    return cls


def load_teacher_weights(module: nn.Module, path: str | Path) -> None:
    """Load a Lightning checkpoint (its ``state_dict``) or a plain ``state_dict`` file into ``module``, strictly.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds no state dict, or its keys or shapes do not fit ``module`` (the
            message lists the missing, unexpected and mismatched keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`teacher_checkpoint`: no file at {str(path)!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):  # e.g. a Lightning checkpoint with custom objects
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # torch.load raises UnpicklingError, EOFError, RuntimeError, ... on other files
            raise ValueError(
                f"`teacher_checkpoint` {str(path)!r} is not a file torch.load can read ({type(err).__name__}: "
                f"{err}); give the .ckpt a teacher's fit wrote, or a file saved with "
                "torch.save(model.state_dict(), path)"
            ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`teacher_checkpoint` {str(path)!r} holds neither a Lightning checkpoint nor a state_dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs module {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                parts.append(f"{label}: {keys[:10]}{more}")
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} does not fit the teacher {type(module).__name__}: " + "; ".join(parts)
        )
    module.load_state_dict(state, strict=True)
