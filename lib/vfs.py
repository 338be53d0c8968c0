"""A version as a read-only file system, independent of any FUSE binding.

`VersionFS` answers what a kernel (or a test) asks of a mounted version: ``lookup / stat / readdir /
readlink / read(path, offset, size)``, the ``user.tessera.sha256`` xattr and ``statfs``. Adapters that
know where an entry sits (the low-level FUSE adapter keeps a (directory, index) per node) use the same
answers by position: `directory`, `subdirectory`, `attrs`, `read_plan_at`, `xattr`. `tessera.fuse` is
a thin layer over it; it is tested here without mounting. File bytes come from the one file reader
(`tessera.reader`), like every other reader's.

How it stays fast and bounded:

- **No scan at mount time.** Paths resolve directory by directory through the version's Merkle trees
  (``Version.tree``, itself an LRU). Each directory, once resolved, is a `Listing`: its path, tree id
  and the tree's entries (the same tuple the tree LRU holds, sorted by UTF-8 name), kept in a small LRU
  bounded by bytes (``listing_cache_bytes``, counted at what parsed entries really cost). A name is
  found by bisecting the entries (a few microseconds): no per-directory index to build or keep.
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
import threading
from collections import deque
from typing import NamedTuple

import xxhash

from tessera.errors import CorruptData, IsADirectory, NotADirectory, NotASymlink, NotFound
from tessera.lru import LRUCache
from tessera.model import DIR, ENTRY_BYTES, FILE, SYMLINK, TreeEntry
from tessera.reader import FileReader, fill_locations
from tessera.sources import Segment
from tessera.store import FileRange
from tessera.version import Version

__all__ = ["Attr", "FileRange", "IsADirectory", "Listing", "NotADirectory", "NotASymlink", "Segment", "StatFS",
           "VersionFS"]

logger = logging.getLogger(__name__)

XATTR_SHA256 = "user.tessera.sha256"
XATTR_META = "user.tessera.meta"
XATTR_REF = "user.tessera.ref"
ROOT_INO = 1
BLOCK = 512
IO_BLOCK = 1024 * 1024  # st_blksize: what cp, stdio and Python buffer by; matches the mount's 1 MiB reads
S_IFREG, S_IFDIR, S_IFLNK = 0o100000, 0o040000, 0o120000
_INO_MASK = (1 << 63) - 1
_KIND_BITS = {FILE: S_IFREG, DIR: S_IFDIR, SYMLINK: S_IFLNK}
LISTING_CACHE_BYTES = 16 << 20  # resolved directories (their entries, counted at model.ENTRY_BYTES each)
_READER_CACHE_CHUNKS = 1 << 17  # file readers: bounded by chunk count (~300 bytes each)
_PREFETCH_FILES = 256
LIST_AHEAD = 8  # directories resolved ahead of a depth-first walk (see `VersionFS.listed`)


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
        return self.mode & 0o170000 == S_IFDIR


class StatFS(NamedTuple):
    bsize: int
    frsize: int
    blocks: int
    files: int
    namemax: int


class Listing:
    """One directory of the version: its path ("" for the root), tree id and entries, in the order of
    their UTF-8 names (`Tree.of`'s order, which every tree id is computed over)."""

    __slots__ = ("path", "tree_id", "entries", "prefix")

    def __init__(self, path: str, tree_id: str, entries: tuple[TreeEntry, ...]) -> None:
        self.path = path
        self.tree_id = tree_id
        self.entries = entries
        self.prefix = f"{path}/" if path else ""

    def index(self, name: str) -> int | None:
        """Position of ``name`` among the entries, or None (by bisection: nothing is built or kept)."""
        key = name.encode("utf-8", "surrogateescape")
        entries = self.entries
        i = bisect.bisect_left(entries, key, key=_name_key)
        return i if i < len(entries) and entries[i].name == name else None

    def path_of(self, i: int) -> str:
        return self.prefix + self.entries[i].name


class VersionFS:
    """A read-only file system view of one version. Thread-safe (the FUSE loop may be threaded)."""

    def __init__(self, version: Version, *, listing_cache_bytes: int = LISTING_CACHE_BYTES) -> None:
        self.version = version
        self.mtime_ns = int(round(version.time * 1e9))
        self._seed = int(version.hash[:16], 16)
        self._listings: LRUCache[Listing] = LRUCache(listing_cache_bytes,
                                                     sizeof=lambda d: ENTRY_BYTES * len(d.entries) + 200)
        self._readers: LRUCache[FileReader] = LRUCache(_READER_CACHE_CHUNKS, sizeof=lambda f: len(f.ids) + 1)
        self._scans: LRUCache[tuple[int, int]] = LRUCache(1024, sizeof=lambda _: 1)  # dir -> (next index, window)
        self.reads = 0
        self._ahead: deque[tuple[str, str]] = deque()  # (path, tree id) to resolve in the background
        self._ahead_cv = threading.Condition()
        self._ahead_thread: threading.Thread | None = None
        self._closed = False

    def close(self) -> None:
        with self._ahead_cv:
            self._closed = True
            self._ahead.clear()
            self._ahead_cv.notify_all()

    # -- directory read-ahead ---------------------------------------------------------------------

    def listed(self, listing: Listing) -> None:
        """A hint: ``listing`` is being listed (its first batch). The directories a depth-first walk
        (``find``, ``os.walk``, ``du``) lists next, its first subdirectories and then its next
        siblings, up to `LIST_AHEAD`, are resolved (their trees read and parsed) by a background
        thread while the kernel and the walker handle this one. Memory stays within the caches."""
        todo = [(listing.prefix + e.name, e.id or "") for e in _first_dirs(listing.entries, 0)]
        if listing.path:
            parent_path, _, name = listing.path.rpartition("/")
            parent = self._listings.get(parent_path)
            i = parent.index(name) if parent is not None else None
            if parent is not None and i is not None:
                todo += [(parent.prefix + e.name, e.id or "") for e in _first_dirs(parent.entries, i + 1)]
        todo = [(path, tid) for path, tid in todo[:LIST_AHEAD] if path not in self._listings]
        if not todo:
            return
        with self._ahead_cv:
            if self._closed:
                return
            self._ahead.clear()  # the walk moved on: what it will list next replaces what was queued
            self._ahead.extend(todo)
            if self._ahead_thread is None:
                self._ahead_thread = threading.Thread(target=self._resolve_ahead, name="tessera-list-ahead",
                                                      daemon=True)
                self._ahead_thread.start()
            self._ahead_cv.notify()

    def _resolve_ahead(self) -> None:
        while True:
            with self._ahead_cv:
                while not self._ahead and not self._closed:
                    self._ahead_cv.wait()
                if self._closed:
                    return
                path, tid = self._ahead.popleft()
            try:
                self.listing(path, tid)
            except Exception as exc:  # noqa: BLE001 - a hint: the request itself reports the error
                logger.debug("read-ahead of %r: %s", path, exc)

    # -- names ------------------------------------------------------------------------------------

    def ino(self, path: str) -> int:
        """Stable inode number of a path (relative, no leading slash; "" is the root)."""
        if not path:
            return ROOT_INO
        n = xxhash.xxh3_64_intdigest(path.encode("utf-8", "surrogateescape"), seed=self._seed) & _INO_MASK
        return n if n > ROOT_INO else n + 2

    def directory(self, path: str) -> Listing:
        """The directory at ``path`` (relative, no leading slash; "" is the root), resolved once and
        cached. `NotFound`, `NotADirectory`."""
        listing = self._listings.get(path)
        if listing is not None:
            return listing
        if not path:
            return self._resolve("", self.version.hash)
        parent_path, _, name = path.rpartition("/")
        parent = self.directory(parent_path)
        i = parent.index(name)
        if i is None:
            raise NotFound(f"no such directory: {path!r}")
        return self.subdirectory(parent, i)

    def subdirectory(self, parent: Listing, i: int) -> Listing:
        """The directory that is entry ``i`` of ``parent`` (`NotADirectory` if it is not one)."""
        te = parent.entries[i]
        path = parent.prefix + te.name
        if te.kind != DIR or te.id is None:
            raise NotADirectory(f"not a directory: {path!r}")
        return self.listing(path, te.id)

    def listing(self, path: str, tree_id: str) -> Listing:
        """The directory at ``path`` whose tree is ``tree_id`` (an adapter that remembers where a
        directory is and what it holds resolves it without walking from the root)."""
        listing = self._listings.get(path)
        if listing is not None and listing.tree_id == tree_id:
            return listing
        return self._resolve(path, tree_id)

    def _resolve(self, path: str, tree_id: str) -> Listing:
        listing = Listing(path, tree_id, self.version.tree(tree_id).entries)
        self._listings.put(path, listing)
        return listing

    @property
    def cached_entries(self) -> int:
        """Entries held by the directory cache (what it costs is bounded by ``listing_cache_bytes``)."""
        return self._listings.size // ENTRY_BYTES

    def locate(self, path: str) -> tuple[Listing, int] | None:
        """(directory, index) of the entry at ``path`` ("/a/b" or "a/b"); None for the root. `NotFound`."""
        rel = path.strip("/")
        if not rel:
            return None
        parent_path, _, name = rel.rpartition("/")
        parent = self.directory(parent_path)
        i = parent.index(name)
        if i is None:
            raise NotFound(f"no such file or directory: {rel!r}")
        return parent, i

    def lookup(self, path: str) -> TreeEntry | None:
        """The tree entry at ``path`` ("/a/b" or "a/b"); None for the root. Raises `NotFound`."""
        at = self.locate(path)
        return None if at is None else at[0].entries[at[1]]

    # -- metadata ---------------------------------------------------------------------------------

    def root_attr(self) -> Attr:
        return Attr(ROOT_INO, S_IFDIR | 0o755, 1, 0, 0, self.mtime_ns)

    def dir_attr(self, listing: Listing) -> Attr:
        """A directory's own attributes."""
        if not listing.path:
            return self.root_attr()
        return Attr(self.ino(listing.path), S_IFDIR | 0o755, 1, 0, 0, self.mtime_ns)

    def attr(self, listing: Listing, i: int) -> Attr:
        return self._attr(listing.prefix + listing.entries[i].name, listing.entries[i])

    def attrs(self, listing: Listing, start: int = 0, stop: int | None = None) -> list[Attr]:
        """Attributes of the entries ``[start:stop]`` of a directory (all by default), in order (one
        pass: what a listing shows)."""
        prefix = listing.prefix.encode("utf-8", "surrogateescape")
        seed, mtime, digest, make = self._seed, self.mtime_ns, xxhash.xxh3_64_intdigest, tuple.__new__
        out = []
        for te in listing.entries[start:stop]:
            n = digest(prefix + te.name.encode("utf-8", "surrogateescape"), seed=seed) & _INO_MASK
            size = te.size if te.kind == FILE else _size_of(te)
            out.append(make(Attr, (n if n > ROOT_INO else n + 2, _KIND_BITS[te.kind] | te.mode, 1, size,
                                   (size + BLOCK - 1) // BLOCK, mtime)))  # (Attr without its __new__: hot loop)
        return out

    def inos(self, listing: Listing, start: int = 0, stop: int | None = None) -> list[int]:
        """Inode numbers of the entries ``[start:stop]`` of a directory (what a listing without
        attributes shows)."""
        prefix = listing.prefix.encode("utf-8", "surrogateescape")
        seed, digest = self._seed, xxhash.xxh3_64_intdigest
        out = []
        for te in listing.entries[start:stop]:
            n = digest(prefix + te.name.encode("utf-8", "surrogateescape"), seed=seed) & _INO_MASK
            out.append(n if n > ROOT_INO else n + 2)
        return out

    def _attr(self, rel: str, te: TreeEntry | None) -> Attr:
        if te is None:
            return self.root_attr()
        size = _size_of(te)
        return Attr(self.ino(rel), _KIND_BITS[te.kind] | te.mode, 1, size, (size + BLOCK - 1) // BLOCK, self.mtime_ns)

    def stat(self, path: str) -> Attr:
        at = self.locate(path)
        return self.root_attr() if at is None else self.attr(*at)

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        """Children of a directory, sorted by name, with their attributes (for readdirplus)."""
        at = self.locate(path)
        listing = self.directory("") if at is None else self.subdirectory(*at)
        return [(te.name, a) for te, a in zip(listing.entries, self.attrs(listing))]

    def readlink(self, path: str) -> str:
        return self.link_target(self.lookup(path), path)

    def link_target(self, te: TreeEntry | None, path: str = "") -> str:
        if te is None or te.kind != SYMLINK:
            raise NotASymlink(f"not a symbolic link: {path.strip('/')!r}")
        return te.target or ""

    def listxattr(self, path: str) -> list[str]:
        return self.xattr_names(self.lookup(path))

    def getxattr(self, path: str, name: str) -> bytes | None:
        """The xattr's value, or None when the path has no such attribute."""
        return self.xattr(self.lookup(path), name)

    def xattr_names(self, te: TreeEntry | None) -> list[str]:
        """Extended attributes of an entry (None: the root)."""
        if te is None:
            return [XATTR_REF]
        names = [XATTR_SHA256] if te.kind == FILE else []
        return names + ([XATTR_META] if te.meta else [])

    def xattr(self, te: TreeEntry | None, name: str) -> bytes | None:
        """The value of an entry's extended attribute (None: the root), or None if it has none."""
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

    def file_reader(self, listing: Listing, i: int) -> FileReader:
        """The reader of the file that is entry ``i`` of ``listing``."""
        te = listing.entries[i]
        if te.kind != FILE or te.id is None:
            if te.kind == DIR:
                raise IsADirectory(f"is a directory: {listing.path_of(i)!r}")
            raise NotFound(f"not a regular file: {listing.path_of(i)!r}")
        reader = self._readers.get(te.id)
        return reader if reader is not None else self._load_readers(listing, i, te.id)

    def _load_readers(self, listing: Listing, idx: int, fid: str) -> FileReader:
        """The reader of entry ``idx``; when files of one directory are read in order (a miss right where
        the last prefetch ended), also those of the next files, in one query, doubling the window up to
        `_PREFETCH_FILES` like kernel read-ahead, with their chunk locations and a request for their
        data. Random access stays at one small query per file."""
        entries = listing.entries
        expected, window = self._scans.get(listing.path) or (-1, 0)
        window = min(max(window * 2, 4), _PREFETCH_FILES) if idx == expected else 1
        self._scans.put(listing.path, (idx + window, window))
        want = {fid: entries[idx].size}
        for e in entries[idx + 1: idx + window]:
            if e.kind == FILE and e.id is not None and e.id not in want and e.id not in self._readers:
                want[e.id] = e.size
        trees = self.version.trees
        records = {fid: trees.file_record(fid)} if len(want) == 1 else trees.file_records(list(want))
        if fid not in records:
            raise CorruptData(f"file record {fid} for {listing.path_of(idx)!r} is missing from the catalog")
        readers = {}
        for rid, rec in records.items():
            if rec.size != want[rid]:
                raise CorruptData(f"file {rid[:12]}: chunks add up to {rec.size} bytes, its entry says {want[rid]}")
            readers[rid] = FileReader(self.version.chunks, rec)
        if len(readers) > 1:  # their chunk locations too, in one go (bounded), and their data
            self.version.chunks.will_need(fill_locations(list(readers.values())))
        for rid, reader in readers.items():
            self._readers.put(rid, reader)
        return readers[fid]

    def read_plan_at(self, listing: Listing, i: int, offset: int, size: int) -> list[Segment]:
        """`read_plan` of the file that is entry ``i`` of ``listing``."""
        self.reads += 1
        return self.file_reader(listing, i).read_plan(offset, size)

    def read_plan(self, path: str, offset: int, size: int) -> list[Segment]:
        """Where the bytes at ``offset`` (up to ``size``, short only at end of file) come from:
        `bytes` and `FileRange`s (verified raw chunk bytes still in a local pack, for the caller to
        ``pread``, or for libfuse to read without Python). `CorruptData` if a chunk fails its check."""
        at = self.locate(path)
        if at is None:
            raise IsADirectory("is a directory: ''")
        return self.read_plan_at(at[0], at[1], offset, size)

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (short only at end of file), all hash-checked."""
        parts = [seg if isinstance(seg, bytes) else seg.read() for seg in self.read_plan(path, offset, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self, path: str) -> bytes:
        return self.read(path, 0, self.stat(path).size)


def _first_dirs(entries: tuple[TreeEntry, ...], start: int) -> list[TreeEntry]:
    """Up to `LIST_AHEAD` subdirectory entries from ``start`` on."""
    out = []
    for e in entries[start:]:
        if e.kind == DIR and e.id is not None:
            out.append(e)
            if len(out) == LIST_AHEAD:
                break
    return out


def _name_key(te: TreeEntry) -> bytes:
    return te.name.encode("utf-8", "surrogateescape")


def _size_of(te: TreeEntry) -> int:
    if te.kind == FILE:
        return te.size
    if te.kind == SYMLINK:
        return len((te.target or "").encode("utf-8", "surrogateescape"))
    return 0  # directories: nlink 1 = "count unknown", like btrfs; find then never prunes
