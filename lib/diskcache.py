"""The on-disk cache of chunks read lazily from remotes: verified stored bytes, bounded, LRU.

Files live under ``$TESSERA_HOME/cache/chunks/<pp>/``. Each holds a *run*: chunks of one pack that
were fetched together (one ranged GET, or a few MiB of a stream), named ``<pack>-<offset>-<count>``
after its first chunk::

    b"TSR1" | count: u32 | count x (offset: u64, length: u32, xxh3-64 of the bytes: u64) | the bytes

One file per run, not per chunk: creating and deleting files is what a cache of 256 KiB chunks spends
most of its time on (ext4 allocating inodes next to thousands just freed). A chunk whose bytes fail
their checksum (a file torn by a crash) is a miss, and its file is dropped. Files named
``<pack>-<offset>`` (one chunk: its xxh3-64, then its bytes) come from older versions and are still read.

The index (chunk -> file) is built from the file headers on first use; a miss looks once more in the
pack's directory for runs another process sharing the home (a mount, the CLI) wrote since. The bound
is ``$TESSERA_CACHE_SIZE``, else the catalog setting ``cache.max_bytes`` (`tessera remote cache
--size`), else 4 GiB; each process evicts the least recently used runs it knows of past it, so the
bound holds per process and approximately across them.
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from tessera.catalog import Catalog
from tessera.config import parse_size

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30
CACHE_SETTING = "cache.max_bytes"
CACHE_ENV = "TESSERA_CACHE_SIZE"
RUN_BYTES = 4 << 20  # the most one file holds (and at most 1/16 of the bound)

Key = tuple[str, int]  # (pack id, offset of the stored bytes)
Stored = bytes | memoryview

_MAGIC = b"TSR1"
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct("<QIQ")
_LEGACY = struct.Struct("<Q")


def cache_size(catalog: Catalog) -> int:
    env = os.environ.get(CACHE_ENV)
    if env:
        return parse_size(env)
    value = catalog.setting(CACHE_SETTING)
    return int(value) if value else DEFAULT_CACHE_BYTES


def cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "chunks"


@dataclass
class _Run:
    """One cache file: its size on disk and where each of its chunks is."""

    pack: str
    size: int
    entries: dict[int, tuple[int, int, int | None]]  # chunk offset -> (position, length, xxh3-64; None: legacy)


class DiskCache:
    """Stored chunk bytes on disk, a file per run of chunks, bounded by total bytes (LRU by file)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._runs: OrderedDict[str, _Run] | None = None  # file name -> run, least recently used first
        self._chunks: dict[Key, str] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def run_bytes(self) -> int:
        """How much a writer should put in one file: eviction stays fine-grained against the bound."""
        return max(1, min(RUN_BYTES, self.max_bytes // 16))

    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    def _ensure(self) -> OrderedDict[str, _Run]:
        """The index of what is on disk (scanned once, oldest first). Call with the lock held."""
        if self._runs is not None:
            return self._runs
        found: list[tuple[float, str, _Run]] = []
        if self.root.is_dir():
            for sub in os.scandir(self.root):
                if sub.is_dir():
                    found.extend(_scan_dir(sub.path, ""))
        found.sort(key=lambda item: item[0])
        self._runs = OrderedDict()
        for _, name, run in found:
            self._add(name, run)
        return self._runs

    def _add(self, name: str, run: _Run) -> None:
        """Index ``run`` as the most recently used (lock held)."""
        runs = self._runs
        assert runs is not None
        if name in runs:
            self._remove(name)
        runs[name] = run
        self._bytes += run.size
        for offset in run.entries:
            self._chunks[(run.pack, offset)] = name

    def _remove(self, name: str) -> _Run | None:
        """Forget ``name`` (lock held); its chunks held by no other known file become misses."""
        run = self._runs.pop(name, None) if self._runs is not None else None
        if run is not None:
            self._bytes -= run.size
            for offset in run.entries:
                if self._chunks.get((run.pack, offset)) == name:
                    del self._chunks[(run.pack, offset)]
        return run

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            self._ensure()
            return key in self._chunks

    def get(self, key: Key, length: int) -> bytes | None:
        """The stored bytes of chunk ``key`` (``length`` of them) if cached and intact, else None."""
        if self.max_bytes <= 0:
            return None
        found = self._find(key)
        if found is None and self._rescan(key[0]):  # written by another process since we looked?
            found = self._find(key)
        if found is None:
            return None
        name, (pos, n, check) = found
        try:
            with open(self._path(name), "rb") as f:
                if check is None:  # legacy: one chunk, its checksum first
                    head = f.read(_LEGACY.size)
                    check = _LEGACY.unpack(head)[0] if len(head) == _LEGACY.size else -1
                data = os.pread(f.fileno(), n, pos)
        except (FileNotFoundError, NotADirectoryError):
            with self._lock:
                self._remove(name)
            return None
        if len(data) != length or check != xxhash.xxh3_64_intdigest(data):
            logger.info("dropping damaged cache file %s", self._path(name))
            self._drop(name)
            return None
        with self._lock:
            if self._runs is not None and name in self._runs:
                self._runs.move_to_end(name)
        return data

    def _find(self, key: Key) -> tuple[str, tuple[int, int, int | None]] | None:
        with self._lock:
            runs = self._ensure()
            name = self._chunks.get(key)
            run = runs.get(name) if name is not None else None
            if run is None:
                return None
            return name, run.entries[key[1]]  # type: ignore[return-value]

    def _rescan(self, pack: str) -> bool:
        """Index runs of ``pack`` that another process wrote; True if there were any."""
        directory = self.root / pack[:2]
        with self._lock:
            runs = self._ensure()
            known = set(runs)
        new = list(_scan_dir(str(directory), f"{pack}-", skip=known))
        if not new:
            return False
        with self._lock:
            for _, name, run in new:
                self._add(name, run)
        return True

    def put(self, key: Key, data: Stored) -> None:
        self.put_run(key[0], [(key[1], data)])

    def put_run(self, pack: str, chunks: list[tuple[int, Stored]]) -> None:
        """Cache chunks of ``pack`` (``(offset, stored bytes)``, verified) in one file."""
        if not chunks:
            return
        head = [_HEAD.pack(_MAGIC, len(chunks))]
        entries: dict[int, tuple[int, int, int | None]] = {}
        pos = _HEAD.size + _ENTRY.size * len(chunks)
        for offset, data in chunks:
            check = xxhash.xxh3_64_intdigest(data)
            head.append(_ENTRY.pack(offset, len(data), check))
            entries[offset] = (pos, len(data), check)
            pos += len(data)
        if pos > self.max_bytes:
            return
        name = f"{pack}-{chunks[0][0]}-{len(chunks)}"
        path = self._path(name)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(b"".join(head))
                f.writelines(data for _, data in chunks)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk only costs us the cache
            logger.warning("cannot write the chunk cache (%s): %s", path.parent, exc.strerror or exc)
            tmp.unlink(missing_ok=True)
            return
        victims: list[str] = []
        with self._lock:
            runs = self._ensure()
            self._add(name, _Run(pack, pos, entries))
            while self._bytes > self.max_bytes and len(runs) > 1:
                victim = next(iter(runs))
                self._remove(victim)
                victims.append(victim)
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)

    def _drop(self, name: str) -> None:
        with self._lock:
            self._remove(name)
        self._path(name).unlink(missing_ok=True)

    def drop_pack(self, pack: str) -> None:
        """Forget every cached chunk of ``pack`` (its pack file is local now: the copies are dead weight)."""
        with self._lock:
            if self._runs is not None:  # an index in memory: keep it true (else nothing to update)
                for name in [n for n, run in self._runs.items() if run.pack == pack]:
                    self._remove(name)
        for path in (self.root / pack[:2]).glob(f"{pack}-*"):
            path.unlink(missing_ok=True)

    def usage(self) -> tuple[int, int]:
        """(bytes, chunks) this process knows to be in the cache."""
        with self._lock:
            self._ensure()
            return self._bytes, len(self._chunks)

    def clear(self) -> None:
        with self._lock:
            shutil.rmtree(self.root, ignore_errors=True)
            self._runs = OrderedDict()
            self._chunks.clear()
            self._bytes = 0


def _scan_dir(directory: str, prefix: str,
              skip: set[str] | frozenset[str] = frozenset()) -> Iterator[tuple[float, str, _Run]]:
    """``(mtime, name, run)`` for each cache file in ``directory`` whose name starts with ``prefix``."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for f in entries:
        if f.name.startswith(".") or not f.name.startswith(prefix) or f.name in skip:
            continue
        try:
            st = f.stat()
            run = _read_run(f.path, f.name, st.st_size)
        except OSError:
            continue
        if run is not None:
            yield st.st_mtime, f.name, run


def _read_run(path: str, name: str, size: int) -> _Run | None:
    """The run a cache file holds, from its name and header; None if it is not one (or is torn)."""
    parts = name.split("-")
    if len(parts) == 2 and parts[1].isdigit():  # legacy: one chunk
        if size < _LEGACY.size:
            return None
        return _Run(parts[0], size, {int(parts[1]): (_LEGACY.size, size - _LEGACY.size, None)})
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    count = int(parts[2])
    with open(path, "rb") as f:
        head = f.read(_HEAD.size + _ENTRY.size * count)
    if len(head) != _HEAD.size + _ENTRY.size * count or _HEAD.unpack_from(head)[0] != _MAGIC:
        return None
    entries: dict[int, tuple[int, int, int | None]] = {}
    pos = len(head)
    for i in range(count):
        offset, n, check = _ENTRY.unpack_from(head, _HEAD.size + i * _ENTRY.size)
        entries[offset] = (pos, n, check)
        pos += n
    return _Run(parts[0], size, entries)
