"""Built-in examples: the bundled digits data and small models, so that every recipe runs offline in seconds.

``SentenceEncoder`` and ``SentenceDataModule`` (the pretrained all-MiniLM-L6-v2, :mod:`.sentence`) need the
``nlp`` extra; they are imported on first access, so that this package works without ``transformers``.
"""

from typing import Any

from lightning_compress.examples.digits import DigitsDataModule, load_digits_tensors
from lightning_compress.examples.models import DigitsClassifier, DigitsCNN, DigitsMLP

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule", "DigitsMLP", "load_digits_tensors"]
_LAZY = {"SentenceDataModule", "SentenceEncoder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lightning_compress.examples import sentence

        return getattr(sentence, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_LAZY])
