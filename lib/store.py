"""The local chunk store: pack files under ``$HOME/packs``, written crash-safely and read verified.

Writing: a `PackSet` hands each commit worker thread its own `PackWriter`, so workers never wait on
each other while compressing, hashing and appending. A pack is sealed (fsync, renamed to its SHA-256,
directory fsynced) before its chunks are recorded in the catalog: a crash leaves only unreferenced
packs, never a chunk row that points at missing bytes. A commit deduplicates only against chunks whose
bytes are in a local pack (`Catalog.local_chunks`), never against a location a remote index claims.

Reading: `read_stored` ``pread``s a chunk's stored bytes from its local pack; `decode_chunk` (the one
place chunks are decompressed and checked) bounds the decompression by the chunk's recorded length and
checks its xxh3-128 id. Reading chunks for users (cache, lazy remote fetches) is `tessera.reader`.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from tessera.catalog import Catalog
from tessera.config import DEFAULT_PACK_TARGET
from tessera.errors import CorruptData, ReadOnlyHome, TesseraError, raise_os_error
from tessera.faults import crash_point
from tessera.format.compress import decompress
from tessera.format.pack import KIND_CHUNK, BlobInfo, PackBuilder, Piece, iter_blobs
from tessera.ids import chunk_id, sha256_hex
from tessera.model import ChunkLocation

logger = logging.getLogger(__name__)


def flock_polling(fd: int, wait: float, busy: str) -> None:
    """Take an exclusive ``flock`` on ``fd``, trying for ``wait`` seconds (polling, so the caller never
    queues behind other waiters); `TesseraError` ``busy`` if it stays taken."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TesseraError(busy) from None
            time.sleep(0.05)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MAX_PACK_FDS = 256
PACK_MAX_BLOBS = 50_000  # chunks in one data pack at most (tiny files): bounds its in-memory index


class PackHandle:
    """An open pack fd, closed when the last user drops it (never while another thread reads it)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


class FileRange(NamedTuple):
    """``size`` verified bytes at ``pos`` in an open local pack (raw chunks are stored as is): the
    mount hands these to libfuse, which ``pread``s them itself, so file data never passes through Python."""

    handle: PackHandle
    pos: int
    size: int

    @property
    def fd(self) -> int:
        return self.handle.fd

    def read(self) -> bytes:
        data = os.pread(self.handle.fd, self.size, self.pos)
        if len(data) != self.size:
            raise CorruptData(f"pack file shrank under a reader (fd {self.handle.fd})")
        return data

    def read_into(self, buf: memoryview) -> int:
        """Read the range straight into ``buf`` (at least ``size`` bytes long); returns ``size``."""
        if os.preadv(self.handle.fd, [buf[:self.size]], self.pos) != self.size:
            raise CorruptData(f"pack file shrank under a reader (fd {self.handle.fd})")
        return self.size


@dataclass
class SealedPack:
    id: str
    size: int
    blobs: list[BlobInfo]


class PackWriter:
    """Appends chunk blobs to one temporary pack file; `seal` makes it durable and names it by its hash."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tmp_path = store.tmp_dir / f"pack-{uuid.uuid4().hex}.tmp"
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._pack = PackBuilder(self._write)

    @property
    def size(self) -> int:
        return self._pack.size

    @property
    def blobs(self) -> list[BlobInfo]:
        return self._pack.blobs

    def add(self, blob_id: bytes, codec: int, stored: Piece, raw_len: int) -> None:
        self._pack.add(KIND_CHUNK, codec, blob_id, stored, raw_len)

    def _write(self, parts: Sequence[Piece]) -> None:
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
        pack_id = self._pack.id
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
    """The packs one commit writes: a writer per thread, commit-wide dedup of in-flight chunks.

    A pack is sealed when it reaches ``target_size`` bytes or ``max_blobs`` chunks (its index is held
    in memory until then: tiny files must not make it grow without bound), and by `checkpoint` / `finish`.
    """

    def __init__(self, store: Store, target_size: int = DEFAULT_PACK_TARGET, max_blobs: int = PACK_MAX_BLOBS,
                 on_sealed: Callable[[str], None] | None = None) -> None:
        """``on_sealed(pack id)`` is called once each pack is durable and indexed (on the sealing thread)."""
        self.store = store
        self.on_sealed = on_sealed
        self.target_size = target_size
        self.max_blobs = max_blobs
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writers: list[PackWriter] = []
        self._claimed: set[bytes] = set()
        self._generation = 0  # bumped by `checkpoint`: a thread's writer of an older generation is sealed
        self.sealed: list[SealedPack] = []  # in sealing order (a long commit clears it at its checkpoints)
        self.new_chunks = 0
        self.new_bytes = 0

    def claim(self, ids: list[bytes]) -> list[bool]:
        """For each id: True when the caller must store it (nobody has it or is writing it)."""
        with self._lock:
            fresh = [i for i in ids if i not in self._claimed]
            known = self.store.catalog.local_chunks(fresh) if fresh else set()
            out = []
            for i in ids:
                if i in self._claimed or i in known:
                    out.append(False)
                else:
                    self._claimed.add(i)
                    out.append(True)
            return out

    def add(self, blob_id: bytes, codec: int, stored: bytes | memoryview, raw_len: int) -> None:
        mine: tuple[int, PackWriter] | None = getattr(self._local, "writer", None)
        if mine is None or mine[0] != self._generation:
            writer = PackWriter(self.store)
            self._local.writer = (self._generation, writer)
            with self._lock:
                self._writers.append(writer)
        else:
            writer = mine[1]
        try:
            writer.add(blob_id, codec, stored, raw_len)
        except OSError as exc:
            raise_os_error(exc, "writing a pack")
        with self._lock:
            self.new_chunks += 1
            self.new_bytes += len(stored)
        if writer.size >= self.target_size or len(writer.blobs) >= self.max_blobs:
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
        if self.on_sealed is not None:
            self.on_sealed(sealed.id)

    def checkpoint(self) -> None:
        """Seal and index every open pack now, so that every chunk added so far is durable; later adds
        start new packs. Call it only while no thread is adding (between batches of work)."""
        self._generation += 1
        self.finish()

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
    def collecting(self, wait: float = 0.0) -> Iterator[None]:
        """Exclusive: no commit, pull or repack is between writing a pack and recording what uses it.
        ``wait``: keep trying that many seconds (polling, so writers are never queued behind us)."""
        fd = os.open(self.home / "write.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flock_polling(fd, wait, "another tessera process is writing to this home; run gc later")
            yield
        finally:
            os.close(fd)

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

    def read_stored(self, loc: ChunkLocation, handle: PackHandle | None = None) -> bytes:
        """The stored bytes of a chunk of a local pack (`CorruptData` if the pack is missing or short)."""
        handle = handle or self.pack_handle(loc.pack)
        if handle is None:
            raise CorruptData(f"pack {loc.pack} holding chunk {loc.id.hex()} is missing")
        data = os.pread(handle.fd, loc.stored_len, loc.offset)
        if len(data) != loc.stored_len:
            raise CorruptData(f"pack {loc.pack} is truncated (chunk {loc.id.hex()})")
        return data

    def pack_index(self, pack: str) -> tuple[int, list[ChunkLocation]]:
        """Check a local pack against its id and list its chunks (what a remote's ``index/<id>`` holds)."""
        chunks = list(self.iter_pack_index(pack))
        return self.pack_path(pack).stat().st_size, chunks

    def iter_pack_index(self, pack: str) -> Iterator[ChunkLocation]:
        """`pack_index`'s chunks one at a time (the pack is checked against its id before the first)."""
        with open(self.pack_path(pack), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CorruptData(f"local pack {pack} is empty (run `tessera fsck`)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if sha256_hex(m) != pack:
                    raise CorruptData(f"local pack {pack} fails its hash check (run `tessera fsck`)")
                for b in iter_blobs(m, f"pack {pack}"):
                    if b.kind == KIND_CHUNK:
                        yield ChunkLocation(b.id, pack, b.offset, b.stored_len, b.raw_len, b.codec)

    def close(self) -> None:
        with self._fd_lock:
            self._fds.clear()


def decode_chunk(loc: ChunkLocation, stored: bytes | memoryview) -> bytes:
    """Decompress and verify one chunk's stored bytes: the one place chunks are decoded. Decompression
    is bounded by the recorded raw length before anything is allocated."""
    try:
        data = decompress(loc.codec, stored, loc.raw_len)
    except CorruptData as exc:
        raise CorruptData(f"chunk {loc.id.hex()} in pack {loc.pack} is corrupt: {exc}") from None
    if chunk_id(data) != loc.id:
        raise CorruptData(f"chunk {loc.id.hex()} in pack {loc.pack} fails its hash check")
    return data


