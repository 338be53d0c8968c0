"""Lazy reads: chunks of packs that are not local, fetched from the remote on first use.

`tessera.reader.ChunkReader` calls `LazyFetcher.fetch(location)` for a chunk whose pack is only on a
remote (``packs.local = 0``, learnt from the remote's pack index by a pull or by the first use of a
dataset). The mount, `Version.open/read_bytes`, `tessera export` and every other reader go through it.

- **Random access: ranged GETs, coalesced.** A miss fetches the chunk *and the chunks after it in the
  same pack*, up to a window (1 MiB), in one ranged GET: chunks of one file sit next to each other in
  a pack, and so do small files committed together, so one request serves many reads.
- **Sequential reads: one stream per reader and pack.** Once a reader looks sequential (a read
  continuing the previous one, a read at a pack's first chunk right after a sequential reader was
  served, or a pack the mount's read-ahead says the reader is about to enter: `will_need`), a
  stream takes over: one GET from there to the end of the pack (at most 64 MiB), read in order by
  its own thread, each chunk verified and handed over as it arrives. Few long requests beat many
  short ones: every request pays the server's latency (and on moto a ranged GET costs time in
  proportion to the whole object). The stream leads its reader by twice the reader's sequential run
  so far (1 to 16 MiB) and waits when that far ahead, so memory stays bounded (the lead, read a
  chunk at a time). It closes at the end of its span, when its reader has not come for a second (it
  stopped, or jumped elsewhere), when its reader needs a chunk it does not have (it starts again
  from there), or when more than 8 streams are wanted. A stream broken mid-way is reopened from
  where it got to; one that goes silent for longer than the transport's timeout fails its waiting
  readers, so a read during an outage fails (EIO) instead of hanging.
- **Verified, once.** Every fetched chunk is decompressed and checked against its xxh3-128 id before it
  is cached or returned, and `fetch` returns those decoded bytes (nobody decodes it again); a chunk that
  fails raises `CorruptData` naming chunk and pack, and is not kept. A pack the remote no longer has is
  `CorruptData` too ("missing from the remote"): the file exists, its bytes cannot be had (EIO).
- **Warming.** A reader whose misses land all over one pack (a shuffled first epoch) gets the whole
  pack streamed into the cache in the background.
- **Bounded disk cache** (`tessera.diskcache`): verified chunks go to files of a few MiB each under
  ``$TESSERA_HOME/cache/chunks``, least recently used evicted past the size setting; processes sharing
  a home (a mount, the CLI) share it. Chunks a stream has just fetched are also handed to their
  reader in memory (at most 64 MiB in all), without a disk round trip.

Remote failures surface as `RemoteError` (after the transport's short retry loop), which the mount
turns into EIO for that read only.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

from tessera.catalog import Catalog
from tessera.diskcache import DiskCache, Key
from tessera.errors import CorruptData, NotFound, RemoteError, TesseraError, TransientRemoteError
from tessera.lru import LRUCache
from tessera.model import ChunkLocation
from tessera.remote.base import ObjectReader, Transport
from tessera.remote.wire import pack_key
from tessera.store import decode_chunk

logger = logging.getLogger(__name__)

MIN_WINDOW = 1 << 20  # a random miss's ranged GET; also the least lead of a stream
MAX_GAP = 64 << 10  # read through holes this small rather than split a request
STREAM_AHEAD = 16 << 20  # the most a stream runs ahead of its reader
STREAM_SPAN = 64 << 20  # the most one stream covers (packs are 48 MiB by default)
STREAM_IDLE = 1.0  # seconds a stream waits for its reader before closing
MAX_STREAMS = 8
MAX_SKIP = 4 << 20  # a stream reads past this many bytes it does not need rather than reopen
WARM_MISSES = 3  # random misses in one pack ...
WARM_FRACTION = 16  # ... that fetched >= 1/16 of it: stream the rest of the pack in the background
READY_BYTES = 64 << 20  # fetched chunks kept in memory until their reader comes (no disk round trip)
_CURSORS_PER_PACK = 4
_CURSOR_PACKS = 64
_PACK_ROWS = 256
_POLL = 0.25  # seconds between a waiting reader's looks at its stream
_DEFAULT_TIMEOUT = 10.0  # for transports that do not say


Fetched = dict[Key, "bytes | CorruptData"]  # decoded, verified chunk bytes (or why not)


class _ChunkFuture(Future):  # type: ignore[type-arg]
    """The result of one chunk a stream is to deliver (``{key: bytes or CorruptData}``; ``{}`` when
    the stream stopped before it: look again)."""

    stream: "_PackStream | None" = None


@dataclass(eq=False)
class _Cursor:
    """Where one sequential reader of a pack has got to: ``[start, end)`` was read in order
    (``credit``: bytes it had read in order before, in the previous pack)."""

    start: int
    end: int
    credit: int = 0
    stream: "_PackStream | None" = None
    quiet_until: int = 0  # nothing to fetch before this offset when last looked (see `_advance`)


class _PackStream:
    """One reader's stream of a pack: a GET from its next needed chunk on, read in order by its own
    thread. The chunks it is to deliver are registered in `_inflight` up to ``ahead`` bytes past its
    reader (a reader reaching one waits for it instead of asking again); chunks that are cached, or
    that another request is fetching, are read past. All state is guarded by the fetcher's lock."""

    def __init__(self, pack: str, rows: list[ChunkLocation], *, follow: bool, origin: int, ahead: int,
                 min_ahead: int, stall: float) -> None:
        self.pack = pack
        self.rows = rows  # the chunks from where it starts to the end of its span, in pack order
        self.follow = follow  # paced by a reader (else: warming the cache as fast as it goes)
        self.origin = origin  # where its reader's sequential run began (the lead grows with the run)
        self.ahead = ahead
        self.min_ahead = min_ahead
        self.stall = stall  # seconds without a byte after which a waiting reader gives up on it
        self.next = 0  # index of the next row to read
        self.planned = 0  # rows[:planned] were looked at (registered or left to others)
        self.futures: dict[int, _ChunkFuture] = {}  # row index -> a chunk this stream delivers
        self.reader_end = rows[0].offset  # how far its reader has read
        now = time.monotonic()
        self.used = now  # when its reader last took a chunk
        self.progress = now  # when bytes last arrived (or it started to wait for them)
        self.closed = False
        self.thread: threading.Thread | None = None
        self.head: _ChunkFuture | None = None  # the future of its first chunk (the reader that opened it waits on it)
        self.to_pack_end = False  # its last chunk is the pack's last

    @property
    def end(self) -> int:
        return self.rows[-1].offset + self.rows[-1].stored_len

    def limit(self) -> int:
        """Chunks starting below this offset may be put in flight now: a reader's stream leads it by
        twice the length of its sequential run so far (between ``min_ahead`` and ``ahead``), so a
        short run wastes little; a warming stream just keeps ``ahead`` in flight."""
        if not self.follow:
            return self.rows[min(self.next, len(self.rows) - 1)].offset + self.ahead
        run = self.reader_end - self.origin
        return self.reader_end + max(self.min_ahead, min(self.ahead, 2 * run))


@dataclass
class FetchStats:
    requests: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    waits: int = 0
    streams: int = 0


class LazyFetcher:
    """Serves stored chunk bytes of remote packs: disk cache, else a stream per sequential reader or
    coalesced ranged GETs, verified."""

    def __init__(self, catalog: Catalog, transport_for: Callable[[str], Transport], cache: DiskCache, *,
                 min_window: int = MIN_WINDOW, ahead: int = STREAM_AHEAD, span: int = STREAM_SPAN,
                 idle: float = STREAM_IDLE, max_streams: int = MAX_STREAMS) -> None:
        self.catalog = catalog
        self.transport_for = transport_for
        self.cache = cache
        self.min_window = min_window
        self.ahead = max(ahead, min_window)
        self.span = max(span, self.ahead)
        self.idle = idle
        self.max_streams = max_streams
        self.stats = FetchStats()
        self._rows: LRUCache[tuple[list[int], list[ChunkLocation]]] = LRUCache(_PACK_ROWS, sizeof=lambda _: 1)
        self._inflight: dict[Key, Future[Fetched]] = {}
        self._ready: OrderedDict[Key, bytes] = OrderedDict()  # decoded chunks handed over in memory
        self._ready_bytes = 0
        self._hot = 0.0  # when a sequential stream last delivered a chunk
        self._random_misses: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._warmed: LRUCache[bool] = LRUCache(1 << 16, sizeof=lambda _: 1)
        self._cursors: OrderedDict[str, list[_Cursor]] = OrderedDict()
        self._streams: list[_PackStream] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # streams waiting for their readers
        self._closed = False

    def close(self) -> None:
        """Stop every stream (their threads end after the block they are reading)."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
            for s in streams:
                self._stop(s)
        deadline = time.monotonic() + 1.0
        for s in streams:
            if s.thread is not None and s.thread is not threading.current_thread():
                s.thread.join(max(0.0, deadline - time.monotonic()))

    # -- the read path ------------------------------------------------------------------------------

    def fetch(self, loc: ChunkLocation) -> bytes:
        """The raw bytes of chunk ``loc``, decoded and verified. Raises `CorruptData` or `RemoteError`."""
        key = (loc.pack, loc.offset)
        while True:
            data, fut = self._take_ready(key)
            if data is None and fut is None:
                stored = self.cache.get(key, loc.stored_len)
                if stored is not None:
                    data = decode_chunk(loc, stored)
                else:  # look again: a stream may have handed it over meanwhile
                    data, fut = self._take_ready(key)
            if data is not None:
                self.stats.hits += 1
                self._advance(loc)
                return data
            if fut is not None:
                self.stats.waits += 1
            else:
                self.stats.misses += 1
                fut = self._stream_from(loc)
            if fut is not None:
                got = self._wait(fut).get(key)
                self._take_ready(key)
            else:
                rows = self._plan(loc.pack, loc.offset, self.min_window, first=loc)
                result = self._fetch_run(loc.pack, rows, wanted=key)
                if result is None:
                    continue  # another thread started fetching it just now: wait for that
                got = result.get(key)
                self._note_miss(loc, rows)
            if isinstance(got, CorruptData):
                raise got
            if got is None:
                continue  # fetched by a request that ended before ours began: look again
            if fut is not None:
                self._advance(loc)
            return got

    def _wait(self, fut: Future[Fetched]) -> Fetched:
        """The result of a request in flight. A stream that goes silent for longer than the
        transport's timeout allows (its own reads should have timed out) is given up: its readers
        get `RemoteError` rather than hang."""
        s = getattr(fut, "stream", None)
        if s is None:
            return fut.result()
        while True:
            try:
                return fut.result(timeout=_POLL)
            except FutureTimeout:
                silent = time.monotonic() - s.progress
                if silent > s.stall:
                    with self._lock:
                        self._stop(s, RemoteError(f"lazy read of pack {s.pack[:12]}: the remote sent nothing "
                                                  f"for {silent:.1f} s"))

    def _take_ready(self, key: Key) -> tuple[bytes | None, Future[Fetched] | None]:
        """The chunk if it was handed over in memory, else the request fetching it, if any (looked up
        together: a stream hands a chunk over before it stops having it in flight)."""
        with self._lock:
            data = self._ready.pop(key, None)
            if data is None:
                return None, self._inflight.get(key)
            self._ready_bytes -= len(data)
        return data, None

    def _keep_ready(self, items: list[tuple[Key, bytes]]) -> None:
        """Hand chunks over in memory to the readers about to ask for them (call with the lock held)."""
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

    # -- ranged GETs (random access) ------------------------------------------------------------------

    def _plan(self, pack: str, offset: int, window: int, first: ChunkLocation | None = None) -> list[ChunkLocation]:
        """Chunks to fetch in one GET: from ``offset`` on, neighbours only, none in flight or cached
        except ``first``; spanning at most ``window`` bytes."""
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
                if key in inflight or key in self._ready or key in self.cache:
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

    def _fetch_run(self, pack: str, rows: list[ChunkLocation], wanted: Key | None = None) -> Fetched | None:
        """GET ``rows`` (neighbours in ``pack``) in one request, verify and cache each chunk. Rows that
        another request is already fetching are left to it (their bytes come along, unused). Returns
        None when every row is already being fetched."""
        fut: Future[Fetched] = Future()
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
            blob = _get_pack_range(self.transport_for(pack), pack, start, end)
            self.stats.requests += 1
            self.stats.bytes += len(blob)
            if len(blob) != end - start:
                raise CorruptData(f"remote pack {pack} is shorter than its index says ({start + len(blob)} < {end})")
            out: Fetched = {}
            view = memoryview(blob)
            good: list[tuple[int, bytes | memoryview]] = []
            ready: list[tuple[Key, bytes]] = []
            for x in mine:
                stored = view[x.offset - start:x.offset - start + x.stored_len]
                value = _verify(x, stored)
                out[(pack, x.offset)] = value
                if not isinstance(value, CorruptData):
                    good.append((x.offset, stored))
                    if (pack, x.offset) != wanted:
                        ready.append(((pack, x.offset), value))
            self.cache.put_run(pack, good)
            with self._lock:
                self._keep_ready(ready)
            fut.set_result(out)
            return out
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            self._release(pack, mine, fut)

    def _release(self, pack: str, rows: list[ChunkLocation], fut: Future[Fetched]) -> None:
        with self._lock:
            for x in rows:
                if self._inflight.get((pack, x.offset)) is fut:
                    del self._inflight[(pack, x.offset)]

    # -- telling sequential readers from random ones --------------------------------------------------

    def _cursor_at(self, pack: str, offset: int) -> _Cursor | None:
        """The cursor a read at ``offset`` continues (lock held)."""
        for c in self._cursors.get(pack, ()):
            reach = c.end + MAX_GAP
            if c.stream is not None and not c.stream.closed:
                reach = max(reach, c.stream.limit())
            if c.start <= offset <= reach:
                return c
        return None

    def _new_cursor(self, pack: str, start: int, end: int) -> _Cursor:
        """Track a new reader of ``pack`` (lock held); the least recently started ones are dropped."""
        cursors = self._cursors.setdefault(pack, [])
        self._cursors.move_to_end(pack)
        c = _Cursor(start, end)
        cursors.append(c)
        if len(cursors) > _CURSORS_PER_PACK:
            self._stop(cursors.pop(0).stream)
        while len(self._cursors) > _CURSOR_PACKS:
            for old in self._cursors.popitem(last=False)[1]:
                self._stop(old.stream)
        return c

    def _stream_from(self, loc: ChunkLocation) -> _ChunkFuture | None:
        """On a miss: the future of ``loc`` from a stream started for it, because the reader is
        sequential: it continues a cursor (it outran its stream, or the stream ended, or this is the
        read after a ranged GET), or it starts at a pack's first chunk right after a sequential
        reader was served elsewhere (a big file continued in the next pack, small files in commit
        order)."""
        with self._lock:
            if self._closed:
                return None
            c = self._cursor_at(loc.pack, loc.offset)
            if c is None:
                first = loc.offset == self._pack_rows(loc.pack)[0][0]
                if not (first and time.monotonic() - self._hot < 1.0):
                    return None
                c = self._new_cursor(loc.pack, loc.offset, loc.offset)
                c.credit = self.ahead
            s = c.stream
            if s is not None and not s.closed:
                if loc.offset < s.reader_end:
                    return None  # a reader behind the stream's (its chunk was evicted): a GET of its own
                logger.debug("pack %s: the reader needs %d, its stream is at %d: restarting", loc.pack[:12],
                             loc.offset, s.rows[min(s.next, len(s.rows) - 1)].offset)
                self._stop(s)  # it does not have this chunk in flight: start again from here
            c.stream = None
        s = self._open_stream(c, loc.pack, loc.offset)
        return s.head if s is not None else None

    def will_need(self, locs: list[ChunkLocation]) -> None:
        """Chunks a sequential reader is about to read, in order (the mount's read-ahead): a stream is
        opened now where the reader is about to enter a pack no stream serves, so the server's
        first-byte latency passes while the reader is still busy with the pack before. It leads by
        just `min_window` until the reader comes (a wrong hint costs little)."""
        seen: set[str] = set()
        for loc in locs:
            if loc.pack in seen:
                continue
            seen.add(loc.pack)
            key = (loc.pack, loc.offset)
            with self._lock:
                if self._closed:
                    return
                if (key in self._inflight or key in self._ready or key in self.cache
                        or any(s.pack == loc.pack for s in self._streams)
                        or self._cursor_at(loc.pack, loc.offset) is not None):
                    continue
                c = self._new_cursor(loc.pack, loc.offset, loc.offset)
            self._try_stream(c, loc.pack, loc.offset)

    def _note_miss(self, loc: ChunkLocation, rows: list[ChunkLocation]) -> None:
        """After a ranged GET for a random miss: track the reader (its next read may continue it) and
        warm the pack if random misses keep landing in it."""
        if not rows:
            return
        end = rows[-1].offset + rows[-1].stored_len
        with self._lock:
            c = self._cursor_at(loc.pack, loc.offset)
            if c is not None:
                c.end = max(c.end, end)
                return
            self._new_cursor(loc.pack, loc.offset, end)
            warm = self._note_random_miss(loc.pack, end - loc.offset)
        if warm:
            self._try_stream(None, loc.pack, self._pack_rows(loc.pack)[0][0])

    def _advance(self, loc: ChunkLocation) -> None:
        """A reader got ``loc`` from the cache or a request: move its cursor, let its stream run on,
        and start a stream for a cursor whose reader has shown it reads in order."""
        end = loc.offset + loc.stored_len
        with self._lock:
            c = self._cursor_at(loc.pack, loc.offset)
            if c is None:
                return
            c.end = max(c.end, end)
            s = c.stream
            if s is not None and not s.closed:
                if end > s.reader_end:
                    s.reader_end = end
                    s.used = time.monotonic()
                    self._register(s)  # now, so the reader's next chunk is in flight when it asks
                    self._wake.notify_all()
                return
            c.stream = None
            if self._closed or c.end + self.ahead // 2 < c.quiet_until:
                return
            if not self._needs_fetch(loc.pack, c.end):
                c.quiet_until = c.end + self.ahead  # all cached: look again half a lead further on
                return
        self._try_stream(c, loc.pack, c.end)

    def _needs_fetch(self, pack: str, offset: int) -> bool:
        """Whether a chunk within ``ahead`` bytes after ``offset`` is neither cached nor in flight
        (lock held): worth a stream."""
        offsets, locs = self._pack_rows(pack)
        i = bisect.bisect_left(offsets, offset)
        while i < len(locs) and locs[i].offset < offset + self.ahead:
            key = (pack, locs[i].offset)
            if key not in self._inflight and key not in self._ready and key not in self.cache:
                return True
            i += 1
        return False

    def _note_random_miss(self, pack: str, nbytes: int) -> bool:
        """Count a non-sequential miss (lock held); True when the pack should now be warmed: a reader
        that keeps missing all over one pack (a shuffled first epoch) is going to read most of it,
        and one stream through the pack serves it far better than one small GET per miss. Sparse
        access (a few files out of many) never gets there."""
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

    # -- streams ---------------------------------------------------------------------------------------

    def _try_stream(self, cursor: _Cursor | None, pack: str, offset: int) -> None:
        """`_open_stream` where a failure must not fail the read at hand (its readers will see it)."""
        try:
            self._open_stream(cursor, pack, offset)
        except TesseraError as exc:
            logger.debug("no stream of pack %s: %s", pack[:12], exc)

    def _open_stream(self, cursor: _Cursor | None, pack: str, offset: int) -> _PackStream | None:
        """Start a stream of ``pack`` from ``offset`` for ``cursor``'s reader, or (no cursor) to warm
        the cache; None when it has nothing to fetch."""
        offsets, locs = self._pack_rows(pack)
        i = bisect.bisect_left(offsets, offset)
        j = bisect.bisect_left(offsets, offset + self.span, lo=i)
        if i >= j:
            return None
        transport = self.transport_for(pack)
        timeout = transport.timeout if transport.timeout is not None else _DEFAULT_TIMEOUT
        origin = cursor.start - cursor.credit if cursor is not None else offset
        s = _PackStream(pack, locs[i:j], follow=cursor is not None, origin=origin, ahead=self.ahead,
                        min_ahead=self.min_window, stall=timeout + 1)
        s.to_pack_end = j == len(locs)
        with self._lock:
            if self._closed or (cursor is not None and cursor.stream is not None and not cursor.stream.closed):
                return None
            self._register(s)
            if not s.futures:
                return None
            s.head = s.futures.get(0)
            while len(self._streams) >= self.max_streams:
                self._stop(min(self._streams, key=lambda x: x.used))
            self._streams.append(s)
            if cursor is not None:
                cursor.stream = s
            self.stats.streams += 1
            logger.debug("stream of pack %s from %d (%s)", pack[:12], offset,
                         "reader" if s.follow else "warming")
            s.thread = threading.Thread(target=self._run_stream, args=(s, transport), daemon=True,
                                        name=f"tessera-stream-{pack[:8]}")
        s.thread.start()
        return s

    def _register(self, s: _PackStream) -> None:
        """Put the stream's chunks up to its limit in flight, leaving those cached or already in
        flight to others (lock held)."""
        limit = s.limit()
        rows = s.rows
        while s.planned < len(rows) and rows[s.planned].offset < limit:
            key = (s.pack, rows[s.planned].offset)
            if key not in self._inflight and key not in self._ready and key not in self.cache:
                fut = _ChunkFuture()
                fut.stream = s
                self._inflight[key] = fut
                s.futures[s.planned] = fut
            s.planned += 1

    def _stop(self, s: _PackStream | None, error: BaseException | None = None) -> None:
        """Close ``s``: the chunks it has in flight are released (their readers look again, or get
        ``error``), and its thread ends after the block it is reading (lock held)."""
        if s is None:
            return
        s.closed = True
        for i, fut in s.futures.items():
            key = (s.pack, s.rows[i].offset)
            if self._inflight.get(key) is fut:
                del self._inflight[key]
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result({})
        s.futures.clear()
        if s in self._streams:
            self._streams.remove(s)
        self._wake.notify_all()

    def _next_row(self, s: _PackStream) -> tuple[int, ChunkLocation] | None:
        """The next chunk the stream delivers, waiting while it is as far ahead of its reader as
        allowed; None when the stream is done, stopped, or its reader has not come for ``idle``
        seconds."""
        with self._lock:
            while True:
                if s.closed:
                    return None
                self._register(s)
                while s.next < s.planned and s.next not in s.futures:
                    s.next += 1  # cached or fetched by another request: read past it
                if s.next < s.planned:
                    return s.next, s.rows[s.next]
                if s.planned >= len(s.rows):
                    return None
                if not s.follow:
                    continue  # its limit moves with it
                if time.monotonic() - s.used > self.idle:
                    return None
                self._wake.wait(self.idle / 4)
                s.progress = time.monotonic()

    def _run_stream(self, s: _PackStream, transport: Transport) -> None:
        """The stream's thread: one GET, reopened past long runs it does not need and once after a
        break mid-way (if it had got somewhere since it was opened)."""
        key = pack_key(s.pack)
        reader: ObjectReader | None = None
        pos = opened_at = 0
        error: BaseException | None = None
        unwritten: list[tuple[int, bytes, _ChunkFuture]] = []  # handed over, not on disk yet
        try:
            while (nxt := self._next_row(s)) is not None:
                i, x = nxt
                if reader is not None and not pos <= x.offset <= pos + MAX_SKIP:
                    reader.close()
                    reader = None
                if reader is None:
                    # a whole-object GET where it costs (almost) nothing more: some servers (moto)
                    # answer it sooner than a range, and it reads past the first blob header only
                    pos = opened_at = 0 if x.offset <= MAX_GAP else x.offset
                    try:
                        reader = transport.open_read(key, pos, None if s.to_pack_end else s.end)
                    except NotFound:
                        raise CorruptData(f"{transport.url}: pack {s.pack} is missing from the remote "
                                          "(pruned or never pushed)") from None
                    self.stats.requests += 1
                try:
                    data = _read_exactly(reader, x.offset - pos, x.stored_len)
                except TransientRemoteError as exc:
                    reader.close()
                    reader = None
                    if pos == opened_at:
                        raise RemoteError(f"lazy read of pack {s.pack[:12]}: {exc}") from exc
                    logger.info("stream of pack %s broke at %d (%s): reopening", s.pack[:12], pos, exc)
                    continue
                pos = x.offset + len(data)
                s.progress = time.monotonic()
                self.stats.bytes += len(data)
                if len(data) != x.stored_len:
                    raise CorruptData(f"remote pack {s.pack} is shorter than its index says "
                                      f"({pos} < {x.offset + x.stored_len})")
                fut = self._deliver(s, i, x, _verify(x, data))
                if fut is not None:
                    unwritten.append((x.offset, data, fut))  # stored bytes go to the disk cache
                    if sum(len(d) for _, d, _ in unwritten) >= self.cache.run_bytes:
                        self._write(s.pack, unwritten)
                        unwritten = []
        except BaseException as exc:  # noqa: BLE001 - handed to the readers waiting for these chunks
            error = exc
            logger.debug("stream of pack %s failed: %s", s.pack[:12], exc)
        finally:
            if reader is not None:
                reader.close()
            self._write(s.pack, unwritten)
            with self._lock:
                self._stop(s, error)

    def _deliver(self, s: _PackStream, i: int, x: ChunkLocation, value: bytes | CorruptData) -> _ChunkFuture | None:
        """Hand a chunk the stream read to whoever waits for it, and to its reader in memory. A good
        chunk stays in flight (its future done) until `_write` has put it on disk: the future is
        returned for that."""
        key = (s.pack, x.offset)
        with self._lock:
            s.next = i + 1
            fut = s.futures.pop(i, None)
            if fut is None:
                return None  # stopped meanwhile: its readers look again
            fut.set_result({key: value})
            if isinstance(value, CorruptData):
                if self._inflight.get(key) is fut:
                    del self._inflight[key]
                return None
            if s.follow:
                self._keep_ready([(key, value)])
                self._hot = time.monotonic()
            return fut

    def _write(self, pack: str, chunks: list[tuple[int, bytes, _ChunkFuture]]) -> None:
        """Put delivered chunks in the disk cache as one run, then stop having them in flight."""
        self.cache.put_run(pack, [(offset, data) for offset, data, _ in chunks])
        with self._lock:
            for offset, _, fut in chunks:
                if self._inflight.get((pack, offset)) is fut:
                    del self._inflight[(pack, offset)]


def _verify(x: ChunkLocation, stored: bytes | memoryview) -> bytes | CorruptData:
    """The chunk decoded from ``stored`` and checked against its id, else the error (for whoever reads
    this chunk): the one decode of a fetched chunk."""
    try:
        return decode_chunk(x, stored)
    except CorruptData as exc:
        logger.debug("remote %s", exc)
        return exc


def _get_pack_range(t: Transport, pack: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a remote pack; a pack the remote does not have is `CorruptData`."""
    try:
        return t.get(pack_key(pack), start, end)
    except NotFound:
        raise CorruptData(f"{t.url}: pack {pack} is missing from the remote (pruned or never pushed)") from None


def _read_exactly(reader: ObjectReader, skip: int, n: int) -> bytes:
    """Read past ``skip`` bytes (blob headers, chunks not needed), then return the next ``n`` (fewer
    only at the end of the stream)."""
    while skip > 0:
        piece = reader.read(min(skip, 1 << 20))
        if not piece:
            return b""
        skip -= len(piece)
    return reader.read(n)
