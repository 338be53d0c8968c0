"""Which version each directory came from: rows of the ``worktrees`` table (migration ``0006_worktrees``).

`tessera commit` records the directory it snapshotted, `export` and `checkout` the directory they
wrote (as incomplete while writing, complete at the end), so that `tessera status DIR` knows what to
compare DIR with. Keyed by the directory's real path (symlinks resolved), like the stat cache.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tessera.catalog.catalog import Catalog


@dataclass(frozen=True)
class WorktreeRecord:
    path: str
    dataset: str
    hash: str
    how: str  # "commit" | "export" | "checkout"
    time: float
    complete: bool
    excludes: tuple[str, ...] = ()  # the commit's --exclude lines (gitignore syntax)

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.hash}"


def real_dir(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def record_worktree(catalog: Catalog, path: str | Path, dataset: str, hash: str, how: str, *,
                    complete: bool = True, excludes: Sequence[str] = ()) -> None:
    """Skipped on a read-only home: `status` of that directory then says it has no record."""
    if catalog.read_only:
        return
    with catalog.write() as c:
        c.execute("INSERT OR REPLACE INTO worktrees VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (real_dir(path), dataset, hash, how, time.time(), int(complete), json.dumps(list(excludes))))


def worktree(catalog: Catalog, path: str | Path) -> WorktreeRecord | None:
    row = catalog.query_one("SELECT path, dataset, hash, how, time, complete, excludes FROM worktrees WHERE path = ?",
                       (real_dir(path),))
    if row is None:
        return None
    p, dataset, hash_, how, t, complete, excludes = row
    return WorktreeRecord(p, dataset, hash_, how, t, bool(complete), tuple(json.loads(excludes)))


def forget_worktree(catalog: Catalog, path: str | Path) -> None:
    with catalog.write() as c:
        c.execute("DELETE FROM worktrees WHERE path = ?", (real_dir(path),))
