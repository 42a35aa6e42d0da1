"""Small classifiers for the digits example: an MLP (LeNet-300-100 shape) and a conv net with BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsMLP"]


class DigitsClassifier(LightningModule):
    """Shared training logic: cross-entropy, Adam or SGD, accuracy with torchmetrics.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc``. Subclasses build ``self.net``.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "sgd"] = "adam",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # a fixed batch of digit-shaped inputs (own generator: the global RNG, hence seeded runs, is untouched);
        # Lightning's model summary reports layer shapes with it, and `export.thin(model)` needs no argument
        self.example_input_array = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    @property
    def example_input_array(self) -> torch.Tensor | None:  # type: ignore[override]
        """The fixed example batch in the dtype of the model's weights, so that a ``bf16-true``/``64-true`` run
        (which casts the model, not this tensor) can show its model summary."""
        x = self._example_input_array
        ref = next((p for p in self.parameters() if p.is_floating_point()), None)
        return x.to(ref.dtype) if isinstance(x, torch.Tensor) and ref is not None else x

    @example_input_array.setter
    def example_input_array(self, example: torch.Tensor | None) -> None:
        self._example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DigitsMLP(DigitsClassifier):
    """A multi-layer perceptron for 8x8 digits: 64-300-100-10 by default (the LeNet-300-100 shape).

    Args:
        hidden_sizes: widths of the hidden layers.
        lr: learning rate.
        weight_decay: L2 penalty.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        dropout: dropout after each hidden activation.

    Example:
        >>> model = DigitsMLP(hidden_sizes=[32, 16])
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        ['net.1', 'net.3', 'net.5']
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (300, 100),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "sgd"] = "adam",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"`hidden_sizes` must be a non-empty list of positive widths, got {hidden_sizes}")
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 64
        for h in hidden_sizes:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)


class DigitsCNN(DigitsClassifier):
    """A small conv net with BatchNorm for 8x8 digits, for structured methods (filter pruning, thinning).

    ``conv(1->c1) - BN - ReLU - conv(c1->c2) - BN - ReLU - maxpool(2) - flatten - fc(16*c2 -> hidden) - ReLU - fc(-> 10)``

    Args:
        channels: output channels of the two conv layers.
        hidden: width of the hidden fully connected layer.
        lr: learning rate.
        weight_decay: L2 penalty.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).

    Example:
        >>> DigitsCNN(channels=[4, 8], hidden=16)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        if len(channels) != 2 or any(int(c) < 1 for c in channels):
            raise ValueError(f"`channels` must be two positive widths, got {channels}")
        if hidden < 1:
            raise ValueError(f"`hidden` must be >= 1, got {hidden}")
        self.save_hyperparameters()
        c1, c2 = (int(c) for c in channels)
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * c2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
