"""Opening a tessera home: does it exist, may this process write to it, and one lock around creating it.

- A home *exists* when it holds a catalog (``catalog.db``). Commands that only read never create one
  (`require_home` says how to make one); commands that write create it on first use.
- A home is *read-only* for this process when its directory (or its catalog) cannot be written: a
  read-only file system, or no write permission. Reads still work: the catalog is opened with SQLite's
  ``mode=ro`` (and ``immutable=1`` when the directory cannot hold WAL side files), nothing is created,
  and every write is refused with one line (`ReadOnlyHome`).
- Creation is atomic: the first process creates the catalog, applies the schema and writes the store
  settings while holding an exclusive ``flock`` on ``init.lock``; a concurrent first command waits
  for it, then finds a complete home. Later opens take the same lock for the few milliseconds that
  opening and checking the catalog takes.
"""
from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tessera.errors import NoHome, ReadOnlyHome

CATALOG_FILE = "catalog.db"
INIT_LOCK = "init.lock"


def catalog_path(home: str | Path) -> Path:
    return Path(home) / CATALOG_FILE


def home_exists(home: str | Path) -> bool:
    """True when ``home`` holds a catalog (an empty or missing directory is no home)."""
    return catalog_path(home).is_file()


def require_home(home: str | Path) -> None:
    """`NoHome` unless ``home`` exists; read commands call this so they never create one."""
    if not home_exists(home):
        raise NoHome(f"no tessera home at {home} (commit something or run `tessera init` to create one)")


def is_read_only(home: str | Path) -> bool:
    """True when ``home`` exists and this process cannot write it (its directory, or its catalog)."""
    h = Path(home)
    if not h.exists():
        return False
    cat = catalog_path(h)
    return not os.access(h, os.W_OK) or (cat.exists() and not os.access(cat, os.W_OK))


def read_only_error(home: str | Path) -> ReadOnlyHome:
    return ReadOnlyHome(f"tessera home {home} is read-only (a read-only file system or no write permission): "
                        "only reading commands work here")


@contextmanager
def init_lock(home: str | Path) -> Iterator[None]:
    """Exclusive lock serialising catalog creation, schema migration and the first settings write."""
    try:
        fd = os.open(Path(home) / INIT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise read_only_error(home) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
