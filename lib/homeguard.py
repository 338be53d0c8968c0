"""The tessera home is never a source or a target: not of commit, export, checkout or watch.

A home holds the catalog and the packs every version depends on. Exporting a version over it (a dataset
with a file named ``catalog.db``) or committing it into itself would destroy or recursively grow it, so
every command that reads or writes a user directory asks here first.
"""
from __future__ import annotations

import os
from pathlib import Path

from tessera.errors import UsageError


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def relation_to_home(directory: str | Path, home: str | Path) -> str | None:
    """How ``directory`` relates to ``home``: ``"is"``, ``"inside"``, ``"contains"`` or None."""
    d, h = _real(directory), _real(home)
    if d == h:
        return "is"
    if d.startswith(h.rstrip("/") + "/"):
        return "inside"
    if h.startswith(d.rstrip("/") + "/"):
        return "contains"
    return None


def home_below(directory: str | Path, home: str | Path) -> str | None:
    """The home's path relative to ``directory`` when ``directory`` contains it, else None."""
    if relation_to_home(directory, home) != "contains":
        return None
    return os.path.relpath(_real(home), _real(directory))


def check_not_home(directory: str | Path, home: str | Path, use: str, *, allow_containing: bool = False) -> None:
    """Refuse ``directory`` as ``use`` (e.g. "commit source", "export target") when it is the home or
    lies inside it, and (unless ``allow_containing``) when it contains the home."""
    rel = relation_to_home(directory, home)
    h = _real(home)
    if rel == "is":
        raise UsageError(f"{directory} is the tessera home itself: refusing to use it as {use}")
    if rel == "inside":
        raise UsageError(f"{directory} is inside the tessera home {h}: refusing to use it as {use}")
    if rel == "contains" and not allow_containing:
        raise UsageError(f"{directory} contains the tessera home {h}: refusing to use it as {use} "
                         "(move the home with TESSERA_HOME, or use a subdirectory)")
