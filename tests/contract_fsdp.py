"""FSDP2 half of the contract: every case fits under ``ModelParallelStrategy`` (2 CPU processes, gloo) on the
contract MLP sharded in ``configure_model`` (:class:`tests.contract_cases.ShardedMLP`).

Run as ``python -m tests.contract_fsdp WORKDIR rows`` or ``python -m tests.contract_fsdp WORKDIR resume``; Lightning
starts the second process by running the same command.

- ``rows``: every run (every case, then all of them in one Trainer) in turn, each rank getting half of every global
  batch; per run and rank it writes ``WORKDIR/fsdp/<run>-rank<r>.pt``: ``{"state": ..., "model": ..., "verified":
  ..., "error": ...}`` with the run's compression state and the model's weights as FULL tensors (DTensors and
  rank-local pieces gathered), ``verified`` ``None`` once every case's own ``verify`` passed (else the assertion's
  text) and ``error`` the exception that ended the fit (``None`` if it ended). Then it fits the pruning case with
  epoch-end checkpoints (directories: DCP shards plus rank zero's metadata) in ``WORKDIR/fsdp/kill/ckpt`` and kills
  both processes with SIGKILL at the end of step :data:`KILL_AT`.
- ``resume``: resumes that fit from its last epoch-end checkpoint directory and writes ``resume-rank<r>.pt``.

Example:
    >>> KILL_AT, RESUME_FROM
    (10, 'epoch=1-step=8.ckpt')
"""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

__all__ = ["KILL_AT", "RESUMED", "RESUME_FROM", "main", "verify_all"]

KILL_AT = 10  # after the epoch-end checkpoint at step 8, two steps before the last mask update of pruning (1, 4, 7, 10)
RESUME_FROM = "epoch=1-step=8.ckpt"
RESUMED = "pruning"


def _strategy() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    # a rank left waiting in a collective (the other one failed) errors out after 2 minutes instead of 30
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=120))


def _fit(run: str, workdir: Path, out: Path, **kwargs: Any) -> tuple[Any, Any, Any]:
    from tests.contract_cases import BATCH, ContractDigits, ShardedMLP, callbacks_for, fit
    from tests.contract_ddp import RecordingLogger

    callbacks = callbacks_for(run, workdir)
    model, trainer = fit(
        [*callbacks, *kwargs.pop("extra", [])],
        out,
        logger=RecordingLogger(),  # a logger, as users have: rank zero logs what every rank computes
        make_model=ShardedMLP,
        devices=2,
        strategy=_strategy(),
        data=ContractDigits(batch_size=BATCH // 2, split=True),  # each rank: half of every global batch
        use_distributed_sampler=False,
        **kwargs,
    )
    return callbacks, model, trainer


def verify_all(run: str, callbacks: list[Any], model: Any, trainer: Any) -> str | None:
    """Every case's own ``verify`` on the run: ``None`` if all pass, else the first failure's text."""
    from tests.contract_cases import case_by_name, order_of

    for name, cb in zip(order_of(run), callbacks, strict=True):
        try:
            case_by_name(name).verify(cb, model, trainer)
        except AssertionError as err:
            return f"{name}: {err!r}"[:2000]
    return None


def _record(run: str, callbacks: list[Any], model: Any, trainer: Any) -> dict[str, Any]:
    """The run's full state and weights (collectives: both ranks call this in the same order) and its verdict."""
    from tests.contract_cases import full_of, state_of

    verified = verify_all(run, callbacks, model, trainer)  # first: reading a state may need what it computed
    params = dict(model.named_parameters())
    state = {
        k: full_of(v.detach(), params.get(k.rpartition("/")[2])).cpu().clone()
        for k, v in state_of(run, callbacks, model).items()
    }
    weights = {k: full_of(v.detach()).cpu().clone() for k, v in model.state_dict().items()}
    return {"state": state, "model": weights, "verified": verified, "error": None, "steps": trainer.global_step}


def _one(run: str, workdir: Path, out: Path, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    import torch.distributed as dist

    try:
        callbacks, model, trainer = _fit(run, workdir, out, **kwargs)
        return trainer.global_rank, _record(run, callbacks, model, trainer)
    except Exception as err:  # noqa: BLE001 (the test reads what ended the fit)
        rank = dist.get_rank() if dist.is_initialized() else 0
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        return rank, {"state": {}, "model": {}, "verified": None, "error": text[-3000:], "steps": -1}


def main(workdir: Path, mode: str) -> None:
    """Fit every run (``rows``, then the killed fit) or resume the killed fit (``resume``); see the module text."""
    from tests.contract_cases import FSDP_RUNS
    from tests.helpers import StopAt

    torch.set_num_threads(1)
    out = workdir / "fsdp"
    out.mkdir(exist_ok=True)
    if mode == "rows":
        for run in FSDP_RUNS:
            rank, record = _one(run, workdir, out / f"run-{run}", checkpoints=False)
            torch.save(record, out / f"{run}-rank{rank}.pt")
        _fit(RESUMED, workdir, out / "kill", extra=[StopAt(KILL_AT, action="kill")])
        raise RuntimeError(f"the fit was not killed at step {KILL_AT}")
    if mode == "resume":
        rank, record = _one(RESUMED, workdir, out / "kill", ckpt_path=str(out / "kill" / "ckpt" / RESUME_FROM))
        torch.save(record, out / f"resume-rank{rank}.pt")
        return
    raise ValueError(f"mode must be 'rows' or 'resume', got {mode!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
