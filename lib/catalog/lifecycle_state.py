"""Lifecycle state in the catalog: forgetting history, deleting datasets and tags, the marks of a
reclaim (`tessera gc`), moving chunks to repacked packs, and the lifecycle settings.

Functions take a `Catalog`. A reclaim marks what kept versions reach in TEMP tables of the catalog's own
connection (SQLite spills them to disk), so marking a big store needs little memory; `Marks` owns them.
Deleting what is dead is one transaction (`Marks.sweep`), so a crash leaves either the old rows or the new.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tessera.catalog.catalog import Catalog
from tessera.catalog.marks import iter_rows, temp_writes
from tessera.config import parse_size
from tessera.errors import UsageError
from tessera.format.pack import BlobInfo, PACK_MAGIC
from tessera.retention import format_duration, parse_duration

BLOB_OVERHEAD = 16 + 16  # blob header + a 16-byte chunk id, in front of each chunk's stored bytes
_BATCH = 500


def _parts(seq: Sequence[Any], n: int = _BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# -- settings ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LifecycleSettings:
    """Per-home settings of forgetting and reclaiming (`tessera config KEY VALUE`); durations in seconds."""

    repack_threshold: float = 0.2  # gc.repack_threshold: repack a pack whose dead share passes this
    auto_dead_bytes: int = 256 << 20  # gc.auto_dead_bytes: the daemon / `run` reclaim past this many dead bytes
    prune_margin: float = 3600.0  # prune.margin: a plan is swept no sooner than this after it was made
    sweep_window: float = 600.0  # prune.sweep_window: a sweep deletes only this long after it starts
    max_clock_skew: float = 300.0  # prune.max_clock_skew: prune refuses beyond this skew from the remote's clock
    session_expiry: float = 3600.0  # push.session_expiry: a push session without heartbeat dies after this


SETTING_KEYS = {
    "gc.repack_threshold": ("repack_threshold", "share of dead bytes in a pack that makes gc repack it (e.g. 20%)"),
    "gc.auto_dead_bytes": ("auto_dead_bytes", "dead bytes past which the daemon and `run` reclaim in the background"),
    "prune.margin": ("prune_margin", "time between a prune plan and its sweep (the second mark)"),
    "prune.sweep_window": ("sweep_window", "how long a sweep may delete after it starts"),
    "prune.max_clock_skew": ("max_clock_skew", "prune refuses to run when the local clock is this far off"),
    "push.session_expiry": ("session_expiry", "a push session that stops beating is dead after this"),
}


def parse_setting(key: str, text: str) -> Any:
    """The typed value of a lifecycle setting given as text (one-line `UsageError` when malformed)."""
    if key not in SETTING_KEYS:
        raise UsageError(f"unknown setting {key!r} (known: {', '.join(sorted(SETTING_KEYS))})")
    attr = SETTING_KEYS[key][0]
    if attr == "repack_threshold":
        t = text.strip()
        try:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise UsageError(f"bad {key} {text!r}: give a share like 20% or 0.2") from None
        if not 0 <= value <= 1:
            raise UsageError(f"bad {key} {text!r}: must be between 0% and 100%")
        return value
    if attr == "auto_dead_bytes":
        return parse_size(text)
    value = parse_duration(text, key)
    if value <= 0:
        raise UsageError(f"bad {key} {text!r}: must be more than 0")
    return value


def format_setting(key: str, value: Any) -> str:
    attr = SETTING_KEYS[key][0]
    if attr == "repack_threshold":
        return f"{value * 100:g}%"
    if attr == "auto_dead_bytes":
        return str(value)
    return format_duration(value)


def lifecycle_settings(catalog: Catalog) -> LifecycleSettings:
    values: dict[str, Any] = {}
    for key, (attr, _) in SETTING_KEYS.items():
        raw = catalog.setting(f"lifecycle.{key}")
        if raw is not None:
            try:
                values[attr] = parse_setting(key, raw)
            except UsageError:
                pass  # a value this tessera cannot read keeps its default
    return LifecycleSettings(**values)


def set_lifecycle_setting(catalog: Catalog, key: str, text: str) -> Any:
    value = parse_setting(key, text)
    catalog.set_setting(f"lifecycle.{key}", text.strip())
    return value


def lifecycle_setting_items(catalog: Catalog) -> list[tuple[str, str, bool, str]]:
    """(key, value, set in this home, meaning) for every lifecycle setting."""
    current = lifecycle_settings(catalog)
    out = []
    for key, (attr, meaning) in sorted(SETTING_KEYS.items()):
        out.append((key, format_setting(key, getattr(current, attr)),
                    catalog.setting(f"lifecycle.{key}") is not None, meaning))
    return out


assert {f.name for f in fields(LifecycleSettings)} == {a for a, _ in SETTING_KEYS.values()}


# -- history, datasets, tags ------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionTimes:
    """One version of a dataset: its newest history entry's time and sequence number."""

    hash: str
    time: float
    seq: int
    entries: int


def dataset_versions(catalog: Catalog, dataset: str) -> list[VersionTimes]:
    rows = catalog.query("SELECT hash, max(time), max(seq), count(*) FROM history WHERE dataset = ? GROUP BY hash",
                         (dataset,))
    return [VersionTimes(h, t, s, n) for h, t, s, n in rows]


def queued_pushes(catalog: Catalog) -> dict[tuple[str, str], list[str]]:
    """(dataset, hash) -> remotes it waits to be pushed to."""
    out: dict[tuple[str, str], list[str]] = {}
    for remote, dataset, hash_ in catalog.query("SELECT remote, dataset, hash FROM push_queue ORDER BY id"):
        out.setdefault((dataset, hash_), []).append(remote)
    return out


def forget_versions(catalog: Catalog, dataset: str, hashes: Iterable[str], max_seq: int) -> int:
    """Delete the history entries of ``dataset`` recording these versions (only entries up to ``max_seq``:
    one recorded since the plan was made stays), every version no history entry records any more, and
    the worktree records naming a forgotten version of ``dataset``. One transaction; returns the entries
    deleted."""
    wanted = list(dict.fromkeys(hashes))
    deleted = 0
    with catalog.write() as c:
        for part in _parts(wanted):
            q = ",".join("?" * len(part))
            cur = c.execute(f"DELETE FROM history WHERE dataset = ? AND seq <= ? AND hash IN ({q})",
                            (dataset, max_seq, *part))
            deleted += cur.rowcount
            c.execute(f"DELETE FROM versions WHERE hash IN ({q}) AND hash NOT IN (SELECT hash FROM history)", part)
            c.execute("DELETE FROM lazy_versions WHERE hash NOT IN (SELECT hash FROM versions)")
            c.execute(f"DELETE FROM worktrees WHERE dataset = ? AND hash IN ({q})"
                      " AND hash NOT IN (SELECT hash FROM history WHERE dataset = ?)", (dataset, *part, dataset))
    return deleted


def remove_dataset(catalog: Catalog, dataset: str) -> tuple[int, int, int]:
    """Delete a dataset: its row, history, tags, queued pushes and worktree records, and the versions no
    other dataset records. Returns (history entries, tags, queued pushes) deleted."""
    with catalog.write() as c:
        hashes = [r[0] for r in c.execute("SELECT DISTINCT hash FROM history WHERE dataset = ?", (dataset,))]
        entries = c.execute("DELETE FROM history WHERE dataset = ?", (dataset,)).rowcount
        tags = c.execute("DELETE FROM tags WHERE dataset = ?", (dataset,)).rowcount
        queued = c.execute("DELETE FROM push_queue WHERE dataset = ?", (dataset,)).rowcount
        c.execute("DELETE FROM watch_status WHERE dataset = ?", (dataset,))
        c.execute("DELETE FROM worktrees WHERE dataset = ?", (dataset,))
        c.execute("DELETE FROM datasets WHERE name = ?", (dataset,))
        c.execute("DELETE FROM settings WHERE key = ?", (f"remote.problem.{dataset}",))
        for part in _parts(hashes):
            q = ",".join("?" * len(part))
            c.execute(f"DELETE FROM versions WHERE hash IN ({q}) AND hash NOT IN (SELECT hash FROM history)", part)
        c.execute("DELETE FROM lazy_versions WHERE hash NOT IN (SELECT hash FROM versions)")
    return entries, tags, queued


def delete_tag(catalog: Catalog, dataset: str, tag: str) -> str | None:
    """Delete tag ``dataset:tag``; returns the version it named, or None when there was no such tag."""
    with catalog.write() as c:
        row = c.execute("SELECT hash FROM tags WHERE dataset = ? AND tag = ?", (dataset, tag)).fetchone()
        if row is None:
            return None
        c.execute("DELETE FROM tags WHERE dataset = ? AND tag = ?", (dataset, tag))
        return str(row[0])


def root_versions(catalog: Catalog) -> set[str]:
    """Every version this home keeps: recorded in history, tagged, or waiting to be pushed."""
    rows = catalog.query("SELECT hash FROM versions UNION SELECT hash FROM history UNION SELECT hash FROM tags"
                         " UNION SELECT hash FROM push_queue")
    return {r[0] for r in rows}


# -- the marks of a reclaim -------------------------------------------------------------------------

@dataclass
class SweepCounts:
    trees: int = 0
    files: int = 0
    chunks: int = 0
    packs: int = 0
    stat_rows: int = 0
    dir_rows: int = 0
    worktree_rows: int = 0  # records of directories checked out from (or committed as) a removed version


@dataclass(frozen=True)
class PackUse:
    """A pack and how much of it kept versions still use."""

    id: str
    size: int
    local: bool
    live_chunks: int
    live_bytes: int  # stored bytes of live chunks plus their blob headers (and the pack magic if any)

    @property
    def dead_bytes(self) -> int:
        return max(0, self.size - self.live_bytes) if self.local else 0

    @property
    def dead_share(self) -> float:
        return self.dead_bytes / self.size if self.size else 0.0


class Marks:
    """What kept versions reach (trees, file records, chunks), held in TEMP tables of the catalog's
    connection. Use as a context manager; the tables go with it."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def __enter__(self) -> Marks:
        with self.catalog.write() as c:
            c.execute("DROP TABLE IF EXISTS temp.gc_files")
            c.execute("DROP TABLE IF EXISTS temp.gc_chunks")
            c.execute("DROP TABLE IF EXISTS temp.gc_trees")
            c.execute("CREATE TEMP TABLE gc_trees (id TEXT PRIMARY KEY) WITHOUT ROWID")
            c.execute("CREATE TEMP TABLE gc_files (id TEXT PRIMARY KEY) WITHOUT ROWID")
            c.execute("CREATE TEMP TABLE gc_chunks (id BLOB PRIMARY KEY) WITHOUT ROWID")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self.catalog.write() as c:
                c.execute("DROP TABLE IF EXISTS temp.gc_trees")
                c.execute("DROP TABLE IF EXISTS temp.gc_files")
                c.execute("DROP TABLE IF EXISTS temp.gc_chunks")
                c.execute("DROP TABLE IF EXISTS temp.gc_batch")
        except Exception:  # noqa: BLE001 - a closed or broken connection takes its temp tables with it
            pass

    def mark_tree(self, tree_id: str) -> bool:
        """Mark a tree; False when it was marked already (then so is everything below it)."""
        with temp_writes(self.catalog) as c:
            return bool(c.execute("INSERT OR IGNORE INTO temp.gc_trees VALUES (?)", (tree_id,)).rowcount)

    def add_files(self, ids: Sequence[str]) -> tuple[list[bytes], int]:
        """Mark file records. Returns the packed chunk lists of those not marked before (their chunks
        still need marking) and how many of those the catalog lacks (0 in a sound store)."""
        with temp_writes(self.catalog) as c:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS gc_batch (id TEXT PRIMARY KEY) WITHOUT ROWID")
            c.execute("DELETE FROM temp.gc_batch")
            c.executemany("INSERT OR IGNORE INTO temp.gc_batch VALUES (?)", ((i,) for i in ids))
            # both forms look each batch row up (`id IN (SELECT ...)` and a plain JOIN would go through all
            # of gc_files / files for every batch: quadratic in the file count)
            c.execute("DELETE FROM temp.gc_batch WHERE EXISTS (SELECT 1 FROM temp.gc_files m WHERE m.id = gc_batch.id)")
            lists = [bytes(r[0]) for r in c.execute(
                "SELECT f.chunks FROM temp.gc_batch b CROSS JOIN files f ON f.id = b.id")]
            fresh = c.execute("SELECT count(*) FROM temp.gc_batch").fetchone()[0]
            c.execute("INSERT INTO temp.gc_files SELECT id FROM temp.gc_batch")
            c.execute("DELETE FROM temp.gc_batch")
        return lists, int(fresh) - len(lists)

    def add_chunks(self, ids: Iterable[bytes]) -> None:
        with temp_writes(self.catalog) as c:
            c.executemany("INSERT OR IGNORE INTO temp.gc_chunks VALUES (?)", ((i,) for i in ids))

    def counts(self) -> tuple[int, int, int]:
        row = self.catalog.query_one("SELECT (SELECT count(*) FROM temp.gc_trees), (SELECT count(*) FROM temp.gc_files),"
                                     " (SELECT count(*) FROM temp.gc_chunks)")
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def pack_use(self) -> list[PackUse]:
        """Every pack with the live bytes it holds (packs with nothing live included)."""
        live = {pack: (n, b) for pack, n, b in self.catalog.query(
            "SELECT c.pack, count(*), sum(c.stored_len) FROM chunks c JOIN temp.gc_chunks l ON l.id = c.id"
            " GROUP BY c.pack")}
        out = []
        for pid, size, local in self.catalog.query("SELECT id, size, local FROM packs ORDER BY id"):
            n, b = live.get(pid, (0, 0))
            overhead = n * BLOB_OVERHEAD + (len(PACK_MAGIC) if n else 0)
            out.append(PackUse(pid, int(size), bool(local), int(n), int(b) + overhead))
        return out

    def live_chunks_of(self, pack: str, page: int = 2000) -> Iterator[list[tuple[bytes, int, int, int, int]]]:
        """(id, offset, stored_len, raw_len, codec) of the live chunks whose rows point into ``pack``, in
        offset order, ``page`` rows at a time (a pack of small chunks holds hundreds of thousands)."""
        for rows in iter_rows(self.catalog, "SELECT c.id, c.pack, c.offset, c.stored_len, c.raw_len, c.codec"
                              " FROM chunks c JOIN temp.gc_chunks l ON l.id = c.id WHERE c.pack = ? ORDER BY c.offset",
                              (pack,), page):
            yield [(r.id, r.offset, r.stored_len, r.raw_len, r.codec) for r in rows]

    def marked_files(self, ids: Sequence[str]) -> set[str]:
        """Of the file ids ``ids``, those marked."""
        return {r[0] for r in self.catalog.select_in("SELECT id FROM temp.gc_files WHERE id {in}", ids)}

    def dead_counts(self) -> SweepCounts:
        """What `sweep` would delete now."""
        row = self.catalog.query_one(
            "SELECT (SELECT count(*) FROM trees WHERE id NOT IN (SELECT id FROM temp.gc_trees)),"
            " (SELECT count(*) FROM files WHERE id NOT IN (SELECT id FROM temp.gc_files)),"
            " (SELECT count(*) FROM chunks WHERE id NOT IN (SELECT id FROM temp.gc_chunks))")
        assert row is not None
        return SweepCounts(int(row[0]), int(row[1]), int(row[2]))

    def sweep(self) -> SweepCounts:
        """Delete, in one transaction, every tree, file record and chunk row not marked, every pack row
        left without a chunk, and the stat-cache / directory-cache rows pointing at what went (the next
        commit must not reuse a file or tree whose bytes are gone), and the worktree records naming a
        version whose root tree went (`tessera status DIR` then says the directory has no record)."""
        out = SweepCounts()
        with self.catalog.write() as c:
            out.worktree_rows = c.execute(
                "DELETE FROM worktrees WHERE hash IN (SELECT id FROM trees WHERE id NOT IN (SELECT id FROM temp.gc_trees))"
            ).rowcount
            out.trees = c.execute("DELETE FROM trees WHERE id NOT IN (SELECT id FROM temp.gc_trees)").rowcount
            out.files = c.execute("DELETE FROM files WHERE id NOT IN (SELECT id FROM temp.gc_files)").rowcount
            out.chunks = c.execute("DELETE FROM chunks WHERE id NOT IN (SELECT id FROM temp.gc_chunks)").rowcount
            out.packs = c.execute("DELETE FROM packs WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack = packs.id)"
                                  ).rowcount
            out.stat_rows = c.execute("DELETE FROM stat_cache WHERE file_id NOT IN (SELECT id FROM files)").rowcount
            out.dir_rows = c.execute("DELETE FROM dir_cache WHERE tree_id NOT IN (SELECT id FROM trees)").rowcount
        return out


def move_chunks(catalog: Catalog, new_pack: str, size: int, blobs: Sequence[BlobInfo],
                old_packs: Sequence[str]) -> int:
    """Record a repacked pack (call once it is durable) and point its chunks at it: in one transaction,
    the new pack row, each chunk row that still points into one of ``old_packs`` moved to the new pack,
    and the old pack rows left without chunks deleted. Returns the chunk rows moved."""
    import time

    moved = 0
    with catalog.write() as c:
        c.execute("INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, 1)", (new_pack, size, len(blobs), time.time()))
        for b in blobs:
            for part in _parts(list(old_packs)):
                q = ",".join("?" * len(part))
                moved += c.execute(f"UPDATE chunks SET pack = ?, offset = ?, stored_len = ?, raw_len = ?, codec = ?"
                                   f" WHERE id = ? AND pack IN ({q})",
                                   (new_pack, b.offset, b.stored_len, b.raw_len, b.codec, b.id, *part)).rowcount
        for part in _parts(list(old_packs)):
            q = ",".join("?" * len(part))
            c.execute(f"DELETE FROM packs WHERE id IN ({q}) AND NOT EXISTS"
                      " (SELECT 1 FROM chunks c WHERE c.pack = packs.id)", part)
    return moved


def known_files(catalog: Catalog, ids: Sequence[str]) -> set[str]:
    """Of the file ids (SHA-256) ``ids``, those the catalog has a record of."""
    return {r[0] for r in catalog.select_in("SELECT id FROM files WHERE id {in}", ids)}


def local_pack_bytes(catalog: Catalog) -> int:
    """Bytes of the packs held in this home."""
    row = catalog.query_one("SELECT coalesce(sum(size), 0) FROM packs WHERE local = 1")
    return int(row[0]) if row else 0


def pack_ids(catalog: Catalog) -> set[str]:
    return {r[0] for r in catalog.query("SELECT id FROM packs")}


def settings_json(catalog: Catalog, key: str) -> Any:
    raw = catalog.setting(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def set_settings_json(catalog: Catalog, key: str, value: Any) -> None:
    catalog.set_setting(key, json.dumps(value, sort_keys=True))
