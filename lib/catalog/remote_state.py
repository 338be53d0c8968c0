"""Remote state in the catalog: configured remotes and what each remote is known to hold.

Functions take a `Catalog` and keep transactions short. Tables: ``remotes`` and ``remote_objects``
(migration ``0002_remote``), ``remote_meta`` (``0005_sync_remote_meta``).

``remote_objects`` lists keys known to exist on a remote: push skips them without asking the remote,
and a key is added right after its upload (or download) succeeded, so an interrupted push resumes.
``remote_meta`` says which metadata pack on a remote holds each tree or file record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from tessera.catalog.catalog import Catalog
from tessera.errors import NotFound, UsageError


@dataclass(frozen=True)
class RemoteInfo:
    name: str
    url: str
    is_default: bool


# -- configured remotes -----------------------------------------------------------------------------

def remote_names(catalog: Catalog) -> list[str]:
    """Names of the remotes configured with `tessera remote add`."""
    return [r.name for r in remotes(catalog)]


def remotes(catalog: Catalog) -> list[RemoteInfo]:
    rows = catalog.query("SELECT name, url, is_default FROM remotes ORDER BY name")
    return [RemoteInfo(n, u, bool(d)) for n, u, d in rows]


def get_remote(catalog: Catalog, name: str) -> RemoteInfo | None:
    row = catalog.query_one("SELECT name, url, is_default FROM remotes WHERE name = ?", (name,))
    return RemoteInfo(row[0], row[1], bool(row[2])) if row else None


def default_remote(catalog: Catalog) -> RemoteInfo | None:
    """The remote marked default, else the only one; None when that does not name exactly one."""
    found = remotes(catalog)
    marked = [r for r in found if r.is_default]
    if marked:
        return marked[0]
    return found[0] if len(found) == 1 else None


def add_remote(catalog: Catalog, name: str, url: str, *, default: bool = False) -> RemoteInfo:
    with catalog.write() as c:
        if c.execute("SELECT 1 FROM remotes WHERE name = ?", (name,)).fetchone():
            raise UsageError(f"remote {name!r} already exists (tessera remote remove {name} first)")
        if default:
            c.execute("UPDATE remotes SET is_default = 0")
        c.execute("INSERT INTO remotes VALUES (?, ?, ?)", (name, url, int(default)))
    return RemoteInfo(name, url, default)


def set_default_remote(catalog: Catalog, name: str) -> None:
    with catalog.write() as c:
        if not c.execute("SELECT 1 FROM remotes WHERE name = ?", (name,)).fetchone():
            raise NotFound(f"unknown remote {name!r}")
        c.execute("UPDATE remotes SET is_default = (name = ?)", (name,))


def remove_remote(catalog: Catalog, name: str) -> None:
    """Forget a remote and everything recorded about what it holds."""
    with catalog.write() as c:
        if not c.execute("SELECT 1 FROM remotes WHERE name = ?", (name,)).fetchone():
            raise NotFound(f"unknown remote {name!r}")
        c.execute("DELETE FROM remotes WHERE name = ?", (name,))
        c.execute("DELETE FROM remote_objects WHERE remote = ?", (name,))
        c.execute("DELETE FROM remote_meta WHERE remote = ?", (name,))


# -- what a remote holds ----------------------------------------------------------------------------

def known_keys(catalog: Catalog, remote: str, keys: Sequence[str]) -> set[str]:
    return {r[0] for r in catalog.select_in("SELECT key FROM remote_objects WHERE remote = ? AND key {in}",
                                            keys, (remote,))}


def has_key(catalog: Catalog, remote: str, key: str) -> bool:
    return catalog.query_one("SELECT 1 FROM remote_objects WHERE remote = ? AND key = ?", (remote, key)) is not None


def mark_keys(catalog: Catalog, remote: str, keys: Iterable[str]) -> None:
    with catalog.write() as c:
        c.executemany("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", ((remote, k) for k in keys))


def remotes_holding(catalog: Catalog, key: str) -> list[str]:
    return [r[0] for r in catalog.query("SELECT remote FROM remote_objects WHERE key = ? ORDER BY remote", (key,))]


KIND_PACK_TABLE = 3
"""``remote_meta`` rows of this kind map a data pack to the chunk table (``chunkidx/<id>``) locating its chunks."""
KIND_META_TABLE = 4
"""... and a metadata pack to the metadata table (``metaidx/<id>``) locating its blobs."""
_TABLE_PREFIXES = ("meta/", "chunkidx/", "metaidx/")


def meta_locations(catalog: Catalog, remote: str, kind: int, ids: Sequence[str]) -> dict[str, str]:
    """For each tree (kind 1) or file record (kind 2) id the remote holds: its metadata pack; for a data
    pack (`KIND_PACK_TABLE`) or metadata pack (`KIND_META_TABLE`): the location table covering it."""
    return {i: pack for i, pack in catalog.select_in(
        "SELECT id, pack FROM remote_meta WHERE remote = ? AND kind = ? AND id {in}", ids, (remote, kind))}


def mark_meta_pack(catalog: Catalog, remote: str, pack: str, blobs: Iterable[tuple[int, str]], *,
                   key: str | None = None, sent: bool = False) -> None:
    """Record that metadata pack ``meta/<pack>`` (or the object ``key``, e.g. a location table named
    ``pack``) is on the remote and which blobs (or packs) it holds or covers. ``sent``: this home just
    uploaded it, so its blobs are recorded there even if an older pack (one no table covers, which is
    why they were sent again) was recorded for them: later pushes then find them covered."""
    verb = "REPLACE" if sent else "IGNORE"
    with catalog.write() as c:
        c.execute("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", (remote, key or f"meta/{pack}"))
        c.executemany(f"INSERT OR {verb} INTO remote_meta VALUES (?, ?, ?, ?)",
                      ((remote, kind, bid, pack) for kind, bid in blobs))


def cover_packs(catalog: Catalog, remote: str, kind: int, table: str, packs: Iterable[str], *, key: str) -> None:
    """Record that location table ``table`` (the object ``key``, a merged table: `tessera.tablemerge`) is
    on the remote and now covers ``packs`` (`KIND_PACK_TABLE` or `KIND_META_TABLE`), replacing the tables
    recorded for them before, so versions pushed from now on name it instead."""
    with catalog.write() as c:
        c.execute("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", (remote, key))
        c.executemany("INSERT OR REPLACE INTO remote_meta VALUES (?, ?, ?, ?)",
                      ((remote, kind, p, table) for p in packs))


# -- versions whose metadata is fetched as it is walked ----------------------------------------------

def lazy_version(catalog: Catalog, hash: str) -> tuple[str, bytes] | None:
    """(remote name, its version object) of a version whose metadata is not all here yet."""
    row = catalog.query_one("SELECT remote, object FROM lazy_versions WHERE hash = ?", (hash,))
    return (row[0], bytes(row[1])) if row else None


def lazy_hashes(catalog: Catalog) -> set[str]:
    return {r[0] for r in catalog.query("SELECT hash FROM lazy_versions")}


def mark_lazy(catalog: Catalog, hash: str, remote: str, obj: bytes) -> None:
    """Joins the caller's transaction (recorded with the version row)."""
    with catalog.write() as c:
        c.execute("INSERT OR REPLACE INTO lazy_versions VALUES (?, ?, ?)", (hash, remote, obj))


def drop_lazy(catalog: Catalog, hash: str) -> None:
    with catalog.write() as c:
        c.execute("DELETE FROM lazy_versions WHERE hash = ?", (hash,))


def forget_key(catalog: Catalog, remote: str, key: str) -> None:
    """The remote no longer holds ``key`` (found missing): push must upload it again."""
    with catalog.write() as c:
        c.execute("DELETE FROM remote_objects WHERE remote = ? AND key = ?", (remote, key))


def forget_keys(catalog: Catalog, remote: str, keys: Iterable[str]) -> None:
    """The remote may no longer hold these keys (a prune plan named them): forget them, and where a key
    is a metadata pack (``meta/<id>``), which trees and file records it held, so push sends them again
    (and likewise which packs a location table ``chunkidx/`` or ``metaidx/`` covered)."""
    keys = list(keys)
    metas = [k.split("/", 1)[1] for k in keys if k.startswith(_TABLE_PREFIXES)]
    with catalog.write() as c:
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            c.execute(f"DELETE FROM remote_objects WHERE remote = ? AND key IN ({','.join('?' * len(part))})",
                      (remote, *part))
        for i in range(0, len(metas), 500):
            part = metas[i:i + 500]
            c.execute(f"DELETE FROM remote_meta WHERE remote = ? AND pack IN ({','.join('?' * len(part))})",
                      (remote, *part))
