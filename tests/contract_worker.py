"""Crash half of the contract's crash-and-resume check: fits that are killed with SIGKILL.

Run as ``python -m tests.contract_worker WORKDIR CASE:STEP [CASE:STEP ...]``. For each job a child process is
forked (one import of torch and Lightning for all jobs); the child runs the contract fit of ``CASE`` (a case name, or ``composed``) with its
epoch-end checkpoints in ``WORKDIR/CASE-STEP/ckpt`` and kills itself with SIGKILL at the end of optimizer step
``STEP``. The parent records how each child ended in ``WORKDIR/crashes.json``: ``{"CASE:STEP": signal}``.

Example:
    >>> from tests.contract_worker import parse_job
    >>> parse_job("pruning:6")
    ('pruning', 6)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def parse_job(job: str) -> tuple[str, int]:
    """``"case:step"`` -> ``(case, step)``."""
    name, _, step = job.partition(":")
    return name, int(step)


def _crash(workdir: Path, name: str, step: int) -> None:
    import torch

    from tests.contract_cases import callbacks_for, fit
    from tests.helpers import StopAt

    torch.set_num_threads(1)
    fit([*callbacks_for(name, workdir), StopAt(step, action="kill")], workdir / f"{name}-{step}")


def main(argv: list[str]) -> int:
    """Fork one child per job, wait for each, write how they ended."""
    workdir = Path(argv[0])
    import lightning.pytorch  # noqa: F401  (imported once, before forking)
    import torch

    torch.set_num_threads(1)
    ended: dict[str, int | str] = {}
    for job in argv[1:]:
        name, step = parse_job(job)
        pid = os.fork()
        if pid == 0:  # the child: it should never get past the fit
            try:
                _crash(workdir, name, step)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        ended[job] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    (workdir / "crashes.json").write_text(json.dumps(ended))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
