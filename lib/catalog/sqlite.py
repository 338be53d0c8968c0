"""sqlite-utils, imported without its optional pandas and numpy support.

sqlite-utils imports pandas and numpy when they are installed, to convert their values on insert;
tessera never inserts either, and on a machine with pandas that import costs about half a second of
every `tessera` command. They are hidden from that one import and visible again right after it.
"""
from __future__ import annotations

import sys


def _import_without(hidden: tuple[str, ...]) -> None:
    absent = [name for name in hidden if name not in sys.modules]
    for name in absent:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError
    try:
        import sqlite_utils  # noqa: F401
        import sqlite_utils.migrations  # noqa: F401
    finally:
        for name in absent:
            if sys.modules.get(name) is None:
                del sys.modules[name]


if "sqlite_utils" not in sys.modules:
    _import_without(("pandas", "numpy"))

from sqlite_utils import Database  # noqa: E402
from sqlite_utils.migrations import Migrations  # noqa: E402

__all__ = ["Database", "Migrations"]
