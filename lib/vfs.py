"""A version as a read-only file system, independent of any FUSE binding.

`VersionFS` answers what a kernel (or a test) asks of a mounted version: ``lookup / stat / readdir /
readlink / read(path, offset, size)``, the ``user.tessera.sha256`` xattr and ``statfs``.
`tessera.fuse.operations` is a thin adapter over it; it is tested here without mounting. File bytes come
from the one file reader (`tessera.reader`), like every other reader's.

How it stays fast and bounded:

- **No scan at mount time.** Paths resolve directory by directory through the version's Merkle trees
  (``Version.tree``, itself an LRU). A small LRU maps directory paths to tree ids, so a lookup of
  ``train/x.jpg`` is two dict lookups once its directory has been seen.
- **Stable inode numbers**: a 63-bit xxh3 of the path, seeded with the version hash. Equal across mounts
  of the same version (and different between versions, so tools that cache by (dev, ino) do not
  confuse two versions); the root is inode 1. A collision (~n^2/2^64) is harmless: every entry has
  ``st_nlink == 1``, so no tool takes two paths for hard links.
- **File readers** (offset tables and chunk locations) are cached per file id (LRU bounded by chunk
  count). Files of one directory read in order get their readers, and their chunk locations, in one
  query for a growing window of the next files, and their data requested ahead (like kernel read-ahead).
- **Data** comes as `read_plan` segments: bytes, or verified ranges of local packs that libfuse reads
  itself (`tessera.reader`).

Every error is a `TesseraError`: `NotFound`, `NotADirectory`, `IsADirectory`, `NotASymlink`, and
`CorruptData` (a chunk failing its hash check) or `RemoteError` (lazy fetch failed) from reads.
"""
from __future__ import annotations

import bisect
import json
import logging
from typing import NamedTuple

import xxhash

from tessera.errors import CorruptData, IsADirectory, NotADirectory, NotASymlink, NotFound
from tessera.lru import LRUCache
from tessera.model import DIR, FILE, SYMLINK, Tree, TreeEntry
from tessera.reader import FileReader, fill_locations
from tessera.sources import Segment
from tessera.store import FileRange
from tessera.version import Version

__all__ = ["Attr", "FileRange", "IsADirectory", "NotADirectory", "NotASymlink", "Segment", "StatFS", "VersionFS"]

logger = logging.getLogger(__name__)

XATTR_SHA256 = "user.tessera.sha256"
XATTR_META = "user.tessera.meta"
XATTR_REF = "user.tessera.ref"
ROOT_INO = 1
BLOCK = 512
IO_BLOCK = 1024 * 1024  # st_blksize: what cp, stdio and Python buffer by; matches the mount's 1 MiB reads
_INO_MASK = (1 << 63) - 1
_KIND_BITS = {FILE: 0o100000, DIR: 0o040000, SYMLINK: 0o120000}
_DIR_CACHE_ENTRIES = 65536
_READER_CACHE_CHUNKS = 1 << 17  # file readers: bounded by chunk count (~300 bytes each)
_PREFETCH_FILES = 256


class Attr(NamedTuple):
    """What stat(2) shows for a path. Times are the version's commit time, in nanoseconds."""

    ino: int
    mode: int  # full st_mode: kind bits | permission bits
    nlink: int
    size: int
    blocks: int  # 512-byte blocks, so du works
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == 0o040000


class StatFS(NamedTuple):
    bsize: int
    frsize: int
    blocks: int
    files: int
    namemax: int


class VersionFS:
    """A read-only file system view of one version. Thread-safe (the FUSE loop may be threaded)."""

    def __init__(self, version: Version) -> None:
        self.version = version
        self.mtime_ns = int(round(version.time * 1e9))
        self._seed = int(version.hash[:16], 16)
        self._dirs: LRUCache[str] = LRUCache(_DIR_CACHE_ENTRIES, sizeof=lambda _: 1)
        self._dirs.put("", version.hash)
        self._readers: LRUCache[FileReader] = LRUCache(_READER_CACHE_CHUNKS, sizeof=lambda f: len(f.ids) + 1)
        self._scans: LRUCache[tuple[int, int]] = LRUCache(1024, sizeof=lambda _: 1)  # dir -> (next index, window)
        self.reads = 0

    def close(self) -> None:
        pass

    # -- names ------------------------------------------------------------------------------------

    def ino(self, path: str) -> int:
        """Stable inode number of a path (relative, no leading slash; "" is the root)."""
        if not path:
            return ROOT_INO
        n = xxhash.xxh3_64_intdigest(path.encode("utf-8", "surrogateescape"), seed=self._seed) & _INO_MASK
        return n if n > ROOT_INO else n + 2

    def _tree(self, dpath: str) -> Tree:
        """The tree of the directory at ``dpath`` (relative path; "" is the root)."""
        tid = self._dirs.get(dpath)
        if tid is None:
            parent, _, name = dpath.rpartition("/")
            te = self._tree(parent).by_name.get(name)
            if te is None:
                raise NotFound(f"no such directory: {dpath!r}")
            if te.kind != DIR or te.id is None:
                raise NotADirectory(f"not a directory: {dpath!r}")
            tid = te.id
            self._dirs.put(dpath, tid)
        return self.version.tree(tid)

    def lookup(self, path: str) -> TreeEntry | None:
        """The tree entry at ``path`` ("/a/b" or "a/b"); None for the root. Raises `NotFound`."""
        rel = path.strip("/")
        if not rel:
            return None
        parent, _, name = rel.rpartition("/")
        te = self._tree(parent).by_name.get(name)
        if te is None:
            raise NotFound(f"no such file or directory: {rel!r}")
        return te

    # -- metadata ---------------------------------------------------------------------------------

    def _attr(self, rel: str, te: TreeEntry | None) -> Attr:
        if te is None:
            return Attr(ROOT_INO, 0o040755, 1, 0, 0, self.mtime_ns)
        if te.kind == FILE:
            size = te.size
        elif te.kind == SYMLINK:
            size = len((te.target or "").encode("utf-8", "surrogateescape"))
        else:
            size = 0  # directories: nlink 1 = "count unknown", like btrfs; find then never prunes
        return Attr(self.ino(rel), _KIND_BITS[te.kind] | te.mode, 1, size, (size + BLOCK - 1) // BLOCK, self.mtime_ns)

    def stat(self, path: str) -> Attr:
        rel = path.strip("/")
        return self._attr(rel, self.lookup(rel))

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        """Children of a directory, sorted by name, with their attributes (for readdirplus)."""
        rel = path.strip("/")
        te = self.lookup(rel)
        if te is not None and te.kind != DIR:
            raise NotADirectory(f"not a directory: {rel!r}")
        base = f"{rel}/" if rel else ""
        tree = self._tree(rel)
        out = []
        for child in tree.entries:
            cpath = base + child.name
            if child.kind == DIR and child.id is not None:
                self._dirs.put(cpath, child.id)
            out.append((child.name, self._attr(cpath, child)))
        return out

    def readlink(self, path: str) -> str:
        te = self.lookup(path)
        if te is None or te.kind != SYMLINK:
            raise NotASymlink(f"not a symbolic link: {path.strip('/')!r}")
        return te.target or ""

    def listxattr(self, path: str) -> list[str]:
        te = self.lookup(path)
        if te is None:
            return [XATTR_REF]
        names = [XATTR_SHA256] if te.kind == FILE else []
        return names + ([XATTR_META] if te.meta else [])

    def getxattr(self, path: str, name: str) -> bytes | None:
        """The xattr's value, or None when the path has no such attribute."""
        te = self.lookup(path)
        if te is None:
            return self.version.ref.encode() if name == XATTR_REF else None
        if name == XATTR_SHA256 and te.kind == FILE and te.id:
            return te.id.encode()
        if name == XATTR_META and te.meta:
            return json.dumps(te.meta, sort_keys=True, ensure_ascii=False).encode()
        return None

    def statfs(self) -> StatFS:
        bsize = 4096
        return StatFS(bsize, bsize, (self.version.size + bsize - 1) // bsize, self.version.files, 255)

    # -- data -------------------------------------------------------------------------------------

    def _file(self, path: str) -> FileReader:
        rel = path.strip("/")
        te = self.lookup(rel)
        if te is None or te.kind == DIR:
            raise IsADirectory(f"is a directory: {rel!r}")
        if te.kind != FILE or te.id is None:
            raise NotFound(f"not a regular file: {rel!r}")
        reader = self._readers.get(te.id)
        if reader is None:
            reader = self._load_readers(rel, te)
        return reader

    def _load_readers(self, rel: str, te: TreeEntry) -> FileReader:
        """The reader of ``te``; when files of one directory are read in order (a miss right where the
        last prefetch ended), also those of the next files, in one query, doubling the window up to
        `_PREFETCH_FILES` like kernel read-ahead, with their chunk locations and a request for their
        data. Random access stays at one small query per file."""
        parent, _, name = rel.rpartition("/")
        entries = self._tree(parent).entries
        key = name.encode("utf-8", "surrogateescape")
        idx = bisect.bisect_left(entries, key, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        expected, window = self._scans.get(parent) or (-1, 0)
        window = min(max(window * 2, 4), _PREFETCH_FILES) if idx == expected else 1
        self._scans.put(parent, (idx + window, window))
        assert te.id is not None
        want = {te.id: te.size}
        for e in entries[idx + 1: idx + window]:
            if e.kind == FILE and e.id is not None and e.id not in want and e.id not in self._readers:
                want[e.id] = e.size
        trees = self.version.trees
        records = {te.id: trees.file_record(te.id)} if len(want) == 1 else trees.file_records(list(want))
        if te.id not in records:
            raise CorruptData(f"file record {te.id} for {rel!r} is missing from the catalog")
        readers = {}
        for fid, rec in records.items():
            if rec.size != want[fid]:
                raise CorruptData(f"file {fid[:12]}: chunks add up to {rec.size} bytes, its entry says {want[fid]}")
            readers[fid] = FileReader(self.version.chunks, rec)
        if len(readers) > 1:  # their chunk locations too, in one go (bounded), and their data
            self.version.chunks.will_need(fill_locations(list(readers.values())))
        for fid, reader in readers.items():
            self._readers.put(fid, reader)
        return readers[te.id]

    def read_plan(self, path: str, offset: int, size: int) -> list[Segment]:
        """Where the bytes at ``offset`` (up to ``size``, short only at end of file) come from:
        `bytes` and `FileRange`s (verified raw chunk bytes still in a local pack, for the caller to
        ``pread``, or for libfuse to read without Python). `CorruptData` if a chunk fails its check."""
        self.reads += 1
        return self._file(path).read_plan(offset, size)

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (short only at end of file), all hash-checked."""
        parts = [seg if isinstance(seg, bytes) else seg.read() for seg in self.read_plan(path, offset, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self, path: str) -> bytes:
        return self.read(path, 0, self.stat(path).size)
