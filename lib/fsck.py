"""`tessera fsck`: prove the store is sound, and say where every version's bytes are.

- Every local pack: its chunks readable, each decoding to its id, where the catalog says.
- Every remote pack's index as recorded (learnt from a remote, a claim): laid out like a pack could be
  (`tessera.remote.wire.check_index_rows`); with ``read_remote`` its chunks are fetched and checked too.
- Every version: complete (trees, file records, chunk locations all present and consistent), and whether
  its bytes are all local. A version committed here whose bytes are not all local is an error (a commit
  must be self-contained); a version learnt from a remote (metadata-only) may read lazily and is noted,
  naming the remotes known to hold it, unless ``require_local``.

Garbage (unindexed packs, temp files) is reported but is not an error: crashes are allowed to leave it,
`tessera gc` removes it. ``repair`` re-indexes every local pack file from its own blob headers (local
bytes win over remote claims; pack files a crash left unindexed come back) and, with ``read_remote``,
forgets remote chunk locations that failed their check.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.catalog.marks import FsckMarks, iter_pack_rows, pack_span
from tessera.errors import CorruptData, NotFound, RemoteError
from tessera.format.pack import KIND_CHUNK, BlobInfo, iter_blobs
from tessera.ids import sha256_hex
from tessera.lru import LRUCache
from tessera.model import DIR, FILE, ChunkLocation, FileRecord, Tree
from tessera.progress import NullProgress, Progress
from tessera.remote.base import Transport
from tessera.remote.wire import check_index_rows, history_key, pack_key, version_key
from tessera.store import Store, decode_chunk

logger = logging.getLogger(__name__)

_PACK_BATCH = 2000  # chunk blobs of a pack checked against their catalog rows at a time
_FILE_BATCH = 2000  # entries of a directory whose file records are checked at a time
FILE_MEMO = 8192  # file results remembered (~250 bytes each), so a file in several trees is mostly checked once


@dataclass
class FsckReport:
    packs: int = 0
    chunks: int = 0
    versions: int = 0
    files: int = 0
    remote_packs: int = 0
    errors: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # versions that read lazily from a remote, repairs made
    repaired: int = 0
    cached_files: int = 0  # whole files checked in the kernel mount's file cache
    image_files: int = 0  # small files checked inside the kernel mount's images

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class _Status:
    """What a file or tree needs that is not here: bytes only in remote packs, chunks with no location,
    chunks whose location a check found false."""

    remote_bytes: int = 0
    missing: int = 0
    bad: int = 0

    def add(self, other: _Status) -> None:
        self.remote_bytes += other.remote_bytes
        self.missing += other.missing
        self.bad += other.bad

    def as_tuple(self) -> tuple[int, int, int]:
        return self.remote_bytes, self.missing, self.bad


def fsck(catalog: Catalog, store: Store, progress: Progress | None = None, *, repair: bool = False,
         require_local: bool = False, read_remote: Callable[[str], Transport] | None = None) -> FsckReport:
    """Check the home; ``read_remote(pack)`` gives the transport to read a remote pack's chunks with.
    What the check has seen is kept in TEMP tables of the catalog (`tessera.catalog.marks`), so memory
    stays bounded whatever the number of files, trees, chunks and versions."""
    progress = progress or NullProgress()
    report = FsckReport()
    if repair:
        with store.writing():
            reindex_local_packs(catalog, store, report, progress)
    with FsckMarks(catalog) as marks:
        check_packs(catalog, store, report, progress, marks)
        check_remote_packs(catalog, report, read_remote, progress, marks)
        if repair and marks.bad_count():
            dropped = marks.drop_bad()
            report.repaired += dropped
            report.notes.append(f"repair: forgot {dropped} remote chunk locations that failed their check")
        check_versions(catalog, report, marks, require_local, progress)
    check_file_cache(store.home, report, progress)
    return report


# -- packs --------------------------------------------------------------------------------------------

def check_packs(catalog: Catalog, store: Store, report: FsckReport, progress: Progress,
                marks: FsckMarks | None = None) -> None:
    if marks is None:
        with FsckMarks(catalog) as own:
            return check_packs(catalog, store, report, progress, own)
    packs = [p for p in catalog.packs() if p.local]
    progress.start("fsck packs", sum(p.size for p in packs))
    for p in packs:
        report.packs += 1
        path = store.pack_path(p.id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            report.errors.append(f"pack {p.id} is missing")
            continue
        if size == 0:
            report.errors.append(f"pack {p.id} is empty")
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                for _ in iter_blobs(m, f"pack {p.id}"):  # the layout first: a broken pack is one error
                    pass
            except CorruptData as exc:
                report.errors.append(str(exc))
                continue
            _check_pack_chunks(marks, p.id, m, report)
        progress.advance(p.size)
    progress.finish()
    known = {p.id for p in catalog.packs()}
    for name in _pack_files(store):
        if name[:-5] not in known:
            report.garbage.append(f"unindexed pack {name}")
    for tmp in sorted(store.tmp_dir.iterdir()) if store.tmp_dir.exists() else []:
        report.garbage.append(f"temporary file tmp/{tmp.name}")


def _check_pack_chunks(marks: FsckMarks, pack: str, m: mmap.mmap, report: FsckReport) -> None:
    """Each chunk blob of a pack against the catalog row pointing into this pack (the first copy of a
    chunk id answers it; later copies are duplicates the catalog does not point at), a batch at a time;
    then every row pointing into the pack that no blob answered."""
    marks.start_pack()
    batch: list[BlobInfo] = []

    def flush() -> None:
        rows = marks.pack_rows(pack, [b.id for b in batch])
        for b in batch:
            row = rows.pop(b.id, None)
            if row is None:
                continue  # a duplicate copy, or a chunk the catalog points at elsewhere
            loc = ChunkLocation(b.id, pack, b.offset, b.stored_len, b.raw_len, b.codec)
            if row != loc:
                report.errors.append(f"chunk {b.id.hex()}: catalog and pack {pack} disagree on its location")
            try:
                decode_chunk(loc, m[b.offset:b.offset + b.stored_len])
                report.chunks += 1
            except CorruptData as exc:
                report.errors.append(str(exc))
        marks.seen_in_pack(b.id for b in batch)
        batch.clear()

    for b in iter_blobs(m, f"pack {pack}"):
        if b.kind == KIND_CHUNK:
            batch.append(b)
            if len(batch) >= _PACK_BATCH:
                flush()
    flush()
    for cid in marks.unseen_rows(pack):
        report.errors.append(f"chunk {cid.hex()} is indexed in pack {pack} but not found in it")


def _pack_files(store: Store) -> list[str]:
    if not store.pack_dir.exists():
        return []
    return sorted(f.name for sub in store.pack_dir.iterdir() if sub.is_dir() for f in sub.glob("*.pack"))


def reindex_local_packs(catalog: Catalog, store: Store, report: FsckReport, progress: Progress) -> None:
    """Record every chunk that verifies in every local pack file, from the pack alone: chunk rows that
    pointed at remote claims (or nowhere) now point here, and packs a crash left unindexed count again."""
    names = _pack_files(store)
    progress.start("fsck --repair: reindex packs", len(names), unit="pack")
    states = catalog.pack_states([n[:-5] for n in names])
    for name in names:
        pack = name[:-5]
        path = store.pack_path(pack)
        good: list[BlobInfo] = []
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size == 0:
                progress.advance(1)
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                whole = sha256_hex(m) == pack
                try:
                    blobs = list(iter_blobs(m, f"pack {pack}"))
                except CorruptData as exc:
                    report.errors.append(f"repair: {exc}")
                    blobs = []
                for b in blobs:
                    if b.kind != KIND_CHUNK:
                        continue
                    try:
                        decode_chunk(ChunkLocation(b.id, pack, b.offset, b.stored_len, b.raw_len, b.codec),
                                     m[b.offset:b.offset + b.stored_len])
                        good.append(b)
                    except CorruptData:
                        pass
        if not whole:
            report.notes.append(f"repair: pack {pack} fails its hash check; indexed its {len(good)} good chunks")
        before = catalog.local_chunks([b.id for b in good])
        catalog.add_pack(pack, size, good)
        gained = len(good) - len(before)
        if gained or pack not in states or not states[pack][1]:
            report.repaired += gained
            report.notes.append(f"repair: pack {pack[:12]}: {gained} chunks now read from it")
        progress.advance(1)
    progress.finish()


def check_remote_packs(catalog: Catalog, report: FsckReport, read_remote: Callable[[str], Transport] | None,
                       progress: Progress, marks: FsckMarks) -> None:
    """Check what the catalog recorded of each remote pack's index, a page of rows at a time; with
    ``read_remote``, fetch and check its chunks too. The chunk rows found false go to ``marks``."""
    remote = [p for p in catalog.packs() if not p.local]
    progress.start("fsck remote packs", len(remote), unit="pack")
    for p in remote:
        report.remote_packs += 1
        problem = None
        last: list[ChunkLocation] = []
        for page in iter_pack_rows(catalog, p.id):
            problem = check_index_rows(last + page, p.size)  # the previous page's last row: no overlap between pages
            if problem is not None:
                break
            last = page[-1:]
        if problem is not None:
            report.errors.append(f"index of remote pack {p.id[:12]} is inconsistent: {problem}")
            marks.add_bad_pack(p.id)
        elif read_remote is not None and last:
            _read_remote_pack(catalog, read_remote, p.id, marks, report)
        progress.advance(1)
    progress.finish()


def _read_remote_pack(catalog: Catalog, read_remote: Callable[[str], Transport], pack: str, marks: FsckMarks,
                      report: FsckReport) -> None:
    span = pack_span(catalog, pack)
    if span is None:
        return
    try:
        t = read_remote(pack)
        with t.open_read(pack_key(pack), *span) as reader:
            pos = span[0]
            for rows in iter_pack_rows(catalog, pack):
                bad = []
                for x in rows:
                    if x.offset > pos:
                        reader.read(x.offset - pos)
                    stored = reader.read(x.stored_len)
                    pos = x.offset + len(stored)
                    try:
                        decode_chunk(x, stored)
                    except CorruptData as exc:
                        report.errors.append(f"remote {exc}")
                        bad.append(x)
                marks.add_bad(bad)
    except (NotFound, RemoteError, CorruptData) as exc:
        report.errors.append(f"cannot read remote pack {pack[:12]}: {exc}")


# -- versions -----------------------------------------------------------------------------------------

def check_versions(catalog: Catalog, report: FsckReport, marks: FsckMarks, require_local: bool,
                   progress: Progress) -> None:
    """Walk every version, each tree once (children before parents, across versions too: a tree's result
    is kept in ``marks``, a TEMP table) and each file record once while it is among the last
    ``FILE_MEMO`` checked (a file shared by trees far apart may be checked again; a table of every
    file's result cost more time than the checks it saved). Memory stays bounded by the largest
    directory and the depth of the trees, whatever the number of files, trees and versions."""
    memo: LRUCache[tuple[int, int, int]] = LRUCache(FILE_MEMO, sizeof=lambda _: 1)
    hashes = catalog.version_hashes()
    lazy = rs.lazy_hashes(catalog)
    progress.start("fsck versions", len(hashes), unit="version")
    for vh in hashes:
        report.versions += 1
        if vh in lazy:  # its metadata is fetched as it is walked: nothing here to check yet
            _judge_lazy(catalog, vh, require_local, report)
            progress.advance(1)
            continue
        try:
            status = _walk_version(catalog, marks, memo, vh, report)
        except CorruptData as exc:
            report.errors.append(f"version {vh[:12]}: {exc}")
        else:
            _judge(catalog, vh, status, require_local, report)
        progress.advance(1)
    progress.finish()


def _load_tree(catalog: Catalog, tid: str) -> Tree:
    data = catalog.tree(tid)
    if data is None:
        raise CorruptData(f"tree {tid[:12]} is missing")
    if sha256_hex(data) != tid:
        raise CorruptData(f"tree {tid[:12]} fails its hash check")
    return Tree.from_bytes(data)


def _walk_version(catalog: Catalog, marks: FsckMarks, memo: LRUCache[tuple[int, int, int]], vh: str,
                  report: FsckReport) -> _Status:
    """Depth first from the root tree; a tree walked to its end (in this version or an earlier one) is
    not entered again. Only finished trees are recorded, so a tree left unfinished by a `CorruptData`
    is walked again by the next version that has it (and its problem is reported there too)."""
    stack: list[tuple[str, Tree | None]] = [(vh, None)]
    while stack:
        tid, tree = stack.pop()
        if tree is not None:  # leaving: every subtree is finished
            marks.set_tree(tid, _tree_status(catalog, marks, memo, vh, tree, report).as_tuple())
            continue
        if marks.tree_done(tid):
            continue
        tree = _load_tree(catalog, tid)
        stack.append((tid, tree))
        stack.extend((e.id, None) for e in reversed(tree.entries) if e.kind == DIR and e.id)
    done = marks.tree_statuses([vh])
    return _Status(*done[vh])


def _tree_status(catalog: Catalog, marks: FsckMarks, memo: LRUCache[tuple[int, int, int]], vh: str, tree: Tree,
                 report: FsckReport) -> _Status:
    """What a tree needs that is not here: its subtrees' (finished) and its files' (checked now unless
    among the last ``memo`` remembers), a slice of entries at a time."""
    status = _Status()
    entries = tree.entries
    for i in range(0, len(entries), _FILE_BATCH):
        part = entries[i:i + _FILE_BATCH]
        dirs = marks.tree_statuses([e.id for e in part if e.kind == DIR and e.id])
        files: dict[str, tuple[int, int, int]] = {}
        fresh: dict[str, int] = {}
        for e in part:
            if e.kind == FILE and e.id and e.id not in files and e.id not in fresh:
                known = memo.get(e.id)
                if known is None:
                    fresh[e.id] = e.size
                else:
                    files[e.id] = known
        if fresh:
            checked = _check_files(catalog, marks, vh, fresh, report)
            for fid, st in checked.items():
                memo.put(fid, st)
            files.update(checked)
        for e in part:
            if e.kind == DIR and e.id:
                if e.id not in dirs:
                    raise CorruptData(f"tree {e.id[:12]} was not walked")  # cannot happen: children finish first
                status.add(_Status(*dirs[e.id]))
            elif e.kind == FILE and e.id:
                status.add(_Status(*files[e.id]))
    return status


def _check_files(catalog: Catalog, marks: FsckMarks, vh: str, sizes: dict[str, int],
                 report: FsckReport) -> dict[str, tuple[int, int, int]]:
    """Check file records (id -> the size their tree entry says): present, sizes adding up, and where
    each chunk is. Returns each file's status."""
    recs = catalog.files_by_id(list(sizes))
    places = marks.chunk_places([cid for rec in recs.values() for cid, _ in rec.chunks])
    out: dict[str, tuple[int, int, int]] = {}
    for fid, size in sizes.items():
        report.files += 1
        rec: FileRecord | None = recs.get(fid)
        if rec is None:
            report.errors.append(f"version {vh[:12]}: file {fid[:12]} is missing")
            out[fid] = (0, 1, 0)
            continue
        if rec.size != size or sum(n for _, n in rec.chunks) != rec.size:
            report.errors.append(f"file {fid[:12]}: chunk sizes do not add up to its size")
        status = _Status()
        for cid, n in rec.chunks:
            local, bad = places.get(cid, (None, False))
            if local is None:
                status.missing += 1
            elif bad:
                status.bad += 1
            elif not local:
                status.remote_bytes += n
        out[fid] = status.as_tuple()
    return out


def _judge(catalog: Catalog, vh: str, status: _Status, require_local: bool, report: FsckReport) -> None:
    names = _names(catalog, vh)
    if status.missing:
        report.errors.append(f"version {names}: {status.missing} chunks are missing (no copy here or on a "
                             "known remote)")
    if status.bad:
        report.errors.append(f"version {names}: {status.bad} chunks have a false location in a remote index "
                             "(their remote copy fails its check)")
    if not status.remote_bytes:
        return
    holders = rs.remotes_holding(catalog, version_key(vh))
    where = f"only on {', '.join(holders)}" if holders else "in remote packs no configured remote is known to hold"
    what = f"{status.remote_bytes / (1 << 20):.1f} MiB of its file data are not in this home ({where})"
    unpushed = _committed_here(catalog, vh)
    if unpushed or require_local or not holders:
        why = " although it was committed here" if unpushed else ""
        report.errors.append(f"version {names}: {what}{why}; `tessera pull {names.split(', ')[0]}` fetches them")
    else:
        report.notes.append(f"version {names} reads lazily: {what}")


def _judge_lazy(catalog: Catalog, vh: str, require_local: bool, report: FsckReport) -> None:
    names = _names(catalog, vh)
    found = rs.lazy_version(catalog, vh)
    remote = found[0] if found else "a remote"
    what = (f"its metadata and file data are on {remote}, fetched as they are read "
            f"(`tessera pull {names.split(', ')[0]}` fetches them all)")
    if require_local or _committed_here(catalog, vh):
        report.errors.append(f"version {names}: {what}")
    else:
        report.notes.append(f"version {names} reads lazily: {what}")


def _names(catalog: Catalog, vh: str) -> str:
    return ", ".join(f"{d}@{vh[:12]}" for d in catalog.datasets_of(vh)) or vh[:12]


def _committed_here(catalog: Catalog, vh: str) -> bool:
    """Whether some history entry of the version exists here only (committed here, never pushed):
    such a version must have all its bytes here."""
    for dataset in catalog.datasets_of(vh):
        for e in catalog.history_for(dataset, vh):
            if not rs.remotes_holding(catalog, history_key(e)):
                return True
    return False


def check_file_cache(home: "str | Path", report: FsckReport, progress: Progress) -> None:
    """Hash every file of the kernel mount's whole-file cache (`tessera.filecache`). A file that fails
    is an error, and is removed together with every mount image (an image promises that all of its
    version's files are cached): the next kernel mount writes them again."""
    from tessera.filecache import FileCache, drop_all_images

    cache = FileCache(home, 0)
    if not cache.root.is_dir():
        return
    errors: list[str] = []
    with cache.locked():
        report.cached_files = cache.verify_files(errors, progress)
        if errors:
            drop_all_images(home)
        else:
            report.image_files = _check_images(home, errors)
    report.errors.extend(errors)


def _check_images(home: "str | Path", errors: list[str]) -> int:
    """Hash every small file an image holds against its ``user.tessera.sha256``; an image with one
    that fails, or that does not parse, is an error and is removed (the next kernel mount writes it
    again; a mount using it keeps its open copy). Returns the number of files checked."""
    from tessera.erofs import ImageError, inline_files
    from tessera.filecache import images_dir

    d = images_dir(home)
    n = 0
    for image in sorted(d.glob("*.erofs")) if d.is_dir() else []:
        bad = ""
        try:
            with open(image, "rb") as f:
                for path, data, xattrs in inline_files(f):
                    n += 1
                    if sha256_hex(data) != xattrs.get(b"user.tessera.sha256", b"").decode("ascii", "replace"):
                        bad = f"{path.decode('utf-8', 'surrogateescape')} fails its SHA-256 check"
                        break
        except ImageError as exc:
            bad = f"is malformed ({exc})"
        except OSError as exc:
            bad = f"cannot be read ({exc.strerror})"
        if bad:
            errors.append(f"mount image {image}: {bad} (removed; the next kernel mount writes it again)")
            with contextlib.suppress(OSError):
                image.unlink()
    return n

