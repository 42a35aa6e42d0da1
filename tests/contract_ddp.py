"""DDP half of the contract: every case fits once under ``strategy="ddp"`` (2 CPU processes, gloo).

Run as ``python -m tests.contract_ddp WORKDIR``; Lightning starts the second process by running the same command.
For each run (every case, then all of them in one Trainer) and rank it writes ``WORKDIR/<run>-rank<r>.pt`` (the case's
compression state, the model's ``state_dict`` and ``verified``: ``None`` once every case's own ``verify`` passed on
the rank, else the assertion's text) and ``WORKDIR/<case>-rank<r>.json`` (every ``log_metrics`` call the rank's logger received: a
recording logger that, unlike Lightning's own loggers, is not silenced off rank zero, so that a callback logging
from every rank would show up).

Example:
    >>> logger = RecordingLogger()
    >>> logger.log_metrics({"a": 1.0}, step=3); logger.calls
    [[3, ['a']]]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger

__all__ = ["RecordingLogger", "main"]


class RecordingLogger(Logger):
    """Keeps ``[step, sorted keys]`` of every ``log_metrics`` call, on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[Any]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append([step, sorted(metrics)])


def main(workdir: Path) -> None:
    """Fit every case under DDP, one after the other in the same two processes, and write what each rank has."""
    from tests.contract_cases import BATCH, RUNS, ContractDigits, callbacks_for, fit, state_of
    from tests.contract_fsdp import verify_all

    torch.set_num_threads(1)
    for run in RUNS:
        logger = RecordingLogger()
        callbacks = callbacks_for(run, workdir)
        model, trainer = fit(
            callbacks,
            workdir / f"run-{run}",
            devices=2,
            strategy="ddp",
            logger=logger,
            limit_val_batches=1,
            checkpoints=False,
            data=ContractDigits(batch_size=BATCH // 2, split=True),  # each rank: half of every global batch
            use_distributed_sampler=False,
        )
        rank = trainer.global_rank
        verified = verify_all(run, callbacks, model, trainer)  # first: reading a state may need what it computed
        state = {k: v.detach().cpu() for k, v in state_of(run, callbacks, model).items()}
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"state": state, "model": weights, "verified": verified}, workdir / f"{run}-rank{rank}.pt")
        (workdir / f"{run}-rank{rank}.json").write_text(json.dumps(logger.calls))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
