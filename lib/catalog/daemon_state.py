"""Daemon state in the catalog: the push queue, per-watch status, and lineage amendments for `tessera run`.

Functions take a `Catalog` and keep every transaction short, so the CLI, a mount and the daemon can
share one home. Rows come back as dataclasses. The tables are created by migration ``0003_daemon``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tessera.catalog.catalog import Catalog


@dataclass(frozen=True)
class PushItem:
    id: int
    remote: str
    dataset: str
    hash: str
    created: float
    attempts: int
    next_try: float
    last_error: str | None

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.hash}"


@dataclass(frozen=True)
class WatchStatus:
    path: str
    dataset: str
    last_event: float | None
    last_version: str | None
    last_commit: float | None
    last_error: str | None
    updated: float


_PUSH_COLS = "id, remote, dataset, hash, created, attempts, next_try, last_error"


# -- push queue -------------------------------------------------------------------------------------

def enqueue_push(catalog: Catalog, remote: str, dataset: str, hash: str) -> bool:
    """Queue ``dataset@hash`` for upload to ``remote``; False if it is already waiting."""
    with catalog.write() as c:
        return _enqueue(c, remote, dataset, hash)


def _enqueue(c: Any, remote: str, dataset: str, hash: str) -> bool:
    found = c.execute("SELECT 1 FROM push_queue WHERE remote = ? AND dataset = ? AND hash = ?",
                      (remote, dataset, hash)).fetchone()
    if found:
        return False
    c.execute("INSERT INTO push_queue (remote, dataset, hash, created, next_try) VALUES (?, ?, ?, ?, 0)",
              (remote, dataset, hash, time.time()))
    return True


def pending_pushes(catalog: Catalog, remote: str | None = None, dataset: str | None = None) -> list[PushItem]:
    """Everything still waiting for upload, oldest first."""
    sql = f"SELECT {_PUSH_COLS} FROM push_queue WHERE 1=1"
    params: list[Any] = []
    if remote is not None:
        sql += " AND remote = ?"
        params.append(remote)
    if dataset is not None:
        sql += " AND dataset = ?"
        params.append(dataset)
    return [PushItem(*r) for r in catalog.query(sql + " ORDER BY id", params)]


def due_pushes(catalog: Catalog, now: float, limit: int = 100) -> list[PushItem]:
    rows = catalog.query(f"SELECT {_PUSH_COLS} FROM push_queue WHERE next_try <= ? ORDER BY id LIMIT ?",
                        (now, limit))
    return [PushItem(*r) for r in rows]


def next_push_time(catalog: Catalog) -> float | None:
    row = catalog.query_one("SELECT min(next_try) FROM push_queue")
    return row[0] if row else None


def push_done(catalog: Catalog, item_id: int) -> None:
    with catalog.write() as c:
        c.execute("DELETE FROM push_queue WHERE id = ?", (item_id,))


def push_failed(catalog: Catalog, item: PushItem, error: str, next_try: float, *, whole_remote: bool = True) -> None:
    """Count a failed attempt of ``item``. With ``whole_remote`` (the remote is down, not the item at
    fault) every other item for that remote waits as long and shows the error, without an attempt."""
    with catalog.write() as c:
        c.execute("UPDATE push_queue SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE id = ?",
                  (next_try, error, item.id))
        if whole_remote:
            c.execute("UPDATE push_queue SET next_try = max(next_try, ?), last_error = ?"
                      " WHERE remote = ? AND id != ?", (next_try, error, item.remote, item.id))


def retry_pushes_now(catalog: Catalog, remote: str | None = None) -> int:
    """Make waiting items due at once (after a success on their remote, or at daemon start)."""
    with catalog.write() as c:
        if remote is None:
            cur = c.execute("UPDATE push_queue SET next_try = 0 WHERE next_try > 0")
        else:
            cur = c.execute("UPDATE push_queue SET next_try = 0 WHERE remote = ? AND next_try > 0", (remote,))
        return cur.rowcount


# -- watch status -----------------------------------------------------------------------------------

def watch_statuses(catalog: Catalog) -> dict[str, WatchStatus]:
    rows = catalog.query("SELECT path, dataset, last_event, last_version, last_commit, last_error, updated"
                        " FROM watch_status ORDER BY path")
    return {r[0]: WatchStatus(*r) for r in rows}


def note_watch_event(catalog: Catalog, path: str, dataset: str, when: float) -> None:
    with catalog.write() as c:
        _ensure_status(c, path, dataset)
        c.execute("UPDATE watch_status SET last_event = ?, dataset = ?, updated = ? WHERE path = ?",
                  (when, dataset, time.time(), path))


def note_watch_error(catalog: Catalog, path: str, dataset: str, error: str | None) -> None:
    with catalog.write() as c:
        _ensure_status(c, path, dataset)
        c.execute("UPDATE watch_status SET last_error = ?, dataset = ?, updated = ? WHERE path = ?",
                  (error, dataset, time.time(), path))


def record_watch_commit(catalog: Catalog, path: str, dataset: str, hash: str, when: float,
                        remote: str | None, created: bool) -> None:
    """After a commit: the watch's last version, cleared error and (if new) its push, in one transaction."""
    with catalog.write() as c:
        _ensure_status(c, path, dataset)
        c.execute("UPDATE watch_status SET last_version = ?, last_commit = ?, last_error = NULL, dataset = ?,"
                  " updated = ? WHERE path = ?", (hash, when, dataset, time.time(), path))
        if created and remote:
            _enqueue(c, remote, dataset, hash)


def forget_watch(catalog: Catalog, path: str) -> None:
    with catalog.write() as c:
        c.execute("DELETE FROM watch_status WHERE path = ?", (path,))


def _ensure_status(c: Any, path: str, dataset: str) -> None:
    c.execute("INSERT OR IGNORE INTO watch_status (path, dataset, updated) VALUES (?, ?, ?)",
              (path, dataset, time.time()))


def unqueued_watch_versions(catalog: Catalog, path: str, dataset: str, remote: str) -> list[str]:
    """Versions this watch committed after its last recorded commit and that are not queued: what a
    crash between recording a version and queueing its push leaves behind."""
    status = catalog.query_one("SELECT last_version FROM watch_status WHERE path = ?", (path,))
    since = catalog.last_seq(dataset, status[0]) if status and status[0] else 0
    queued = {i.hash for i in pending_pushes(catalog, remote, dataset)}
    out: list[str] = []
    for e in catalog.history_after(dataset, since):
        info = e.meta.get("daemon")
        if isinstance(info, dict) and info.get("watch") == path and e.hash not in queued and e.hash not in out:
            out.append(e.hash)
    return out
