"""The corpus of the sentence example: sentences of the Python standard library's docstrings, the same on every
machine with the same Python version (re-exported by :mod:`lightning_compress.examples.sentence`)."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from typing import Any

__all__ = ["CORPUS_MODULES", "stdlib_sentences"]

# standard-library modules whose docstrings make the corpus (sorted; no module with side effects on import)
CORPUS_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal "
    "difflib email enum fractions functools glob gzip hashlib heapq html http.client inspect io ipaddress itertools "
    "json logging math mimetypes operator os pathlib pickle pprint queue random re shutil socket sqlite3 statistics "
    "string struct subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types typing "
    "unittest urllib.parse uuid warnings weakref xml.etree.ElementTree zipfile"
).split()
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def stdlib_sentences() -> list[str]:
    """Sentences of the docstrings of :data:`CORPUS_MODULES` (module, public classes, functions and methods).

    A sentence is kept if it has 6 to 40 words, starts with a capital letter, ends with a period, holds no
    doctest prompt and is at least 85 % letters and spaces. Deduplicated and sorted; the exact set follows the
    Python version (3.11 gives about 2,700).
    """
    found: set[str] = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        with warnings.catch_warnings():  # reading deprecated attributes (typing.io) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = _docstrings(module)
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                for s in _SENTENCE_END.split(" ".join(para.split())):
                    words = s.split()
                    if (6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and ">>>" not in s
                            and sum(c.isalpha() or c == " " for c in s) > 0.85 * len(s)):
                        found.add(s)
    return sorted(found)


def _docstrings(module: Any) -> list[str]:
    objs: list[Any] = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            objs.append(obj)
            if inspect.isclass(obj):
                objs += [m for n, m in sorted(vars(obj).items())
                         if not n.startswith("_") and (inspect.isfunction(m) or inspect.ismethoddescriptor(m))]
    return [d for d in (inspect.getdoc(o) for o in objs) if d]
