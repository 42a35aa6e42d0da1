"""``python -m lightning_compress.cli``: the ``lightning-compress`` command."""

import sys

from lightning_compress.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
