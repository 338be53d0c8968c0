"""One SQLite database (WAL, busy timeout) indexing datasets, versions, trees, files, chunks, packs.

Thread-safe: one connection guarded by a lock, so commit workers can ask "which of these chunks do we
already have?" while the main thread writes. Write transactions are explicit (`BEGIN IMMEDIATE`).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterable, Iterator, Sequence
from urllib.parse import quote

from tessera.catalog.schema import SCHEMA_VERSION, migrations
from tessera.catalog.sqlite import Database
from tessera.errors import ReadOnlyHome, SchemaTooNew, TesseraError
from tessera.format.pack import BlobInfo
from tessera.model import ChunkLocation, FileRecord, HistoryEntry

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 60.0
_BATCH = 500


@dataclass(frozen=True)
class PackInfo:
    id: str
    size: int
    blobs: int
    local: bool


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    head: str | None
    versions: int
    created: float


@dataclass(frozen=True)
class StatRow:
    name: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    file_id: str


@dataclass(frozen=True)
class DirRow:
    path: str
    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    tree_id: str
    size: int
    files: int


def _chunks(seq: Sequence[Any], n: int = _BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


_CHUNK_COLS = "id, pack, offset, stored_len, raw_len, codec"


def db_name(name: str) -> str | bytes:
    """How a file or directory name is stored in the stat and directory caches: as TEXT when it is
    valid UTF-8 (always so far), else as a BLOB of its bytes (`os.fsencode` of a surrogate-escaped
    name). TEXT and BLOB never compare equal in SQLite, so lookups use the same conversion."""
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name)


def name_of(value: str | bytes) -> str:
    """The inverse of `db_name`."""
    return value if isinstance(value, str) else os.fsdecode(value)


def _connect_read_only(path: Path, timeout: float) -> sqlite3.Connection:
    """Open an existing catalog without writing anything. ``immutable=1`` when the directory cannot
    hold the WAL index (-shm) and none exists: SQLite then reads the database file as is (a home made
    read-only after its last writer closed it has no WAL content left)."""
    query = "mode=ro"
    shm = path.with_name(path.name + "-shm")
    if not os.access(path.parent, os.W_OK) and not shm.exists():
        query += "&immutable=1"
    uri = f"file:{quote(os.fsencode(path))}?{query}"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)


class Catalog:
    def __init__(self, path: str | Path, *, read_only: bool = False, timeout: float = BUSY_TIMEOUT_S) -> None:
        """``read_only``: open an existing catalog for reading only (`write` raises `ReadOnlyHome`).
        ``timeout``: seconds to wait for a lock another process holds."""
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        try:
            if read_only:
                conn = _connect_read_only(self.path, timeout)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            raise TesseraError(f"catalog {self.path} is not a usable SQLite database: {exc}") from None
        if not read_only:
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys=OFF")
        self.conn = conn
        self.db = Database(conn)
        self._migrate()

    # -- plumbing ---------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._lock:
            found = None
            if "settings" in self.db.table_names():
                found = self._setting_unlocked("schema_version")
                if found is not None and int(found) > SCHEMA_VERSION:
                    raise SchemaTooNew(
                        f"catalog {self.path} has schema version {found}, this tessera knows up to "
                        f"{SCHEMA_VERSION}: upgrade tessera"
                    )
            if self.read_only:
                if found is None or int(found) < SCHEMA_VERSION:
                    raise ReadOnlyHome(f"catalog {self.path} needs an upgrade to schema version {SCHEMA_VERSION}, "
                                       "but its home is read-only: open it once where it can be written")
                return
            if not migrations.pending(self.db):
                return
            migrations.apply(self.db)
            with self.write():
                self.conn.execute(
                    "INSERT OR REPLACE INTO settings VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction; nested calls join the outer one."""
        with self._lock:
            if self.conn.in_transaction:
                yield self.conn
                return
            if self.read_only:
                raise ReadOnlyHome(f"tessera home {self.path.parent} is read-only (a read-only file system or no "
                                   "write permission): only reading commands work here")
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read query (the table modules `remote_state`, `daemon_state` use this too)."""
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
            return row

    def select_in(self, sql: str, values: Sequence[Any], params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` whose ``{in}`` placeholder stands for ``IN (?, ...)`` over ``values``, asked
        in batches of 500 (SQLite's variable limit); ``params`` come before the values."""
        out: list[tuple[Any, ...]] = []
        for part in _chunks(list(values)):
            out.extend(self.query(sql.replace("{in}", f"IN ({','.join('?' * len(part))})"), (*params, *part)))
        return out

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # -- settings ---------------------------------------------------------------------------------

    def _setting_unlocked(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def setting(self, key: str) -> str | None:
        with self._lock:
            return self._setting_unlocked(key)

    def set_setting(self, key: str, value: str) -> None:
        with self.write() as c:
            c.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def delete_setting(self, key: str) -> None:
        with self.write() as c:
            c.execute("DELETE FROM settings WHERE key = ?", (key,))

    # -- datasets, history, tags -------------------------------------------------------------------

    def datasets(self) -> list[DatasetInfo]:
        rows = self.query(
            "SELECT d.name, d.head, d.created, (SELECT count(*) FROM history h WHERE h.dataset = d.name)"
            " FROM datasets d ORDER BY d.name"
        )
        return [DatasetInfo(name, head, n, created) for name, head, created, n in rows]

    def dataset_head(self, name: str) -> tuple[bool, str | None]:
        row = self.query_one("SELECT head FROM datasets WHERE name = ?", (name,))
        return (row is not None, row[0] if row else None)

    def history(self, dataset: str, limit: int | None = None) -> list[HistoryEntry]:
        sql = (
            "SELECT h.seq, h.dataset, h.hash, h.parent, h.time, h.author, h.message, h.meta, v.files, v.size"
            " FROM history h JOIN versions v ON v.hash = h.hash WHERE h.dataset = ? ORDER BY h.seq DESC"
        )
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [self._history_row(r) for r in self.query(sql, (dataset,))]

    def history_entry(self, dataset: str, hash: str) -> HistoryEntry | None:
        row = self.query_one(
            "SELECT h.seq, h.dataset, h.hash, h.parent, h.time, h.author, h.message, h.meta, v.files, v.size"
            " FROM history h JOIN versions v ON v.hash = h.hash WHERE h.dataset = ? AND h.hash = ?"
            " ORDER BY h.seq DESC LIMIT 1",
            (dataset, hash),
        )
        return self._history_row(row) if row else None

    @staticmethod
    def _history_row(r: tuple[Any, ...]) -> HistoryEntry:
        seq, dataset, hash_, parent, t, author, message, meta, files, size = r
        return HistoryEntry(dataset, hash_, parent, t, author, message, json.loads(meta), files, size, seq)

    def find_versions(self, dataset: str, prefix: str) -> list[str]:
        rows = self.query(
            "SELECT DISTINCT hash FROM history WHERE dataset = ? AND hash >= ? AND hash < ? ORDER BY hash",
            (dataset, prefix, prefix + "g"),
        )
        return [r[0] for r in rows]

    def tag(self, dataset: str, tag: str) -> str | None:
        row = self.query_one("SELECT hash FROM tags WHERE dataset = ? AND tag = ?", (dataset, tag))
        return row[0] if row else None

    def tags(self, dataset: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for tag, hash_ in self.query("SELECT tag, hash FROM tags WHERE dataset = ? ORDER BY tag", (dataset,)):
            out.setdefault(hash_, []).append(tag)
        return out

    def set_tag(self, dataset: str, tag: str, hash: str) -> None:
        with self.write() as c:
            c.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (dataset, tag, hash))

    def has_version(self, hash: str) -> bool:
        return self.query_one("SELECT 1 FROM versions WHERE hash = ?", (hash,)) is not None

    def version_hashes(self) -> list[str]:
        return [r[0] for r in self.query("SELECT hash FROM versions ORDER BY hash")]

    def record_version(self, entry: HistoryEntry, trees: Iterable[tuple[str, bytes]],
                       *, move_head: bool = True) -> bool:
        """Atomically store the trees, the version row, its history row and move the dataset head.

        Returns False (and changes nothing) when the dataset already has this version as its head.
        """
        now = time.time()
        with self.write() as c:
            row = c.execute("SELECT head FROM datasets WHERE name = ?", (entry.dataset,)).fetchone()
            if row is not None and row[0] == entry.hash:
                return False
            c.executemany("INSERT OR IGNORE INTO trees VALUES (?, ?)", trees)
            c.execute("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)",
                      (entry.hash, entry.files, entry.size, now))
            if row is None:
                c.execute("INSERT INTO datasets VALUES (?, NULL, ?)", (entry.dataset, now))
            c.execute(
                "INSERT INTO history (dataset, hash, parent, time, author, message, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.dataset, entry.hash, entry.parent, entry.time, entry.author, entry.message,
                 json.dumps(entry.meta, sort_keys=True)),
            )
            if move_head:
                c.execute("UPDATE datasets SET head = ? WHERE name = ?", (entry.hash, entry.dataset))
            return True

    def import_version(self, hash: str, files: int, size: int, history: Sequence[HistoryEntry]) -> None:
        """Add a version learnt from a remote (its trees, files and chunks already recorded) and its
        history entries, in time order; entries the catalog already has are skipped. Each dataset's head
        becomes its newest entry by time. Joins the caller's transaction if there is one."""
        now = time.time()
        with self.write() as c:
            c.execute("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)", (hash, files, size, now))
            for e in sorted(history, key=lambda e: e.time):
                dup = c.execute("SELECT 1 FROM history WHERE dataset = ? AND hash = ? AND time = ?",
                                (e.dataset, e.hash, e.time)).fetchone()
                if dup:
                    continue
                if not c.execute("SELECT 1 FROM datasets WHERE name = ?", (e.dataset,)).fetchone():
                    c.execute("INSERT INTO datasets VALUES (?, NULL, ?)", (e.dataset, now))
                c.execute("INSERT INTO history (dataset, hash, parent, time, author, message, meta)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (e.dataset, e.hash, e.parent, e.time, e.author, e.message,
                           json.dumps(e.meta, sort_keys=True)))
                c.execute("UPDATE datasets SET head = (SELECT h.hash FROM history h JOIN versions v ON v.hash = h.hash"
                          " WHERE h.dataset = ? ORDER BY h.time DESC, h.seq DESC LIMIT 1) WHERE name = ?",
                          (e.dataset, e.dataset))

    def append_history(self, entry: HistoryEntry) -> None:
        """Record ``entry`` for a version the dataset already has, without moving its head (a run that
        produced the head's content again, with its own lineage)."""
        with self.write() as c:
            c.execute("INSERT INTO history (dataset, hash, parent, time, author, message, meta)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (entry.dataset, entry.hash, entry.parent, entry.time, entry.author, entry.message,
                       json.dumps(entry.meta, sort_keys=True)))

    def history_for(self, dataset: str, hash: str) -> list[HistoryEntry]:
        """Every history entry recording ``dataset@hash`` (usually one), oldest first."""
        return [e for e in reversed(self.history(dataset)) if e.hash == hash]

    def datasets_of(self, hash: str) -> list[str]:
        """The datasets whose history records version ``hash``."""
        return [r[0] for r in self.query("SELECT DISTINCT dataset FROM history WHERE hash = ? ORDER BY dataset",
                                         (hash,))]

    def dataset_hashes(self, dataset: str) -> list[str]:
        """The versions of a dataset, oldest first (each once)."""
        rows = self.query("SELECT hash, min(seq) FROM history WHERE dataset = ? GROUP BY hash ORDER BY 2", (dataset,))
        return [r[0] for r in rows]

    def history_after(self, dataset: str, seq: int) -> list[HistoryEntry]:
        """Entries of ``dataset`` recorded after entry number ``seq``, oldest first."""
        return [e for e in reversed(self.history(dataset)) if e.seq > seq]

    def last_seq(self, dataset: str, hash: str) -> int:
        """The number of the newest entry recording ``dataset@hash`` (0: none)."""
        row = self.query_one("SELECT max(seq) FROM history WHERE dataset = ? AND hash = ?", (dataset, hash))
        return int(row[0] or 0) if row else 0

    def amend_history(self, seq: int, meta: dict[str, Any], message: str | None = None) -> None:
        """Replace the metadata (and message) of one history entry. Neither is part of the version hash;
        `tessera run` turns its last periodic version into the final one this way."""
        with self.write() as c:
            c.execute("UPDATE history SET meta = ? WHERE seq = ?", (json.dumps(meta, sort_keys=True), seq))
            if message is not None:
                c.execute("UPDATE history SET message = ? WHERE seq = ?", (message, seq))

    def tags_at(self, dataset: str, hash: str) -> list[str]:
        return [r[0] for r in self.query("SELECT tag FROM tags WHERE dataset = ? AND hash = ? ORDER BY tag",
                                         (dataset, hash))]

    def set_tag_if_missing(self, dataset: str, tag: str, hash: str) -> str | None:
        """Set a tag learnt from a remote unless the dataset already has a tag of that name; returns the
        hash the local tag names when it differs (the tags diverged), else None."""
        with self.write() as c:
            c.execute("INSERT OR IGNORE INTO tags VALUES (?, ?, ?)", (dataset, tag, hash))
            row = c.execute("SELECT hash FROM tags WHERE dataset = ? AND tag = ?", (dataset, tag)).fetchone()
            return row[0] if row and row[0] != hash else None

    # -- trees and files --------------------------------------------------------------------------

    def tree(self, tree_id: str) -> bytes | None:
        row = self.query_one("SELECT data FROM trees WHERE id = ?", (tree_id,))
        return row[0] if row else None

    def add_trees(self, trees: Iterable[tuple[str, bytes]]) -> None:
        with self.write() as c:
            c.executemany("INSERT OR IGNORE INTO trees VALUES (?, ?)", trees)

    def file(self, file_id: str) -> FileRecord | None:
        row = self.query_one("SELECT size, chunks FROM files WHERE id = ?", (file_id,))
        if row is None:
            return None
        return FileRecord(file_id, row[0], FileRecord.chunks_from_bytes(row[1]))

    def files_by_id(self, file_ids: Sequence[str]) -> dict[str, FileRecord]:
        """Many file records in a few queries (ids not in the catalog are absent from the result)."""
        return {fid: FileRecord(fid, size, FileRecord.chunks_from_bytes(chunks))
                for fid, size, chunks in self.select_in("SELECT id, size, chunks FROM files WHERE id {in}", file_ids)}

    def known_files(self, ids: Sequence[str]) -> set[str]:
        return {r[0] for r in self.select_in("SELECT id FROM files WHERE id {in}", ids)}

    def add_files(self, records: Iterable[FileRecord]) -> None:
        with self.write() as c:
            c.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?)",
                          ((r.id, r.size, r.chunks_to_bytes()) for r in records))

    # -- chunks and packs -------------------------------------------------------------------------

    def chunk(self, chunk_id: bytes) -> ChunkLocation | None:
        row = self.query_one(f"SELECT {_CHUNK_COLS} FROM chunks WHERE id = ?", (chunk_id,))
        return ChunkLocation(*row) if row else None

    def chunks_by_id(self, chunk_ids: Sequence[bytes]) -> dict[bytes, ChunkLocation]:
        """Many chunk locations in a few queries (unknown ids are absent from the result)."""
        return {row[0]: ChunkLocation(*row)
                for row in self.select_in(f"SELECT {_CHUNK_COLS} FROM chunks WHERE id {{in}}", chunk_ids)}

    def local_chunks(self, ids: Sequence[bytes]) -> set[bytes]:
        """The ids whose bytes are in a local pack (written here, or pulled and verified whole): the
        only chunks a commit may deduplicate against. A location learnt from a remote index is a claim
        until its pack is here, so it never counts (docs/format.md, "Trust rules")."""
        return {r[0] for r in self.select_in(
            "SELECT c.id FROM chunks c JOIN packs p ON p.id = c.pack WHERE p.local = 1 AND c.id {in}", ids)}

    def add_pack(self, pack_id: str, size: int, blobs: Sequence[BlobInfo]) -> None:
        """Record a sealed local pack and the chunks it holds (call only after the pack is durable). A
        chunk the catalog knew only in a remote pack now points here: local bytes win over claims."""
        with self.write() as c:
            c.execute("INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, 1)", (pack_id, size, len(blobs), time.time()))
            c.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET pack = excluded.pack,"
                " offset = excluded.offset, stored_len = excluded.stored_len, raw_len = excluded.raw_len,"
                " codec = excluded.codec WHERE (SELECT local FROM packs WHERE id = chunks.pack) IS NOT 1",
                ((b.id, pack_id, b.offset, b.stored_len, b.raw_len, b.codec) for b in blobs),
            )

    def add_remote_pack(self, pack: str, size: int, chunks: Sequence[ChunkLocation]) -> None:
        """Record a pack that lives only on a remote (local = 0) and the chunks its index lists. Known
        chunks keep their location (a remote index never moves a chunk), and so does a known pack."""
        with self.write() as c:
            c.execute("INSERT OR IGNORE INTO packs VALUES (?, ?, ?, ?, 0)", (pack, size, len(chunks), time.time()))
            c.executemany(f"INSERT OR IGNORE INTO chunks ({_CHUNK_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                          ((x.id, pack, x.offset, x.stored_len, x.raw_len, x.codec) for x in chunks))

    def add_remote_chunks(self, chunks: Iterable[ChunkLocation]) -> None:
        """`add_remote_pack`'s chunk rows, of any packs, taken from ``chunks`` as they come (record their
        packs with `add_remote_packs`, in the same transaction)."""
        with self.write() as c:
            c.executemany(f"INSERT OR IGNORE INTO chunks ({_CHUNK_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                          ((x.id, x.pack, x.offset, x.stored_len, x.raw_len, x.codec) for x in chunks))

    def add_remote_packs(self, packs: Iterable[tuple[str, int, int]]) -> None:
        """`add_remote_pack`'s pack rows: (id, size, chunk count) of packs that live only on a remote."""
        now = time.time()
        with self.write() as c:
            c.executemany("INSERT OR IGNORE INTO packs VALUES (?, ?, ?, ?, 0)", ((p, size, n, now) for p, size, n in packs))

    def mark_pack_local(self, pack: str) -> None:
        """The pack's file is now here, checked whole against its id and index."""
        with self.write() as c:
            c.execute("UPDATE packs SET local = 1 WHERE id = ?", (pack,))

    def pack_states(self, ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """Pack id -> (size, is local) for the packs the catalog knows."""
        return {pid: (size, bool(local))
                for pid, size, local in self.select_in("SELECT id, size, local FROM packs WHERE id {in}", ids)}

    def drop_chunk_rows(self, rows: Sequence[ChunkLocation]) -> None:
        """Forget chunk locations found false (`fsck --repair`): each only if it still points there."""
        with self.write() as c:
            c.executemany("DELETE FROM chunks WHERE id = ? AND pack = ? AND offset = ?",
                          ((x.id, x.pack, x.offset) for x in rows))

    def tree_rows(self) -> list[tuple[Any, ...]]:
        """Every tree row as stored: (id, data). A distributed commit's worker hands its temporary
        home's rows to the driver this way."""
        return self.query("SELECT id, data FROM trees")

    def file_rows(self) -> list[tuple[Any, ...]]:
        """Every file record row as stored: (id, size, chunks)."""
        return self.query("SELECT id, size, chunks FROM files")

    def packs(self) -> list[PackInfo]:
        return [PackInfo(i, s, b, bool(loc)) for i, s, b, loc in
                self.query("SELECT id, size, blobs, local FROM packs ORDER BY id")]

    def pack_blob_counts(self, ids: Sequence[str]) -> dict[str, int]:
        """Pack id -> the number of blobs it holds, for the packs the catalog knows."""
        return {pid: n for pid, n in self.select_in("SELECT id, blobs FROM packs WHERE id {in}", ids)}

    def iter_pack_chunks(self, pack_id: str) -> Generator[ChunkLocation, None, None]:
        """`pack_chunks` a page at a time (the catalog stays locked until the iterator is done or closed)."""
        with self._lock:
            cur = self.conn.execute(f"SELECT {_CHUNK_COLS} FROM chunks WHERE pack = ? ORDER BY offset", (pack_id,))
            while rows := cur.fetchmany(4096):
                yield from (ChunkLocation(*r) for r in rows)

    def pack_chunks(self, pack_id: str) -> list[ChunkLocation]:
        rows = self.query(f"SELECT {_CHUNK_COLS} FROM chunks WHERE pack = ? ORDER BY offset", (pack_id,))
        return [ChunkLocation(*r) for r in rows]

    def stats(self) -> dict[str, int]:
        row = self.query_one(
            "SELECT (SELECT count(*) FROM datasets), (SELECT count(*) FROM versions),"
            " (SELECT count(*) FROM files), (SELECT count(*) FROM chunks),"
            " (SELECT coalesce(sum(raw_len), 0) FROM chunks), (SELECT coalesce(sum(stored_len), 0) FROM chunks),"
            " (SELECT count(*) FROM packs), (SELECT coalesce(sum(size), 0) FROM packs)"
        )
        assert row is not None
        keys = ("datasets", "versions", "files", "chunks", "chunk_bytes", "stored_bytes", "packs", "pack_bytes")
        return dict(zip(keys, row))

    # -- stat cache -------------------------------------------------------------------------------

    def stat_keys(self, directory: str) -> dict[str, tuple[tuple[int, int, int, int, int], str]]:
        """The stat cache of one directory as name -> ((dev, ino, size, mtime_ns, ctime_ns), file id),
        only rows whose file record still exists. Tuples, not dataclasses: this is the recommit hot path."""
        rows = self.query(
            "SELECT s.name, s.dev, s.ino, s.size, s.mtime_ns, s.ctime_ns, s.file_id FROM stat_cache s"
            " JOIN files f ON f.id = s.file_id WHERE s.dir = ?",
            (db_name(directory),),
        )
        return {(r[0] if type(r[0]) is str else name_of(r[0])): (r[1:6], r[6]) for r in rows}  # hot: no call per row

    def dir_rows(self, paths: Sequence[str]) -> dict[str, DirRow]:
        out: dict[str, DirRow] = {}
        for part in _chunks([db_name(p) for p in paths]):
            q = ",".join("?" * len(part))
            for r in self.query(
                "SELECT d.path, d.dev, d.ino, d.mtime_ns, d.ctime_ns, d.tree_id, d.size, d.files FROM dir_cache d"
                f" JOIN trees t ON t.id = d.tree_id WHERE d.path IN ({q})", part
            ):
                out[name_of(r[0])] = DirRow(name_of(r[0]), *r[1:])
        return out

    def put_dir_rows(self, rows: Iterable[DirRow]) -> None:
        """Caches are optional: a read-only home keeps none (nor a stat cache, nor worktree records)."""
        if self.read_only:
            return
        with self.write() as c:
            c.executemany("INSERT OR REPLACE INTO dir_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          ((db_name(r.path), r.dev, r.ino, r.mtime_ns, r.ctime_ns, r.tree_id, r.size, r.files)
                           for r in rows))

    def put_stat_rows(self, directory: str, rows: Iterable[StatRow]) -> None:
        if self.read_only:
            return
        d = db_name(directory)
        with self.write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO stat_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ((d, db_name(r.name), r.dev, r.ino, r.size, r.mtime_ns, r.ctime_ns, r.file_id) for r in rows),
            )
