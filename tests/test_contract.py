"""One contract for every callback (issue 9), in the spirit of timm's tests/test_models.py.

Every check below is parametrized over :data:`tests.contract_cases.CASES`; a new callback is covered by adding
one ``Case`` there. The checks:

- built from YAML through LightningCLI, and ``--print_config`` writes a config that parses to an equal callback;
- pickle, deepcopy and ``state_dict`` round trips after a fit;
- crash and resume: a fit SIGKILLed in a subprocess at several steps, resumed with ``ckpt_path="last"``, ends with
  the weights and compression state of an uninterrupted run (exactly), and the checkpoints written before the
  crash are intact and unchanged;
- DDP (2 CPU processes, gloo): every case reaches its own target, compression state identical on both ranks,
  callback metrics logged once;
- FSDP2 (``ModelParallelStrategy``, 2 CPU processes, gloo, the MLP sharded in ``configure_model``): every case
  reaches its own target (or refuses the sharded model in ``setup``, as its ``Case.fsdp`` says), both ranks hold the
  same full state, and it equals the one-process run on the same data (masks exactly, values to a stated
  tolerance); a fit killed with SIGKILL resumes from its sharded checkpoint directory to the uninterrupted result;
- composition: pruning + quantization + distillation + weight sharing + low-rank in one Trainer reach each
  target; every pair of callbacks on the same layers either trains to both targets, in either order, with the same
  result, or is refused before the first step;
- models of other shapes (several inputs, keyword arguments and a dict output; tied weights; frozen layers;
  ``bf16-mixed``): each callback works (and reaches its target) or refuses with a clear error;
- bad input (hypothesis): random argument values and random recipe edits either train or are refused before the
  first step (``ValueError``/``TypeError``, or the CLI parser's exit), and never leave an unreadable checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback, seed_everything

from lightning_compress import claims
from lightning_compress.cli import run_cli
from tests.contract_cases import (
    CASES,
    COMPOSED,
    COMPOSED_ORDER,
    COMPOSED_SHARDED,
    RUNS,
    STEPS_PER_EPOCH,
    Case,
    FrozenMLP,
    MultiInputNet,
    TiedNet,
    build,
    callbacks_for,
    case_by_name,
    fit,
    order_of,
    small_mlp,
    state_of,
    teacher_checkpoint,
)
from tests.helpers import REPO_ROOT

IDS = [c.name for c in CASES]
CRASH_STEPS = (2, 6, 10, 13)  # epoch-end checkpoints are at steps 4, 8 and 12; step 2 crashes before any
TOTAL_STEPS = 16


def _params(cases: list[Case], check: str) -> list[Any]:
    return [
        pytest.param(c, id=c.name, marks=pytest.mark.xfail(strict=True, reason=c.xfail[check]))
        if check in c.xfail
        else pytest.param(c, id=c.name)
        for c in cases
    ]


def _same(a: Any, b: Any, path: str = "") -> None:
    """Assert two nested states (dicts, lists, tensors, numbers) are exactly equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            path,
            sorted(a),
            sorted(b) if isinstance(b, dict) else b,
        )
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (path, a, b)


def _public(cb: Callback) -> dict[str, Any]:
    """The constructor arguments a callback keeps (public attributes), for comparing two instances.

    Lightning attaches the module's ``log``/``log_dict`` to every callback during fit; results of a run (an export
    report, a byte count, the last statistics) are not settings either.
    """
    skip = ("log", "log_dict", "report", "converted_bytes", "last_stats")
    return {k: v for k, v in vars(cb).items() if not k.startswith("_") and k not in skip}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contract")
    teacher_checkpoint(path)  # written once, before any subprocess
    return path


# -- YAML ----------------------------------------------------------------------------------------------
def _recipe(case: Case, workdir: Path, root: Path | None = None) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "max_epochs": 2,
            "limit_train_batches": STEPS_PER_EPOCH,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root or workdir),
            "accelerator": "cpu",
            "devices": 1,
            "callbacks": [{"class_path": case.class_path, "init_args": case.args(workdir)}],
        },
        "model": {
            "class_path": "lightning_compress.examples.DigitsMLP",
            "init_args": {"hidden_sizes": [16, 8]},
        },
        "data": {"class_path": "tests.contract_cases.ContractDigits"},
    }


def _from_cli(path: Path, case: Case) -> tuple[Any, Any]:
    cli = run_cli(["--config", str(path)], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, case.cls)]
    return cli, cb


@pytest.mark.parametrize("case", _params(CASES, "yaml"))
def test_built_from_yaml_and_print_config_round_trips(
    case: Case, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(case, workdir)))
    _, from_yaml = _from_cli(recipe, case)
    direct = build(case, workdir)
    _same(_public(from_yaml), _public(direct))

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--config", str(recipe), "--print_config"], run=False)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    written = yaml.safe_load(printed)
    (entry,) = [c for c in written["trainer"]["callbacks"] if c["class_path"] == case.class_path]
    for key, value in case.args(workdir).items():
        assert entry["init_args"][key] == value, key  # every setting written back, defaults beside them
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    _, reparsed = _from_cli(again, case)
    _same(_public(reparsed), _public(from_yaml))
    _same(reparsed.state_dict(), from_yaml.state_dict())


# -- pickle / deepcopy / state_dict --------------------------------------------------------------------
@pytest.mark.parametrize("case", _params(CASES, "pickle"))
def test_pickle_deepcopy_and_state_dict_round_trip(case: Case, workdir: Path, tmp_path: Path) -> None:
    cb = build(case, workdir)
    for clone in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb)):  # before fit
        _same(_public(clone), _public(cb))
    model, trainer = fit([cb], tmp_path, checkpoints=False)
    case.verify(cb, model, trainer)
    state = cb.state_dict()
    assert isinstance(state.get("version"), int), "state_dict carries a version"
    assert pickle.loads(pickle.dumps(state)) is not None
    for clone in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb)):  # after fit
        _same(_public(clone), _public(cb))
        _same(clone.state_dict(), state)
    fresh = build(case, workdir)
    fresh.load_state_dict(copy.deepcopy(state))
    _same(fresh.state_dict(), state)
    build(case, workdir).load_state_dict({})  # a state from an older version (no keys) still loads
    with pytest.raises(ValueError, match="newer than this code knows"):  # one from a newer version is refused
        build(case, workdir).load_state_dict({**copy.deepcopy(state), "version": state["version"] + 1})


# -- crash and resume ----------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def crashed(workdir: Path) -> dict[str, Any]:
    """Every run killed with SIGKILL at every crash step, in one worker subprocess (a forked child per fit)."""
    jobs = [f"{run}:{s}" for run in RUNS for s in CRASH_STEPS]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.contract_worker", str(workdir), *jobs],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / "crashes.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# check -> reason, for a known failure of the composed run (strict, as `Case.xfail`)
COMPOSED_XFAIL: dict[str, str] = {}


def _run_params(check: str) -> list[Any]:
    composed = (
        pytest.param(COMPOSED, id=COMPOSED, marks=pytest.mark.xfail(strict=True, reason=COMPOSED_XFAIL[check]))
        if check in COMPOSED_XFAIL
        else pytest.param(COMPOSED, id=COMPOSED)
    )
    sharded = [pytest.param(COMPOSED_SHARDED, id=COMPOSED_SHARDED)] if check == "fsdp" else []
    return [*_params(CASES, check), composed, *sharded]


@pytest.fixture(scope="module")
def straight(workdir: Path) -> Any:
    """``straight(run)``: the uninterrupted one-process run's full state and weights (fitted once, on first use,
    after checking every case's own target)."""
    cache: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in cache:
            callbacks = callbacks_for(name, workdir)
            model, trainer = fit(callbacks, workdir / f"{name}-straight", checkpoints=False)
            for case_name, cb in zip(order_of(name), callbacks, strict=True):
                case_by_name(case_name).verify(cb, model, trainer)  # every target reached
            state = {k: v.detach().clone() for k, v in state_of(name, callbacks, model).items()}
            assert state, "the run reads no state"
            cache[name] = {"state": state, "model": {k: v.clone() for k, v in model.state_dict().items()}}
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("run", _run_params("crash"))
def test_sigkill_then_resume_equals_uninterrupted_run(
    run: Any, workdir: Path, crashed: dict[str, Any], straight: Any
) -> None:
    name = run if isinstance(run, str) else run.name
    expected = straight(name)
    for step in CRASH_STEPS:
        assert crashed[f"{name}:{step}"] == signal.SIGKILL, f"step {step}: {crashed[f'{name}:{step}']}"
        out = workdir / f"{name}-{step}"
        saved_steps = [s for s in range(STEPS_PER_EPOCH, step + 1, STEPS_PER_EPOCH)]
        files = {f"epoch={s // STEPS_PER_EPOCH - 1}-step={s}.ckpt" for s in saved_steps}
        found = {p.name for p in (out / "ckpt").glob("*")} if (out / "ckpt").exists() else set()
        assert found == (files | {"last.ckpt"} if files else set()), (step, found)  # nothing half-written
        before = {}
        for file in found:  # everything written before the crash loads, at the step its name says
            ckpt = torch.load(out / "ckpt" / file, map_location="cpu", weights_only=False)
            written = max(saved_steps) if file == "last.ckpt" else int(file[:-5].split("=")[-1])
            assert ckpt["global_step"] == written
            for cb in callbacks_for(name, workdir):
                assert any(k.startswith(type(cb).__name__) for k in ckpt["callbacks"]), list(
                    ckpt["callbacks"]
                )
            before[file] = _sha(out / "ckpt" / file)

        callbacks = callbacks_for(name, workdir)
        model, trainer = fit(callbacks, out, ckpt_path="last")
        assert trainer.global_step == TOTAL_STEPS
        for case_name, cb in zip(order_of(name), callbacks, strict=True):
            case_by_name(case_name).verify(cb, model, trainer)
        for file, digest in before.items():
            if file != "last.ckpt":
                assert _sha(out / "ckpt" / file) == digest, f"{file} changed by the resumed run"
        _same(state_of(name, callbacks, model), expected["state"], f"state after crash at {step}")
        _same(model.state_dict(), expected["model"], f"weights after crash at {step}")


def _cli_recipe(workdir: Path, kill_at: int | None = None) -> dict[str, Any]:
    """The pruning case as a user's recipe: the CLI's own TensorBoard logger and Lightning's default
    checkpointing (no ``dirpath``: checkpoints go to the logger's ``version_<n>/checkpoints``)."""
    recipe = _recipe(case_by_name("pruning"), workdir, root=Path("."))
    trainer = recipe["trainer"]
    del trainer["logger"]
    trainer.update(max_epochs=TOTAL_STEPS // STEPS_PER_EPOCH, deterministic=True)
    trainer["callbacks"].append(
        {
            "class_path": "lightning_compress.CompressionMonitor",
            "init_args": {"log_every_n_steps": 2, "print_table": False},
        }
    )
    if kill_at is not None:
        trainer["callbacks"].append(
            {"class_path": "tests.helpers.StopAt", "init_args": {"step": kill_at, "action": "kill"}}
        )
    recipe["model"]["init_args"]["lr"] = 0.01
    recipe["test_after_fit"] = False
    return recipe


@pytest.mark.slow
def test_cli_sigkill_then_resume_last_equals_uninterrupted_run(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lightning-compress fit --config R` killed with SIGKILL, then `... --ckpt_path last` from the same folder,
    resumes where the killed run wrote (same `version_<n>` folder, latest checkpoint) and ends equal to a straight
    run."""
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    for path in (straight_dir, run_dir):
        path.mkdir()
        (path / "recipe.yaml").write_text(yaml.safe_dump(_cli_recipe(workdir)))
    (run_dir / "crash.yaml").write_text(yaml.safe_dump(_cli_recipe(workdir, kill_at=10)))
    monkeypatch.chdir(straight_dir)
    straight = run_cli(["fit", "--config", "recipe.yaml"])
    assert straight.trainer.global_step == TOTAL_STEPS

    proc = subprocess.run(
        [sys.executable, "-m", "lightning_compress.cli", "fit", "--config", "crash.yaml"],
        cwd=run_dir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    written = sorted(
        p.name for p in (run_dir / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    )
    assert written == ["epoch=1-step=8.ckpt"], written  # what the killed run left

    monkeypatch.chdir(run_dir)
    resumed = run_cli(["fit", "--config", "recipe.yaml", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == TOTAL_STEPS
    assert [p.name for p in (run_dir / "lightning_logs").iterdir()] == ["version_0"], (
        "resumed in a new folder"
    )
    (straight_cb,) = [c for c in straight.trainer.callbacks if type(c).__name__ == "GradualPruning"]
    (resumed_cb,) = [c for c in resumed.trainer.callbacks if type(c).__name__ == "GradualPruning"]
    _same(resumed_cb.state_dict(), straight_cb.state_dict(), "pruning state")
    _same(resumed.model.state_dict(), straight.model.state_dict(), "weights")


class RaiseAt(Callback):
    """Raises at the end of optimizer step ``step`` (after every case's compression has started)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("fit failed")


def _modes(model: torch.nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    grads = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    return grads, {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("run", _run_params("exception"))
def test_a_fit_that_raises_restores_requires_grad_and_train_eval_mode(
    run: Any, workdir: Path, tmp_path: Path
) -> None:
    """README: a fit that raises leaves the model as it was. The model enters the fit in eval mode with one
    parameter frozen; every layer that still has its name afterwards has its mode and `requires_grad` back
    (a factorized layer's new parts take the mode of the layer they replace)."""
    name = run if isinstance(run, str) else run.name
    model = small_mlp()
    model.eval()
    model.net[3].bias.requires_grad_(False)
    grads, modes = _modes(model)
    with pytest.raises(RuntimeError, match="fit failed"):
        fit([*callbacks_for(name, workdir), RaiseAt(11)], tmp_path, model=model, checkpoints=False)
    after_grads, after_modes = _modes(model)
    assert {n: g for n, g in after_grads.items() if n in grads} == {
        n: grads[n] for n in after_grads if n in grads
    }
    assert all(not training for training in after_modes.values()), [n for n, t in after_modes.items() if t]
    assert grads["net.3.bias"] is False and any(not g for g in after_grads.values())


# -- DDP -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_runs(workdir: Path) -> Path:
    out = workdir / "ddp"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.contract_ddp", str(workdir)],
        cwd=out,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return workdir


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("run", _run_params("ddp"))
def test_ddp_state_identical_on_both_ranks_and_logged_once(run: Any, ddp_runs: Path, straight: Any) -> None:
    name = run if isinstance(run, str) else run.name
    r0, r1 = (torch.load(ddp_runs / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["verified"], r1["verified"]) == (None, None), "a target was not reached"  # before any comparison
    assert r0["state"], "the run reads no state"
    _same(r0["state"], r1["state"])
    _same(r0["model"], r1["model"])
    expected = straight(name)  # each rank saw half of every one-process batch: the same run as one process
    logged = "monitor/last_logged_step"
    _close({k: v for k, v in r0["state"].items() if k != logged},
           {k: v for k, v in expected["state"].items() if k != logged}, "DDP state vs one process")
    _close(r0["model"], expected["model"], "DDP weights vs one process")
    calls = [json.loads((ddp_runs / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
    direct = ("compression/", "lowrank/")  # keys the callbacks hand to the loggers themselves
    assert not [keys for _, keys in calls[1] if any(k.startswith(direct) for k in keys)], "logged from rank 1"
    seen: set[tuple[int, str]] = set()
    for step, keys in calls[0]:
        for key in keys:
            assert (step, key) not in seen, f"{key} logged twice at step {step}"
            seen.add((step, key))
    if name in ("monitor", COMPOSED):
        assert any(k == "compression/sparsity" for _, keys in calls[0] for k in keys)


# -- FSDP2 ---------------------------------------------------------------------------------------------
FSDP_TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # measured: 1-3e-7 after one step (the gradients reduced in halves)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fsdp_runs(workdir: Path) -> dict[str, Any]:
    """Two launches of ``tests.contract_fsdp``: every run (its last fit SIGKILLed at step ``KILL_AT``), then the
    killed fit resumed from its sharded checkpoint directory. Returns what the killed fit left and how its
    epoch-end checkpoints looked before and after the resume."""
    from tests.contract_fsdp import RESUME_FROM

    ended = {}
    for mode in ("rows", "resume"):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.contract_fsdp", str(workdir), mode],
            cwd=workdir,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        ended[mode] = (proc.returncode, proc.stdout[-2000:] + proc.stderr[-6000:])
        if mode == "rows":
            ckpt = workdir / "fsdp" / "kill" / "ckpt"
            left = sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []
            before = _files(ckpt / RESUME_FROM) if (ckpt / RESUME_FROM).exists() else {}
    after = _files(workdir / "fsdp" / "kill" / "ckpt" / RESUME_FROM)
    return {"ended": ended, "left": left, "before": before, "after": after}


def _load_ranks(root: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = (torch.load(root / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1))
    return r0, r1


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Same keys; bool and integer tensors (masks, assignments, integer weights) equal, floats within
    :data:`FSDP_TOLERANCE`."""
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b)))
    for k in a:
        x, y = a[k].detach().cpu(), b[k].detach().cpu()
        assert x.shape == y.shape and x.dtype == y.dtype, (what, k, x.shape, y.shape, x.dtype, y.dtype)
        if x.dtype == torch.bool or not x.is_floating_point():
            assert torch.equal(x, y), (what, k, int((x != y).sum()))
        else:
            torch.testing.assert_close(x, y, **FSDP_TOLERANCE, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("run", _run_params("fsdp"))
def test_fsdp2_row_reaches_targets_and_equals_the_one_process_run(
    run: Any, fsdp_runs: dict[str, Any], workdir: Path, straight: Any
) -> None:
    name = run if isinstance(run, str) else run.name
    assert fsdp_runs["ended"]["rows"][0] == -signal.SIGKILL, fsdp_runs["ended"]["rows"][1]
    r0, r1 = _load_ranks(workdir / "fsdp", name)
    cases = [case_by_name(n) for n in order_of(name)]
    refusing = [c for c in cases if c.fsdp == "refuses"]
    if refusing:  # refused in setup, before the first step, naming the callback and the strategy
        for r in (r0, r1):
            assert r["error"] and r["error"].startswith("ValueError"), r["error"]
            assert "ModelParallelStrategy" in r["error"], r["error"]
            assert any(c.cls.__name__ in r["error"] for c in refusing), r["error"]
        return
    assert (r0["error"], r1["error"]) == (None, None), r0["error"] or r1["error"]
    assert r0["steps"] == r1["steps"] == TOTAL_STEPS
    assert (r0["verified"], r1["verified"]) == (None, None), r0["verified"] or r1["verified"]  # targets first
    assert r0["state"], "the run reads no state"
    _same(r0["state"], r1["state"], "state of rank 0 vs rank 1")
    _same(r0["model"], r1["model"], "weights of rank 0 vs rank 1")
    expected = straight(name)
    logged = "monitor/last_logged_step"  # the FSDP runs have a logger (as users do), the one-process one has none
    assert int(r0["state"][logged] if logged in r0["state"] else TOTAL_STEPS) == TOTAL_STEPS
    _close(
        {k: v for k, v in r0["state"].items() if k != logged},
        {k: v for k, v in expected["state"].items() if k != logged},
        "state vs one process",
    )
    _close(r0["model"], expected["model"], "weights vs one process")
    for key, mask in expected["state"].items():  # the final sparsity, stated on its own
        if mask.dtype == torch.bool:
            assert float((~r0["state"][key]).float().mean()) == float((~mask).float().mean()), key


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_sigkill_then_resume_from_the_sharded_checkpoint_equals_uninterrupted_run(
    fsdp_runs: dict[str, Any], workdir: Path
) -> None:
    from tests.contract_fsdp import RESUME_FROM, RESUMED

    assert fsdp_runs["ended"]["rows"][0] == -signal.SIGKILL, fsdp_runs["ended"]["rows"][1]
    assert fsdp_runs["ended"]["resume"][0] == 0, fsdp_runs["ended"]["resume"][1]
    assert fsdp_runs["left"] == ["epoch=0-step=4.ckpt", RESUME_FROM, "last.ckpt"], fsdp_runs["left"]
    assert any(f.endswith(".distcp") for f in fsdp_runs["before"]), fsdp_runs["before"]  # a sharded directory
    assert fsdp_runs["after"] == fsdp_runs["before"], "the resumed run changed the checkpoint it resumed from"
    uninterrupted = _load_ranks(workdir / "fsdp", RESUMED)
    resumed = _load_ranks(workdir / "fsdp", "resume")
    for rank, (r, u) in enumerate(zip(resumed, uninterrupted, strict=True)):
        assert r["error"] is None, r["error"]
        assert r["steps"] == TOTAL_STEPS
        assert r["verified"] is None and u["verified"] is None, r["verified"] or u["verified"]
        _same(r["state"], u["state"], f"state of rank {rank}")
        _same(r["model"], u["model"], f"weights of rank {rank}")


# -- composition ---------------------------------------------------------------------------------------
COMPOSED_STEPS = 128  # 8 epochs of 16 batches of 64 digits


def _all_five(workdir: Path, order: list[str], teacher: str | None = None) -> list[Callback]:
    """Every method on a 64-32-16-10 digits MLP, each on the layers it may share with the others:
    net.3 factorized at step 0 (rank 8 of 16), its factors and net.5 fake-quantized to 8 bits from step 32,
    net.1 and net.5 pruned to 80% by step 64, net.1 shared to 16 values at step 80, a trained teacher."""
    spec = {"class_path": "lightning_compress.examples.DigitsMLP", "init_args": {"hidden_sizes": [64]}}
    kd = {} if teacher is None else {"teacher": spec, "teacher_checkpoint": teacher, "feature_pairs": None}
    made = {
        "low_rank": build(case_by_name("low_rank"), workdir, start_step=0, targets=["net.3"], rank_ratio=0.5),
        "pruning": build(
            case_by_name("pruning"),
            workdir,
            targets=["net.1", "net.5"],
            final_sparsity=0.8,
            layer_sparsity={"net.5": 0.5},  # the 16x10 output layer has little to spare
            start_step=0,
            end_step=64,
            update_every=8,
        ),
        "weight_sharing": build(
            case_by_name("weight_sharing"), workdir, targets=["net.1"], bits=4, start_step=80
        ),
        "quantization": build(
            case_by_name("quantization"),
            workdir,
            targets=["net.5", "net.3.down", "net.3.up"],
            weight_bits=8,
            learn_scale=False,
            start_step=32,
        ),
        "distillation": build(case_by_name("distillation"), workdir, alpha=0.5, **kd),
        "monitor": build(case_by_name("monitor"), workdir),
    }
    return [made[n] for n in order]


def _composed_fit(callbacks: list[Callback], run: Path, seed: int = 0) -> tuple[Any, Any]:
    from lightning_compress.examples import DigitsMLP
    from tests.contract_cases import ContractDigits

    seed_everything(seed, verbose=False)  # the model is built here, before `fit` seeds again
    return fit(
        callbacks,
        run,
        model=DigitsMLP(hidden_sizes=[32, 16], lr=0.01),
        data=ContractDigits(n_train=1024, n_val=512, batch_size=64),
        checkpoints=False,
        max_epochs=8,
        limit_train_batches=None,
        limit_val_batches=None,
        seed=seed,
    )


@pytest.mark.slow
def test_all_callbacks_in_one_trainer_reach_their_targets_in_any_order_that_is_allowed(
    workdir: Path, tmp_path: Path
) -> None:
    from lightning_compress.examples import DigitsMLP
    from tests.contract_cases import ContractDigits

    seed_everything(0, verbose=False)  # the teacher is built before `fit` seeds
    teacher, _ = fit(
        [],
        tmp_path / "teacher",
        model=DigitsMLP(hidden_sizes=[64], lr=0.01),
        data=ContractDigits(n_train=1024, n_val=512, batch_size=64),
        checkpoints=False,
        max_epochs=8,
        limit_train_batches=None,
    )
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    _, dense = _composed_fit([], tmp_path / "dense")
    dense_acc = float(dense.callback_metrics["val/acc"])
    results = []
    for order in (
        COMPOSED_ORDER,
        ["monitor", "distillation", "low_rank", "quantization", "weight_sharing", "pruning"],
    ):
        callbacks = _all_five(workdir, order, teacher=str(tmp_path / "teacher.pt"))
        model, trainer = _composed_fit(callbacks, tmp_path / str(len(results)))
        assert trainer.global_step == COMPOSED_STEPS
        named = dict(zip(order, callbacks, strict=True))
        for name, cb in named.items():
            case_by_name(name).verify(cb, model, trainer)
        for layer, sparsity in (("net.1", 0.8), ("net.5", 0.5)):
            assert float((~named["pruning"].masks[f"{layer}.weight"]).float().mean()) == pytest.approx(
                sparsity, abs=0.01
            )
        weight = model.get_submodule("net.1").weight.detach()
        assert float((weight == 0).float().mean()) >= 0.79  # the pruned zeros stay zero through sharing
        assert len(torch.unique(weight[weight != 0])) <= 16
        assert named["low_rank"].layers["net.3"]["rank"] == 8
        assert (
            type(model.get_submodule("net.3.down")).__name__ == "Int8Linear"
        )  # factors quantized, converted
        accuracy = float(
            trainer.callback_metrics["val/acc"]
        )  # measured, 3 seeds: 87.2 +- 0.9% vs 92.4 +- 0.9%
        assert accuracy >= 0.8 and accuracy >= dense_acc - 0.1, (accuracy, dense_acc)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    _same(results[0], results[1])  # the order of the list changed nothing


def test_factorize_before_quantize_is_the_order_that_matters(workdir: Path, tmp_path: Path) -> None:
    quantize_first = ["quantization", "low_rank", "pruning"]
    with pytest.raises(ValueError, match="net.3.down"):  # QAT's setup runs before the factors exist
        fit(_all_five(workdir, quantize_first), tmp_path, checkpoints=False)
    quantize_all = build(case_by_name("quantization"), workdir)
    factorize = build(case_by_name("low_rank"), workdir, start_step=0)
    with pytest.raises(ValueError, match="cannot be factorized: it is a QATLinear"):
        fit([quantize_all, factorize], tmp_path, checkpoints=False)


def _refused(a: Case, b: Case) -> bool:
    """Whether callbacks ``a`` then ``b`` (in this order) on the same layers must be refused before training."""
    if (a.name, b.name) == ("distillation", "slimmable"):
        return True  # feature hints on slimmed layers: SlimmableTraining must be listed first
    if a.kind is None or b.kind is None:
        return a is b and a.name in ("monitor", "distillation")  # the same state_key twice
    if a is b:
        return True
    pair = frozenset({a.kind, b.kind})
    # prune + share is allowed only when pruning ends before sharing starts; the cases overlap (end 10, start 6)
    return pair not in claims.COMPATIBLE or pair == frozenset({"prune", "share"})


PAIRS = list(itertools.combinations_with_replacement(CASES, 2))


@pytest.mark.parametrize("a,b", [pytest.param(a, b, id=f"{a.name}+{b.name}") for a, b in PAIRS])
def test_every_pair_on_the_same_layers_composes_or_is_refused(
    a: Case, b: Case, workdir: Path, tmp_path: Path
) -> None:
    finals = []
    for first, second in ((a, b), (b, a)):
        cbs = [build(first, workdir), build(second, workdir)]
        if _refused(first, second):
            with pytest.raises((ValueError, RuntimeError)) as err:
                fit(cbs, tmp_path, checkpoints=False)
            assert isinstance(err.value, ValueError) or "state_key" in str(err.value), err.value
            continue
        model, trainer = fit(cbs, tmp_path, checkpoints=False)
        first.verify(cbs[0], model, trainer)
        second.verify(cbs[1], model, trainer)
        finals.append(model.state_dict())
    if len(finals) == 2:
        _same(finals[0], finals[1])


# -- models of other shapes ----------------------------------------------------------------------------
SHAPES = ["multi_input_dict", "tied", "tied_targeted", "frozen", "bf16"]
# (case, shape) -> a fragment of the error that refuses it; every other combination must train to its target.
# Tied weights: pruning and sharing act on the parameter itself (both uses see it); quantizing or factorizing one
# module would untie it, so those skip tied layers by default and refuse them when named in `targets`.
REFUSED = {
    ("low_rank", "tied_targeted"): "tied to \\['embed'\\]",
    ("quantization", "tied_targeted"): "tied to \\['embed'\\]",
    (
        "slimmable",
        "multi_input_dict",
    ): "no hidden layer whose width can change",  # the forward scales its hidden
}
SHAPE_CASES = [
    (c, s)
    for c in CASES
    for s in SHAPES
    if s != "tied_targeted" or "targets" in inspect.signature(c.cls).parameters
]


def _shape_run(case: Case, shape: str, workdir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    seed_everything(0, verbose=False)  # the model is built here, before `fit` seeds again
    overrides: dict[str, Any] = {}
    trainer_kwargs: dict[str, Any] = {}
    model: Any = None
    if case.name == "low_rank":
        overrides["targets"] = None
    if shape == "multi_input_dict":
        model = MultiInputNet()
        if case.name == "distillation":
            overrides.update(
                teacher={"class_path": "tests.contract_cases.MultiInputNet"},
                teacher_checkpoint=None,
                feature_pairs={"enc_a": "enc_a"},
                student_output="logits",
                teacher_output="logits",
            )
    elif shape in ("tied", "tied_targeted"):
        model = TiedNet()
        if shape == "tied_targeted":
            overrides["targets"] = ["out"]
        if case.name == "distillation":
            overrides.update(
                teacher={"class_path": "tests.contract_cases.TiedNet"},
                teacher_checkpoint=None,
                feature_pairs=None,
            )
    elif shape == "frozen":
        model = FrozenMLP()
    else:
        trainer_kwargs["precision"] = "bf16-mixed"
    return model, overrides, trainer_kwargs


@pytest.mark.parametrize("case,shape", [pytest.param(c, s, id=f"{c.name}-{s}") for c, s in SHAPE_CASES])
def test_models_of_other_shapes_work_or_are_refused(
    case: Case, shape: str, workdir: Path, tmp_path: Path
) -> None:
    model, overrides, trainer_kwargs = _shape_run(case, shape, workdir)
    cb = build(case, workdir, **overrides)
    if (case.name, shape) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[case.name, shape]):
            fit([cb], tmp_path, model=model, checkpoints=False, **trainer_kwargs)
        return
    frozen_before = model.net[1].weight.detach().clone() if shape == "frozen" else None
    model, trainer = fit([cb], tmp_path, model=model, checkpoints=False, **trainer_kwargs)
    assert trainer.global_step == TOTAL_STEPS
    case.verify(cb, model, trainer)
    if shape.startswith("tied"):
        assert model.out.weight is model.embed.weight, "the tie was broken"
    if (
        frozen_before is not None and case.name != "quantization"
    ):  # QAT converts the frozen layer to integers too
        assert torch.equal(model.net[1].weight, frozen_before), "a frozen layer changed"


# -- bad input (property-based) ------------------------------------------------------------------------
_PATTERNS = ["net.1", "net.3", "net.5", "net.*", "re:net\\.[13]", "re:(", "", "nope", "net.0"]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(0, 16),  # plausible steps, bits, ranks: more inputs get past validation and train
    st.floats(0, 1),  # plausible sparsities, ratios, alphas
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(
        [
            0,
            1,
            2,
            3,
            4,
            8,
            0.0,
            0.5,
            0.99,
            1.0,
            1.5,
            "",
            "cubic",
            "linear",
            "one_shot",
            "structured",
            "layer",
            "per_tensor",
            "power_of_two",
            "sum",
            "density",
            "net.1",
            "nope",
        ]
    ),
    st.lists(st.sampled_from(_PATTERNS), max_size=3),
    st.dictionaries(
        st.sampled_from(_PATTERNS),
        st.one_of(st.integers(-2, 9), st.floats(-1, 2), st.sampled_from(["net.1", "net.3"])),
        max_size=2,
    ),
    st.text(max_size=4),
)


class _Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps = trainer.global_step


def _checkpoints_readable(root: Path) -> None:
    for path in root.rglob("*.ckpt"):
        torch.load(path, map_location="cpu", weights_only=False)  # raises on a half-written file
    assert not [p for p in root.rglob("*") if p.suffix in (".tmp", ".part")]


def _train_or_refuse(make: Any, run: Path) -> None:
    """``make()`` builds the callback; it must train, or be refused before the first optimizer step.

    Runs with ``run`` as the working directory: a random relative path (e.g. an ``export_path``) lands there.
    """
    steps = _Steps()
    home = os.getcwd()
    os.chdir(run)
    try:
        try:
            cb = make()
        except (ValueError, TypeError, SystemExit) as err:
            assert not isinstance(err, SystemExit) or err.code not in (0, None)
            event(f"refused when built ({type(err).__name__})")
            return
        try:
            fit([cb, steps], run, max_epochs=2)
        except (ValueError, TypeError, FileNotFoundError) as err:  # the last: a path that names no file
            assert steps.steps == 0, f"refused after {steps.steps} steps: {err}"
            event(f"refused before the first step ({type(err).__name__})")
        else:
            assert steps.steps > 0
            event("trained")
        _checkpoints_readable(run)
    finally:
        os.chdir(home)


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(CASES, "bad_arguments"))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_arguments_train_or_are_refused_before_the_first_step(
    case: Case, workdir: Path, data: Any
) -> None:
    names = [n for n in inspect.signature(case.cls).parameters]
    keys = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="arguments")
    overrides = {k: data.draw(VALUES, label=k) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        _train_or_refuse(lambda: build(case, workdir, **overrides), Path(tmp))


_LAYERS = ["net.1", "net.3", "net.5"]


def _plausible(annotation: Any) -> st.SearchStrategy[Any] | None:
    """Values of the argument's own type, in ranges a user might write (``None``: leave the argument alone)."""
    import types
    import typing
    from collections.abc import Sequence

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        inner = [_plausible(a) for a in args if a is not type(None)]
        if any(x is None for x in inner):
            return None
        return st.one_of(st.none(), *inner) if type(None) in args else st.one_of(*inner)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(0, 20)
    if annotation is float:
        return st.one_of(st.floats(0, 1.5), st.sampled_from([0.0, 0.5, 0.99, 1.0, 4.0]))
    if annotation is str:
        return st.sampled_from(["", *_LAYERS, "logits"])
    if origin is list and args == (str,):
        return st.lists(
            st.sampled_from([*_LAYERS, "net.*", "re:net\\.[13]"]), min_size=1, max_size=2, unique=True
        )
    if origin in (Sequence, list) and args == (float,):
        return st.lists(st.sampled_from([0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=3, unique=True)
    if origin is dict and args[0] is str and args[1] in (int, float, str):
        values = {int: st.integers(1, 8), float: st.floats(0, 0.99), str: st.sampled_from(_LAYERS)}[args[1]]
        return st.dictionaries(st.sampled_from(_LAYERS), values, min_size=1, max_size=2)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(CASES, "plausible_arguments"))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_plausible_settings_train_or_are_refused_before_the_first_step(
    case: Case, workdir: Path, data: Any
) -> None:
    """Values of each argument's own type: more of them pass validation, so more runs train to the end."""
    import typing

    hints = typing.get_type_hints(case.cls.__init__)
    strategies = {
        n: s for n in inspect.signature(case.cls).parameters if (s := _plausible(hints.get(n))) is not None
    }
    keys = data.draw(st.lists(st.sampled_from(sorted(strategies)), min_size=1, max_size=4, unique=True))
    overrides = {k: data.draw(strategies[k], label=k) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        _train_or_refuse(lambda: build(case, workdir, **overrides), Path(tmp))


_EDITS = ("set", "delete", "unknown", "class_path")


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(CASES, "bad_yaml"))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_recipe_edits_train_or_are_refused_before_the_first_step(
    case: Case, workdir: Path, data: Any
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        recipe = _recipe(case, workdir, root=run)
        init_args = recipe["trainer"]["callbacks"][0]["init_args"]
        edit = data.draw(st.sampled_from(_EDITS), label="edit")
        if edit == "set":
            key = data.draw(st.sampled_from(list(inspect.signature(case.cls).parameters)), label="key")
            init_args[key] = data.draw(
                VALUES.filter(lambda v: not (isinstance(v, float) and math.isnan(v))), label="value"
            )
        elif edit == "delete" and init_args:
            init_args.pop(data.draw(st.sampled_from(sorted(init_args)), label="key"))
        elif edit == "unknown":
            init_args[data.draw(st.sampled_from(["bogus", "finalsparsity", "bits_"]), label="key")] = 1
        else:
            recipe["trainer"]["callbacks"][0]["class_path"] = case.class_path + "X"
        path = run / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))

        def make() -> Any:
            cli = run_cli(["--config", str(path)], run=False)
            (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, case.cls)]
            return cb

        _train_or_refuse(make, run)


# -- coverage of the list ------------------------------------------------------------------------------
def test_every_callback_of_the_package_has_a_case() -> None:
    """A callback module added to lightning_compress/callbacks/ fails here until it joins CASES."""
    import importlib
    import pkgutil

    import lightning_compress.callbacks as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Callback) and obj.__module__ == module.__name__:
                if not name.startswith("_"):
                    found.add(f"{module.__name__}.{name}")
    assert found, "no callbacks found"
    assert found <= {c.class_path for c in CASES}, sorted(found - {c.class_path for c in CASES})


RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", [  # the MiniLM recipes load the 22.7M-parameter model: slow
    pytest.param(r, id=r.stem, marks=[pytest.mark.slow] if r.stem.startswith("minilm_") else []) for r in RECIPES
])
def test_every_recipe_prints_a_config_that_builds_the_same_callbacks(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--config", str(recipe), "--trainer.logger=false"]
    first = run_cli(args, run=False).trainer.callbacks
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli([*args, "--print_config"], run=False)
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = run_cli(["--config", str(printed)], run=False).trainer.callbacks
    ours = [(type(c), _public(c)) for c in first if type(c).__module__.startswith("lightning_compress")]
    assert ours or "baseline" in recipe.stem or "teacher" in recipe.stem
    theirs = [(type(c), _public(c)) for c in again if type(c).__module__.startswith("lightning_compress")]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        _same(a, b)
