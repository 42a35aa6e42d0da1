"""The pure distillation math, selectors, hooks and teacher loading, checked against references, no Trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.distillation import (
    FeatureRecorder,
    agreement_counts,
    build_module,
    distill_loss,
    feature_loss,
    kd_loss,
    layer_width,
    load_teacher_weights,
    project_features,
    select_output,
)


def _reference_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(p_t || p_s) written out by hand, averaged over samples, times T^2."""
    p_t = torch.softmax(t / temp, dim=-1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / temp, dim=-1))).sum(-1)
    return kl.mean() * temp**2


@pytest.mark.parametrize("temp", [0.5, 1.0, 4.0, 20.0])
def test_kd_loss_matches_reference_and_gradient(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    loss = kd_loss(s, t, temp)
    torch.testing.assert_close(loss.double(), _reference_kd(s, t, temp), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, s)
    # d/ds [T^2 KL] = T (softmax(s/T) - softmax(t/T)) / N
    expected = temp * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)) / s.shape[0]
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-4, atol=1e-6)


def test_kd_loss_zero_for_equal_and_flattens_sequences() -> None:
    s = torch.randn(3, 7, 5)
    assert float(kd_loss(s, s.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(3, 7, 5)
    torch.testing.assert_close(kd_loss(s, t, 2.0), _reference_kd(s.reshape(-1, 5), t.reshape(-1, 5), 2.0))


def test_kd_loss_does_not_backprop_into_teacher() -> None:
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_kd_loss_errors() -> None:
    with pytest.raises(ValueError, match=r"different shapes: \(2, 3\) vs \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="`temperature` must be > 0, got 0"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0)


def test_feature_loss_and_projection() -> None:
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(feature_loss(s, t), F.mse_loss(s, t))
    with pytest.raises(ValueError, match="different shapes"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    proj = nn.Linear(3, 5)
    x = torch.randn(2, 3, 4, 4)
    out = project_features(x, proj, dim=1)
    # a linear map on the channel dimension is a 1x1 convolution
    conv = F.conv2d(x, proj.weight[:, :, None, None], proj.bias)
    torch.testing.assert_close(out, conv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(project_features(torch.ones(2, 3), proj, -1), proj(torch.ones(2, 3)))


@dataclass
class _HFOutput:
    logits: torch.Tensor
    hidden_states: tuple


def test_select_output_forms() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert select_output(a, None) is a
    assert select_output({"logits": a, "aux": b}, None) is a
    assert select_output(_HFOutput(a, (b,)), None) is a
    assert select_output(_HFOutput(a, (b,)), "hidden_states.0") is b
    assert select_output((a, b), 1) is b
    assert select_output({"out": [a, b]}, "out.1") is b


def test_select_output_errors() -> None:
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"`student_output`='logits' does not exist in the output \(a Tensor\)"):
        select_output(a, "logits", "student_output")
    with pytest.raises(ValueError, match=r"`teacher_output`=2 does not exist in the output \(tuple of length 2\)"):
        select_output((a, a), 2, "teacher_output")
    with pytest.raises(ValueError, match="not a tensor: set `student_output`"):
        select_output({"a": a}, None, "student_output")
    with pytest.raises(ValueError, match="leads to a str, not a tensor"):
        select_output({"a": "x"}, "a", "teacher_output")


def test_layer_width() -> None:
    assert layer_width(nn.Linear(3, 9)) == (9, -1)
    assert layer_width(nn.Conv1d(2, 5, 3)) == (5, 1)
    assert layer_width(nn.BatchNorm2d(6)) == (6, 1)
    assert layer_width(nn.LayerNorm(11)) == (11, -1)
    assert layer_width(nn.Embedding(10, 4)) == (4, -1)
    with pytest.raises(ValueError, match="cannot tell the output width of a ReLU"):
        layer_width(nn.ReLU())


def test_agreement_counts() -> None:
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    assert agreement_counts(s, t) == (2, 3)


def test_feature_recorder_keeps_first_output_only_while_active() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    rec = FeatureRecorder({"0": net[0]})
    net(torch.zeros(1, 2))
    assert rec.outputs == {}
    rec.start()
    first = torch.ones(1, 2)
    net(first)
    net(torch.zeros(1, 2))
    rec.stop()
    torch.testing.assert_close(rec.outputs["0"], net[0](first))
    rec.remove()
    rec.start()
    net(first)
    assert rec.outputs == {}


def test_build_module_errors() -> None:
    assert isinstance(build_module({"class_path": "torch.nn.ReLU"}), nn.ReLU)
    with pytest.raises(ValueError, match="cannot import 'torch.nn.Nope'"):
        build_module({"class_path": "torch.nn.Nope"})
    with pytest.raises(ValueError, match="is not an nn.Module class"):
        build_module({"class_path": "torch.optim.SGD"})
    with pytest.raises(ValueError, match="needs a 'class_path'"):
        build_module({"init_args": {}})
    with pytest.raises(ValueError, match=r"got also \['init_arg'\]"):
        build_module({"class_path": "torch.nn.ReLU", "init_arg": {}})


def test_load_teacher_weights_plain_and_lightning(tmp_path: Path) -> None:
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    load_teacher_weights(dst, plain)
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(a, b)
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3, "pytorch-lightning_version": "2.6"}, wrapped)
    dst2 = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    load_teacher_weights(dst2, wrapped)
    assert torch.equal(dst2[1].weight, src[1].weight)


def test_load_teacher_weights_errors_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys: \['2.weight', '2.bias'\]"):
        load_teacher_weights(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)), path)
    with pytest.raises(ValueError, match=r"unexpected keys: \['1.weight', '1.bias'\]"):
        load_teacher_weights(nn.Sequential(nn.Linear(3, 4)), path)
    with pytest.raises(ValueError, match=r"0.weight: checkpoint \(4, 3\) vs module \(5, 3\)"):
        load_teacher_weights(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)), path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_teacher_weights(nn.Linear(1, 1), tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="neither a Lightning checkpoint nor a state_dict"):
        load_teacher_weights(nn.Linear(1, 1), tmp_path / "list.pt")


def test_distill_loss_kinds_match_torch_and_detach_the_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    torch.testing.assert_close(distill_loss(s, t, "kl", 2.0), kd_loss(s, t, 2.0))
    torch.testing.assert_close(distill_loss(s, t, "mse"), F.mse_loss(s, t))
    torch.testing.assert_close(distill_loss(s, t, "cosine"), 1 - F.cosine_similarity(s, t, dim=-1).mean())
    assert float(distill_loss(s, 3 * s, "cosine")) == pytest.approx(0.0, abs=1e-6)  # direction only
    distill_loss(s, t, "cosine").backward()
    assert s.grad is not None and t.grad is None
    assert distill_loss(s.half(), t.half(), "mse").dtype == torch.float32


def test_distill_loss_errors() -> None:
    with pytest.raises(ValueError, match="`loss` must be 'kl', 'mse' or 'cosine', got 'l2'"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l2")
    with pytest.raises(ValueError, match=r"different shapes: \(2, 3\) vs \(2, 4\)"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4), "cosine")
