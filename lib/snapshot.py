"""Snapshot a directory into trees, file records and chunks (the work behind `tessera commit`).

One pass in bounded memory (issue 14: peak memory must not grow with the file count):
1. walk: directories depth-first, one at a time: `lstat` every entry; the directory's stat-cache rows
   (dev, inode, size, mtime_ns, ctime_ns -> file id; one query per directory) decide which files must be
   read at all, and the directory-cache rows of its subdirectories (one query) which subtrees are kept
   whole. Unchanged trees read no file bytes and build no trees.
2. ingest: files to read go in batches to worker threads (hashing, FastCDC, xxh3 and zstd all release
   the GIL), with a bounded number of batches and bytes in flight: each changed file is read once
   (SHA-256 of the whole file, chunk ids, new chunks compressed into per-thread packs). A file that
   changes while being read is read again. With ``keep_busy`` (the daemon), a file some process holds
   open for writing when the snapshot starts or at the checkpoint after its read, or whose stat changed
   after our read, keeps its previous record: a writer paused between two `write()` calls is never
   captured torn.
3. trees: a directory's tree is built as soon as its files are read and its subdirectories are built,
   and written to the catalog in batches (children before parents).
4. checkpoints: records of files read wait in memory for the packs holding their chunks. When they
   reach half the memory budget, and at the end, every open pack is sealed and indexed, then file
   records, stat-cache rows, trees and dir-cache rows are written, in that order (docs/format.md
   "Write ordering"). The caller records the version; a crash anywhere leaves only unreferenced garbage,
   and a commit re-run after a crash does not read again what a checkpoint recorded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from tessera.catalog import Catalog, DirRow, StatRow
from tessera.config import DEFAULT_PACK_TARGET, parse_size
from tessera.errors import SourceError, TesseraError, UsageError, raise_os_error
from tessera.faults import crash_point
from tessera.format.chunker import Chunker, ChunkParams
from tessera.format.compress import thread_compressor
from tessera.ids import chunk_id
from tessera.model import DIR, FILE, SYMLINK, FileRecord, TreeEntry, normalize_mode
from tessera.progress import NullProgress, Progress
from tessera.store import PackSet, Store
from tessera.treebuild import BuiltTree, TreeBatch, encode_tree

logger = logging.getLogger(__name__)

MetaFor = Callable[[str], "dict[str, Any] | None"]
READ_RETRIES = 5
WHOLE_READ_MAX = 8 * 1024 * 1024  # files up to this size are read in one call and cut in memory
BATCH_BYTES = 4 * 1024 * 1024     # small files are handed to workers in batches of about this size
BATCH_FILES = 256
T = TypeVar("T")


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


DEFAULT_MEMORY = 256 * 1024 * 1024  # `commit.memory`: what a commit may hold beyond its fixed costs
MIN_MEMORY = 16 * 1024 * 1024
MEMORY_SETTING = "commit.memory"
MEMORY_ENV = "TESSERA_COMMIT_MEMORY"
_FILE_COST = 1700  # bytes a file read and waiting for its checkpoint holds (measured: record, stat, names)
_DIR_COST = 600  # a directory completed and waiting for its checkpoint (its dir-cache row)


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
    checkpoints: int = 0  # times open packs were sealed and the records read so far written
    trees_built: int = 0  # directories whose tree was built (the rest kept their cached tree)
    busy: list[str] = field(default_factory=list)  # kept at their previous content (still being written)
    home_skipped: str | None = None  # the tessera home, found inside the committed directory and left out


class _Dir:
    """A directory being snapshotted: scanned, waiting for its files and subdirectories, then built."""

    __slots__ = ("rel", "path", "st", "parent", "row", "entries", "pending", "files_below", "reusable",
                 "excluded")

    def __init__(self, rel: str, path: str, st: os.stat_result, parent: _Dir | None, row: DirRow | None) -> None:
        self.rel = rel
        self.path = path
        self.st = st
        self.parent = parent
        if row is not None and (row.dev, row.ino, row.mtime_ns, row.ctime_ns) != (
                st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns):
            row = None  # the directory changed since that tree was built
        self.row = row  # its directory-cache row, if still valid (looked up with its siblings)
        self.entries: list[TreeEntry] = []
        self.pending = 1  # files being read + subdirectories not done + 1 until scanned
        self.files_below = 0  # files in completed subdirectories
        self.reusable = row is not None  # no file read, nothing excluded, every subdirectory reused
        self.excluded = False  # something in or below this directory was excluded: its tree depends on the rules

    @property
    def name(self) -> str:
        return self.rel.rpartition("/")[2]


_Item = tuple[str, str, os.stat_result, "_Dir | None", "DirRow | None"]  # a directory to scan: _Dir's arguments


@dataclass(slots=True)
class _File:
    name: str
    rel: str
    path: str
    st: os.stat_result
    mode: int
    dir: _Dir
    record: FileRecord | None = None
    busy: bool = False  # not committed as read: record is the previous version's (or None: left out)


@dataclass
class Snapshot:
    root_id: str
    trees: list[tuple[str, bytes]]  # trees still to record (a streamed commit has written them already)
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
    # before) and at each checkpoint (at the latest, once all files are read); a file read since the
    # previous checkpoint that was open for writing either time, or whose stat changed after our read,
    # is busy (its ``previous`` record, or left out).
    open_files: Callable[[str], set[str]] | None = None
    open_at_start: set[str] | None = None
    # Called with each pack's id once it is sealed and indexed (a distributed commit's worker uploads it).
    on_sealed: Callable[[str], None] | None = None
    # The memory budget: records of files read wait for their packs to be sealed up to half of it, file
    # reads in flight take up to a quarter. Not counted: the directories being built (their entries).
    memory: int = DEFAULT_MEMORY


def memory_budget(setting: str | None, override: int | None = None) -> int:
    """The commit memory budget: ``override``, else ``$TESSERA_COMMIT_MEMORY``, else the home's
    ``commit.memory`` setting, else 256 MiB; never below 16 MiB."""
    if override is not None:
        value = override
    elif os.environ.get(MEMORY_ENV):
        value = parse_size(os.environ[MEMORY_ENV])
    elif setting:
        value = parse_size(setting)
    else:
        value = DEFAULT_MEMORY
    if value < MIN_MEMORY:
        raise UsageError(f"commit memory budget {value} bytes is too small: use at least 16M")
    return value


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
        self._use_cache = options.meta_for is None  # the dir cache cannot see per-entry metadata
        self._record_budget = options.memory // 2
        self._read_budget = max(options.memory // 4, 2 * WHOLE_READ_MAX)
        self._trees = TreeBatch(catalog, max(1 << 20, options.memory // 16))
        # waiting for the next checkpoint: files read (records, stat rows), directories built (dir rows)
        self._done_files: list[_File] = []
        self._unsettled: list[_File] = []  # keep_busy: read, to be checked against open files first
        self._done_dirs: list[tuple[_Dir, BuiltTree]] = []
        self._waiting = 0  # bytes the lists above hold, estimated
        self._opened: set[str] = set()
        self._root: BuiltTree | None = None

    # -- the walk: one directory at a time ---------------------------------------------------------

    def _scan(self, node: _Dir, stack: list[_Item]) -> list[_File]:
        """List one directory: symlinks become entries, files that hit the stat cache become entries,
        the rest are returned to be read; subdirectories go on ``stack``."""
        cache = self.catalog.stat_keys(node.path)
        try:
            with os.scandir(node.path) as it:
                items = list(it)
        except OSError as exc:
            raise SourceError(f"cannot read directory {node.path}: {exc.strerror}") from None
        prefix = f"{node.rel}/" if node.rel else ""
        to_read: list[_File] = []
        subdirs: list[tuple[str, str, os.stat_result]] = []
        for d in items:
            rel = prefix + d.name
            if self.opts.exclude and self.opts.exclude(rel + "/" if d.is_dir(follow_symlinks=False) else rel):
                node.excluded = True  # directories are asked with a trailing "/", as in gitignore
                self.stats.excluded += 1
                continue
            try:
                st = d.stat(follow_symlinks=False)
            except OSError as exc:
                raise SourceError(f"cannot stat {d.path}: {exc.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((rel, d.path, st))
                self.stats.dirs += 1
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(d.path)
                node.entries.append(TreeEntry(d.name, SYMLINK, 0o777, len(os.fsencode(target)), None, target,
                                              self._meta(rel)))
                self.stats.symlinks += 1
            elif stat.S_ISREG(st.st_mode):
                mode = normalize_mode(FILE, st.st_mode)
                self.stats.files += 1
                self.stats.bytes_total += st.st_size
                hit = cache.get(d.name)
                if hit and hit[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    # Size and id are all the tree needs; the chunk list is already stored.
                    node.entries.append(TreeEntry(d.name, FILE, mode, st.st_size, hit[1], None, self._meta(rel)))
                    self.stats.stat_cache_hits += 1
                else:
                    to_read.append(_File(d.name, rel, d.path, st, mode, node))
                    node.reusable = False
            else:
                logger.warning("skipping %s: not a regular file, directory or symlink", d.path)
                self.stats.skipped += 1
        if node.excluded:
            node.reusable = False
        node.pending += len(subdirs) + len(to_read)
        rows = self._dir_rows([path for _, path, _ in subdirs])
        stack.extend((rel, path, st, node, rows.get(path)) for rel, path, st in subdirs)
        return to_read

    def _dir_rows(self, paths: list[str]) -> dict[str, DirRow]:
        """The directory-cache rows of some directories (a directory's subdirectories: one query)."""
        if not self._use_cache or not paths:
            return {}
        return self.catalog.dir_rows(paths)

    def _meta(self, rel: str) -> dict[str, Any]:
        if self.opts.meta_for is None:
            return {}
        meta = self.opts.meta_for(rel) or {}
        if not isinstance(meta, dict):
            raise UsageError(f"metadata for {rel!r} must be a JSON object, got {type(meta).__name__}")
        return meta

    # -- completing directories, bottom-up ---------------------------------------------------------

    def _done(self, node: _Dir) -> None:
        """One thing ``node`` waited for is done; build every directory that has nothing left to wait for."""
        node.pending -= 1
        while node.pending == 0:
            row = node.row
            if node.reusable and row is not None and self._use_cache:
                built = BuiltTree(row.tree_id, b"", row.size, row.files)
            else:
                built = encode_tree(node.entries, node.files_below)
                self._trees.add(built)
                self.stats.trees_built += 1
                if self._use_cache and not node.excluded:
                    self._done_dirs.append((node, built))
                    self._waiting += _DIR_COST
            node.entries = []
            parent = node.parent
            if parent is None:
                self._root = built
                return
            parent.entries.append(TreeEntry(node.name, DIR, 0o755, built.size, built.id, None, self._meta(node.rel)))
            parent.files_below += built.files
            if built.data:
                parent.reusable = False
            if node.excluded:  # an exclusion below counts too: no dir-cache row above it, none reused
                parent.excluded = True
                parent.reusable = False
            parent.pending -= 1
            node = parent

    def _file_read(self, f: _File) -> None:
        if f.busy:  # kept changing while read: its previous record, never remembered in the caches
            self._add_file_entry(f)
            self._done(f.dir)
        elif self.opts.open_files is not None:
            self._unsettled.append(f)  # its directory waits for the next checkpoint's check
            self._waiting += _FILE_COST
        else:
            self._add_file_entry(f)
            self._done_files.append(f)
            self._waiting += _FILE_COST + 20 * len(f.record.chunks if f.record else ())
            self._done(f.dir)

    def _add_file_entry(self, f: _File) -> None:
        if f.record is not None:  # None: busy and new, left out of this version
            f.dir.entries.append(TreeEntry(f.name, FILE, f.mode, f.record.size, f.record.id, None, self._meta(f.rel)))

    # -- ingest -----------------------------------------------------------------------------------

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

    def _settle(self, root: Path) -> None:
        """keep_busy, at a checkpoint: a file read since the last one that was open for writing when the
        snapshot started or is now, or whose stat changed since our read, may hold a torn state: keep
        its previous content. (Files that hit the stat cache were not read: their recorded content is
        one that was read complete earlier and their stat says it is still on disk.)"""
        assert self.opts.open_files is not None
        opened = self._opened | self.opts.open_files(str(root))
        files, self._unsettled = self._unsettled, []
        for f in files:
            if f.record is not None and not f.busy:
                if f.path in opened:
                    self._keep_previous(f, "open for writing")
                elif _changed_since(f):
                    self._keep_previous(f, "changed after it was read")
            self._add_file_entry(f)
            if not f.busy:
                self._done_files.append(f)
            self._done(f.dir)

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

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, root: Path, packs: PackSet) -> None:
        """Make everything read so far durable, in the write order of docs/format.md: seal and index the
        open packs, then (keep_busy: after checking the files against open writers) file records and
        stat-cache rows, then trees, then the dir-cache rows of the directories built. No worker may be
        reading. A crash in between leaves unreferenced rows; a re-run reuses what was recorded."""
        crash_point("before-seal")
        packs.checkpoint()
        packs.sealed.clear()  # their indexes are in the catalog now
        crash_point("after-seal")
        if self.opts.open_files is not None:
            self._settle(root)
        files, self._done_files = self._done_files, []
        for part in _slices(files, 20_000):
            self.catalog.add_files(f.record for f in part if f.record is not None)
        crash_point("after-files")
        for part in _slices(files, 20_000):
            self._save_stat_cache(part)
        self._trees.flush()
        built, self._done_dirs = self._done_dirs, []
        for dirs in _slices(built, 20_000):
            self.catalog.put_dir_rows(DirRow(d.path, d.st.st_dev, d.st.st_ino, d.st.st_mtime_ns, d.st.st_ctime_ns,
                                             b.id, b.size, b.files) for d, b in dirs)
        self._waiting = 0
        self.stats.checkpoints += 1
        crash_point("after-checkpoint")

    def _save_stat_cache(self, files: list[_File]) -> None:
        """Remember what was read; stat-cache hits are already there, unchanged."""
        by_dir: dict[str, list[StatRow]] = {}
        for f in files:
            if f.record is None or f.busy:
                continue
            by_dir.setdefault(f.dir.path, []).append(StatRow(
                f.name, f.st.st_dev, f.st.st_ino, f.st.st_size, f.st.st_mtime_ns, f.st.st_ctime_ns, f.record.id))
        with self.catalog.write():
            for parent, rows in by_dir.items():
                self.catalog.put_stat_rows(parent, rows)

    # -- entry point ------------------------------------------------------------------------------

    def run(self, root: Path) -> Snapshot:
        if self.opts.open_files is not None:
            self._opened = (self.opts.open_at_start if self.opts.open_at_start is not None
                            else self.opts.open_files(str(root)))
        packs = PackSet(self.store, self.opts.pack_target, on_sealed=self.opts.on_sealed)
        workers = self.opts.workers or min(8, (os.cpu_count() or 2) + 2)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest")
        self.progress.start("commit", None)
        try:
            self._walk(root, packs, pool, workers)
            self._checkpoint(root, packs)
        except BaseException:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            packs.abort()
            raise
        pool.shutdown(wait=True)
        self.progress.finish()
        self.stats.new_chunks = packs.new_chunks
        self.stats.new_bytes_stored = packs.new_bytes
        assert self._root is not None
        return Snapshot(self._root.id, [], self._root.files, self._root.size, self.stats)

    def _walk(self, root: Path, packs: PackSet, pool: ThreadPoolExecutor, workers: int) -> None:
        """Scan directories depth-first while workers read files: at most ``2 x workers`` batches and a
        quarter of the memory budget in flight; a checkpoint whenever the records waiting for their packs
        pass half of it."""
        top_st = os.stat(root)
        stack: list[_Item] = []
        inflight: dict[Future[None], tuple[list[_File], int]] = {}
        batch: list[_File] = []
        batch_bytes = 0
        inflight_bytes = 0
        node: _Dir | None = _Dir("", str(root), top_st, None, self._dir_rows([str(root)]).get(str(root)))

        def submit() -> None:
            nonlocal batch, batch_bytes, inflight_bytes
            if batch:
                inflight[pool.submit(self._ingest_batch, batch, packs)] = (batch, batch_bytes)
                inflight_bytes += batch_bytes
                batch, batch_bytes = [], 0

        def collect(block: bool) -> None:
            nonlocal inflight_bytes
            if not inflight:
                return
            done, _ = wait(inflight, return_when=FIRST_COMPLETED) if block else (
                [fu for fu in inflight if fu.done()], None)
            for fu in done:
                files, nbytes = inflight.pop(fu)
                inflight_bytes -= nbytes
                exc = fu.exception()
                if exc is not None:
                    raise exc
                for f in files:
                    self._file_read(f)

        while True:
            collect(block=False)
            if self._waiting >= self._record_budget:
                submit()
                while inflight:
                    collect(block=True)
                self._checkpoint(root, packs)
                continue
            if len(inflight) >= 2 * workers or inflight_bytes >= self._read_budget:
                collect(block=True)
                continue
            if node is None:
                if not stack:
                    submit()
                    if not inflight:
                        break
                    collect(block=True)
                    continue
                node = _Dir(*stack.pop())
            for f in self._scan(node, stack):
                batch.append(f)
                batch_bytes += min(f.st.st_size, WHOLE_READ_MAX)
                if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_FILES:
                    submit()
            self._done(node)  # scanned
            node = None


def _slices(items: list[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _changed_since(f: _File) -> bool:
    """Is ``f`` (inode, size, mtime, ctime) no longer what our read of it ended with?"""
    try:
        st = os.lstat(f.path)
    except OSError:
        return True  # gone (or replaced by something unreadable) since we read it
    return ((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            != (f.st.st_ino, f.st.st_size, f.st.st_mtime_ns, f.st.st_ctime_ns))


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
