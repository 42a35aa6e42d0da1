"""scikit-learn's bundled 8x8 digits as a LightningDataModule: no download, runs anywhere in seconds."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.examples._shuffle import ResumableShuffle

__all__ = ["DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images, labels)``: images ``(N, 1, 8, 8)`` float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: read from disk, never downloaded

    data = load_digits()
    x = torch.from_numpy(np.asarray(data.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(data.target, dtype=np.int64))
    return x, y


class DigitsDataModule(ResumableShuffle):
    """The 8x8 handwritten digits (10 classes) with a fixed, seeded train/val/test split.

    Args:
        batch_size: samples per batch for every split.
        val_fraction: fraction of all samples held out for validation.
        test_fraction: fraction of all samples held out for testing.
        train_subset: use only this many training samples (``None``: all), e.g. to make a
            small-data setting for distillation.
        split_seed: seed of the split (independent of the training seed).
        num_workers: DataLoader workers.

    The training loader shuffles from torch's global generator; its state is in every checkpoint, so a fit
    resumed with ``ckpt_path`` sees the batches an uninterrupted one would have.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype, len(dm.train_set), len(dm.val_set)
        ((32, 1, 8, 8), torch.int64, 1168, 270)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        train_subset: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"`val_fraction` + `test_fraction` must be < 1, got {val_fraction + test_fraction}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"`train_subset` must be >= 1 or None, got {train_subset}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_subset = train_subset
        self.split_seed = split_seed
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        x, y = load_digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_test = int(round(self.test_fraction * len(x)))
        n_val = int(round(self.val_fraction * len(x)))
        test_idx, val_idx, train_idx = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
