"""A version as a read-only file system, independent of any FUSE binding.

`VersionFS` answers what a kernel (or an fsspec filesystem, or a test) asks of a mounted version:
``lookup / stat / readdir / readlink / read(path, offset, size)``, the ``user.tessera.sha256`` xattr and
``statfs``. `tessera.fuse.operations` is a thin adapter over it; it is tested here without mounting.

How it stays fast and bounded:

- **No scan at mount time.** Paths resolve directory by directory through the version's Merkle trees
  (``repo.load_tree``, itself an LRU). A small LRU maps directory paths to tree ids, so a lookup of
  ``train/x.jpg`` is two dict lookups once its directory has been seen.
- **Stable inode numbers**: a 63-bit xxh3 of the path, seeded with the version hash. Equal across mounts
  of the same version (and different between versions, so tools that cache by (dev, ino) do not
  confuse two versions); the root is inode 1. A collision (~n^2/2^64) is harmless: every entry has
  ``st_nlink == 1``, so no tool takes two paths for hard links.
- **Offsets to chunks** by bisecting each file's cumulative chunk sizes; these offset tables are
  cached per file id (LRU), with each chunk's pack location filled in on first use.
- **Decoded chunks** live in a byte-bounded LRU (``cache_bytes``) *only when a read used part of a
  chunk*: a read that consumes a whole chunk (a small file, or a big read) leaves it to the kernel page
  cache instead of churning the LRU.
- **Raw chunks** (stored uncompressed) are verified once, on first touch: the whole chunk is read and
  its xxh3-128 checked. After that the chunk id is remembered (bounded) and reads of it are a plain
  ``pread`` of just the requested range. `read_plan` hands those out as `FileRange`s (fd, offset,
  length), so the FUSE layer can let libfuse do the ``pread`` in C: file data then never passes
  through Python. A partial ``pread`` cannot itself be hash-checked, so this trades re-verifying
  bytes already verified in this mount for not reading whole chunks again; bytes are never served
  before their chunk has passed its hash check once.

Every error is a `TesseraError`: `NotFound`, `NotADirectory`, `IsADirectory`, `NotASymlink`, and
`CorruptData` (a chunk failing its hash check) or `RemoteError` (lazy fetch failed) from reads.
"""
from __future__ import annotations

import bisect
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple, Union

import xxhash

from tessera.cache import LRUCache
from tessera.errors import CorruptData, NotFound, UsageError
from tessera.format.compress import RAW
from tessera.model import DIR, FILE, SYMLINK, TreeEntry
from tessera.store import PackHandle, decode_chunk

if TYPE_CHECKING:
    from tessera.catalog import ChunkLocation
    from tessera.model import Tree
    from tessera.version import Version

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 128 * 1024 * 1024
XATTR_SHA256 = "user.tessera.sha256"
XATTR_META = "user.tessera.meta"
XATTR_REF = "user.tessera.ref"
ROOT_INO = 1
BLOCK = 512
IO_BLOCK = 1024 * 1024  # st_blksize: what cp, stdio and Python buffer by; matches the mount's 1 MiB reads
_INO_MASK = (1 << 63) - 1
_KIND_BITS = {FILE: 0o100000, DIR: 0o040000, SYMLINK: 0o120000}
_DIR_CACHE_ENTRIES = 65536
_LAYOUT_CACHE_CHUNKS = 1 << 17  # offset tables + pack locations: bounded by chunk count (~300 bytes each)
_PREFETCH_FILES = 256
_READ_AHEAD = 8 << 20  # bytes of a sequentially read file whose pack data is requested ahead
_AHEAD_CHUNKS = 256  # raw chunks queued for a background check at most
_PREFETCH_CHUNKS = 4096
_VERIFIED_IDS = 1 << 18


class NotADirectory(UsageError):
    """A path used as a directory is a file or symlink (ENOTDIR)."""


class IsADirectory(UsageError):
    """A directory was read as a file (EISDIR)."""


class NotASymlink(UsageError):
    """readlink of something that is not a symlink (EINVAL)."""


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


class FileRange(NamedTuple):
    """``size`` verified bytes at ``pos`` in an open pack file (raw chunks are stored as is)."""

    handle: PackHandle
    pos: int
    size: int

    @property
    def fd(self) -> int:
        return self.handle.fd

    def read(self) -> bytes:
        data = os.pread(self.handle.fd, self.size, self.pos)
        if len(data) != self.size:
            raise CorruptData(f"pack file shrank under a mount (fd {self.handle.fd})")
        return data


Segment = Union[bytes, FileRange]


class _Layout:
    """One file's chunks: ids, cumulative start offsets, and pack locations filled in lazily."""

    __slots__ = ("size", "ids", "starts", "ends", "locs", "next_read", "ahead")

    def __init__(self, chunks: tuple[tuple[bytes, int], ...]) -> None:
        self.ids = [cid for cid, _ in chunks]
        self.ends = list(accumulate(n for _, n in chunks))
        self.starts = [0, *self.ends[:-1]] if chunks else []
        self.size = self.ends[-1] if chunks else 0
        self.locs: list[ChunkLocation | None] = [None] * len(chunks)
        self.next_read = 0  # where a sequential reader continues
        self.ahead = 0  # file offset up to which pack data has been asked for (read-ahead)


class VersionFS:
    """A read-only file system view of one version. Thread-safe (the FUSE loop may be threaded)."""

    def __init__(self, version: "Version", *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 read_ahead_threads: int = 2) -> None:
        self.version = version
        self.repo = version.repo
        self.store = version.repo.store
        self.mtime_ns = int(round(version.time * 1e9))
        self._seed = int(version.hash[:16], 16)
        self._dirs: LRUCache[str] = LRUCache(_DIR_CACHE_ENTRIES, sizeof=lambda _: 1)
        self._dirs.put("", version.hash)
        self._chunks: LRUCache[bytes] = LRUCache(max(cache_bytes, 0))
        self._layouts: LRUCache[_Layout] = LRUCache(_LAYOUT_CACHE_CHUNKS, sizeof=lambda lay: len(lay.ids) + 1)
        self._verified: LRUCache[bool] = LRUCache(_VERIFIED_IDS, sizeof=lambda _: 1)
        self._scans: LRUCache[tuple[int, int]] = LRUCache(1024, sizeof=lambda _: 1)  # dir -> (next index, window)
        self.reads = 0
        self.errors = 0
        # Background checks of raw chunks a sequential reader is about to need (see `_will_need`).
        self._ahead = ThreadPoolExecutor(read_ahead_threads, "tessera-verify") if read_ahead_threads > 0 else None
        self._pending: dict[bytes, Future[None]] = {}

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown(wait=True, cancel_futures=True)

    # -- names ------------------------------------------------------------------------------------

    def ino(self, path: str) -> int:
        """Stable inode number of a path (relative, no leading slash; "" is the root)."""
        if not path:
            return ROOT_INO
        n = xxhash.xxh3_64_intdigest(path.encode("utf-8", "surrogateescape"), seed=self._seed) & _INO_MASK
        return n if n > ROOT_INO else n + 2

    def _tree(self, dpath: str) -> "Tree":
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
        return self.repo.load_tree(tid)

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
            import json

            return json.dumps(te.meta, sort_keys=True, ensure_ascii=False).encode()
        return None

    def statfs(self) -> StatFS:
        bsize = 4096
        return StatFS(bsize, bsize, (self.version.size + bsize - 1) // bsize, self.version.files, 255)

    # -- data -------------------------------------------------------------------------------------

    def _file(self, path: str) -> tuple[TreeEntry, _Layout]:
        rel = path.strip("/")
        te = self.lookup(rel)
        if te is None or te.kind == DIR:
            raise IsADirectory(f"is a directory: {rel!r}")
        if te.kind != FILE or te.id is None:
            raise NotFound(f"not a regular file: {rel!r}")
        lay = self._layouts.get(te.id)
        if lay is None:
            lay = self._load_layouts(rel, te)
        return te, lay

    def _load_layouts(self, rel: str, te: TreeEntry) -> _Layout:
        """The layout of ``te``; when files of one directory are read in order (a miss right where the
        last prefetch ended), also those of the next files, in one query, doubling the window up to
        `_PREFETCH_FILES` like kernel read-ahead. Random access stays at one small query per file."""
        parent, _, name = rel.rpartition("/")
        entries = self._tree(parent).entries
        key = name.encode("utf-8", "surrogateescape")
        idx = bisect.bisect_left(entries, key, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        expected, window = self._scans.get(parent) or (-1, 0)
        window = min(max(window * 2, 4), _PREFETCH_FILES) if idx == expected else 1
        self._scans.put(parent, (idx + window, window))
        want = {te.id: te.size}
        for e in entries[idx + 1: idx + window]:
            if e.kind == FILE and e.id is not None and e.id not in want and e.id not in self._layouts:
                want[e.id] = e.size
        catalog = self.repo.catalog
        if len(want) == 1:
            rec = catalog.file(te.id)  # type: ignore[arg-type]
            records = {rec.id: rec} if rec is not None else {}
        else:
            records = catalog.files_by_id(list(want))
        if te.id not in records:
            raise CorruptData(f"file record {te.id} for {rel!r} is missing from the catalog")
        layouts = {}
        for fid, rec in records.items():
            lay = _Layout(rec.chunks)
            if lay.size != want[fid]:
                raise CorruptData(f"file {fid[:12]}: chunks add up to {lay.size} bytes, its entry says {want[fid]}")
            layouts[fid] = lay
        if len(layouts) > 1:  # their chunk locations too, in one go (bounded)
            ids = [cid for lay in layouts.values() for cid in lay.ids][:_PREFETCH_CHUNKS]
            found = catalog.chunks_by_id(ids)
            for lay in layouts.values():
                lay.locs = [found.get(cid) for cid in lay.ids]
            self._will_need([loc for loc in found.values() if loc.id not in self._verified])  # and their data
        for fid, lay in layouts.items():
            self._layouts.put(fid, lay)
        return layouts[te.id]  # type: ignore[index]

    def read_plan(self, path: str, offset: int, size: int) -> list["Segment"]:
        """Where the bytes at ``offset`` (up to ``size``, short only at end of file) come from:
        `bytes` (decompressed or fetched chunk data) and `FileRange`s (verified raw chunk bytes still
        in a local pack, for the caller to ``pread``, or for libfuse to read without Python).

        Every byte planned comes from a chunk that passed its hash check in this mount: a raw chunk is
        read whole and checked on first touch. A chunk that fails raises `CorruptData`."""
        _, lay = self._file(path)
        end = min(offset + size, lay.size)
        if offset >= end:
            return []
        self.reads += 1
        if offset == lay.next_read and end < lay.size and end + _READ_AHEAD // 2 > lay.ahead:
            self._read_ahead(lay, max(end, lay.ahead))
        lay.next_read = end
        i = bisect.bisect_right(lay.starts, offset) - 1
        plan: list[Segment] = []
        pos = offset
        while pos < end:
            start, stop = lay.starts[i], lay.ends[i]
            plan.append(self._segment(lay, i, pos - start, min(end, stop) - start))
            pos = stop
            i += 1
        return plan

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (short only at end of file), all hash-checked."""
        parts = [seg if isinstance(seg, bytes) else seg.read() for seg in self.read_plan(path, offset, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, lay: _Layout, start: int) -> None:
        """A sequential reader: ask the kernel to start reading the pack data of the next
        `_READ_AHEAD` bytes of this file now (``posix_fadvise(WILLNEED)``, asynchronous), so the chunk
        checks of the coming reads find it in the page cache instead of waiting for the disk."""
        first = bisect.bisect_right(lay.starts, start) - 1
        last = bisect.bisect_left(lay.starts, start + _READ_AHEAD)
        missing = [lay.ids[j] for j in range(first, last) if lay.locs[j] is None]
        if missing:
            found = self.repo.catalog.chunks_by_id(missing)
            for j in range(first, last):
                if lay.locs[j] is None:
                    lay.locs[j] = found.get(lay.ids[j])
        self._will_need([loc for loc in lay.locs[first:last] if loc is not None and loc.id not in self._verified])
        lay.ahead = lay.ends[last - 1] if last > first else lay.size

    def _will_need(self, locs: list["ChunkLocation"]) -> None:
        """Start getting the data of chunks about to be read: raw chunks of local packs are read and
        checked by background threads (disk waits and their kernel CPU then overlap with serving, and
        the reads that follow find them verified and cached); others get posix_fadvise(WILLNEED).
        Chunks whose pack is not local go to the store's remote hint (a lazy stream starts early)."""
        local = {pack: self._pack_handle(pack) is not None for pack in {loc.pack for loc in locs}}
        remote = [loc for loc in locs if not local[loc.pack]]
        if remote:
            self.store.will_need(remote)
            locs = [loc for loc in locs if local[loc.pack]]
        rest = []
        for loc in locs:
            if loc.codec != RAW or self._ahead is None or len(self._pending) >= _AHEAD_CHUNKS:
                rest.append(loc)
            elif loc.id not in self._pending and loc.id not in self._verified:
                handle = self._pack_handle(loc.pack)
                if handle is not None:
                    self._pending[loc.id] = self._ahead.submit(self._verify_ahead, handle, loc)
        if not rest or not hasattr(os, "posix_fadvise"):
            return
        runs: dict[str, list[list[int]]] = {}
        for loc in sorted(rest, key=lambda c: (c.pack, c.offset)):
            pack_runs = runs.setdefault(loc.pack, [])
            if pack_runs and loc.offset - pack_runs[-1][1] < (1 << 20):
                pack_runs[-1][1] = max(pack_runs[-1][1], loc.offset + loc.stored_len)
            else:
                pack_runs.append([loc.offset, loc.offset + loc.stored_len])
        for pack, pack_runs in runs.items():
            handle = self._pack_handle(pack)
            if handle is not None:
                for lo, hi in pack_runs:
                    os.posix_fadvise(handle.fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)

    def _verify_ahead(self, handle: "PackHandle", loc: "ChunkLocation") -> None:
        try:
            self._verify_raw(handle, loc, count_errors=False)
        except (CorruptData, OSError):
            pass  # the read that needs this chunk checks it again and reports the error itself
        finally:
            self._pending.pop(loc.id, None)

    def _location(self, lay: _Layout, i: int) -> "ChunkLocation":
        loc = lay.locs[i]
        if loc is None:
            loc = lay.locs[i] = self.store.location(lay.ids[i])
        return loc

    def _segment(self, lay: _Layout, i: int, lo: int, hi: int) -> "Segment":
        cid = lay.ids[i]
        data = self._chunks.get(cid)
        if data is None:
            loc = self._location(lay, i)
            if loc.codec == RAW:
                handle = self._pack_handle(loc.pack)
                if handle is not None:
                    if cid not in self._verified:
                        ahead = self._pending.get(cid)
                        if ahead is not None:  # a background check of this chunk is under way: wait for it
                            ahead.result()
                    if cid not in self._verified:
                        stored = self._verify_raw(handle, loc)
                        if lo == 0 and hi == len(stored):
                            return stored  # just read and checked: hand over, do not read it again
                    return FileRange(handle, loc.offset + lo, hi - lo)
            data = self._load(loc)
            if lo == 0 and hi == len(data):
                return data  # all of it goes to the kernel's page cache: not worth keeping here
            self._chunks.put(cid, data)
        return data if lo == 0 and hi == len(data) else data[lo:hi]

    def _verify_raw(self, handle: "PackHandle", loc: "ChunkLocation", count_errors: bool = True) -> bytes:
        """Read a raw chunk whole and check its xxh3-128 once; afterwards its ranges are served as is."""
        stored = os.pread(handle.fd, loc.stored_len, loc.offset)
        try:
            if len(stored) != loc.stored_len:
                raise CorruptData(f"pack {loc.pack} is truncated (chunk {loc.id.hex()})")
            decode_chunk(loc, stored)
        except CorruptData:
            self.errors += count_errors
            raise
        self._verified.put(loc.id, True)
        return stored

    def _load(self, loc: "ChunkLocation") -> bytes:
        try:
            return decode_chunk(loc, self.store.read_stored(loc))
        except CorruptData:
            self.errors += 1
            raise

    def _pack_handle(self, pack: str) -> "PackHandle | None":
        """An open pack (None when not local: the caller fetches the whole chunk instead)."""
        return self.store.pack_handle(pack)

    # -- convenience ------------------------------------------------------------------------------

    def read_all(self, path: str) -> bytes:
        return self.read(path, 0, self.stat(path).size)
