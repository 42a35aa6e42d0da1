"""Built-in examples: the bundled digits data and small models, so that every recipe runs offline in seconds."""

from lightning_compress.examples.digits import DigitsDataModule, load_digits_tensors
from lightning_compress.examples.models import DigitsClassifier, DigitsCNN, DigitsMLP

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule", "DigitsMLP", "load_digits_tensors"]
