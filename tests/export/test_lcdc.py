"""The compressed artefact: bit-exact round trips, relative indices with fillers, errors, report, CLI entry, speed."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from lightning_compress.cli import export_main
from lightning_compress.examples import DigitsDataModule, DigitsMLP
from lightning_compress.export import lcdc as compressed
from lightning_compress.export.lcdc import load_compressed, save_compressed
from lightning_compress.functional import weight_sharing as kmeans


def _pruned_shared(net: nn.Module, sparsity: float, bits: int, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                w.mul_((torch.rand(w.shape, generator=g) >= sparsity).to(w.dtype))
                codebook, a = kmeans.share(w, bits)
                w.copy_(kmeans.expand(codebook, a))
    return net


def _assert_same(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(state) == list(reference)
    for k, v in reference.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _pruned_shared(
        nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)),
        0.95,
        4,
    )
    path = tmp_path / "m.lcdc"
    report = save_compressed(net, path, verbose=False)
    fresh = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    state = load_compressed(path, fresh)
    _assert_same(state, net.state_dict())
    _assert_same(fresh.state_dict(), net.state_dict())
    assert report.file_bytes == path.stat().st_size
    assert [t.codebook for t in report.tensors if t.name.endswith("weight")] == [16, 16, 16]


def test_round_trip_of_mixed_tensors(tmp_path: Path) -> None:
    """Buffers (BatchNorm, int64), half precisions, all-zero, one non-zero, long gaps, -0.0, dense unshared."""
    g = torch.Generator().manual_seed(0)
    long_gaps = torch.zeros(50_000)
    long_gaps[[0, 7, 9_000, 49_999]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    state = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),  # dense, unshared
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(123, dtype=torch.int64),
        "half": (torch.randn(40, 40, generator=g) * (torch.rand(40, 40, generator=g) > 0.8)).half(),
        "bf16": torch.randn(100, generator=g).bfloat16(),
        "zeros": torch.zeros(10, 10),
        "one": torch.zeros(5, 5).index_put_((torch.tensor([2]), torch.tensor([3])), torch.tensor(0.25)),
        "long_gaps": long_gaps,
        "neg_zero": torch.tensor([-0.0, 1.0, -0.0, 2.0]),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.lcdc"
    save_compressed(state, path, verbose=False)
    _assert_same(load_compressed(path), state)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_round_trip_of_float8_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    """One-byte floats: shared (few values), sparse and dense tensors come back bit-exact."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([-0.5, 0.25, 1.0])
    kept = torch.rand(64, 32, generator=g) > 0.7  # pruned entries are +0.0 (-0.0 reloads as +0.0, documented)
    state = {
        "shared": torch.where(kept, levels[torch.randint(0, 3, (64, 32), generator=g)], 0.0).to(dtype),
        "dense": torch.randn(16, 16, generator=g).to(dtype),
        "empty": torch.zeros(0, 3).to(dtype),
    }
    path = tmp_path / "fp8.lcdc"
    report = save_compressed(state, path, verbose=False)
    assert report.tensors[0].codebook == 3
    loaded = load_compressed(path)
    for name, value in state.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == value.shape, name
        assert torch.equal(loaded[name].view(torch.uint8), value.view(torch.uint8)), name


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_relative_indices_with_fillers(bits: int) -> None:
    rng = np.random.default_rng(bits)
    positions = np.unique(rng.integers(0, 100_000, size=300))
    gaps = compressed._gaps(positions)
    entries = compressed._rel_entries(gaps, bits)
    assert entries.max() <= (1 << bits) - 1
    fillers = int((entries == (1 << bits) - 1).sum())
    assert fillers == int((gaps // ((1 << bits) - 1)).sum())  # one filler per full span, as in the paper
    assert fillers > 0
    np.testing.assert_array_equal(compressed._rel_positions(entries, bits), positions)
    np.testing.assert_array_equal(
        compressed._rel_counts(gaps, bits), np.bincount(entries, minlength=1 << bits)
    )


def test_report_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _pruned_shared(nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10)), 0.9, 4)
    report = save_compressed(net, tmp_path / "m.lcdc")
    printed = capsys.readouterr().out
    assert "| **total**" in printed and "0.weight" in printed
    totals = report.stage_totals()
    assert totals["dense"] == 4 * sum(p.numel() for p in net.parameters())
    assert totals["dense"] > totals["pruned"] > totals["shared"] > totals["huffman"]
    assert report.ratio == pytest.approx(totals["dense"] / (tmp_path / "m.lcdc").stat().st_size)
    w = report.tensors[0]
    assert w.nonzero == int(torch.count_nonzero(net[0].weight))
    assert w.pruned_bytes < w.dense_bytes / 4  # 10% non-zeros at 32 bits + short relative indices
    assert report.as_dict()["stages"] == totals


def test_truncated_corrupted_and_foreign_files_raise(tmp_path: Path) -> None:
    net = _pruned_shared(nn.Linear(64, 32), 0.9, 4)
    path = tmp_path / "m.lcdc"
    save_compressed(net, path, verbose=False)
    blob = path.read_bytes()
    (tmp_path / "short").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed(tmp_path / "short")
    for i in (len(blob) - 5, len(blob) // 2, 40):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        (tmp_path / "bad").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="corrupted"):
            load_compressed(tmp_path / "bad")
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ValueError, match="bad magic"):
        load_compressed(tmp_path / "foreign")
    (tmp_path / "future").write_bytes(blob[:4] + bytes([99]) + blob[5:])
    with pytest.raises(ValueError, match="version 99"):
        load_compressed(tmp_path / "future")
    with pytest.raises(TypeError, match="`model` must be"):
        save_compressed([1, 2], tmp_path / "x")  # type: ignore[arg-type]


def test_wrong_model_is_refused(tmp_path: Path) -> None:
    save_compressed(nn.Linear(4, 3), tmp_path / "m.lcdc", verbose=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_compressed(tmp_path / "m.lcdc", nn.Linear(4, 5))


def test_ten_million_parameters_round_trip_in_seconds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3000, 2000), nn.ReLU(), nn.Linear(2000, 2000), nn.ReLU(), nn.Linear(2000, 10)
    )
    with torch.no_grad():
        for m in (net[0], net[2], net[4]):
            keep = torch.rand(m.weight.shape) > 0.9
            m.weight.copy_(
                torch.where(keep, torch.linspace(-0.1, 0.1, 16)[torch.randint(0, 16, m.weight.shape)], 0.0)
            )
    t0 = time.perf_counter()
    report = save_compressed(net, tmp_path / "big.lcdc", verbose=False)
    state = load_compressed(tmp_path / "big.lcdc")
    elapsed = time.perf_counter() - t0
    _assert_same(state, net.state_dict())
    assert sum(t.numel for t in report.tensors) > 10_000_000
    assert report.ratio > 30  # 90% sparse, 4-bit: ~3 bits of index + ~3 bits of position per non-zero
    assert elapsed < 30, f"10M parameters took {elapsed:.1f}s"


def test_export_command_from_checkpoint_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_everything(0)
    model = DigitsMLP(hidden_sizes=[16])
    trainer = Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: lightning_compress.examples.DigitsMLP\n  init_args:\n    hidden_sizes: [16]\n"
    )
    assert export_main(["--ckpt", str(ckpt), "--config", str(config), "--out", str(tmp_path / "a.lcdc")]) == 0
    assert "| **total**" in capsys.readouterr().out
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "b.lcdc"), "--quiet"]) == 0
    _assert_same(load_compressed(tmp_path / "a.lcdc", DigitsMLP(hidden_sizes=[16])), model.state_dict())
    assert (tmp_path / "a.lcdc").read_bytes() == (tmp_path / "b.lcdc").read_bytes()
    torch.save({"weights": model.state_dict()}, tmp_path / "plain.pt")
    for bad in (["--ckpt", str(tmp_path / "missing.ckpt")], ["--ckpt", str(tmp_path / "plain.pt")]):
        with pytest.raises(SystemExit) as exit_info:  # a usage error with a message, not a traceback
            export_main([*bad, "--out", str(tmp_path / "x.lcdc")])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "not a Lightning checkpoint" in err
    config.write_text(config.read_text().replace("[16]", "[17]"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        export_main(["--ckpt", str(ckpt), "--config", str(config), "--out", str(tmp_path / "c.lcdc")])


@pytest.mark.parametrize("method", ["quantization", "low_rank"])
def test_export_of_a_qat_or_factorized_checkpoint_is_refused_with_what_to_do(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # with --config: a raw `load_state_dict` error; without: the fake-quantized / factorized float weights were
    # written silently, and the file loaded into no model of the recipe
    from lightning_compress import LowRankFactorization, QuantizationAwareTraining

    seed_everything(0)
    callback = (
        QuantizationAwareTraining(weight_bits=8, convert_on_fit_end=False)
        if method == "quantization"
        else LowRankFactorization(rank_ratio=0.5, start_step=0, targets=["net.1"])
    )
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(DigitsMLP(hidden_sizes=[32]), DigitsDataModule())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: lightning_compress.examples.DigitsMLP\n  init_args:\n    hidden_sizes: [32]\n"
    )
    expected = {
        "quantization": r"QuantizationAwareTraining.*convert_quantized\(load_quantized_checkpoint",
        "low_rank": r"LowRankFactorization.*'net.1'.*load_factorized_checkpoint",
    }[method]
    for extra in ([], ["--config", str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--ckpt", str(ckpt), *extra, "--out", str(tmp_path / "x.lcdc")])
        assert exit_info.value.code == 2
        assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "x.lcdc").exists()
