"""The one reader of chunks and files: every adapter (the mount, `Version.open`, fsspec, torch) reads here.

`ChunkReader` (a `ChunkSource`) serves a chunk from its local pack or, when the pack is only on a remote,
from the lazy fetcher; each chunk is decoded and verified exactly once per read (`store.decode_chunk`,
or the fetcher, which verifies what it fetches). Decoded chunks that a read used only part of stay in a
byte-bounded LRU (a whole-chunk read goes to the caller and, on a mount, to the page cache). Raw chunks
of local packs are read whole and verified on first touch, by the read that needs them; after that
their ranges are handed out as `FileRange`s for the caller (or libfuse) to ``pread``: bytes are never
served before their chunk has passed its hash check once in this process.

`FileReader` maps one file's offsets to its chunks by bisecting cumulative sizes (borg and restic do
the same) and reads ahead for sequential readers: locations of the next 8 MiB are looked up in one
query and their data requested (``posix_fadvise(WILLNEED)`` for local packs, so the kernel reads them
while earlier reads are served; a hint to the lazy fetcher for remote packs).
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Protocol

from tessera.catalog import Catalog
from tessera.errors import CorruptData
from tessera.format.compress import RAW
from tessera.lru import LRUCache
from tessera.model import ChunkLocation, FileRecord
from tessera.sources import ChunkSource, Segment
from tessera.store import FileRange, PackHandle, Store, decode_chunk

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
READ_AHEAD = 8 << 20  # bytes of a sequentially read file whose data is requested ahead
LOCATE_AHEAD = 32  # chunks located together when a read needs a location not known yet
_VERIFIED_IDS = 1 << 18  # raw chunks remembered as checked (oldest forgotten first: then checked again)


class RemoteChunks(Protocol):
    """Chunks of packs that are only on a remote (`tessera.lazy.LazyFetcher`)."""

    def fetch(self, loc: ChunkLocation) -> bytes:
        """The chunk's raw bytes, fetched and verified (`CorruptData`, `RemoteError` otherwise)."""

    def will_need(self, locs: list[ChunkLocation]) -> None:
        """A reader is about to read these chunks (a hint)."""

    def close(self) -> None: ...


class ChunkReader:
    """Chunks of the local store, else of a remote (through ``remote()``, made on first need). Thread-safe."""

    def __init__(self, catalog: Catalog, store: Store, *, remote: Callable[[], RemoteChunks] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.catalog = catalog
        self.store = store
        self._open_remote = remote
        self._remote: RemoteChunks | None = None
        self._remote_lock = threading.Lock()
        self._packs: dict[str, bool] = {}  # pack -> is local (as the catalog said when first asked)
        self._decoded: LRUCache[bytes] = LRUCache(max(cache_bytes, 0))
        # ids of raw chunks checked in this process, oldest first (a dict: membership needs no lock)
        self._verified: dict[bytes, None] = {}
        self.errors = 0  # chunks that failed their check (the mount logs it)

    def use_remote(self, fetcher: RemoteChunks) -> None:
        """Read chunks of remote packs through ``fetcher`` from now on (tests, embedders)."""
        with self._remote_lock:
            old, self._remote = self._remote, fetcher
        if old is not None and old is not fetcher:
            old.close()

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()

    # -- ChunkSource ---------------------------------------------------------------------------------

    def locations(self, chunk_ids: Sequence[bytes]) -> dict[bytes, ChunkLocation]:
        return self.catalog.chunks_by_id(chunk_ids)

    def location(self, chunk_id: bytes) -> ChunkLocation:
        loc = self.catalog.chunk(chunk_id)
        if loc is None:
            raise CorruptData(f"chunk {chunk_id.hex()} is not in the store")
        return loc

    def is_local(self, pack: str) -> bool:
        """Whether ``pack`` is a local pack file (else its chunks are read from a remote)."""
        return self._is_local(pack)

    def read_chunk(self, loc: ChunkLocation) -> bytes:
        data = self._decoded.get(loc.id)
        return data if data is not None else self._load(loc)

    def segment(self, loc: ChunkLocation, lo: int, hi: int) -> Segment:
        """Bytes ``[lo, hi)`` of a chunk: a `FileRange` for a verified raw chunk of a local pack, else
        bytes (a chunk used only in part is kept decoded in the LRU for the next read of it)."""
        data = self._decoded.get(loc.id)
        if data is None:
            if loc.codec == RAW:
                handle = self.store.pack_handle(loc.pack)
                if handle is None and self._is_local(loc.pack) and (moved := self._relocated(loc)) is not None:
                    return self.segment(moved, lo, hi)  # gc repacked it: same chunk, another pack
                if handle is not None:
                    if loc.id not in self._verified:
                        stored = self._verify_raw(handle, loc)  # just read and checked: do not read it again
                        return stored if lo == 0 and hi == len(stored) else stored[lo:hi]
                    return FileRange(handle, loc.offset + lo, hi - lo)
            data = self._load(loc)
            if lo == 0 and hi == len(data):
                return data  # all of it goes to the caller (and the kernel's page cache): not kept here
            self._decoded.put(loc.id, data)
        return data if lo == 0 and hi == len(data) else data[lo:hi]

    def will_need(self, locs: Sequence[ChunkLocation]) -> None:
        """Start getting the data of chunks about to be read: chunks of local packs get
        ``posix_fadvise(WILLNEED)`` (the kernel reads them while earlier reads are served; the read that
        needs a chunk checks it); chunks of remote packs go to the lazy fetcher as a hint (its stream
        for the next pack starts early)."""
        verified = self._verified
        locs = [loc for loc in locs if loc.id not in verified]
        remote = [loc for loc in locs if not self._is_local(loc.pack)]
        if remote:
            fetcher = self._fetcher(create=False)
            if fetcher is not None:
                fetcher.will_need(remote)
            locs = [loc for loc in locs if self._is_local(loc.pack)]
        if locs and hasattr(os, "posix_fadvise"):
            self._advise(locs)

    # -- internals ---------------------------------------------------------------------------------

    def _is_local(self, pack: str) -> bool:
        local = self._packs.get(pack)
        if local is None:
            local = self._packs[pack] = self.catalog.pack_states([pack]).get(pack, (0, True))[1]
        return local

    def _fetcher(self, *, create: bool = True) -> RemoteChunks | None:
        if self._remote is None and create and self._open_remote is not None:
            with self._remote_lock:
                if self._remote is None:
                    self._remote = self._open_remote()
        return self._remote

    def _load(self, loc: ChunkLocation) -> bytes:
        """Decode and verify one chunk, once: from its local pack, else from the remote holding it."""
        try:
            handle = self.store.pack_handle(loc.pack)
            if handle is None and self._is_local(loc.pack) and (moved := self._relocated(loc)) is not None:
                loc, handle = moved, self.store.pack_handle(moved.pack)  # gc repacked it
            if handle is not None:
                return decode_chunk(loc, self.store.read_stored(loc, handle))
            if self._is_local(loc.pack):
                raise CorruptData(f"pack {loc.pack} holding chunk {loc.id.hex()} is missing")
            fetcher = self._fetcher()
            if fetcher is None:
                raise CorruptData(f"pack {loc.pack} holding chunk {loc.id.hex()} is only on a remote")
            return fetcher.fetch(loc)
        except CorruptData:
            self.errors += 1
            raise

    def _relocated(self, loc: ChunkLocation) -> ChunkLocation | None:
        """Where the catalog says the chunk is now, when that is elsewhere: `tessera gc` repacks live
        chunks into new packs and deletes the old one while readers hold locations into it."""
        current = self.catalog.chunk(loc.id)
        if current is None or (current.pack, current.offset) == (loc.pack, loc.offset):
            return None
        return current

    def _verify_raw(self, handle: PackHandle, loc: ChunkLocation) -> bytes:
        """Read a raw chunk whole and check its xxh3-128 once; afterwards its ranges are served as is."""
        try:
            stored = self.store.read_stored(loc, handle)
            decode_chunk(loc, stored)
        except CorruptData:
            self.errors += 1
            raise
        verified = self._verified
        verified[loc.id] = None
        if len(verified) > _VERIFIED_IDS:
            try:
                del verified[next(iter(verified))]
            except (KeyError, RuntimeError, StopIteration):  # another thread changed it meanwhile
                pass
        return stored

    def _advise(self, locs: list[ChunkLocation]) -> None:
        runs: dict[str, list[list[int]]] = {}
        for loc in sorted(locs, key=lambda c: (c.pack, c.offset)):
            pack_runs = runs.setdefault(loc.pack, [])
            if pack_runs and loc.offset - pack_runs[-1][1] < (1 << 20):
                pack_runs[-1][1] = max(pack_runs[-1][1], loc.offset + loc.stored_len)
            else:
                pack_runs.append([loc.offset, loc.offset + loc.stored_len])
        for pack, pack_runs in runs.items():
            handle = self.store.pack_handle(pack)
            if handle is not None:
                for lo, hi in pack_runs:
                    os.posix_fadvise(handle.fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)


class FileReader:
    """One file's bytes by offset: its chunks, cumulative start offsets, locations (filled on first use
    or in batches by `fill_locations`) and where a sequential reader has got to."""

    __slots__ = ("chunks", "id", "size", "ids", "starts", "ends", "locs", "next_read", "ahead")

    def __init__(self, chunks: ChunkSource, record: FileRecord) -> None:
        self.chunks = chunks
        self.id = record.id
        self.ids = [cid for cid, _ in record.chunks]
        self.ends = list(accumulate(n for _, n in record.chunks))
        self.starts = [0, *self.ends[:-1]] if self.ids else []
        self.size = self.ends[-1] if self.ids else 0
        if self.size != record.size:
            raise CorruptData(f"file {record.id[:12]}: chunks add up to {self.size} bytes, its record says "
                              f"{record.size}")
        self.locs: list[ChunkLocation | None] = [None] * len(self.ids)
        self.next_read = 0  # where a sequential reader continues
        self.ahead = 0  # file offset up to which data has been asked for (read-ahead)

    def read_plan(self, offset: int, size: int) -> list[Segment]:
        """Where the bytes at ``offset`` (up to ``size``, short only at end of file) come from: `bytes`
        and `FileRange`s, every one from a chunk that passed its hash check. `CorruptData` otherwise."""
        end = min(offset + size, self.size)
        if offset >= end:
            return []
        sequential = offset == self.next_read
        self.next_read = end
        i = bisect.bisect_right(self.starts, offset) - 1
        plan: list[Segment] = []
        pos = offset
        while pos < end:
            start, stop = self.starts[i], self.ends[i]
            plan.append(self.chunks.segment(self._location(i), pos - start, min(end, stop) - start))
            pos = stop
            i += 1
        # after this read's own chunks were asked for (a remote reader's stream then already serves
        # their pack, and the hint goes to the packs after it)
        if sequential and end < self.size and end + READ_AHEAD // 2 > self.ahead:
            self._read_ahead(max(end, self.ahead))
        return plan

    def read(self, offset: int, size: int) -> bytes:
        parts = [seg if isinstance(seg, bytes) else seg.read() for seg in self.read_plan(offset, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _location(self, i: int) -> ChunkLocation:
        loc = self.locs[i]
        if loc is None:  # this chunk and the next few in one lookup (one query; remote tables: one batch)
            fill_locations([self], i, i + LOCATE_AHEAD)
            loc = self.locs[i]
            if loc is None:
                raise CorruptData(f"chunk {self.ids[i].hex()} of file {self.id[:12]} is not in the store")
        return loc

    def _read_ahead(self, start: int) -> None:
        """A sequential reader: locate the chunks of the next `READ_AHEAD` bytes in one query and ask
        for their data now, so the coming reads find it ready."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_left(self.starts, start + READ_AHEAD)
        fill_locations([self], first, last)
        self.chunks.will_need([loc for loc in self.locs[first:last] if loc is not None])
        self.ahead = self.ends[last - 1] if last > first else self.size


def fill_locations(files: Sequence[FileReader], first: int = 0, last: int | None = None,
                   limit: int = 4096) -> list[ChunkLocation]:
    """Look up the missing locations of chunks ``[first, last)`` of each file in one query (at most
    ``limit`` chunks in all); returns the locations found."""
    want: list[bytes] = []
    for f in files:
        want.extend(cid for cid, loc in zip(f.ids[first:last], f.locs[first:last]) if loc is None)
    if not want or not files:
        return []
    found = files[0].chunks.locations(want[:limit])
    for f in files:
        stop = len(f.ids) if last is None else min(last, len(f.ids))
        for j in range(first, stop):
            if f.locs[j] is None:
                f.locs[j] = found.get(f.ids[j])
    return list(found.values())
