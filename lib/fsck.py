"""`tessera fsck`: prove the store is sound — every chunk readable with the right hash, every version
complete (trees, file records and chunks all present). Garbage (unindexed packs, temp files) is
reported but is not an error: crashes are allowed to leave it, `tessera gc` removes it."""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from tessera.catalog import Catalog, ChunkLocation
from tessera.errors import CorruptData
from tessera.format.pack import KIND_CHUNK, iter_blobs
from tessera.ids import sha256_hex
from tessera.model import DIR, FILE, Tree
from tessera.progress import NullProgress, Progress
from tessera.store import Store, decode_chunk


@dataclass
class FsckReport:
    packs: int = 0
    chunks: int = 0
    versions: int = 0
    files: int = 0
    errors: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    cached_files: int = 0  # whole files checked in the kernel mount's file cache

    @property
    def ok(self) -> bool:
        return not self.errors


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
                    decode_chunk(loc, bytes(m[b.offset:b.offset + b.stored_len]))
                    report.chunks += 1
                except CorruptData as exc:
                    report.errors.append(str(exc))
        for cid in rows:
            report.errors.append(f"chunk {cid.hex()} is indexed in pack {p.id} but not found in it")
        progress.advance(p.size)
    progress.finish()
    known = {p.id for p in catalog.packs()}
    for sub in sorted(store.pack_dir.iterdir()) if store.pack_dir.exists() else []:
        for f in sorted(sub.glob("*.pack")):
            if f.stem not in known:
                report.garbage.append(f"unindexed pack {f.name}")
    for f in sorted(store.tmp_dir.iterdir()):
        report.garbage.append(f"temporary file tmp/{f.name}")


def check_versions(catalog: Catalog, report: FsckReport, progress: Progress) -> None:
    seen_trees: set[str] = set()
    seen_files: set[str] = set()
    hashes = catalog.version_hashes()
    progress.start("fsck versions", len(hashes), unit="version")
    for vh in hashes:
        report.versions += 1
        stack = [vh]
        while stack:
            tid = stack.pop()
            if tid in seen_trees:
                continue
            seen_trees.add(tid)
            data = catalog.tree(tid)
            if data is None:
                report.errors.append(f"version {vh[:12]}: tree {tid[:12]} is missing")
                continue
            try:
                tree = Tree.from_bytes(data)
            except CorruptData as exc:
                report.errors.append(f"version {vh[:12]}: tree {tid[:12]}: {exc}")
                continue
            if tid != sha256_hex(data):
                report.errors.append(f"version {vh[:12]}: tree {tid[:12]} fails its hash check")
            for e in tree.entries:
                if e.kind == DIR and e.id:
                    stack.append(e.id)
                elif e.kind == FILE and e.id and e.id not in seen_files:
                    seen_files.add(e.id)
                    check_file(catalog, vh, e.id, report)
        progress.advance(1)
    progress.finish()


def check_file(catalog: Catalog, vh: str, file_id: str, report: FsckReport) -> None:
    rec = catalog.file(file_id)
    report.files += 1
    if rec is None:
        report.errors.append(f"version {vh[:12]}: file {file_id[:12]} is missing")
        return
    ids = [cid for cid, _ in rec.chunks]
    known = catalog.known_chunks(ids)
    for cid in ids:
        if cid not in known:
            report.errors.append(f"version {vh[:12]}: file {file_id[:12]} needs chunk {cid.hex()}, which is missing")
    if sum(n for _, n in rec.chunks) != rec.size:
        report.errors.append(f"file {file_id[:12]}: chunk sizes do not add up to its size")


def fsck(catalog: Catalog, store: Store, progress: Progress | None = None) -> FsckReport:
    progress = progress or NullProgress()
    report = FsckReport()
    check_packs(catalog, store, report, progress)
    check_versions(catalog, report, progress)
    check_file_cache(store.home, report, progress)
    return report


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


def remove_garbage(store: Store, catalog: Catalog) -> list[str]:
    """Delete temp files and unindexed packs (what a crash can leave); returns what was removed."""
    with store.collecting():
        return _remove_garbage(store, catalog)


def _remove_garbage(store: Store, catalog: Catalog) -> list[str]:
    removed = []
    known = {p.id for p in catalog.packs()}
    for sub in store.pack_dir.iterdir():
        for f in sub.glob("*.pack"):
            if f.stem not in known:
                f.unlink()
                removed.append(f"packs/{sub.name}/{f.name}")
    for f in store.tmp_dir.iterdir():
        os.unlink(f)
        removed.append(f"tmp/{f.name}")
    return removed
