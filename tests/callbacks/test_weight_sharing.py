"""WeightSharing with a real Trainer: tied training, the paper's update rule, pruning, checkpoints, resume, DDP."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F

from lightning_compress import CompressionMonitor, GradualPruning
from lightning_compress.callbacks.weight_sharing import WeightSharing
from lightning_compress.export.lcdc import load_compressed
from lightning_compress.functional import weight_sharing as kmeans
from tests.helpers import TinyModule, run_python

WEIGHTS = ("net.0.weight", "net.2.weight")


class Record(Callback):
    """After every batch once shared: every weight is a codebook value, zeros stayed zeros, codebooks move."""

    def __init__(self, sharing: WeightSharing, pruning: GradualPruning | None = None) -> None:
        self.sharing, self.pruning = sharing, pruning
        self.violations = 0
        self.first: dict[str, torch.Tensor] = {}
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.sharing.shared:
            return
        params = dict(pl_module.named_parameters())
        for fqn, a in self.sharing.assignments.items():
            w, cb = params[fqn].detach(), self.sharing.codebooks[fqn]
            self.first.setdefault(fqn, cb)
            self.violations += int((w != kmeans.expand(cb, a)).sum())
            self.violations += int(((a >= 0) & (w == 0)).sum()) if len(cb) and (cb != 0).all() else 0
            if self.pruning is not None:
                self.violations += int((w[~self.pruning.masks[fqn]] != 0).sum())
        self.checked += 1


def _adam(model: TinyModule) -> TinyModule:
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    return model


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_tied_training_with_pruning_in_either_order(optimizer: str, make_trainer) -> None:
    finals = []
    for order in ("prune_first", "share_first"):
        seed_everything(0)
        model = TinyModule() if optimizer == "sgd_momentum" else _adam(TinyModule())
        pruning = GradualPruning(final_sparsity=0.8, start_step=0, end_step=8, update_every=2, scope="layer")
        sharing = WeightSharing(bits=2, start_step=9)  # the step after pruning's last update
        record = Record(sharing, pruning)
        callbacks = [pruning, sharing] if order == "prune_first" else [sharing, pruning]
        make_trainer(callbacks=[*callbacks, record], max_epochs=3).fit(model)  # 24 steps
        assert record.checked == 15 and record.violations == 0
        for fqn in WEIGHTS:
            w = model.get_parameter(fqn).detach()
            assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
            assert len(torch.unique(w[w != 0])) <= 4
            assert not torch.equal(record.first[fqn], sharing.codebooks[fqn])  # the shared values trained
        finals.append(model.state_dict())
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_centroid_moves_by_lr_times_member_gradients(reduce: str, make_trainer) -> None:
    """Plain SGD: one tied step moves each centroid by -lr * (sum or mean of its members' gradients)."""
    lr, start = 0.05, 3

    def model() -> TinyModule:
        seed_everything(0)
        m = TinyModule()
        m.configure_optimizers = lambda: torch.optim.SGD(m.parameters(), lr=lr)
        return m

    before = model()
    make_trainer(max_steps=start).fit(before)  # the weights sharing will see
    after = model()
    sharing = WeightSharing(bits=3, start_step=start, reduce=reduce)
    make_trainer(max_steps=start + 1, callbacks=[sharing]).fit(after)

    x, y = list(before.train_dataloader())[start]
    plan = {f: kmeans.share(before.get_parameter(f), 3) for f in WEIGHTS}
    with torch.no_grad():
        for f, (cb, a) in plan.items():
            before.get_parameter(f).copy_(kmeans.expand(cb, a))
    before.zero_grad()
    F.cross_entropy(before(x), y).backward()
    for f, (cb, a) in plan.items():
        grad = before.get_parameter(f).grad
        per = torch.stack(
            [grad[a == j].sum() if reduce == "sum" else grad[a == j].mean() for j in range(len(cb))]
        )
        assert torch.equal(sharing.assignments[f], a)
        torch.testing.assert_close(sharing.codebooks[f], cb - lr * per, atol=1e-6, rtol=1e-5)


def test_checkpoint_loads_strict_and_export_is_exact(tmp_path: Path, make_trainer, capsys) -> None:
    seed_everything(0)
    model = TinyModule()
    export = tmp_path / "out" / "model.lcdc"
    pruning = GradualPruning(final_sparsity=0.75, start_step=0, end_step=4, update_every=2)
    sharing = WeightSharing(bits=4, layer_bits={"net.2": 1}, start_epoch=1, export_path=str(export))
    monitor = CompressionMonitor(print_table=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(callbacks=[pruning, sharing, monitor, ckpt], max_epochs=2, enable_checkpointing=True).fit(
        model
    )
    assert "| **total**" in capsys.readouterr().out
    assert len(sharing.codebooks["net.2.weight"]) <= 2 and len(sharing.codebooks["net.0.weight"]) <= 16
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    fresh = TinyModule()
    fresh.load_state_dict(saved["state_dict"], strict=True)  # plain weights, no extra keys
    state = saved["callbacks"][sharing.state_key]
    assert state["version"] == 2 and state["shared_step"] == 8 and set(state["assignments"]) == set(WEIGHTS)
    reloaded = TinyModule()
    load_compressed(export, reloaded)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert sharing.report.file_bytes == export.stat().st_size and sharing.report.ratio > 3
    bits = sharing.compression_bits(model)
    assert bits["net.2.weight"] == 1 and 1 <= bits["net.0.weight"] <= 4
    stats, _ = monitor.collect(make_trainer(callbacks=[sharing, monitor]), model)
    assert {layer.name: layer.bits for layer in stats.layers}["net.2"] == 1


@pytest.mark.parametrize("monitor_first", [True, False])
def test_monitor_reports_bits_and_file_size(
    monitor_first: bool, tmp_path: Path, make_trainer, capsys
) -> None:
    """The monitor logs the codebook index widths while tied and the file's size; its fit-end table shows the
    file in either callback order (the export happens at train end, before any ``on_fit_end``)."""
    seed_everything(0)
    model = TinyModule()
    logger = CSVLogger(str(tmp_path), name="csv")
    sharing = WeightSharing(
        bits=3, layer_bits={"net.2": 2}, start_step=4, export_path=str(tmp_path / "m.lcdc")
    )
    monitor = CompressionMonitor(log_every_n_steps=2, histograms=False)
    callbacks = [monitor, sharing] if monitor_first else [sharing, monitor]
    make_trainer(callbacks=callbacks, max_epochs=2, logger=logger, log_every_n_steps=1).fit(model)
    size = (tmp_path / "m.lcdc").stat().st_size
    assert f"deep_compression: {size:,} B (artefact)" in capsys.readouterr().out
    rows = list(csv.DictReader(Path(logger.log_dir, "metrics.csv").open()))
    logged = [
        float(r["compression/size_bytes/deep_compression"])
        for r in rows
        if r.get("compression/size_bytes/deep_compression")
    ]
    assert logged == [float(size)]
    bits = {
        int(r["step"]): (r["compression/bits/net.0"], r["compression/bits/net.2"])
        for r in rows
        if r.get("compression/sparsity")
    }
    # a row logged at step s follows optimizer step s - 1; sharing happens before optimizer step 4
    assert all(b == ("", "") for step, b in bits.items() if step <= 4)
    tied = [b for step, b in bits.items() if step > 4]
    assert tied and all(b == ("3.0", "2.0") for b in tied)
    assert sharing.compression_sizes(model) == {"deep_compression": size}


def _fit(
    make_trainer, root: Path, extra: list[Any], ckpt_path: str | None = None
) -> tuple[TinyModule, WeightSharing]:
    seed_everything(0)
    model = _adam(TinyModule())
    sharing = WeightSharing(bits=3, start_step=7, init="density")
    pruning = GradualPruning(final_sparsity=0.7, start_step=0, end_step=6, update_every=3)
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(
        callbacks=[pruning, sharing, *extra, ckpt], max_epochs=4, enable_checkpointing=True
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    assert trainer.global_step == 32
    return model, sharing


@pytest.mark.ddp
def test_ddp_codebooks_identical_on_every_rank(tmp_path: Path) -> None:
    run_python(
        """
        import torch
        from lightning.pytorch import Trainer, seed_everything
        from lightning_compress import GradualPruning
        from lightning_compress.callbacks.weight_sharing import WeightSharing
        from tests.helpers import TinyModule

        if __name__ == "__main__":
            seed_everything(0)
            pruning = GradualPruning(final_sparsity=0.7, start_step=0, end_step=2, update_every=1)
            sharing = WeightSharing(bits=2, start_step=3, init="random", export_path="model.lcdc", verbose=False)
            trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                              callbacks=[pruning, sharing], enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False)
            model = TinyModule()
            trainer.fit(model)
            torch.save({"codebooks": sharing.codebooks, "assignments": sharing.assignments,
                        "weights": model.state_dict()}, f"rank{trainer.global_rank}.pt")
        """,
        cwd=tmp_path,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert set(r0["codebooks"]) == set(WEIGHTS)
    for fqn in WEIGHTS:
        assert torch.equal(r0["codebooks"][fqn], r1["codebooks"][fqn])
        assert torch.equal(r0["assignments"][fqn], r1["assignments"][fqn])
        assert torch.equal(r0["weights"][fqn], kmeans.expand(r0["codebooks"][fqn], r0["assignments"][fqn]))
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name])
    for name, value in load_compressed(tmp_path / "model.lcdc").items():
        assert torch.equal(value, r0["weights"][name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 0}, r"`bits` must be an integer in \[1, 8\], got 0"),
        ({"bits": 9}, r"`bits` must be an integer in \[1, 8\], got 9"),
        ({"bits": True}, r"`bits` must be an integer"),
        ({"layer_bits": {"net.0": 12}}, r"`layer_bits\['net.0'\]` must be an integer in \[1, 8\], got 12"),
        ({"layer_bits": ["net.0"]}, "`layer_bits` must map layer patterns"),
        ({"init": "kmeans++"}, "`init` must be one of"),
        ({"reduce": "max"}, "`reduce` must be one of"),
        ({"start_step": 3, "start_epoch": 1.0}, "not both"),
        ({"start_step": -1}, "`start_step` must be an integer >= 0"),
        ({"max_iter": 0}, "`max_iter` must be an integer >= 1"),
        ({"export_path": 3}, "`export_path` must be a non-empty string"),
        ({"targets": "net.0"}, "`targets` must be a list"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        WeightSharing(**kwargs)


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        (lambda: [WeightSharing(targets=["net.9"])], r"`targets`: pattern\(s\) \['net.9'\] match no layer"),
        (
            lambda: [WeightSharing(layer_bits={"net.7": 2})],
            r"`layer_bits`: pattern\(s\) \['net.7'\] match no",
        ),
        (
            lambda: [WeightSharing(start_step=16)],
            "puts weight sharing at optimizer step 16, but this run has only 16",
        ),
        (
            lambda: [
                GradualPruning(final_sparsity=0.9, start_step=0, end_step=10),
                WeightSharing(start_step=5),
            ],
            r"GradualPruning prunes .* until step 10 .* start sharing after step 10",
        ),
        (
            lambda: [WeightSharing(start_step=8), GradualPruning(final_sparsity=0.9, start_epoch=0)],
            "until step 8",
        ),  # default end: half the run; equal is too early
        (
            lambda: [WeightSharing(start_step=2, export_path=".", verbose=False)],
            r"`export_path` '\.' is a directory",
        ),  # found before training, not when writing the file at its end
    ],
)
def test_bad_configuration_fails_before_the_first_step(callbacks, message: str, make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        make_trainer(callbacks=callbacks(), max_epochs=2).fit(model)
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_pruning_of_other_layers_does_not_block(make_trainer) -> None:
    seed_everything(0)
    pruning = GradualPruning(final_sparsity=0.5, targets=["net.2"], start_step=0, end_step=12)
    sharing = WeightSharing(bits=2, targets=["net.0"], start_step=4)
    make_trainer(callbacks=[pruning, sharing], max_epochs=2).fit(TinyModule())
    assert set(sharing.codebooks) == {"net.0.weight"}


def test_a_failed_fit_releases_the_weights(make_trainer) -> None:
    """Lightning skips `teardown` when fit raises: the claims must be released so that the model can be refit."""
    from lightning_compress import claims

    class FailsAtFitStart(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            raise RuntimeError("another callback failed")

    model = TinyModule()
    with pytest.raises(RuntimeError, match="another callback failed"):
        make_trainer(callbacks=[WeightSharing(bits=2, start_step=1, verbose=False), FailsAtFitStart()]).fit(
            model
        )
    assert claims.claims(model) == {}
    sharing = WeightSharing(bits=2, start_step=1, verbose=False)
    make_trainer(callbacks=[sharing], max_epochs=1, limit_train_batches=3).fit(model)
    assert sharing.shared and all(len(cb) <= 4 for cb in sharing.codebooks.values())


def test_codes_round_trip_and_members() -> None:
    """Compact codes: uint8 with 255 unassigned up to 255 values, int16 with -1 for 256; members as int64."""
    from lightning_compress.callbacks._weight_sharing_parts import Ties, to_assignments, to_codes

    a = torch.tensor([[-1, 254], [0, -1]])
    codes = to_codes(a, 255)
    assert codes.dtype == torch.uint8 and codes.tolist() == [[255, 254], [0, 255]]
    assert torch.equal(to_assignments(codes), a) and to_codes(codes, 255) is codes
    wide = to_codes(torch.tensor([-1, 255, 0]), 256)
    assert wide.dtype == torch.int16 and to_assignments(wide).tolist() == [-1, 255, 0]
    small = to_codes(torch.tensor([[-1, 1], [0, -1], [1, 1]]), 2)
    positions, labels = Ties(small, 2, small).members
    assert positions.dtype == labels.dtype == torch.int64  # uint8 indices would be read as a mask
    assert (positions.tolist(), labels.tolist()) == ([1, 2, 4, 5], [1, 0, 1, 1])



@pytest.mark.parametrize("density", [0.1, 0.4, 0.9])
def test_ties_keep_the_members_of_a_sparse_weight_and_tie_alike(density: float) -> None:
    """At most half assigned: members kept (int32 positions, uint8 labels) and read directly; denser: derived from
    the codes at each use. Either way the gradient tie and the re-tie give what the int64 members give."""
    from lightning_compress.callbacks._weight_sharing_parts import Ties, to_codes
    from lightning_compress.functional import weight_sharing as ws

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 16, (40, 50), generator=g)
    a[torch.rand(40, 50, generator=g) >= density] = -1
    ties = Ties(to_codes(a, 16), 16, torch.empty(40, 50))
    kept = ties._kept is not None
    assert kept == (density < 0.5)
    if kept:
        assert ties._kept[0].dtype == torch.int32 and ties._kept[1].dtype == torch.uint8
        assert ties.held_bytes == 16 * 8 + 5 * int((a >= 0).sum())
    else:
        assert ties.held_bytes == 16 * 8
    positions, labels = ties.members
    assert positions.dtype == labels.dtype == torch.int64
    reference = ws.members(a)
    assert torch.equal(positions, reference[0]) and torch.equal(labels, reference[1])
    codebook = torch.randn(16, generator=g)
    assert torch.equal(ties.expand_(torch.empty(40, 50), codebook), ws.expand(codebook, a))
    grad = torch.randn(40, 50, generator=g)
    tied = ws.tie_gradient_(grad.clone(), *ties.members, 16)
    assert torch.equal(tied, ws.cluster_gradient(grad, a, 16))

def test_state_holds_codes_and_old_checkpoints_resume_alike(tmp_path: Path, make_trainer) -> None:
    """One byte per weight held and saved; a version-1 state (int64, -1 unassigned) resumes to the same weights."""
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pruning = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2)
    sharing = WeightSharing(bits=3, start_epoch=1)
    make_trainer(callbacks=[pruning, sharing, ckpt], max_epochs=2, enable_checkpointing=True).fit(TinyModule())
    assert all(a.dtype == torch.uint8 for a in sharing._assignments.values())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = saved["callbacks"][sharing.state_key]
    old = {**state, "version": 1, "assignments": dict(sharing.assignments)}  # int64, -1 for pruned weights
    assert any(bool((a < 0).any()) for a in old["assignments"].values())
    saved["callbacks"][sharing.state_key] = old
    torch.save(saved, tmp_path / "old.ckpt")
    finals = []
    for name in ("last.ckpt", "old.ckpt"):
        seed_everything(0)
        model = TinyModule()
        again = WeightSharing(bits=3, start_epoch=1)
        resumed = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2)
        make_trainer(callbacks=[resumed, again], max_epochs=3).fit(model, ckpt_path=str(tmp_path / name))
        assert all(torch.equal(again.assignments[f], sharing.assignments[f]) for f in WEIGHTS)
        assert all(a.dtype == torch.uint8 for a in again._assignments.values())  # converted on load
        finals.append(model.state_dict())
    for key, value in finals[0].items():
        assert torch.equal(finals[1][key], value), key


@pytest.mark.parametrize("k", [3, 256])
def test_ties_expand_matches_functional_expand(k: int) -> None:
    """The table lookup on uint8 codes (and the members path on int16 ones) writes exactly `kmeans.expand`."""
    from lightning_compress.callbacks._weight_sharing_parts import Ties, to_codes

    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.arange(k), torch.randint(-1, k, (1050 - k,), generator=g)]).reshape(-1, 7)
    codebook = torch.randn(k, generator=g, dtype=torch.float64)
    codes = to_codes(a, k)
    assert codes.dtype == (torch.uint8 if k < 256 else torch.int16)
    out = Ties(codes, k, codes).expand_(torch.full(a.shape, 9.0), codebook)
    assert torch.equal(out, kmeans.expand(codebook.float(), a))


class _AdamTiny(TinyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _PrunedGradients(Callback):
    """Listed after the sharing callback: whether any pruned entry reaches the optimizer with a gradient."""

    def __init__(self, sharing: WeightSharing) -> None:
        self.sharing, self.seen = sharing, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for fqn, codes in self.sharing._assignments.items():
            grad = pl_module.get_parameter(fqn).grad
            self.seen |= bool((grad[codes == 255] != 0).any())


def test_pruned_entries_keep_their_gradient_unless_clipping_and_the_shared_weights_train_alike(make_trainer) -> None:
    finals = {}
    for clip in (None, 1e9):  # a clip that never bites: the two runs differ only in the pruned entries' gradients
        seed_everything(0)
        model = _AdamTiny()
        sharing = WeightSharing(bits=3, start_step=4)
        seen = _PrunedGradients(sharing)
        pruning = GradualPruning(final_sparsity=0.6, start_step=0, end_step=2, update_every=1)
        make_trainer(callbacks=[pruning, sharing, seen], max_steps=12, gradient_clip_val=clip).fit(model)
        assert seen.seen == (clip is None)  # Adam is slower on exactly-zero moments: zeroed only for clipping
        finals[clip] = {k: v.clone() for k, v in model.state_dict().items()}
        for fqn, codes in sharing._assignments.items():
            assert bool((model.get_parameter(fqn)[codes == 255] == 0).all()), fqn  # re-tied to exactly zero
    for name, value in finals[None].items():
        torch.testing.assert_close(value, finals[1e9][name], rtol=1e-6, atol=1e-7, msg=name)
