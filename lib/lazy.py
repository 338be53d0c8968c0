"""Lazy reads: chunks of packs that are not local, fetched from the remote on first use.

`Store.read_stored` calls `LazyFetcher.fetch(location)` for a chunk whose pack is only on a remote
(``packs.local = 0``, learnt from the remote's pack index by a pull or by the first use of a dataset).
The mount, `Version.open/read_bytes` and `tessera export` all read through it.

- **Ranged GETs, coalesced.** A miss fetches the chunk *and the chunks after it in the same pack*, up to
  a window (1 MiB), in one ranged GET: chunks of one file sit next to each other in a pack, and so do
  small files committed together, so one request serves many reads.
- **Prefetch on sequential reads.** Each pack being read has a stream. Once reads look sequential (a
  second read continuing the first, or a read starting at a pack's first chunk), up to two windows are
  kept in flight ahead of the reader, each four times the last, up to 32 MiB: per-request costs
  dominate small GETs. A reader that reaches a chunk still in flight waits for that request instead
  of issuing its own. Memory: at most 4 requests of at most 32 MiB in flight.
- **Verified.** Every fetched chunk is decompressed and checked against its xxh3-128 id before it is
  cached or returned; a chunk that fails raises `CorruptData` naming chunk and pack, and is not kept.
- **Bounded disk cache.** Verified stored bytes go to ``$TESSERA_HOME/cache/chunks/<pp>/<pack>-<offset>``
  (an xxh3-64 checksum first, so a torn file is a miss, not an error), least recently used evicted past
  the size setting: ``$TESSERA_CACHE_SIZE``, else the catalog setting ``cache.max_bytes`` (`tessera remote
  cache --size`), else 4 GiB. Processes sharing a home (a mount, the CLI) share the cache; each evicts what
  it knows of, so the bound holds per process and approximately across them.

Remote failures surface as `RemoteError` (after the transport's short retry loop), which the mount
turns into EIO for that read only.
"""
from __future__ import annotations

import bisect
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import xxhash

from tessera.cache import LRUCache
from tessera.catalog import Catalog, ChunkLocation
from tessera.errors import CorruptData, UsageError
from tessera.remote.base import Transport
from tessera.store import decode_chunk

if TYPE_CHECKING:
    from tessera.repo import Repo

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30
CACHE_SETTING = "cache.max_bytes"
CACHE_ENV = "TESSERA_CACHE_SIZE"
MIN_WINDOW = 1 << 20
MAX_WINDOW = 32 << 20
MAX_GAP = 64 << 10  # read through holes this small rather than split a request
PREFETCH_WORKERS = 4
PREFETCH_DEPTH = 2  # windows in flight ahead of one sequential reader
GROWTH = 4  # each prefetch window is this many times the last (per-request costs dominate small GETs)
WARM_MISSES = 3  # random misses in one pack ...
WARM_FRACTION = 16  # ... that fetched >= 1/16 of it: fetch the rest of the pack in the background
READY_BYTES = 64 << 20  # fetched chunks kept in memory until their reader comes (no disk round trip)
_STREAMS = 64
_PACK_ROWS = 256
_HEADER = struct.Struct("<Q")

Key = tuple[str, int]  # (pack id, offset of the stored bytes)


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix") from None
    if value < 0:
        raise UsageError(f"bad size {text!r}: must not be negative")
    return value


def cache_size(catalog: Catalog) -> int:
    env = os.environ.get(CACHE_ENV)
    if env:
        return parse_size(env)
    value = catalog.setting(CACHE_SETTING)
    return int(value) if value else DEFAULT_CACHE_BYTES


def cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "chunks"


class DiskCache:
    """Stored chunk bytes on disk, one file per chunk, bounded by total bytes (LRU)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._index: OrderedDict[Key, int] | None = None
        self._bytes = 0
        self._lock = threading.Lock()

    def _path(self, key: Key) -> Path:
        return self.root / key[0][:2] / f"{key[0]}-{key[1]}"

    def _ensure(self) -> OrderedDict[Key, int]:
        """The index of what is on disk (scanned once, oldest first). Call with the lock held."""
        if self._index is not None:
            return self._index
        found: list[tuple[float, Key, int]] = []
        if self.root.is_dir():
            for sub in os.scandir(self.root):
                if not sub.is_dir():
                    continue
                for f in os.scandir(sub.path):
                    pack, _, off = f.name.partition("-")
                    if f.name.startswith(".") or not off.isdigit():
                        continue
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime, (pack, int(off)), st.st_size))
        found.sort()
        self._index = OrderedDict((key, size) for _, key, size in found)
        self._bytes = sum(self._index.values())
        return self._index

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._ensure()

    def get(self, key: Key, length: int) -> bytes | None:
        if self.max_bytes <= 0:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            with self._lock:
                index = self._ensure()
                size = index.pop(key, None)
                if size is not None:
                    self._bytes -= size
            return None
        if len(head) != _HEADER.size or len(data) != length or _HEADER.unpack(head)[0] != xxhash.xxh3_64_intdigest(data):
            logger.info("dropping damaged cache file %s", path)
            self._drop(key)
            return None
        with self._lock:
            index = self._ensure()
            if key in index:
                index.move_to_end(key)
            else:  # cached by another process
                index[key] = len(data) + _HEADER.size
                self._bytes += len(data) + _HEADER.size
        return data

    def put(self, key: Key, data: bytes) -> None:
        size = len(data) + _HEADER.size
        if size > self.max_bytes:
            return
        path = self._path(key)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(xxhash.xxh3_64_intdigest(data)))
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk only costs us the cache
            logger.warning("cannot write the chunk cache (%s): %s", path.parent, exc.strerror or exc)
            tmp.unlink(missing_ok=True)
            return
        victims: list[Key] = []
        with self._lock:
            index = self._ensure()
            old = index.pop(key, None)
            self._bytes += size - (old or 0)
            index[key] = size
            while self._bytes > self.max_bytes and index:
                victim, n = index.popitem(last=False)
                self._bytes -= n
                victims.append(victim)
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)

    def _drop(self, key: Key) -> None:
        with self._lock:
            size = self._ensure().pop(key, None)
            if size is not None:
                self._bytes -= size
        self._path(key).unlink(missing_ok=True)

    def usage(self) -> tuple[int, int]:
        """(bytes, files) this process knows to be in the cache."""
        with self._lock:
            index = self._ensure()
            return self._bytes, len(index)

    def clear(self) -> None:
        with self._lock:
            shutil.rmtree(self.root, ignore_errors=True)
            self._index = OrderedDict()
            self._bytes = 0


@dataclass
class _Stream:
    """Sequential reading of one pack: ``[start, end)`` has been fetched or is being fetched."""

    start: int
    end: int
    window: int
    inflight: int = 0


@dataclass
class FetchStats:
    requests: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    waits: int = 0
    prefetches: int = 0


class LazyFetcher:
    """Serves stored chunk bytes of remote packs: disk cache, else coalesced ranged GETs, verified."""

    def __init__(self, catalog: Catalog, transport_for: Callable[[str], Transport], cache: DiskCache, *,
                 min_window: int = MIN_WINDOW, max_window: int = MAX_WINDOW,
                 workers: int = PREFETCH_WORKERS) -> None:
        self.catalog = catalog
        self.transport_for = transport_for
        self.cache = cache
        self.min_window = min_window
        self.max_window = max(max_window, min_window)
        self.workers = workers
        self.stats = FetchStats()
        self._rows: LRUCache[tuple[list[int], list[ChunkLocation]]] = LRUCache(_PACK_ROWS, sizeof=lambda _: 1)
        self._inflight: dict[Key, Future[dict[Key, memoryview | CorruptData]]] = {}
        self._ready: OrderedDict[Key, memoryview] = OrderedDict()
        self._ready_bytes = 0
        self._hot = (0.0, 0)  # (when, window) of the latest sequential prefetch
        self._random_misses: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._warmed: LRUCache[bool] = LRUCache(1 << 16, sizeof=lambda _: 1)
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def for_repo(cls, repo: "Repo") -> "LazyFetcher":
        from tessera import sync

        cache = DiskCache(cache_dir(repo.home), cache_size(repo.catalog))
        return cls(repo.catalog, lambda pack: sync.transport_for_pack(repo, pack), cache)

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the read path ------------------------------------------------------------------------------

    def fetch(self, loc: ChunkLocation) -> bytes:
        """The stored bytes of ``loc`` (verified). Raises `CorruptData` or `RemoteError`."""
        key = (loc.pack, loc.offset)
        while True:
            data = self._take_ready(key)
            if data is None:
                data = self.cache.get(key, loc.stored_len)
            if data is not None:
                self.stats.hits += 1
                self._advance(loc)
                return data
            with self._lock:
                fut = self._inflight.get(key)
            if fut is not None:
                self.stats.waits += 1
                got = fut.result().get(key)
                self._take_ready(key)
            else:
                self.stats.misses += 1
                rows = self._plan(loc.pack, loc.offset, self.min_window, first=loc)
                result = self._fetch_run(loc.pack, rows, wanted=key)
                if result is None:
                    continue  # another thread started fetching it just now: wait for that
                got = result.get(key)
                self._start_stream(loc, rows)
            if isinstance(got, CorruptData):
                raise got
            if got is None:
                continue  # fetched by a request that ended before ours began: look again
            if fut is not None:
                self._advance(loc)
            return bytes(got)

    def _take_ready(self, key: Key) -> bytes | None:
        with self._lock:
            view = self._ready.pop(key, None)
            if view is None:
                return None
            self._ready_bytes -= len(view)
        return bytes(view)

    def _keep_ready(self, items: list[tuple[Key, memoryview]]) -> None:
        with self._lock:
            for key, view in items:
                old = self._ready.pop(key, None)
                self._ready_bytes += len(view) - (len(old) if old is not None else 0)
                self._ready[key] = view
            while self._ready_bytes > READY_BYTES:
                _, view = self._ready.popitem(last=False)
                self._ready_bytes -= len(view)

    def _pack_rows(self, pack: str) -> tuple[list[int], list[ChunkLocation]]:
        rows = self._rows.get(pack)
        if rows is None:
            locs = self.catalog.pack_chunks(pack)
            rows = ([x.offset for x in locs], locs)
            self._rows.put(pack, rows)
        return rows

    def _plan(self, pack: str, offset: int, window: int, first: ChunkLocation | None = None,
              through_cached: bool = False) -> list[ChunkLocation]:
        """Chunks to fetch in one GET: from ``offset`` on, neighbours only, none in flight and (unless
        ``through_cached``) none cached, except ``first``; spanning at most ``window`` bytes."""
        offsets, locs = self._pack_rows(pack)
        i = bisect.bisect_left(offsets, offset)
        out: list[ChunkLocation] = [first] if first is not None else []
        if first is not None and i < len(locs) and locs[i].offset == first.offset:
            i += 1
        start = out[0].offset if out else None
        with self._lock:
            inflight = self._inflight
            while i < len(locs):
                x = locs[i]
                key = (pack, x.offset)
                if key in inflight or (key in self.cache and not (through_cached and out)):
                    if out:
                        break
                    i += 1
                    continue
                if out:
                    prev = out[-1]
                    if x.offset - (prev.offset + prev.stored_len) > MAX_GAP:
                        break
                    if x.offset + x.stored_len - start > window:  # type: ignore[operator]
                        break
                else:
                    start = x.offset
                out.append(x)
                i += 1
        return out

    def _fetch_run(self, pack: str, rows: list[ChunkLocation],
                   wanted: Key | None = None) -> dict[Key, memoryview | CorruptData] | None:
        """GET ``rows`` (neighbours in ``pack``) in one request, verify and cache each chunk. Rows that
        another request is already fetching are left to it (their bytes come along, unused). Returns
        None when every row is already being fetched."""
        fut: Future[dict[Key, memoryview | CorruptData]] = Future()
        mine: list[ChunkLocation] = []
        with self._lock:
            for x in rows:
                key = (pack, x.offset)
                if key not in self._inflight:
                    self._inflight[key] = fut
                    mine.append(x)
        if not mine:
            return None
        if wanted is not None and mine[0].offset != wanted[1]:  # someone else is fetching it: wait for them
            fut.set_result({})
            self._release(pack, mine, fut)
            return None
        try:
            start, end = mine[0].offset, mine[-1].offset + mine[-1].stored_len
            blob = self.transport_for(pack).get(f"packs/{pack}", start, end)
            self.stats.requests += 1
            self.stats.bytes += len(blob)
            if len(blob) != end - start:
                raise CorruptData(f"remote pack {pack} is shorter than its index says ({start + len(blob)} < {end})")
            out: dict[Key, memoryview | CorruptData] = {}
            view = memoryview(blob)
            ready = []
            for x in mine:
                stored = view[x.offset - start:x.offset - start + x.stored_len]
                try:
                    decode_chunk(x, stored)
                except CorruptData as exc:
                    logger.debug("remote %s", exc)  # raised to whoever reads this chunk
                    out[(pack, x.offset)] = exc
                    continue
                self.cache.put((pack, x.offset), stored)
                out[(pack, x.offset)] = stored
                if (pack, x.offset) != wanted:
                    ready.append(((pack, x.offset), stored))
            self._keep_ready(ready)
            fut.set_result(out)
            return out
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            self._release(pack, mine, fut)

    def _release(self, pack: str, rows: list[ChunkLocation], fut: Future[dict[Key, memoryview | CorruptData]]) -> None:
        with self._lock:
            for x in rows:
                if self._inflight.get((pack, x.offset)) is fut:
                    del self._inflight[(pack, x.offset)]

    # -- prefetch -----------------------------------------------------------------------------------

    def _start_stream(self, loc: ChunkLocation, rows: list[ChunkLocation]) -> None:
        """After a miss: continue the pack's stream if the miss is just past it (a sequential reader
        outran the prefetch, or chunks are bigger than the window), else start a new one."""
        if not rows or self.cache.max_bytes <= 0:
            return
        end = rows[-1].offset + rows[-1].stored_len
        with self._lock:
            s = self._streams.get(loc.pack)
            sequential = s is not None and s.start <= loc.offset <= s.end + MAX_GAP
            if s is not None and sequential:
                # a miss inside the stream means a prefetch failed or was outrun: resume from here
                s.end = end
            else:
                # a reader starting at a pack's first chunk is most likely going through it in order
                # (a big file continued from the previous pack, small files in commit order): it
                # keeps the window a sequential reader reached in the last second
                sequential = loc.offset == self._pack_rows(loc.pack)[0][0]
                hot = self._hot[1] if sequential and time.monotonic() - self._hot[0] < 1.0 else 0
                self._streams[loc.pack] = _Stream(loc.offset, end, max(self.min_window, hot // GROWTH))
            self._streams.move_to_end(loc.pack)
            while len(self._streams) > _STREAMS:
                self._streams.popitem(last=False)
            warm = not sequential and self._note_random_miss(loc.pack, end - loc.offset)
        if sequential:
            self._advance(loc)
        elif warm:
            self._submit(self._warm, loc.pack)

    def _note_random_miss(self, pack: str, nbytes: int) -> bool:
        """Count a non-sequential miss (lock held); True when the pack should now be warmed: a reader
        that keeps missing all over one pack (a shuffled first epoch) is going to read most of it,
        and whole-window GETs serve it far better than one small GET per miss. Sparse access (a few
        files out of many) never gets there."""
        if pack in self._warmed:
            return False
        n, got = self._random_misses.pop(pack, (0, 0))
        n, got = n + 1, got + nbytes
        offsets, locs = self._pack_rows(pack)
        size = locs[-1].offset + locs[-1].stored_len if locs else 0
        if n >= WARM_MISSES and got * WARM_FRACTION >= size and self.cache.max_bytes >= 4 * size:
            self._warmed.put(pack, True)
            return True
        self._random_misses[pack] = (n, got)
        while len(self._random_misses) > 4096:
            self._random_misses.popitem(last=False)
        return False

    def _warm(self, pack: str) -> None:
        """Fetch a whole pack into the cache, window by window (in a prefetch worker)."""
        pos = 0
        while not self._closed:
            rows = self._plan(pack, pos, self.max_window, through_cached=True)
            if not rows:
                return
            pos = rows[-1].offset + rows[-1].stored_len
            self.stats.prefetches += 1
            try:
                self._fetch_run(pack, rows)
            except Exception as exc:  # noqa: BLE001 - readers fetch (and fail) themselves
                logger.debug("warming pack %s failed: %s", pack[:12], exc)
                return

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._lock:
            if self._closed:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tessera-prefetch")
            pool = self._pool
        try:
            pool.submit(fn, *args)
        except RuntimeError:  # shut down meanwhile
            pass

    def _advance(self, loc: ChunkLocation) -> None:
        """A reader got ``loc`` in its pack's stream: keep up to `PREFETCH_DEPTH` windows in flight
        ahead of it, each twice the last (up to ``max_window``)."""
        pos = loc.offset + loc.stored_len
        while True:
            with self._lock:
                s = self._streams.get(loc.pack)
                if (s is None or self._closed or s.inflight >= PREFETCH_DEPTH or not s.start <= loc.offset < s.end
                        or s.end - pos > PREFETCH_DEPTH * s.window // 2):
                    return
                s.window = min(s.window * GROWTH, self.max_window)
                self._hot = (time.monotonic(), s.window)
                s.inflight += 1
                start = s.end
                self._streams.move_to_end(loc.pack)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tessera-prefetch")
            rows = self._plan(loc.pack, start, s.window)
            with self._lock:
                if not rows:
                    s.inflight -= 1
                    return
                s.end = max(s.end, rows[-1].offset + rows[-1].stored_len)
            self.stats.prefetches += 1
            try:
                self._pool.submit(self._prefetch, loc.pack, rows, s)
            except RuntimeError:  # shut down
                with self._lock:
                    s.inflight -= 1
                return

    def _prefetch(self, pack: str, rows: list[ChunkLocation], s: _Stream) -> None:
        try:
            self._fetch_run(pack, rows)
        except Exception as exc:  # noqa: BLE001 - a reader that needs these chunks fetches (and fails) itself
            logger.debug("prefetch of pack %s failed: %s", pack[:12], exc)
        finally:
            with self._lock:
                s.inflight -= 1
