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

import logging
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData, NotFound, RemoteError
from tessera.format.pack import KIND_CHUNK, BlobInfo, iter_blobs
from tessera.ids import sha256_hex
from tessera.lru import LRUCache
from tessera.model import DIR, FILE, ChunkLocation, FileRecord, Tree
from tessera.progress import NullProgress, Progress
from tessera.remote.base import Transport
from tessera.remote.wire import check_index_rows, history_key, pack_key, version_key
from tessera.store import Store, decode_chunk
from tessera.trees import CatalogTrees, walk_trees

logger = logging.getLogger(__name__)

FILE_MEMO_ENTRIES = 1 << 18  # file results fsck remembers (~300 bytes each)


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


def fsck(catalog: Catalog, store: Store, progress: Progress | None = None, *, repair: bool = False,
         require_local: bool = False, read_remote: Callable[[str], Transport] | None = None,
         file_memo: int = FILE_MEMO_ENTRIES) -> FsckReport:
    """Check the home; ``read_remote(pack)`` gives the transport to read a remote pack's chunks with.
    ``file_memo``: how many file results are remembered (a file shared by versions is checked once
    while remembered): memory stays bounded whatever the number of files."""
    progress = progress or NullProgress()
    report = FsckReport()
    if repair:
        with store.writing():
            reindex_local_packs(catalog, store, report, progress)
    check_packs(catalog, store, report, progress)
    bad_rows = check_remote_packs(catalog, report, read_remote, progress)
    if repair and bad_rows:
        catalog.drop_chunk_rows(bad_rows)
        report.repaired += len(bad_rows)
        report.notes.append(f"repair: forgot {len(bad_rows)} remote chunk locations that failed their check")
        bad_rows = []
    check_versions(catalog, report, {x.id for x in bad_rows}, require_local, progress, file_memo)
    check_file_cache(store.home, report, progress)
    return report


# -- packs --------------------------------------------------------------------------------------------

def check_packs(catalog: Catalog, store: Store, report: FsckReport, progress: Progress) -> None:
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
        rows = {c.id: c for c in catalog.pack_chunks(p.id)}
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                blobs = list(iter_blobs(m, f"pack {p.id}"))
            except CorruptData as exc:
                report.errors.append(str(exc))
                continue
            for b in blobs:
                if b.kind != KIND_CHUNK:
                    continue
                row = rows.pop(b.id, None)
                if row is None:
                    continue  # a duplicate copy; the catalog points elsewhere
                loc = ChunkLocation(b.id, p.id, b.offset, b.stored_len, b.raw_len, b.codec)
                if row != loc:
                    report.errors.append(f"chunk {b.id.hex()}: catalog and pack {p.id} disagree on its location")
                try:
                    decode_chunk(loc, m[b.offset:b.offset + b.stored_len])
                    report.chunks += 1
                except CorruptData as exc:
                    report.errors.append(str(exc))
        for cid in rows:
            report.errors.append(f"chunk {cid.hex()} is indexed in pack {p.id} but not found in it")
        progress.advance(p.size)
    progress.finish()
    known = {p.id for p in catalog.packs()}
    for name in _pack_files(store):
        if name[:-5] not in known:
            report.garbage.append(f"unindexed pack {name}")
    for tmp in sorted(store.tmp_dir.iterdir()) if store.tmp_dir.exists() else []:
        report.garbage.append(f"temporary file tmp/{tmp.name}")


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
                       progress: Progress) -> list[ChunkLocation]:
    """Check what the catalog recorded of each remote pack's index; with ``read_remote``, fetch and check
    its chunks too. Returns the chunk rows found false."""
    remote = [p for p in catalog.packs() if not p.local]
    bad: list[ChunkLocation] = []
    progress.start("fsck remote packs", len(remote), unit="pack")
    for p in remote:
        report.remote_packs += 1
        rows = catalog.pack_chunks(p.id)
        problem = check_index_rows(rows, p.size)
        if problem is not None:
            report.errors.append(f"index of remote pack {p.id[:12]} is inconsistent: {problem}")
            bad.extend(rows)
        elif read_remote is not None and rows:
            bad.extend(_read_remote_pack(read_remote, p.id, rows, report))
        progress.advance(1)
    progress.finish()
    return bad


def _read_remote_pack(read_remote: Callable[[str], Transport], pack: str, rows: Sequence[ChunkLocation],
                      report: FsckReport) -> list[ChunkLocation]:
    bad = []
    try:
        t = read_remote(pack)
        with t.open_read(pack_key(pack), rows[0].offset, rows[-1].offset + rows[-1].stored_len) as reader:
            pos = rows[0].offset
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
    except (NotFound, RemoteError, CorruptData) as exc:
        report.errors.append(f"cannot read remote pack {pack[:12]}: {exc}")
    return bad


# -- versions -----------------------------------------------------------------------------------------

def check_versions(catalog: Catalog, report: FsckReport, bad_chunks: set[bytes], require_local: bool,
                   progress: Progress, file_memo: int = FILE_MEMO_ENTRIES) -> None:
    """Walk every version, each tree once (bottom-up, memoised across versions: memory grows with the
    number of directories, ~200 bytes each) and each file record once while it is among the last
    ``file_memo`` remembered (an LRU: a file shared by versions far apart may be checked again)."""
    trees = CatalogTrees(catalog)
    memo: dict[str, _Status] = {}
    files: LRUCache[_Status] = LRUCache(file_memo, sizeof=lambda _: 1)
    seen: set[str] = set()
    pack_local = {p.id: p.local for p in catalog.packs()}

    def load(tid: str) -> Tree:
        data = catalog.tree(tid)
        if data is None:
            raise CorruptData(f"tree {tid[:12]} is missing")
        if sha256_hex(data) != tid:
            raise CorruptData(f"tree {tid[:12]} fails its hash check")
        return trees.load_tree(tid)

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
            for leaving, _, tid, tree in walk_trees(load, vh, seen=seen):
                if not leaving:
                    continue
                status = _Status()
                for e in tree.entries:
                    if e.kind == DIR and e.id:
                        status.add(memo[e.id])
                    elif e.kind == FILE and e.id:
                        fstat = files.get(e.id)
                        if fstat is None:
                            fstat = _file_status(catalog, vh, e.id, e.size, pack_local, bad_chunks, report)
                            files.put(e.id, fstat)
                        status.add(fstat)
                memo[tid] = status
        except CorruptData as exc:
            report.errors.append(f"version {vh[:12]}: {exc}")
            seen.intersection_update(memo)  # trees entered but not finished: walk them again if shared
        else:
            _judge(catalog, vh, memo[vh], require_local, report)
        progress.advance(1)
    progress.finish()


def _file_status(catalog: Catalog, vh: str, file_id: str, size: int, pack_local: dict[str, bool],
                 bad_chunks: set[bytes], report: FsckReport) -> _Status:
    report.files += 1
    rec: FileRecord | None = catalog.file(file_id)
    if rec is None:
        report.errors.append(f"version {vh[:12]}: file {file_id[:12]} is missing")
        return _Status(missing=1)
    if rec.size != size or sum(n for _, n in rec.chunks) != rec.size:
        report.errors.append(f"file {file_id[:12]}: chunk sizes do not add up to its size")
    locs = catalog.chunks_by_id([cid for cid, _ in rec.chunks])
    status = _Status()
    for cid, n in rec.chunks:
        loc = locs.get(cid)
        if loc is None or loc.pack not in pack_local:
            status.missing += 1
        elif cid in bad_chunks:
            status.bad += 1
        elif not pack_local[loc.pack]:
            status.remote_bytes += n
    return status


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
    report.errors.extend(errors)

