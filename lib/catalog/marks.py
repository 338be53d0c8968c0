"""Marks of a check in TEMP tables of the catalog's connection: what `tessera fsck` has checked and
found (trees, the chunks of the pack being read, chunk rows found false), and the chunks each version
uses for `tessera du`, so that their memory does not grow with the number of files, trees or chunks
(SQLite spills TEMP tables to disk).

TEMP tables live in the connection's own temporary database: writing them takes no lock on the catalog
and works on a read-only home. `FsckMarks` and `UsageMarks` own their tables; use them as context managers.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from tessera.catalog.catalog import Catalog
from tessera.model import ChunkLocation, FileRecord

_BATCH = 500  # SQLite's variable limit, with room
_COLS = "id, pack, offset, stored_len, raw_len, codec"

Status = tuple[int, int, int]  # (remote bytes, missing chunks, chunks with a false location)


@contextmanager
def temp_writes(catalog: Catalog) -> Iterator[sqlite3.Connection]:
    """A transaction for writes to TEMP tables only: deferred (no write lock on the catalog, so commits go
    on and a read-only home works); joins a transaction already open on the connection."""
    with catalog._lock:  # the catalog's own lock: one statement at a time on its connection
        conn = catalog.conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _parts(seq: Sequence[str] | Sequence[bytes], n: int = _BATCH) -> Iterator[Sequence[str] | Sequence[bytes]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _in(n: int) -> str:
    return f"IN ({','.join('?' * n)})"


_TABLES = ("fsck_trees", "fsck_pack_seen", "fsck_bad")


class FsckMarks:
    """What a `tessera fsck` run has found so far:

    - ``fsck_trees``: each tree walked to its end, with the status of everything below it;
    - ``fsck_pack_seen``: the chunk ids found in the local pack being read (emptied per pack);
    - ``fsck_bad``: chunk rows of remote packs found false (their index is inconsistent or a chunk fails
      its check)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def __enter__(self) -> FsckMarks:
        with temp_writes(self.catalog) as c:
            for t in _TABLES:
                c.execute(f"DROP TABLE IF EXISTS temp.{t}")
            c.execute("CREATE TEMP TABLE fsck_trees (id TEXT PRIMARY KEY, remote INTEGER, missing INTEGER,"
                      " bad INTEGER) WITHOUT ROWID")
            c.execute("CREATE TEMP TABLE fsck_pack_seen (id BLOB PRIMARY KEY) WITHOUT ROWID")
            c.execute("CREATE TEMP TABLE fsck_bad (id BLOB, pack TEXT, offset INTEGER, PRIMARY KEY (id, pack, offset))"
                      " WITHOUT ROWID")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with temp_writes(self.catalog) as c:
                for t in _TABLES:
                    c.execute(f"DROP TABLE IF EXISTS temp.{t}")
        except Exception:  # noqa: BLE001 - a closed or broken connection takes its temp tables with it
            pass

    # -- trees and files ----------------------------------------------------------------------------

    def tree_done(self, tree_id: str) -> bool:
        return self.catalog.query_one("SELECT 1 FROM temp.fsck_trees WHERE id = ?", (tree_id,)) is not None

    def tree_statuses(self, ids: Sequence[str]) -> dict[str, Status]:
        """Of the tree ids ``ids``, those walked to their end, with their status."""
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in self.catalog.select_in(
            "SELECT id, remote, missing, bad FROM temp.fsck_trees WHERE id {in}", list(dict.fromkeys(ids)))}

    def set_tree(self, tree_id: str, status: Status) -> None:
        with temp_writes(self.catalog) as c:
            c.execute("INSERT OR REPLACE INTO temp.fsck_trees VALUES (?, ?, ?, ?)", (tree_id, *status))

    def chunk_places(self, ids: Sequence[bytes]) -> dict[bytes, tuple[bool | None, bool]]:
        """Chunk id -> (its pack is local: True / remote: False / no pack row: None, its row was found
        false) for the ids the catalog has a row of."""
        out: dict[bytes, tuple[bool | None, bool]] = {}
        for part in _parts(list(dict.fromkeys(ids))):
            for cid, local, bad in self.catalog.query(
                    "SELECT c.id, p.local, EXISTS (SELECT 1 FROM temp.fsck_bad b WHERE b.id = c.id AND b.pack = c.pack"
                    f" AND b.offset = c.offset) FROM chunks c LEFT JOIN packs p ON p.id = c.pack WHERE c.id {_in(len(part))}",
                    part):
                out[bytes(cid)] = (None if local is None else bool(local), bool(bad))
        return out

    # -- the chunks of one local pack --------------------------------------------------------------

    def start_pack(self) -> None:
        with temp_writes(self.catalog) as c:
            c.execute("DELETE FROM temp.fsck_pack_seen")

    def pack_rows(self, pack: str, ids: Sequence[bytes]) -> dict[bytes, ChunkLocation]:
        """The chunk rows pointing into ``pack`` among ``ids``, except those `seen_in_pack` recorded."""
        out: dict[bytes, ChunkLocation] = {}
        for part in _parts(list(dict.fromkeys(ids))):
            for r in self.catalog.query(
                    f"SELECT {_COLS} FROM chunks WHERE pack = ? AND id {_in(len(part))}"
                    " AND id NOT IN (SELECT id FROM temp.fsck_pack_seen)", (pack, *part)):
                out[bytes(r[0])] = ChunkLocation(bytes(r[0]), *r[1:])
        return out

    def seen_in_pack(self, ids: Iterable[bytes]) -> None:
        with temp_writes(self.catalog) as c:
            c.executemany("INSERT OR IGNORE INTO temp.fsck_pack_seen VALUES (?)", ((i,) for i in ids))

    def unseen_rows(self, pack: str) -> Iterator[bytes]:
        """Ids of the chunk rows pointing into ``pack`` that `seen_in_pack` did not record."""
        after = b""
        while True:
            rows = self.catalog.query(
                "SELECT id FROM chunks WHERE pack = ? AND id > ? AND id NOT IN (SELECT id FROM temp.fsck_pack_seen)"
                " ORDER BY id LIMIT ?", (pack, after, _BATCH))
            if not rows:
                return
            yield from (bytes(r[0]) for r in rows)
            after = bytes(rows[-1][0])

    # -- remote packs -------------------------------------------------------------------------------

    def add_bad(self, rows: Iterable[ChunkLocation]) -> None:
        with temp_writes(self.catalog) as c:
            c.executemany("INSERT OR IGNORE INTO temp.fsck_bad VALUES (?, ?, ?)", ((x.id, x.pack, x.offset) for x in rows))

    def add_bad_pack(self, pack: str) -> None:
        """Every chunk row of ``pack`` is false."""
        with temp_writes(self.catalog) as c:
            c.execute("INSERT OR IGNORE INTO temp.fsck_bad SELECT id, pack, offset FROM chunks WHERE pack = ?", (pack,))

    def bad_count(self) -> int:
        row = self.catalog.query_one("SELECT count(*) FROM temp.fsck_bad")
        return int(row[0]) if row else 0

    def drop_bad(self) -> int:
        """Forget the chunk rows found false (`fsck --repair`), each only if it still points there; then
        nothing is marked false any more. Returns the rows deleted."""
        with self.catalog.write() as c:
            n = c.execute("DELETE FROM chunks WHERE EXISTS (SELECT 1 FROM temp.fsck_bad b WHERE b.id = chunks.id"
                          " AND b.pack = chunks.pack AND b.offset = chunks.offset)").rowcount
            c.execute("DELETE FROM temp.fsck_bad")
        return int(n)


def pack_span(catalog: Catalog, pack: str) -> tuple[int, int] | None:
    """Where the chunks of ``pack`` lie: (first offset, end of the last), None when it has no chunk row."""
    row = catalog.query_one("SELECT min(offset), max(offset + stored_len) FROM chunks WHERE pack = ?", (pack,))
    return None if row is None or row[0] is None else (int(row[0]), int(row[1]))


def iter_pack_rows(catalog: Catalog, pack: str, page: int = 2000) -> Iterator[list[ChunkLocation]]:
    """Every chunk row of ``pack`` in offset order, ``page`` rows at a time, from one cursor (SQLite sorts
    a big pack's rows on disk: memory stays one page)."""
    yield from iter_rows(catalog, f"SELECT {_COLS} FROM chunks WHERE pack = ? ORDER BY offset", (pack,), page)


def iter_rows(catalog: Catalog, sql: str, params: Sequence[object], page: int = 2000) -> Iterator[list[ChunkLocation]]:
    """Chunk rows (the columns of `ChunkLocation`) of one query, ``page`` at a time from one cursor."""
    with catalog._lock:
        cur = catalog.conn.execute(sql, params)
    try:
        while True:
            with catalog._lock:
                rows = cur.fetchmany(page)
            if not rows:
                return
            yield [ChunkLocation(bytes(r[0]), *r[1:]) for r in rows]
    finally:
        with catalog._lock:
            cur.close()


class UsageMarks:
    """The chunks each kept version uses, for `tessera du`: TEMP tables ``du_trees`` and ``du_files``
    (what the walk of each version has entered, so a subtree shared within a version is walked once) and
    ``du_chunks`` (version number, chunk id); then sums of stored bytes by SQL, never a set in memory."""

    _TABLES = ("du_trees", "du_files", "du_chunks", "du_versions", "du_refs", "du_ds", "du_ds_refs")

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def __enter__(self) -> UsageMarks:
        with temp_writes(self.catalog) as c:
            for t in self._TABLES:
                c.execute(f"DROP TABLE IF EXISTS temp.{t}")
            c.execute("CREATE TEMP TABLE du_versions (v INTEGER PRIMARY KEY, hash TEXT UNIQUE)")
            c.execute("CREATE TEMP TABLE du_trees (v INTEGER, id TEXT, PRIMARY KEY (v, id)) WITHOUT ROWID")
            c.execute("CREATE TEMP TABLE du_files (v INTEGER, id TEXT, PRIMARY KEY (v, id)) WITHOUT ROWID")
            c.execute("CREATE TEMP TABLE du_chunks (v INTEGER, id BLOB, PRIMARY KEY (v, id)) WITHOUT ROWID")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with temp_writes(self.catalog) as c:
                for t in self._TABLES:
                    c.execute(f"DROP TABLE IF EXISTS temp.{t}")
        except Exception:  # noqa: BLE001 - a closed or broken connection takes its temp tables with it
            pass

    def add_version(self, hash: str) -> int:
        with temp_writes(self.catalog) as c:
            cur = c.execute("INSERT INTO temp.du_versions (hash) VALUES (?)", (hash,))
            return int(cur.lastrowid or 0)

    def enter_tree(self, v: int, tree_id: str) -> bool:
        """Record that version ``v``'s walk entered a tree; False when it had already."""
        with temp_writes(self.catalog) as c:
            return bool(c.execute("INSERT OR IGNORE INTO temp.du_trees VALUES (?, ?)", (v, tree_id)).rowcount)

    def add_files(self, v: int, file_ids: Sequence[str]) -> None:
        """Version ``v`` uses these files: record them, and the chunks of those it did not use yet."""
        with temp_writes(self.catalog) as c:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS du_batch (id TEXT PRIMARY KEY) WITHOUT ROWID")
            c.execute("DELETE FROM temp.du_batch")
            c.executemany("INSERT OR IGNORE INTO temp.du_batch VALUES (?)", ((i,) for i in file_ids))
            # each batch row looked up (not all of du_files / files per batch: quadratic)
            c.execute("DELETE FROM temp.du_batch WHERE EXISTS (SELECT 1 FROM temp.du_files m WHERE m.v = ?"
                      " AND m.id = du_batch.id)", (v,))
            c.execute("INSERT INTO temp.du_files SELECT ?, id FROM temp.du_batch", (v,))
            lists = [bytes(r[0]) for r in c.execute(
                "SELECT f.chunks FROM temp.du_batch b CROSS JOIN files f ON f.id = b.id")]
            c.execute("DELETE FROM temp.du_batch")
            c.executemany("INSERT OR IGNORE INTO temp.du_chunks VALUES (?, ?)",
                          ((v, cid) for blob in lists for cid, _ in FileRecord.chunks_from_bytes(blob)))

    def version_bytes(self) -> dict[str, tuple[int, int]]:
        """Version hash -> (stored bytes of the chunks it uses, of those no other version uses)."""
        with temp_writes(self.catalog) as c:
            c.execute("DROP TABLE IF EXISTS temp.du_refs")
            c.execute("CREATE TEMP TABLE du_refs (id BLOB PRIMARY KEY, n INTEGER) WITHOUT ROWID")
            c.execute("INSERT INTO temp.du_refs SELECT id, count(*) FROM temp.du_chunks GROUP BY id")
        rows = self.catalog.query(
            "SELECT v.hash, coalesce(sum(c.stored_len), 0), coalesce(sum(CASE WHEN r.n = 1 THEN c.stored_len END), 0)"
            " FROM temp.du_versions v LEFT JOIN temp.du_chunks d ON d.v = v.v LEFT JOIN chunks c ON c.id = d.id"
            " LEFT JOIN temp.du_refs r ON r.id = d.id GROUP BY v.hash")
        return {h: (int(s), int(u)) for h, s, u in rows}

    def dataset_bytes(self, datasets: Mapping[str, Sequence[str]]) -> dict[str, tuple[int, int]]:
        """Dataset -> (stored bytes of the chunks its versions (among those walked) use, of those no other
        dataset uses); ``datasets`` maps each dataset to its version hashes."""
        with temp_writes(self.catalog) as c:
            c.execute("DROP TABLE IF EXISTS temp.du_ds")
            c.execute("DROP TABLE IF EXISTS temp.du_ds_refs")
            c.execute("CREATE TEMP TABLE du_ds (ds TEXT, id BLOB, PRIMARY KEY (ds, id)) WITHOUT ROWID")
            for name, hashes in datasets.items():
                for part in _parts(list(hashes)):
                    c.execute("INSERT OR IGNORE INTO temp.du_ds SELECT ?, d.id FROM temp.du_chunks d JOIN"
                              f" temp.du_versions v ON v.v = d.v WHERE v.hash {_in(len(part))}", (name, *part))
            c.execute("CREATE TEMP TABLE du_ds_refs (id BLOB PRIMARY KEY, n INTEGER) WITHOUT ROWID")
            c.execute("INSERT INTO temp.du_ds_refs SELECT id, count(*) FROM temp.du_ds GROUP BY id")
        rows = self.catalog.query(
            "SELECT d.ds, coalesce(sum(c.stored_len), 0), coalesce(sum(CASE WHEN r.n = 1 THEN c.stored_len END), 0)"
            " FROM temp.du_ds d JOIN temp.du_ds_refs r ON r.id = d.id LEFT JOIN chunks c ON c.id = d.id GROUP BY d.ds")
        return {name: (int(s), int(u)) for name, s, u in rows}
