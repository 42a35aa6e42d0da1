"""CompressionMonitor: exact counts, real TensorBoard event files, and the real TensorBoard server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_compress.callbacks.monitor import CompressionMonitor
from lightning_compress.stats import model_stats, weight_storage_bytes


class PlaceZeros(Callback):
    """Zero a fixed set of weights after every step, as a stand-in for any pruning method."""

    def __init__(self, k0: int, k1: int) -> None:
        self.k0, self.k1 = k0, k1

    def _zero(self, pl_module) -> None:
        with torch.no_grad():
            pl_module.net[0].weight.view(-1)[: self.k0] = 0.0
            pl_module.net[2].weight.view(-1)[: self.k1] = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._zero(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._zero(pl_module)


class ReportsBits(Callback):
    def compression_bits(self, pl_module):
        return {"net.0.weight": 4}

    def compression_targets(self):
        return {"sparsity": 0.5}

    def compression_sizes(self, pl_module):
        return {"serialized_int": 1234}


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_exact_sparsity_of_placed_zeros(tiny_module, make_trainer) -> None:
    # net.0: 16x32=512 weights, net.2: 32x4=128 weights
    monitor = CompressionMonitor(log_every_n_steps=1, print_table=False)
    make_trainer(callbacks=[PlaceZeros(256, 32), monitor], max_steps=3).fit(tiny_module)
    _, metrics = monitor.collect(make_trainer(), tiny_module)
    assert metrics["compression/sparsity/net.0"] == pytest.approx(256 / 512)
    assert metrics["compression/sparsity/net.2"] == pytest.approx(32 / 128)
    assert metrics["compression/sparsity"] == pytest.approx((256 + 32) / (512 + 128))
    total = 512 + 32 + 128 + 4
    assert metrics["compression/total_params"] == total
    assert metrics["compression/nonzero_params"] == total - 256 - 32
    assert metrics["compression/size_bytes/dense_fp32"] == 4 * total


def test_counts_agree_with_torch_prune() -> None:
    """Sparsity made by torch.nn.utils.prune (as Lightning's ModelPruning does) is counted from the weights."""
    from torch import nn
    from torch.nn.utils import prune

    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    prune.global_unstructured(
        [(net[0], "weight"), (net[2], "weight")], pruning_method=prune.L1Unstructured, amount=0.7
    )
    stats = model_stats(net)
    assert stats.sparsity == pytest.approx(0.7, abs=1 / 750)
    zeros = sum(int((m.weight == 0).sum()) for m in (net[0], net[2]))
    assert stats.sparsity == pytest.approx(zeros / 750)


def test_tensorboard_event_files_hold_the_values(tiny_module, make_trainer, tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = CompressionMonitor(log_every_n_steps=2, print_table=False)
    trainer = make_trainer(
        callbacks=[PlaceZeros(128, 64), ReportsBits(), monitor], logger=logger, max_epochs=2, limit_train_batches=4
    )
    trainer.fit(tiny_module)
    scalars = _scalars(logger.log_dir)
    sparsity = dict(scalars["compression/sparsity"])
    # logged every 2 optimizer steps during training (steps 2, 4, 6, 8) and at each validation end (4, 8)
    assert sorted(sparsity) == [2, 4, 6, 8]
    assert all(v == pytest.approx((128 + 64) / 640) for v in sparsity.values())
    assert dict(scalars["compression/sparsity/net.0"])[8] == pytest.approx(0.25)
    assert dict(scalars["compression/sparsity/net.2"])[8] == pytest.approx(0.5)
    assert dict(scalars["compression/bits/net.0"])[8] == 4.0
    assert dict(scalars["compression/target/sparsity"])[8] == 0.5
    assert dict(scalars["compression/size_bytes/serialized_int"])[8] == 1234.0
    expected = weight_storage_bytes(512, 384, 4) + weight_storage_bytes(128, 64, 32) + 4 * (32 + 4)
    assert dict(scalars["compression/size_bytes/compressed"])[8] == expected
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert {"weights/net.0", "weights/net.2"} <= set(acc.Tags()["histograms"])
    # the custom-scalars layout is written once, as TensorBoard's own plugin data
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_non_tensorboard_logger_gets_metrics(tiny_module, make_trainer, tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    make_trainer(callbacks=[PlaceZeros(512, 0), CompressionMonitor(log_every_n_steps=4)], logger=logger).fit(tiny_module)
    text = Path(logger.log_dir, "metrics.csv").read_text()
    assert "compression/sparsity/net.0" in text.splitlines()[0]


def test_prints_table_at_fit_end(tiny_module, make_trainer, capsys) -> None:
    make_trainer(callbacks=[PlaceZeros(256, 0), CompressionMonitor()], max_steps=2).fit(tiny_module)
    out = capsys.readouterr().out
    assert "net.0" in out and "50.00%" in out and "compressed" in out


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`log_every_n_steps` must be an integer >= 0, got -1"):
        CompressionMonitor(log_every_n_steps=-1)
    with pytest.raises(ValueError, match="got 2.5"):
        CompressionMonitor(log_every_n_steps=2.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_tensorboard_server_serves_sparsity(tiny_module, make_trainer, tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="run")
    make_trainer(
        callbacks=[PlaceZeros(384, 0), CompressionMonitor(log_every_n_steps=1, print_table=False)],
        logger=logger,
        max_steps=3,
    ).fit(tiny_module)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "tb"), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.urlencode({"run": "run", "tag": "compression/sparsity"})
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
        deadline, data = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    data = json.loads(resp.read())
                if data:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert data, "TensorBoard did not serve the compression/sparsity series in time"
        steps = [int(step) for _, step, _ in data]
        assert steps == [1, 2, 3]
        assert all(v == pytest.approx(384 / 640) for _, _, v in data)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_each_scalar_logged_once_per_step(make_trainer, tiny_module) -> None:
    """A validation that ends right after a logging step does not log the same scalars at that step again."""
    from lightning.pytorch.loggers import Logger

    class Calls(Logger):
        name, version = "calls", 0

        def __init__(self) -> None:
            super().__init__()
            self.keys: list[tuple[int, str]] = []

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.keys += [(step, k) for k in metrics if k.startswith("compression/")]

    calls = Calls()
    monitor = CompressionMonitor(log_every_n_steps=4, histograms=False, print_table=False)
    make_trainer(max_epochs=2, logger=calls, callbacks=[monitor]).fit(tiny_module)  # validation at steps 8 and 16
    assert (8, "compression/sparsity") in calls.keys and (16, "compression/sparsity") in calls.keys
    assert len(calls.keys) == len(set(calls.keys))


def test_counts_a_model_converted_to_integers_at_fit_end(tiny_module, make_trainer, capsys) -> None:
    # the converted layers hold their weights (int8 codes) and biases in buffers, read through `weight`/`bias`
    # properties: the model had no parameters left, and the final table said "0 B dense fp32 (0.00x)"
    from lightning_compress.callbacks.quantization import QuantizationAwareTraining

    dense_params = sum(p.numel() for p in tiny_module.parameters())  # 16*32 + 32 + 32*4 + 4 = 676
    monitor = CompressionMonitor(log_every_n_steps=0, histograms=False)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8)
    make_trainer(callbacks=[qat, monitor]).fit(tiny_module)
    assert type(tiny_module.net[0]).__name__ == "Int8Linear"
    stats = monitor.last_stats
    assert stats.total_params == dense_params
    assert stats.dense_fp32_bytes == 4 * dense_params
    weights = [tiny_module.net[0].weight, tiny_module.net[2].weight]
    expected = sum(weight_storage_bytes(w.numel(), int(torch.count_nonzero(w)), 8) for w in weights) + 4 * (32 + 4)
    assert stats.compressed_bytes == expected
    assert stats.compression_ratio > 3.0
    assert "(0.00x)" not in capsys.readouterr().out


def test_a_monitor_reused_in_a_new_run_logs_from_its_first_step(make_trainer, tmp_path: Path) -> None:
    # the step of the previous run's last log stayed: a new run whose first log fell on that step (8 here) logged
    # no scalars there, so its only validation wrote nothing to its fresh logger
    from tests.helpers import TinyModule

    monitor = CompressionMonitor(log_every_n_steps=0, histograms=False, print_table=False)
    steps = []
    for run in ("first", "second"):
        logger = CSVLogger(str(tmp_path), name=run)
        make_trainer(max_epochs=1, logger=logger, callbacks=[monitor]).fit(TinyModule())
        lines = Path(logger.log_dir, "metrics.csv").read_text().splitlines()
        column = lines[0].split(",").index("compression/sparsity")
        step = lines[0].split(",").index("step")
        steps.append([int(r.split(",")[step]) for r in lines[1:] if r.split(",")[column]])
    assert steps[0] == steps[1] == [8]  # the validation at the end of the epoch: 8 optimizer steps


def test_low_rank_is_reported_against_the_model_before_factorization(make_trainer, tmp_path: Path, capsys) -> None:
    # after the low-rank recipe the table said "53,368 B dense fp32 -> 53,368 B compressed (1.00x)" and
    # compression/ratio stayed 1.0 although the factorized layers had 4x fewer parameters
    from lightning_compress import LowRankFactorization
    from lightning_compress.examples import DigitsDataModule, DigitsMLP

    model = DigitsMLP(hidden_sizes=[64, 32])
    dense = sum(p.numel() for p in model.parameters())
    logger = TensorBoardLogger(str(tmp_path), name="run")
    lowrank = LowRankFactorization(param_ratio=0.25, start_step=2, targets=["net.1", "net.3"])
    monitor = CompressionMonitor(log_every_n_steps=2, histograms=False)
    trainer = make_trainer(callbacks=[lowrank, monitor], max_steps=4, logger=logger, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    now = sum(p.numel() for p in model.parameters())
    assert now < 0.5 * dense
    stats = monitor.last_stats
    assert stats.total_params == now and stats.dense_fp32_bytes == 4 * dense
    assert stats.compressed_bytes == 4 * now and stats.compression_ratio == pytest.approx(dense / now)
    logged = _scalars(logger.log_dir)
    assert logged["compression/ratio"][0][1] == pytest.approx(1.0)  # step 2: before factorization
    assert logged["compression/ratio"][-1][1] == pytest.approx(dense / now, rel=1e-4)
    assert f"{4 * dense:,} B dense fp32" in capsys.readouterr().out
