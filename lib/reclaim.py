"""Local reclaim (`tessera gc`): delete what no kept version reaches, repack mostly dead packs, and
remove crash garbage — while commits, pulls, mounts and reads go on.

The roots are every version this home keeps (history, tags, the push queue) and every version a mount
of this home serves (the mount registry). One run:

1. **mark** (no lock): walk every root's trees once (shared subtrees once), marking trees, file records
   and chunks in TEMP tables of the catalog (`lifecycle_state.Marks`), so memory stays small;
2. **repack** (the shared write lock, like a commit): for each local pack whose dead share passes
   ``gc.repack_threshold``, copy its live chunks (verified on the way) into new packs, make those durable
   (fsync, rename, directory fsync), then move the chunk rows to them in one transaction;
3. **sweep** (the exclusive write lock, held briefly): mark the roots that appeared since step 1 (a
   commit that finished meanwhile, which may reuse chunks the first mark found dead), delete every
   unmarked tree, file record, chunk and pack row, the stat/directory-cache rows pointing at them and the
   worktree records of removed versions (one transaction), then delete pack files no row names and temporary files;
4. **caches** (the file cache lock, if free): delete the kernel-mount images of versions no longer kept
   and the whole files (`tessera.filecache`) no file record names any more, images first.

Crash safety: nothing is deleted before what replaces it is durable and indexed; a row is deleted only
when unmarked under the exclusive lock (no commit is between writing a pack and recording its version);
a pack file goes only after its rows. A SIGKILL anywhere leaves every kept version intact; what is left
over is garbage the next run removes (named failpoints: ``gc-after-mark``, ``repack-after-seal``,
``repack-after-move``, ``gc-locked``, ``gc-after-sweep``, ``gc-after-unlink``).

Readers are not disturbed: a repacked chunk keeps its id, and the chunk reader looks a chunk up again
when the pack it knew is gone (`tessera.reader`); an fd already open on a deleted pack keeps reading it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.catalog.lifecycle_state import (
    Marks,
    PackUse,
    SweepCounts,
    known_files,
    local_pack_bytes,
    move_chunks,
    pack_ids,
)
from tessera.errors import CorruptData, raise_os_error
from tessera.faults import crash_point
from tessera.filecache import FileCache, images_dir
from tessera.model import DIR, FILE, ChunkLocation, FileRecord
from tessera.mounting import kernel_records, record_active
from tessera.progress import NullProgress, Progress
from tessera.store import PackWriter, Store, decode_chunk, flock_polling

logger = logging.getLogger(__name__)

GC_LOCK_GRACE = 1.0  # seconds gc waits for gc.lock before saying another gc runs
LOCK_WAIT = 5.0  # seconds gc waits for a moment without commits before it gives up (its work so far stays valid)
_CHUNK_BATCH = 20_000
_FILE_BATCH = 5_000


@dataclass
class GcReport:
    dry_run: bool = False
    roots: int = 0
    live_trees: int = 0
    live_files: int = 0
    live_chunks: int = 0
    swept: SweepCounts = field(default_factory=SweepCounts)
    packs_deleted: int = 0
    repacked: int = 0  # old packs rewritten
    repack_written: int = 0  # bytes written into new packs
    packs_written: int = 0
    garbage: list[str] = field(default_factory=list)  # crash leftovers removed (temp files, unindexed packs)
    pack_bytes_before: int = 0
    pack_bytes_after: int = 0
    dead_bytes_left: int = 0  # dead bytes in packs below the repack threshold
    cached_files: int = 0  # whole files of the kernel mount's cache no kept version has (`tessera.filecache`)
    cached_bytes: int = 0
    images: int = 0  # kernel-mount images of versions no longer kept
    cache_busy: bool = False  # the file cache was locked (a kernel mount at work): left for the next gc
    errors: list[str] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return max(0, self.pack_bytes_before - self.pack_bytes_after)


@dataclass(frozen=True)
class Usage:
    """Bytes of the local packs: all of them, those kept versions use, and the rest."""

    pack_bytes: int
    live_bytes: int
    dead_bytes: int
    dead_packs: int  # local packs nothing live is left in


RootsFn = Callable[[], set[str]]


# -- marking ----------------------------------------------------------------------------------------

def mark_versions(catalog: Catalog, marks: Marks, roots: set[str], progress: Progress | None = None) -> None:
    """Mark everything the versions ``roots`` reach (trees already marked are skipped with their
    subtrees). A root whose tree or file record is missing stops the run: deleting anything on the word
    of a store that is not whole could lose data (`tessera fsck` says what is wrong). Memory stays
    bounded whatever the number of files: marks are TEMP tables, file and chunk ids go there in batches."""
    progress = progress or NullProgress()
    # a version whose metadata is fetched as it is walked keeps nothing here: its trees, file records
    # and chunk locations are on its remote (what was fetched of them is a cache, fetched again if swept)
    roots = roots - rs.lazy_hashes(catalog)
    progress.start("gc: mark", len(roots), unit="version")
    files: list[str] = []
    chunks: list[bytes] = []

    def flush(root: str) -> None:
        lists, missing = marks.add_files(list(dict.fromkeys(files)))
        files.clear()
        if missing:
            raise CorruptData(f"gc stopped, nothing was deleted: version {root[:12]} needs {missing} file "
                              "records the catalog lacks; run `tessera fsck`")
        for blob in lists:
            chunks.extend(cid for cid, _ in FileRecord.chunks_from_bytes(blob))
        if len(chunks) >= _CHUNK_BATCH:
            marks.add_chunks(chunks)
            chunks.clear()

    for root in sorted(roots):
        stack = [root]
        try:
            while stack:
                tid = stack.pop()
                if not marks.mark_tree(tid):
                    continue
                subdirs, found = tree_refs(catalog, tid)
                stack.extend(subdirs)
                files.extend(found)
                if len(files) >= _FILE_BATCH:
                    flush(root)
        except CorruptData as exc:
            raise CorruptData(f"gc stopped, nothing was deleted: version {root[:12]} is incomplete ({exc}); "
                              "run `tessera fsck`") from None
        flush(root)
        progress.advance(1)
    marks.add_chunks(chunks)
    progress.finish()


def tree_refs(catalog: Catalog, tree_id: str) -> tuple[list[str], list[str]]:
    """(subtree ids, file ids) a tree of the catalog names: only what marking needs, read straight from
    the canonical JSON (a full `Tree` costs several times more on a 100,000-file walk)."""
    data = catalog.tree(tree_id)
    if data is None:
        raise CorruptData(f"tree {tree_id[:12]} is missing")
    try:
        entries = json.loads(data)["entries"]
        dirs = [e["id"] for e in entries if e["kind"] == DIR]
        files = [e["id"] for e in entries if e["kind"] == FILE]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"tree {tree_id[:12]} is malformed ({exc})") from None
    if not all(isinstance(i, str) for i in dirs + files):
        raise CorruptData(f"tree {tree_id[:12]} is malformed")
    return dirs, files


def measure(catalog: Catalog, roots: RootsFn) -> Usage:
    """How many bytes of the local packs kept versions use (a full mark; no lock, nothing changed)."""
    with Marks(catalog) as marks:
        mark_versions(catalog, marks, roots())
        uses = marks.pack_use()
    local = [u for u in uses if u.local]
    return Usage(sum(u.size for u in local), sum(min(u.live_bytes, u.size) for u in local),
                 sum(u.dead_bytes for u in local), sum(1 for u in local if not u.live_chunks))


# -- the run ----------------------------------------------------------------------------------------

@contextmanager
def _one_gc(store: Store) -> Iterator[None]:
    fd = os.open(store.home / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        # a short grace: a process another thread of a finished gc's process forked and has not yet
        # exec'd (CLOEXEC acts only at exec) still holds that gc's lock for a moment
        flock_polling(fd, GC_LOCK_GRACE, "another gc is already running in this home")
        yield
    finally:
        os.close(fd)


def collect(catalog: Catalog, store: Store, roots: RootsFn, *, repack_threshold: float = 0.2,
            pack_target: int = 48 << 20, dry_run: bool = False, lock_wait: float = LOCK_WAIT,
            progress: Progress | None = None) -> GcReport:
    """One reclaim run (see the module doc). ``roots()`` is asked twice: before marking, and again under
    the exclusive lock."""
    report = GcReport(dry_run=dry_run)
    with _one_gc(store), Marks(catalog) as marks:
        first = roots()
        report.roots = len(first)
        report.pack_bytes_before = _local_pack_bytes(catalog)
        mark_versions(catalog, marks, first, progress)
        crash_point("gc-after-mark")
        uses = marks.pack_use()
        if dry_run:
            _drop_cached(store.home, roots, report, lambda ids: marks.marked_files(ids), dry_run=True)
            return _dry_run(report, marks, uses, repack_threshold, store)
        todo = [u for u in uses if u.local and u.live_chunks and u.dead_share > repack_threshold
                and store.has_pack_file(u.id)]
        if todo:
            _repack(catalog, store, marks, todo, pack_target, report, progress)
        with store.collecting(wait=lock_wait):
            crash_point("gc-locked")
            late = roots() - first
            if late:
                logger.info("gc: %d versions appeared while marking; marking them too", len(late))
                mark_versions(catalog, marks, late)
            report.roots += len(late)
            report.live_trees, report.live_files, report.live_chunks = marks.counts()
            report.swept = marks.sweep()
            crash_point("gc-after-sweep")
            report.packs_deleted, report.garbage = _remove_unindexed(catalog, store)
        report.pack_bytes_after = _local_pack_bytes(catalog)
        after = marks.pack_use()
        report.dead_bytes_left = sum(u.dead_bytes for u in after if u.local)
    _drop_cached(store.home, roots, report, lambda ids: known_files(catalog, ids))
    return report


def _dry_run(report: GcReport, marks: Marks, uses: list[PackUse], threshold: float, store: Store) -> GcReport:
    report.live_trees, report.live_files, report.live_chunks = marks.counts()
    report.swept = marks.dead_counts()
    local = [u for u in uses if u.local]
    gone = [u for u in local if not u.live_chunks]
    repack = [u for u in local if u.live_chunks and u.dead_share > threshold and store.has_pack_file(u.id)]
    report.packs_deleted = len(gone)
    report.repacked = len(repack)
    freed = sum(u.size for u in gone) + sum(u.dead_bytes for u in repack)
    report.pack_bytes_after = report.pack_bytes_before - freed
    report.dead_bytes_left = sum(u.dead_bytes for u in local if u.live_chunks and u not in repack)
    return report


def _local_pack_bytes(catalog: Catalog) -> int:
    return local_pack_bytes(catalog)


# -- repacking --------------------------------------------------------------------------------------

def _repack(catalog: Catalog, store: Store, marks: Marks, todo: list[PackUse], target: int, report: GcReport,
            progress: Progress | None) -> None:
    progress = progress or NullProgress()
    progress.start("gc: repack", sum(u.live_bytes for u in todo))
    try:
        with store.writing():
            writer: PackWriter | None = None
            group: list[str] = []
            try:
                for use in todo:
                    fd = _open_sound_pack(store, marks, use.id, report)
                    if fd is None:
                        continue
                    try:
                        if writer is None:
                            writer = PackWriter(store)
                        for loc, stored in _live_blobs(fd, marks, use.id, verify=False):
                            writer.add(loc.id, loc.codec, stored, loc.raw_len)
                            progress.advance(len(stored))
                    finally:
                        os.close(fd)
                    group.append(use.id)
                    if writer.size >= target:
                        _seal_and_move(catalog, writer, group, report)
                        writer, group = None, []
                if writer is not None and group:
                    _seal_and_move(catalog, writer, group, report)
                    writer = None
            except OSError as exc:
                if writer is not None:
                    writer.abort()
                raise_os_error(exc, "repacking")
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
    finally:
        progress.finish()


def _open_sound_pack(store: Store, marks: Marks, pack: str, report: GcReport) -> int | None:
    """An fd on ``pack`` once each of its live chunks was read and verified (a first pass, keeping
    nothing), or None: leave this pack alone, it has a problem."""
    try:
        fd = os.open(store.pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        report.errors.append(f"pack {pack[:12]} is missing; not repacked (run `tessera fsck`)")
        return None
    try:
        for _ in _live_blobs(fd, marks, pack, verify=True):
            pass
    except CorruptData as exc:
        os.close(fd)
        report.errors.append(f"not repacking pack {pack[:12]}: {exc} (run `tessera fsck`)")
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _live_blobs(fd: int, marks: Marks, pack: str, *, verify: bool) -> Iterator[tuple[ChunkLocation, bytes]]:
    """The live chunks of one pack, read one at a time (``verify``: decoded and checked). A pack cut
    short is `CorruptData` either way: the copying pass stops there and the new pack is not sealed."""
    for rows in marks.live_chunks_of(pack):
        for cid, offset, stored_len, raw_len, codec in rows:
            loc = ChunkLocation(cid, pack, offset, stored_len, raw_len, codec)
            stored = os.pread(fd, stored_len, offset)
            if len(stored) != stored_len:
                raise CorruptData(f"pack {pack} is truncated")
            if verify:
                decode_chunk(loc, stored)
            yield loc, stored


def _seal_and_move(catalog: Catalog, writer: PackWriter, group: list[str], report: GcReport) -> None:
    sealed = writer.seal()
    crash_point("repack-after-seal")
    move_chunks(catalog, sealed.id, sealed.size, sealed.blobs, group)
    crash_point("repack-after-move")
    report.repacked += len(group)
    report.packs_written += 1
    report.repack_written += sealed.size
    logger.info("gc: repacked %d packs into %s (%d bytes)", len(group), sealed.id[:12], sealed.size)


# -- deleting files ---------------------------------------------------------------------------------

def _drop_cached(home: Path, roots: RootsFn, report: GcReport, live: Callable[[list[str]], set[str]], *,
                 dry_run: bool = False) -> None:
    """The kernel mount's caches (`tessera.filecache`, `tessera.kernelmount`), under the file cache lock:
    delete the image of every version no longer kept (none an active kernel mount uses: those versions
    are roots, and active images are spared anyway), then every whole file no file record names (``live``
    says which are named). Images go first: an image promises that all of its version's files are
    cached. A cache locked by a kernel mount at work is left for the next gc."""
    cache = FileCache(home, 0)
    if not cache.root.is_dir():
        return
    try:
        with cache.locked(wait=False):
            kept = roots()
            active = {Path(r.image).name for r in kernel_records(home) if r.image and record_active(r)}
            idir = images_dir(home)
            for f in sorted(idir.glob("*.erofs")) if idir.is_dir() else []:
                if f.name.partition("-")[0] not in kept and f.name not in active:
                    if not dry_run:
                        f.unlink(missing_ok=True)
                    report.images += 1
            report.cached_files, report.cached_bytes = cache.remove_unused(live, dry_run=dry_run)
    except BlockingIOError:
        report.cache_busy = True
        logger.info("gc: the file cache is in use (a kernel mount at work); its unused files stay until the next gc")
    except OSError as exc:
        report.errors.append(f"file cache: {exc.strerror or exc}")
    except CorruptData as exc:  # a cache of an unknown format: not ours to clean
        report.errors.append(str(exc))


def _remove_unindexed(catalog: Catalog, store: Store) -> tuple[int, list[str]]:
    """Under the exclusive lock: delete pack files no row names (swept, repacked or left by a crash) and
    temporary files. Returns (pack files deleted, what was removed)."""
    known = pack_ids(catalog)
    removed: list[str] = []
    packs = 0
    for sub in sorted(store.pack_dir.iterdir()) if store.pack_dir.exists() else []:
        if not sub.is_dir():
            continue
        for f in sorted(sub.glob("*.pack")):
            if f.name[:-5] not in known:
                f.unlink(missing_ok=True)
                packs += 1
                removed.append(f"packs/{sub.name}/{f.name}")
                crash_point("gc-after-unlink")
    for tmp in sorted(store.tmp_dir.iterdir()) if store.tmp_dir.exists() else []:
        tmp.unlink(missing_ok=True)
        removed.append(f"tmp/{tmp.name}")
    return packs, removed
