"""Remote state in the catalog: configured remotes, what each remote is known to hold, and the
metadata a pull brings in (packs that are not local, their chunk rows, trees, file records, versions).

Functions take a `Catalog` and keep transactions short. Tables: ``remotes`` and ``remote_objects``
(migration ``0002_remote``), ``remote_meta`` (``0005_sync_remote_meta``).

``remote_objects`` lists keys known to exist on a remote: push skips them without asking the remote,
and a key is added right after its upload (or download) succeeded, so an interrupted push resumes.
``remote_meta`` says which metadata pack on a remote holds each tree or file record.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from tessera.catalog.catalog import Catalog, ChunkLocation, _chunks
from tessera.errors import NotFound, UsageError
from tessera.model import FileRecord, HistoryEntry


@dataclass(frozen=True)
class RemoteInfo:
    name: str
    url: str
    is_default: bool


# -- configured remotes -----------------------------------------------------------------------------

def remotes(catalog: Catalog) -> list[RemoteInfo]:
    rows = catalog._all("SELECT name, url, is_default FROM remotes ORDER BY name")
    return [RemoteInfo(n, u, bool(d)) for n, u, d in rows]


def get_remote(catalog: Catalog, name: str) -> RemoteInfo | None:
    row = catalog._one("SELECT name, url, is_default FROM remotes WHERE name = ?", (name,))
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
    found: set[str] = set()
    for part in _chunks(list(keys)):
        q = ",".join("?" * len(part))
        found.update(r[0] for r in catalog._all(
            f"SELECT key FROM remote_objects WHERE remote = ? AND key IN ({q})", (remote, *part)))
    return found


def has_key(catalog: Catalog, remote: str, key: str) -> bool:
    return catalog._one("SELECT 1 FROM remote_objects WHERE remote = ? AND key = ?", (remote, key)) is not None


def mark_keys(catalog: Catalog, remote: str, keys: Iterable[str]) -> None:
    with catalog.write() as c:
        c.executemany("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", ((remote, k) for k in keys))


def remotes_holding(catalog: Catalog, key: str) -> list[str]:
    return [r[0] for r in catalog._all("SELECT remote FROM remote_objects WHERE key = ? ORDER BY remote", (key,))]


def meta_locations(catalog: Catalog, remote: str, kind: int, ids: Sequence[str]) -> dict[str, str]:
    """For each tree (kind 1) or file record (kind 2) id the remote holds: its metadata pack."""
    out: dict[str, str] = {}
    for part in _chunks(list(ids)):
        q = ",".join("?" * len(part))
        out.update(catalog._all(
            f"SELECT id, pack FROM remote_meta WHERE remote = ? AND kind = ? AND id IN ({q})",
            (remote, kind, *part)))
    return out


def mark_meta_pack(catalog: Catalog, remote: str, pack: str, blobs: Iterable[tuple[int, str]]) -> None:
    """Record that metadata pack ``meta/<pack>`` is on the remote and which blobs it holds."""
    with catalog.write() as c:
        c.execute("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", (remote, f"meta/{pack}"))
        c.executemany("INSERT OR IGNORE INTO remote_meta VALUES (?, ?, ?, ?)",
                      ((remote, kind, bid, pack) for kind, bid in blobs))


# -- local packs and chunks -------------------------------------------------------------------------

def chunk_packs(catalog: Catalog, ids: Sequence[bytes]) -> dict[bytes, str]:
    """Chunk id -> the pack the catalog reads it from (missing ids are left out)."""
    out: dict[bytes, str] = {}
    for part in _chunks(list(ids)):
        q = ",".join("?" * len(part))
        out.update(catalog._all(f"SELECT id, pack FROM chunks WHERE id IN ({q})", part))
    return out


def pack_states(catalog: Catalog, ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
    """Pack id -> (size, is local) for the packs the catalog knows."""
    out: dict[str, tuple[int, bool]] = {}
    for part in _chunks(list(ids)):
        q = ",".join("?" * len(part))
        for pid, size, local in catalog._all(f"SELECT id, size, local FROM packs WHERE id IN ({q})", part):
            out[pid] = (size, bool(local))
    return out


def add_remote_pack(catalog: Catalog, pack: str, size: int, chunks: Sequence[ChunkLocation]) -> None:
    """Record a pack that lives only on a remote (local = 0) and the chunks its index lists. A pack
    the catalog already knows keeps its row."""
    with catalog.write() as c:
        c.execute("INSERT OR IGNORE INTO packs VALUES (?, ?, ?, ?, 0)", (pack, size, len(chunks), time.time()))
        c.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                      ((x.id, pack, x.offset, x.stored_len, x.raw_len, x.codec) for x in chunks))


def mark_pack_local(catalog: Catalog, pack: str) -> None:
    with catalog.write() as c:
        c.execute("UPDATE packs SET local = 1 WHERE id = ?", (pack,))


def remote_pack_ids(catalog: Catalog) -> list[str]:
    return [r[0] for r in catalog._all("SELECT id FROM packs WHERE local = 0 ORDER BY id")]


# -- versions brought in by a pull ------------------------------------------------------------------

def add_metadata(catalog: Catalog, trees: Iterable[tuple[str, bytes]], files: Iterable[FileRecord]) -> None:
    """Trees and file records from a remote metadata pack (unreferenced until a version is added)."""
    with catalog.write() as c:
        c.executemany("INSERT OR IGNORE INTO trees VALUES (?, ?)", trees)
        c.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?)",
                      ((r.id, r.size, r.chunks_to_bytes()) for r in files))


def import_version(catalog: Catalog, remote: str, hash: str, files: int, size: int,
                   history: Sequence[tuple[str, HistoryEntry]], keys: Iterable[str]) -> None:
    """Add a version fetched from ``remote`` (its trees, files and chunks already recorded) with its
    history entries ``(remote key, entry)``; entries the catalog already has are skipped. Moves each
    dataset's head to its newest entry. ``keys`` are remote objects now known to exist."""
    now = time.time()
    with catalog.write() as c:
        c.execute("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)", (hash, files, size, now))
        add_history(c, remote, history, now)
        c.executemany("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", ((remote, k) for k in keys))


def add_history(c: Any, remote: str, history: Sequence[tuple[str, HistoryEntry]], now: float) -> None:
    """Insert history entries in time order (inside a write transaction)."""
    for key, e in sorted(history, key=lambda item: (item[1].time, item[0])):
        c.execute("INSERT OR IGNORE INTO remote_objects VALUES (?, ?)", (remote, key))
        dup = c.execute("SELECT 1 FROM history WHERE dataset = ? AND hash = ? AND time = ?",
                        (e.dataset, e.hash, e.time)).fetchone()
        if dup:
            continue
        if not c.execute("SELECT 1 FROM datasets WHERE name = ?", (e.dataset,)).fetchone():
            c.execute("INSERT INTO datasets VALUES (?, NULL, ?)", (e.dataset, now))
        c.execute("INSERT INTO history (dataset, hash, parent, time, author, message, meta)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (e.dataset, e.hash, e.parent, e.time, e.author, e.message, json.dumps(e.meta, sort_keys=True)))
        c.execute("UPDATE datasets SET head = (SELECT h.hash FROM history h JOIN versions v ON v.hash = h.hash"
                  " WHERE h.dataset = ? ORDER BY h.time DESC, h.seq DESC LIMIT 1) WHERE name = ?",
                  (e.dataset, e.dataset))


def history_for(catalog: Catalog, dataset: str, hash: str) -> list[HistoryEntry]:
    """Every local history entry recording ``dataset@hash`` (usually one), oldest first."""
    return [e for e in reversed(catalog.history(dataset)) if e.hash == hash]


def dataset_hashes(catalog: Catalog, dataset: str) -> list[str]:
    """The versions of a dataset, oldest first (each once)."""
    rows = catalog._all("SELECT hash, min(seq) FROM history WHERE dataset = ? GROUP BY hash ORDER BY 2", (dataset,))
    return [r[0] for r in rows]


def tags_at(catalog: Catalog, dataset: str, hash: str) -> list[str]:
    return [r[0] for r in catalog._all("SELECT tag FROM tags WHERE dataset = ? AND hash = ? ORDER BY tag",
                                        (dataset, hash))]


def set_tag_if_missing(catalog: Catalog, dataset: str, tag: str, hash: str) -> bool:
    """Set a tag learnt from a remote unless the dataset already has a local tag of that name."""
    with catalog.write() as c:
        cur = c.execute("INSERT OR IGNORE INTO tags VALUES (?, ?, ?)", (dataset, tag, hash))
        return cur.rowcount > 0


def setting(catalog: Catalog, key: str) -> str | None:
    return catalog.setting(key)
