"""The local chunk store: pack files under ``$HOME/packs`` plus verified chunk reads.

Writing: a `PackSet` hands each commit worker thread its own `PackWriter`, so workers never wait on
each other while compressing, hashing and appending. A pack is sealed (fsync, renamed to its SHA-256,
directory fsynced) before its chunks are recorded in the catalog: a crash leaves only unreferenced
packs, never a chunk row that points at missing bytes.

Reading: `read_chunk` finds the chunk in the catalog, `pread`s the stored bytes, decompresses and
checks the xxh3-128 id. A mismatch raises `CorruptData` naming the chunk and pack.
"""
from __future__ import annotations

import errno
import fcntl
from collections import deque
import hashlib
import logging
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tessera.catalog import Catalog, ChunkLocation
from tessera.errors import CorruptData, DiskFull, NotFound, ReadOnlyHome, TesseraError
from tessera.faults import crash_point
from tessera.format.compress import decompress
from tessera.format.pack import KIND_CHUNK, PACK_MAGIC, BlobInfo, encode_header
from tessera.ids import chunk_id

logger = logging.getLogger(__name__)

DEFAULT_PACK_TARGET = 48 * 1024 * 1024

# Fetches the stored bytes of a chunk whose pack is not local (set by the remote layer for lazy reads).
RemoteFetch = Callable[[ChunkLocation], bytes]
# Told of chunks of packs that are not local that a reader is about to read, in order (a hint).
RemoteHint = Callable[[list[ChunkLocation]], None]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_os_error(exc: OSError, what: str) -> None:
    if exc.errno == errno.ENOSPC:
        raise DiskFull(f"disk full while {what}: nothing was committed, the store is intact") from None
    raise TesseraError(f"error while {what}: {exc.strerror or exc}") from None


MAX_PACK_FDS = 256


class PackHandle:
    """An open pack fd, closed when the last user drops it (never while another thread reads it)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass
class SealedPack:
    id: str
    size: int
    blobs: list[BlobInfo]


class PackWriter:
    """Appends blobs to one temporary pack file; `seal` makes it durable and names it by its hash."""

    def __init__(self, store: "Store", kind: int = KIND_CHUNK) -> None:
        self.store = store
        self.kind = kind
        self.tmp_path = store.tmp_dir / f"pack-{uuid.uuid4().hex}.tmp"
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._hash = hashlib.sha256(PACK_MAGIC)
        self._write(PACK_MAGIC)
        self.size = len(PACK_MAGIC)
        self.blobs: list[BlobInfo] = []

    def add(self, blob_id: bytes, codec: int, stored: bytes | memoryview, raw_len: int,
            kind: int | None = None) -> None:
        kind = self.kind if kind is None else kind
        header = encode_header(kind, codec, blob_id, raw_len, len(stored))
        self._write(header, stored)
        self._hash.update(header)
        self._hash.update(stored)
        self.blobs.append(BlobInfo(kind, codec, blob_id, self.size + len(header), raw_len, len(stored)))
        self.size += len(header) + len(stored)

    def _write(self, *parts: bytes | memoryview) -> None:
        """Append without an intermediate buffer copy (writev straight to the page cache)."""
        want = sum(len(p) for p in parts)
        done = os.writev(self._fd, parts)
        if done != want:  # short write: finish piece by piece
            rest = memoryview(b"".join(bytes(p) for p in parts))[done:]
            while rest:
                rest = rest[os.write(self._fd, rest):]

    def seal(self) -> SealedPack:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        pack_id = self._hash.hexdigest()
        final = self.store.pack_path(pack_id)
        final.parent.mkdir(exist_ok=True)
        crash_point("before-pack-rename")
        os.replace(self.tmp_path, final)
        fsync_dir(final.parent)
        crash_point("after-pack-rename")
        return SealedPack(pack_id, self.size, self.blobs)

    def abort(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        self.tmp_path.unlink(missing_ok=True)


class PackSet:
    """The packs one commit writes: a writer per thread, commit-wide dedup of in-flight chunks."""

    def __init__(self, store: Store, target_size: int = DEFAULT_PACK_TARGET) -> None:
        self.store = store
        self.target_size = target_size
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writers: list[PackWriter] = []
        self._claimed: set[bytes] = set()
        self.sealed: list[SealedPack] = []
        self.new_chunks = 0
        self.new_bytes = 0

    def claim(self, ids: list[bytes]) -> list[bool]:
        """For each id: True when the caller must store it (nobody has it or is writing it)."""
        with self._lock:
            fresh = [i for i in ids if i not in self._claimed]
            known = self.store.catalog.known_chunks(fresh) if fresh else set()
            out = []
            for i in ids:
                if i in self._claimed or i in known:
                    out.append(False)
                else:
                    self._claimed.add(i)
                    out.append(True)
            return out

    def add(self, blob_id: bytes, codec: int, stored: bytes | memoryview, raw_len: int) -> None:
        writer: PackWriter | None = getattr(self._local, "writer", None)
        if writer is None:
            writer = self._local.writer = PackWriter(self.store)
            with self._lock:
                self._writers.append(writer)
        try:
            writer.add(blob_id, codec, stored, raw_len)
        except OSError as exc:
            raise_os_error(exc, "writing a pack")
        with self._lock:
            self.new_chunks += 1
            self.new_bytes += len(stored)
        if writer.size >= self.target_size:
            self._local.writer = None
            self._seal(writer)

    def _seal(self, writer: PackWriter) -> None:
        try:
            sealed = writer.seal()
        except OSError as exc:
            writer.abort()
            raise_os_error(exc, "sealing a pack")
        self.store.catalog.add_pack(sealed.id, sealed.size, sealed.blobs)
        with self._lock:
            self._writers.remove(writer)
            self.sealed.append(sealed)
            self._claimed.difference_update(b.id for b in sealed.blobs)

    def finish(self) -> list[SealedPack]:
        """Seal every open pack (called by the committing thread once all workers are done)."""
        for writer in list(self._writers):
            if writer.blobs:
                self._seal(writer)
            else:
                writer.abort()
                self._writers.remove(writer)
        return self.sealed

    def abort(self) -> None:
        for writer in list(self._writers):
            writer.abort()
        self._writers.clear()


class Store:
    def __init__(self, home: Path, catalog: Catalog, *, read_only: bool = False) -> None:
        self.home = home
        self.catalog = catalog
        self.pack_dir = home / "packs"
        self.tmp_dir = home / "tmp"
        self.read_only = read_only  # a read-only home: nothing is created, `writing` refuses
        if not read_only:
            self.pack_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, PackHandle] = {}
        self._retired: deque[PackHandle] = deque(maxlen=MAX_PACK_FDS)
        self._fd_lock = threading.Lock()
        self.remote_fetch: RemoteFetch | None = None
        self.remote_will_need: RemoteHint | None = None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held (shared) by every writer of packs; `gc` takes it exclusively, so it never deletes a
        temporary or not-yet-indexed pack of a running commit or pull."""
        if self.read_only:
            raise ReadOnlyHome(f"tessera home {self.home} is read-only (a read-only file system or no write "
                               "permission): only reading commands work here")
        with self._lock_file(fcntl.LOCK_SH):
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        try:
            with self._lock_file(fcntl.LOCK_EX | fcntl.LOCK_NB):
                yield
        except BlockingIOError:
            raise TesseraError("another tessera process is writing to this home; run gc later") from None

    @contextmanager
    def _lock_file(self, mode: int) -> Iterator[None]:
        fd = os.open(self.home / "write.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def pack_path(self, pack_id: str) -> Path:
        return self.pack_dir / pack_id[:2] / f"{pack_id}.pack"

    def has_pack_file(self, pack_id: str) -> bool:
        return self.pack_path(pack_id).exists()

    def pack_handle(self, pack_id: str) -> PackHandle | None:
        """An open pack file, or None when the pack is not local. Hold the handle while reading:
        evicting it from the cache never closes an fd another thread is using."""
        handle = self._fds.get(pack_id)
        if handle is not None:
            return handle
        try:
            handle = PackHandle(os.open(self.pack_path(pack_id), os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return None
        with self._fd_lock:
            if len(self._fds) >= MAX_PACK_FDS:
                # Retire, do not close: a handle given out a moment ago may still be read (the mount
                # hands (fd, offset) ranges to libfuse, which reads after our callback returns).
                # Retired handles close when pushed out of the deque and no longer referenced.
                self._retired.extend(self._fds.values())
                self._fds.clear()
            return self._fds.setdefault(pack_id, handle)

    def location(self, cid: bytes) -> ChunkLocation:
        loc = self.catalog.chunk(cid)
        if loc is None:
            raise CorruptData(f"chunk {cid.hex()} is not in the store")
        return loc

    def read_stored(self, loc: ChunkLocation) -> bytes:
        handle = self.pack_handle(loc.pack)
        if handle is None:
            if self.remote_fetch is not None:
                return self.remote_fetch(loc)
            raise CorruptData(f"pack {loc.pack} holding chunk {loc.id.hex()} is missing")
        data = os.pread(handle.fd, loc.stored_len, loc.offset)
        if len(data) != loc.stored_len:
            raise CorruptData(f"pack {loc.pack} is truncated (chunk {loc.id.hex()})")
        return data

    def will_need(self, locs: list[ChunkLocation]) -> None:
        """A reader is about to read these chunks, in this order, and their packs are not local: the
        remote layer may start fetching them now (the mount's read-ahead calls this). A hint only."""
        if self.remote_will_need is not None and locs:
            self.remote_will_need(locs)

    def read_chunk(self, cid: bytes, loc: ChunkLocation | None = None) -> bytes:
        loc = loc or self.location(cid)
        return decode_chunk(loc, self.read_stored(loc))

    def close(self) -> None:
        with self._fd_lock:
            self._fds.clear()


def decode_chunk(loc: ChunkLocation, stored: bytes) -> bytes:
    """Decompress and verify one chunk's stored bytes."""
    try:
        data = decompress(loc.codec, stored, loc.raw_len)
    except CorruptData as exc:
        raise CorruptData(f"chunk {loc.id.hex()} in pack {loc.pack} is corrupt: {exc}") from None
    if len(data) != loc.raw_len or chunk_id(data) != loc.id:
        raise CorruptData(f"chunk {loc.id.hex()} in pack {loc.pack} fails its hash check")
    return data


