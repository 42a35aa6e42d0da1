"""The shuffle of the examples' training loaders, carried through checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule


class ResumableShuffle(LightningDataModule):
    """A data module whose checkpointed state is torch's global random generator, so that a resumed fit draws the
    shuffles an uninterrupted one would have.

    A ``DataLoader(shuffle=True)`` seeds each epoch's order from torch's global generator when the epoch starts
    (as does everything else random in a step: dropout, augmentation). A process resuming from a checkpoint starts
    with another generator state, so without this its epochs after the checkpoint see the data in another order
    and the fit ends elsewhere. Lightning writes :meth:`state_dict` into each checkpoint when it saves (after the
    epoch's validation) and calls :meth:`load_state_dict` before the resumed fit's first batch, when the
    uninterrupted run would be at the same point. Fresh runs are unchanged. Under DDP every process takes the
    state of rank 0 (the one that saved): the state each had when its processes drew the same random numbers
    (``seed_everything``, batches of the same shapes); Lightning's distributed sampler shuffles by epoch anyway.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"torch_rng_state": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("torch_rng_state")
        if state is not None:  # checkpoints written before this state existed resume as they did
            torch.set_rng_state(state)
