"""Snapshot a directory into trees, file records and chunks (the work behind `tessera commit`).

Three phases:
1. walk: `lstat` every path; the stat cache (dev, inode, size, mtime_ns, ctime_ns -> file id) decides
   which files must be read at all. Unchanged trees read no file bytes.
2. ingest: worker threads (hashing, FastCDC, xxh3 and zstd all release the GIL) read each changed file
   once: SHA-256 of the whole file, chunk ids, and new chunks compressed into per-thread packs. A file
   that changes while being read is read again. With ``keep_busy`` (the daemon), a file some process
   holds open for writing when the snapshot starts or ends, or whose stat changed after our read,
   keeps its previous record: a writer paused between two `write()` calls is never captured torn.
3. seal and record: packs are fsynced and indexed, then file rows, then trees are built bottom-up.
   The caller records the version; a crash anywhere leaves only unreferenced garbage.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tessera.catalog import Catalog, DirRow, StatRow
from tessera.config import DEFAULT_PACK_TARGET
from tessera.errors import SourceError, TesseraError, UsageError
from tessera.faults import crash_point
from tessera.format.chunker import Chunker, ChunkParams
from tessera.format.compress import thread_compressor
from tessera.ids import chunk_id
from tessera.model import DIR, FILE, SYMLINK, Entry, FileRecord, normalize_mode
from tessera.treebuild import BuiltTrees, build_trees
from tessera.progress import NullProgress, Progress
from tessera.errors import raise_os_error
from tessera.store import PackSet, Store

logger = logging.getLogger(__name__)

MetaFor = Callable[[str], "dict[str, Any] | None"]
READ_RETRIES = 5
WHOLE_READ_MAX = 8 * 1024 * 1024  # files up to this size are read in one call and cut in memory
BATCH_BYTES = 4 * 1024 * 1024     # small files are handed to workers in batches of about this size
BATCH_FILES = 256


def _read_upto(fd: int, size: int) -> bytes:
    """The first ``size + 1`` bytes at most: one byte more than stat'ed tells the caller the file grew
    (and it will be read again), without ever chasing a writer that appends faster than we read."""
    parts = []
    left = size + 1
    while left > 0:
        block = os.read(fd, min(left, 1 << 24))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Bounded:
    """A reader that stops after ``limit`` bytes (for streaming big files; see `_read_upto`)."""

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def readinto(self, buf: memoryview) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buf)
        n = self._raw.readinto(view[: min(len(view), self._left)])
        self._left -= n or 0
        return n or 0


@dataclass
class SnapshotStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    skipped: int = 0
    excluded: int = 0  # entries left out by exclude rules (an excluded directory counts once)
    bytes_total: int = 0
    files_read: int = 0
    bytes_read: int = 0
    stat_cache_hits: int = 0
    new_chunks: int = 0
    new_bytes_stored: int = 0
    busy: list[str] = field(default_factory=list)  # kept at their previous content (still being written)
    home_skipped: str | None = None  # the tessera home, found inside the committed directory and left out


@dataclass(slots=True)
class _File:
    rel: str
    path: str
    st: os.stat_result
    mode: int
    record: FileRecord | None = None
    busy: bool = False  # kept changing while read: record is the previous version's (or None: left out)


@dataclass
class _Dir:
    rel: str
    path: str
    st: os.stat_result
    files: list[_File] = field(default_factory=list)
    links: list[Entry] = field(default_factory=list)
    dirs: list["_Dir"] = field(default_factory=list)
    all_cached: bool = True
    excluded: bool = False  # something in or below this directory was excluded: its tree depends on the rules


@dataclass
class Snapshot:
    root_id: str
    trees: list[tuple[str, bytes]]
    files: int
    size: int
    stats: SnapshotStats


@dataclass
class SnapshotOptions:
    params: ChunkParams
    level: int = 3
    pack_target: int = DEFAULT_PACK_TARGET
    workers: int = 0
    meta_for: MetaFor | None = None
    exclude: Callable[[str], bool] | None = None  # relative path ("dir/" for a directory) -> leave out?
    # For a file that keeps changing while read: its previously committed record (None: leave it out).
    # When unset, such a file fails the commit with SourceError.
    previous: Callable[[str], FileRecord | None] | None = None
    # keep_busy: the files below a directory that some process holds open for writing (`tessera.openfiles`).
    # Asked when the snapshot starts (unless ``open_at_start`` already holds such a scan, made just
    # before) and once all files are read; a file read this time that was open for writing either
    # time, or whose stat changed after our read, is busy (its ``previous`` record, or left out).
    open_files: Callable[[str], set[str]] | None = None
    open_at_start: set[str] | None = None


class Snapshotter:
    def __init__(self, catalog: Catalog, store: Store, options: SnapshotOptions,
                 progress: Progress | None = None) -> None:
        self.catalog = catalog
        self.store = store
        self.opts = options
        self.progress = progress or NullProgress()
        self.stats = SnapshotStats()
        self._stats_lock = threading.Lock()
        self._tls = threading.local()
        self._stop = threading.Event()

    # -- phase 1: walk ----------------------------------------------------------------------------

    def _walk(self, root: Path) -> tuple[_Dir, list[_File]]:
        top = _Dir("", str(root), os.stat(root))
        to_read: list[_File] = []
        stack = [top]
        while stack:
            node = stack.pop()
            cache = self.catalog.stat_keys(node.path)
            try:
                with os.scandir(node.path) as it:
                    items = list(it)
            except OSError as exc:
                raise SourceError(f"cannot read directory {node.path}: {exc.strerror}") from None
            for d in items:
                rel = f"{node.rel}/{d.name}" if node.rel else d.name
                if self.opts.exclude and self.opts.exclude(rel + "/" if d.is_dir(follow_symlinks=False) else rel):
                    node.excluded = True  # directories are asked with a trailing "/", as in gitignore
                    self.stats.excluded += 1
                    continue
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError as exc:
                    raise SourceError(f"cannot stat {d.path}: {exc.strerror}") from None
                if stat.S_ISDIR(st.st_mode):
                    child = _Dir(rel, d.path, st)
                    node.dirs.append(child)
                    stack.append(child)
                    self.stats.dirs += 1
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(d.path)
                    node.links.append(Entry(rel, SYMLINK, 0o777, len(os.fsencode(target)), None, target))
                    self.stats.symlinks += 1
                elif stat.S_ISREG(st.st_mode):
                    f = _File(rel, d.path, st, normalize_mode(FILE, st.st_mode))
                    node.files.append(f)
                    self.stats.files += 1
                    self.stats.bytes_total += st.st_size
                    hit = cache.get(d.name)
                    if hit and hit[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                        # Size and id are all the trees need; the chunk list is already stored.
                        f.record = FileRecord(hit[1], st.st_size, ())
                        self.stats.stat_cache_hits += 1
                    else:
                        to_read.append(f)
                        node.all_cached = False
                else:
                    logger.warning("skipping %s: not a regular file, directory or symlink", d.path)
                    self.stats.skipped += 1
        return top, to_read

    def _meta(self, rel: str) -> dict[str, Any]:
        if self.opts.meta_for is None:
            return {}
        meta = self.opts.meta_for(rel) or {}
        if not isinstance(meta, dict):
            raise UsageError(f"metadata for {rel!r} must be a JSON object, got {type(meta).__name__}")
        return meta

    # -- phase 2: ingest --------------------------------------------------------------------------

    def _chunker(self) -> Chunker:
        ch = getattr(self._tls, "chunker", None)
        if ch is None:
            ch = self._tls.chunker = Chunker(self.opts.params)
        return ch

    def _ingest_batch(self, files: list[_File], packs: PackSet) -> None:
        for f in files:
            self._ingest(f, packs)

    def _ingest(self, f: _File, packs: PackSet) -> None:
        for _ in range(READ_RETRIES):
            if self._stop.is_set():
                return
            record, changed = self._read_file(f, packs)
            if not changed:
                f.record = record
                return
            logger.info("%s changed while being read; reading it again", f.path)
            f.st = os.lstat(f.path)
        if self.opts.previous is None:
            raise SourceError(f"{f.path} kept changing while being read ({READ_RETRIES} tries)")
        self._keep_previous(f, "kept changing while being read")

    def _keep_previous(self, f: _File, why: str) -> None:
        """keep_busy: ``f`` is not committed as read; it keeps its previous record (or is left out)."""
        assert self.opts.previous is not None
        f.busy = True
        f.record = self.opts.previous(f.rel)
        with self._stats_lock:
            self.stats.busy.append(f.rel)
        logger.warning("%s is still being written (%s): %s", f.path, why,
                       "keeping its previous version" if f.record else "leaving it out of this version")

    def _settle(self, root: Path, files: list[_File], opened: set[str]) -> None:
        """keep_busy, once every file is read: a file that was open for writing when the snapshot
        started or is now, or whose stat changed since our read, may hold a torn state: keep its
        previous content. (Files that hit the stat cache were not read: their recorded content is one
        that was read complete earlier and their stat says it is still on disk.)"""
        assert self.opts.open_files is not None
        opened = opened | self.opts.open_files(str(root))
        for f in files:
            if f.busy or f.record is None:
                continue
            if f.path in opened:
                self._keep_previous(f, "open for writing")
            elif _changed_since(f):
                self._keep_previous(f, "changed after it was read")

    def _read_file(self, f: _File, packs: PackSet) -> tuple[FileRecord, bool]:
        try:
            fd = os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot read {f.path}: {exc.strerror}") from None
        with open(fd, "rb", buffering=0) as fh:
            before = os.fstat(fd)
            sha = hashlib.sha256()
            chunks: list[tuple[bytes, int]] = []
            comp = thread_compressor(self.opts.level)
            size = 0
            try:
                if before.st_size <= WHOLE_READ_MAX:
                    pieces = self._chunker().cut_buf(_read_upto(fd, before.st_size))
                else:
                    pieces = self._chunker().cut_stream(_Bounded(fh, before.st_size + 1))  # type: ignore[arg-type]
                for piece in pieces:
                    sha.update(piece)
                    cid = chunk_id(piece)
                    n = len(piece)
                    chunks.append((cid, n))
                    size += n
                    if packs.claim([cid])[0]:
                        codec, stored = comp.compress(piece)
                        packs.add(cid, codec, stored, n)
                    self.progress.advance(n)
            except OSError as exc:
                if exc.errno == 28:
                    raise_os_error(exc, "writing a pack")
                raise SourceError(f"cannot read {f.path}: {exc.strerror}") from None
            after = os.fstat(fd)
        with self._stats_lock:
            self.stats.files_read += 1
            self.stats.bytes_read += size
        changed = (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
            (f.st.st_size, f.st.st_mtime_ns) != (after.st_size, after.st_mtime_ns)) or size != after.st_size
        f.st = after
        return FileRecord(sha.hexdigest(), size, tuple(chunks)), changed

    def _ingest_all(self, files: list[_File], packs: PackSet) -> None:
        workers = self.opts.workers or min(8, (os.cpu_count() or 2) + 2)
        self.progress.start("commit", sum(f.st.st_size for f in files))
        if not files:
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
            futures: list[Future[None]] = [pool.submit(self._ingest_batch, b, packs) for b in _batches(files)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [fu for fu in done if fu.exception() is not None]
            if failed:
                self._stop.set()
                for fu in futures:
                    fu.cancel()
                raise failed[0].exception()  # type: ignore[misc]
        self.progress.finish()

    # -- phase 3: trees ---------------------------------------------------------------------------

    def _trees(self, top: _Dir) -> BuiltTrees:
        """Build trees, reusing the cached tree id of every unchanged directory. Not with per-entry
        metadata (the cache cannot see it), and never for a directory where something was excluded
        (its tree depends on the exclude rules, which may change between commits)."""
        use_cache = self.opts.meta_for is None
        all_dirs: list[_Dir] = []
        stack = [top]
        while stack:
            d = stack.pop()
            all_dirs.append(d)
            stack.extend(d.dirs)
        cached = self.catalog.dir_rows([d.path for d in all_dirs]) if use_cache else {}
        reusable: dict[str, tuple[str, int, int]] = {}
        for d in reversed(all_dirs):  # children before parents
            d.excluded = d.excluded or any(c.excluded for c in d.dirs)  # an exclusion below counts too
            row = cached.get(d.path)
            if (row and d.all_cached and not d.excluded and all(c.rel in reusable for c in d.dirs)
                    and (row.dev, row.ino, row.mtime_ns, row.ctime_ns)
                    == (d.st.st_dev, d.st.st_ino, d.st.st_mtime_ns, d.st.st_ctime_ns)):
                reusable[d.rel] = (row.tree_id, row.size, row.files)
        if "" in reusable:
            tid, size, files = reusable[""]
            return BuiltTrees(tid, [], files, size)
        entries: list[Entry] = []
        stack = [top]
        while stack:
            d = stack.pop()
            if d.rel:
                entries.append(Entry(d.rel, DIR, 0o755, 0, meta=self._meta(d.rel)))
            entries.extend(Entry(e.path, e.kind, e.mode, e.size, None, e.target, self._meta(e.path)) for e in d.links)
            for f in d.files:
                if f.record is None:
                    continue  # busy and new: left out of this version
                entries.append(Entry(f.rel, FILE, f.mode, f.record.size, f.record.id, None, self._meta(f.rel)))
            stack.extend(c for c in d.dirs if c.rel not in reusable)
        # only the outermost reusable directories: their insides are already in the catalog
        outer = {rel: v for rel, v in reusable.items() if rel.rpartition("/")[0] not in reusable}
        built = build_trees(entries, prebuilt=outer)
        if use_cache:
            self._save_dir_cache(all_dirs, reusable, built)
        return built

    def _save_dir_cache(self, dirs: list[_Dir], reusable: dict[str, tuple[str, int, int]],
                        built: BuiltTrees) -> None:
        rows = [DirRow(d.path, d.st.st_dev, d.st.st_ino, d.st.st_mtime_ns, d.st.st_ctime_ns, *built.dirs[d.rel])
                for d in dirs if d.rel not in reusable and d.rel in built.dirs and not d.excluded]
        self.catalog.put_dir_rows(rows)

    # -- entry point ------------------------------------------------------------------------------

    def run(self, root: Path) -> Snapshot:
        opened: set[str] = set()
        if self.opts.open_files is not None:
            opened = self.opts.open_at_start if self.opts.open_at_start is not None else self.opts.open_files(str(root))
        top, to_read = self._walk(root)
        packs = PackSet(self.store, self.opts.pack_target)
        try:
            self._ingest_all(to_read, packs)
            if self.opts.open_files is not None:
                self._settle(root, to_read, opened)
            crash_point("before-seal")
            packs.finish()
        except BaseException:
            self._stop.set()
            packs.abort()
            raise
        crash_point("after-seal")
        self.stats.new_chunks = packs.new_chunks
        self.stats.new_bytes_stored = packs.new_bytes
        self.catalog.add_files(f.record for f in to_read if f.record is not None and not f.busy)
        crash_point("after-files")
        self._save_stat_cache(to_read)
        built = self._trees(top)
        return Snapshot(built.root_id, built.trees, built.files, built.size, self.stats)

    def _save_stat_cache(self, files: list[_File]) -> None:
        """Remember what was read; stat-cache hits are already there, unchanged."""
        by_dir: dict[str, list[StatRow]] = {}
        for f in files:
            if f.record is None or f.busy:
                continue
            parent, _, name = f.path.rpartition("/")
            by_dir.setdefault(parent, []).append(StatRow(
                name, f.st.st_dev, f.st.st_ino, f.st.st_size, f.st.st_mtime_ns, f.st.st_ctime_ns, f.record.id))
        with self.catalog.write():
            for parent, rows in by_dir.items():
                self.catalog.put_stat_rows(parent, rows)


def _changed_since(f: _File) -> bool:
    """Is ``f`` (inode, size, mtime, ctime) no longer what our read of it ended with?"""
    try:
        st = os.lstat(f.path)
    except OSError:
        return True  # gone (or replaced by something unreadable) since we read it
    return ((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            != (f.st.st_ino, f.st.st_size, f.st.st_mtime_ns, f.st.st_ctime_ns))


def _batches(files: list[_File]) -> list[list[_File]]:
    out: list[list[_File]] = []
    cur: list[_File] = []
    size = 0
    for f in files:
        cur.append(f)
        size += f.st.st_size
        if size >= BATCH_BYTES or len(cur) >= BATCH_FILES:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def snapshot_dir(catalog: Catalog, store: Store, root: str | Path, options: SnapshotOptions,
                 progress: Progress | None = None) -> Snapshot:
    path = Path(root)
    if not path.exists():
        raise UsageError(f"{root}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{root}: not a directory")
    try:
        with store.writing():
            return Snapshotter(catalog, store, options, progress).run(path.resolve())
    except TesseraError:
        raise
    except OSError as exc:
        raise_os_error(exc, f"committing {root}")
        raise
