"""Lazy reads (`tessera.lazy`) on the in-memory remote: coalescing, streams for sequential readers,
verification, the LRU disk cache, outages. No S3 server, no mount: the store's remote hook and
`VersionFS` are driven directly. A counting wrapper (a real `Transport` around the memory backend)
counts the requests."""
from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path

import pytest

from tessera.errors import CorruptData, RemoteError, TransientRemoteError
from tessera.remote.base import ObjectReader, Transport
from trees import write_random
from conftest import wait_until  # noqa: E402


class Counting(Transport):
    """Forwards to a real transport, counting ranged GETs (``gets``: bytes each) and streams
    (``opened``; ``streams``: bytes read from each, once closed; ``fetched``: all bytes so far).
    ``down`` makes every call fail like an outage; ``stall`` makes streams go silent after their
    first read (until closed); ``break_after`` makes streams fail after that many bytes, like a
    connection reset."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.url = inner.url
        self.timeout = 0.5
        self.gets: list[int] = []
        self.keys: list[str] = []  # the key of every GET and stream, in order
        self.streams: list[int] = []
        self.opened = 0
        self.stream_bytes = 0
        self.down = False
        self.stall = False
        self.break_after: int | None = None
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise RemoteError(f"{self.url}: get failed after 3 attempts: connection refused")

    def get(self, key, start=None, end=None):
        self._check()
        data = self.inner.get(key, start, end)
        with self._lock:
            self.gets.append(len(data))
            self.keys.append(key)
        return data

    def open_read(self, key, start=0, end=None):
        self._check()
        reader = _CountingReader(self, self.inner.open_read(key, start, end))
        with self._lock:
            self.opened += 1
            self.keys.append(key)
        return reader

    @property
    def requests(self) -> int:
        return len(self.gets) + self.opened

    @property
    def fetched(self) -> int:
        return sum(self.gets) + self.stream_bytes

    def put(self, key, data, *, if_none_match=False):
        self.inner.put(key, data, if_none_match=if_none_match)

    def put_file(self, key, path, *, progress=None):
        self.inner.put_file(key, path, progress=progress)

    def get_file(self, key, path, *, progress=None):
        self.inner.get_file(key, path, progress=progress)

    def head(self, key):
        return self.inner.head(key)

    def list(self, prefix="", *, start_after=None):
        return self.inner.list(prefix, start_after=start_after)

    def delete(self, key):
        self.inner.delete(key)


class _CountingReader(ObjectReader):
    def __init__(self, owner: Counting, inner: ObjectReader) -> None:
        self.owner, self.inner, self.got, self.closed = owner, inner, 0, threading.Event()

    def read(self, n=-1):
        if self.owner.stall and self.got:
            self.closed.wait(30)  # a connection that went silent: nothing until the reader gives up
            raise TransientRemoteError("read timed out")
        if self.owner.break_after is not None and self.got >= self.owner.break_after:
            raise TransientRemoteError("connection reset by peer")
        data = self.inner.read(n)
        self.got += len(data)
        with self.owner._lock:
            self.owner.stream_bytes += len(data)
        return data

    def close(self):
        if not self.closed.is_set():
            self.closed.set()
            self.inner.close()
            with self.owner._lock:
                self.owner.streams.append(self.got)


@pytest.fixture(scope="module")
def remote_version(tmp_path_factory: pytest.TempPathFactory):
    """A version pushed to a fresh memory:// remote: 120 small files and one 6 MiB file in 4 MiB packs."""
    from tessera.config import RepoSettings
    from tessera.repo import Repo

    base = tmp_path_factory.mktemp("lazy")
    src = base / "src"
    rng = random.Random(7)
    for i in range(120):
        p = src / "small" / f"f{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(2000, 20000)))
    write_random(src / "big.bin", 6 * 1024 * 1024 + 777, 3)
    (src / "text.csv").write_text("id,name,value\n" + "".join(f"{i},n{i % 17},{i * 3}\n" for i in range(100000)))
    url = f"memory://lazy-{uuid.uuid4().hex[:8]}/repo"
    with Repo(base / "a", settings=RepoSettings(pack_target=4 << 20)) as repo:
        v = repo.commit("ds", src)
        repo.push(v.ref, url)
    return url, v.ref, src


@pytest.fixture
def lazy_repo(tmp_path: Path, remote_version):
    """A fresh home that knows the version's metadata only, with a counting transport."""
    from tessera.diskcache import DiskCache
    from tessera.lazy import LazyFetcher
    from tessera.remote import open_transport
    from tessera.repo import Repo

    url, ref, src = remote_version
    repo = Repo(tmp_path / "b", remote=url, chunk_cache_bytes=0)  # every read reaches the fetcher
    repo.pull(ref, metadata_only=True)
    counting = Counting(open_transport(url, retries=0))

    def install(cache_bytes: int = 1 << 30, **kw) -> "LazyFetcher":
        fetcher = LazyFetcher(repo.catalog, lambda pack: counting,
                              DiskCache(tmp_path / "b" / "cache" / "chunks", cache_bytes), **kw)
        repo.chunks.use_remote(fetcher)
        return fetcher

    yield repo, ref, src, counting, install
    repo.close()


def test_metadata_only_pull_leaves_every_pack_remote(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    packs = repo.catalog.packs()
    assert len(packs) >= 2 and not any(p.local for p in packs)
    assert repo.fsck().ok


def test_small_files_are_coalesced_into_few_requests(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install()
    v = repo.get(ref)
    names = sorted(p.name for p in (src / "small").iterdir())
    total = 0
    for name in names:
        data = v.read_bytes(f"small/{name}")
        assert data == (src / "small" / name).read_bytes()
        total += len(data)
    # one request per window of neighbours or per stream, not one per file
    assert counting.requests * 8 <= len(names), (counting.gets, counting.streams)
    assert f.stats.hits + f.stats.waits >= len(names) - counting.requests


def _read_in_order(repo, ref, path: str, block: int = 128 << 10, limit: int | None = None) -> bytes:
    got = bytearray()
    with repo.get(ref).open(path) as fh:
        while (limit is None or len(got) < limit) and (piece := fh.read(block)):
            got += piece
    return bytes(got)


def _packs_of(repo, ref, path: str) -> list[str]:
    packs: list[str] = []
    for cid, _ in repo.get(ref).file_record(path).chunks:
        pack = repo.catalog.chunk(cid).pack
        if pack not in packs:
            packs.append(pack)
    return packs




def test_sequential_read_streams_each_pack(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10, ahead=4 << 20)
    assert _read_in_order(repo, ref, "big.bin") == (src / "big.bin").read_bytes()
    packs = _packs_of(repo, ref, "big.bin")
    assert len(packs) >= 2
    # a ranged GET for the first read, then one stream per pack (no window after window)
    assert len(counting.gets) <= 1 and counting.opened <= len(packs), (counting.gets, counting.opened)
    assert f.stats.streams == counting.opened and f.stats.misses <= len(packs) + 1
    assert wait_until(lambda: not f._streams)  # each ended at the end of its pack, or idle
    assert max(counting.streams) > 1 << 20
    assert counting.fetched < 1.5 * (src / "big.bin").stat().st_size


def test_a_stream_leads_its_reader_by_a_bounded_amount_and_closes_when_idle(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10, ahead=512 << 10, idle=0.3)
    want = (src / "big.bin").read_bytes()
    assert _read_in_order(repo, ref, "big.bin", block=64 << 10, limit=2 << 20) == want[:2 << 20]
    # the reader's stream, and at most one its read-ahead opened early for the file's next pack
    assert f._streams and counting.opened <= len(_packs_of(repo, ref, "big.bin")[:2])
    assert wait_until(lambda: not f._streams, 3)  # the reader stopped: the streams closed
    # what the reader read, the lead, and the chunk that crossed it; a hinted stream leads by min_window
    hinted = (counting.opened - 1) * ((256 << 10) + (2 << 20))
    assert counting.streams and counting.stream_bytes <= (2 << 20) + (512 << 10) + (2 << 20) + hinted


def test_random_reads_use_ranged_gets_not_streams(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(cache_bytes=8 << 20, min_window=64 << 10)  # too small a cache to warm 4 MiB packs
    want = (src / "big.bin").read_bytes()
    chunks = repo.get(ref).file_record("big.bin").chunks
    starts = [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
    rng = random.Random(3)
    order = list(range(1, len(chunks), 3))
    rng.shuffle(order)
    with repo.get(ref).open("big.bin") as fh:
        for i in order:
            fh.seek(starts[i] + 10)
            assert fh.read(100) == want[starts[i] + 10:starts[i] + 110]
    assert counting.opened == 0 and len(counting.gets) == len(order) >= 4
    assert f.stats.streams == 0


def test_random_misses_all_over_a_pack_warm_it_with_one_stream(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=64 << 10)
    want = (src / "big.bin").read_bytes()
    chunks = repo.get(ref).file_record("big.bin").chunks
    starts = [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
    pack = repo.catalog.chunk(chunks[0][0]).pack
    mine = [i for i, (cid, _) in enumerate(chunks) if repo.catalog.chunk(cid).pack == pack]
    with repo.get(ref).open("big.bin") as fh:
        for i in [mine[-1], mine[1], mine[len(mine) // 2]]:
            fh.seek(starts[i])
            assert fh.read(100) == want[starts[i]:starts[i] + 100]
    assert f.stats.streams == 1 and wait_until(lambda: not f._streams)
    assert all((pack, x.offset) in f.cache for x in repo.catalog.pack_chunks(pack))
    requests = counting.requests
    got = _read_in_order(repo, ref, "big.bin", limit=starts[mine[-1]])
    assert got == want[:len(got)]
    assert f"packs/{pack}" not in counting.keys[requests:]  # the warm pack served it all (read-ahead may
    assert counting.requests <= requests + 1  # have opened the next pack's stream early)


def test_a_reader_that_jumps_gets_a_ranged_get_and_its_old_stream_closes(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10, ahead=512 << 10, idle=0.3)
    want = (src / "big.bin").read_bytes()
    with repo.get(ref).open("big.bin") as fh:
        assert fh.read(2 << 20) == want[:2 << 20]
        assert f._streams
        gets = len(counting.gets)
        fh.seek(len(want) - 5000)
        assert fh.read() == want[-5000:]
        assert len(counting.gets) == gets + 1
    assert wait_until(lambda: not f._streams, 3)


def test_a_stream_broken_mid_way_is_reopened_where_it_got_to(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10)
    counting.break_after = 1 << 20  # every stream breaks after 1 MiB
    assert _read_in_order(repo, ref, "big.bin") == (src / "big.bin").read_bytes()
    assert counting.opened >= 4 and f.stats.streams < counting.opened
    assert counting.fetched < 1.5 * (src / "big.bin").stat().st_size  # reopened, not restarted


def test_outage_during_a_stream_fails_the_read_quickly_then_recovers(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    install(min_window=256 << 10)
    want = (src / "big.bin").read_bytes()
    with repo.get(ref).open("big.bin") as fh:
        assert fh.read(1 << 20) == want[:1 << 20]
        counting.down = True
        counting.break_after = 0  # every open stream breaks on its next read; reopening is refused
        started = time.monotonic()
        with pytest.raises(RemoteError):
            fh.read()
        assert time.monotonic() - started < 2
        counting.down, counting.break_after = False, None
        fh.seek(1 << 20)
        assert fh.read() == want[1 << 20:]


def test_a_silent_stream_fails_its_reader_within_the_transport_timeout(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    install(min_window=256 << 10)
    counting.timeout = 0.3
    want = (src / "big.bin").read_bytes()
    with repo.get(ref).open("big.bin") as fh:
        assert fh.read(256 << 10) == want[:256 << 10]
        counting.stall = True  # the stream goes silent (its reads would never time out)
        started = time.monotonic()
        with pytest.raises(RemoteError, match="sent nothing"):
            fh.read()
        assert time.monotonic() - started < 2
        counting.stall = False
        fh.seek(256 << 10)
        assert fh.read() == want[256 << 10:]


def test_random_reads_through_the_vfs(lazy_repo) -> None:
    from tessera.vfs import VersionFS

    repo, ref, src, counting, install = lazy_repo
    install(min_window=64 << 10)
    fs = VersionFS(repo.get(ref))
    want = (src / "big.bin").read_bytes()
    rng = random.Random(1)
    for _ in range(200):
        off = rng.randrange(len(want))
        n = rng.randint(1, 300_000)
        assert fs.read("/big.bin", off, n) == want[off:off + n]
    assert fs.read("text.csv", 0, 14) == b"id,name,value\n"


def test_disk_cache_serves_a_second_reader_without_requests(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    install()
    assert repo.get(ref).read_bytes("text.csv") == (src / "text.csv").read_bytes()
    n = counting.requests
    install()  # a new fetcher (another process, a restart) finds the chunks on disk
    assert repo.get(ref).read_bytes("text.csv") == (src / "text.csv").read_bytes()
    assert counting.requests == n


def test_disk_cache_is_bounded_lru(lazy_repo, tmp_path: Path) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(cache_bytes=2 << 20, min_window=256 << 10)
    assert repo.get(ref).read_bytes("big.bin") == (src / "big.bin").read_bytes()
    assert wait_until(lambda: not f._streams)  # no chunk still being written
    used, files = f.cache.usage()
    on_disk = sum(p.stat().st_size for p in f.cache.root.rglob("*") if p.is_file())
    assert used <= 2 << 20 and on_disk <= 2 << 20 and files > 0
    # the most recently read chunks are the ones kept
    last = repo.get(ref).file_record("big.bin").chunks[-1][0]
    loc = repo.catalog.chunk(last)
    assert (loc.pack, loc.offset) in f.cache


def test_remote_bytes_failing_their_hash_are_refused_and_not_cached(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install()
    rec = repo.get(ref).file_record("small/f010.bin")
    loc = repo.catalog.chunk(rec.chunks[0][0])
    key = f"packs/{loc.pack}"
    good = counting.inner.get(key)
    bad = bytearray(good)
    bad[loc.offset + 5] ^= 0x55
    counting.inner.put(key, bytes(bad))
    try:
        with pytest.raises(CorruptData, match=f"chunk {loc.id.hex()} .* fails its hash check"):
            repo.get(ref).read_bytes("small/f010.bin")
        assert (loc.pack, loc.offset) not in f.cache
    finally:
        counting.inner.put(key, good)
    assert repo.get(ref).read_bytes("small/f010.bin") == (src / "small" / "f010.bin").read_bytes()


def test_a_torn_cache_file_is_a_miss(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install()
    want = (src / "small" / "f020.bin").read_bytes()
    assert repo.get(ref).read_bytes("small/f020.bin") == want
    for p in f.cache.root.rglob("*-*"):
        p.write_bytes(p.read_bytes()[:-3])  # as if a crash cut every cache file short
    install()
    assert repo.get(ref).read_bytes("small/f020.bin") == want


def test_cache_files_hold_runs_of_chunks(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install()
    assert _read_in_order(repo, ref, "big.bin") == (src / "big.bin").read_bytes()
    assert wait_until(lambda: not f._streams)
    files = [p for p in f.cache.root.rglob("*-*") if p.is_file()]
    chunks = len(repo.get(ref).file_record("big.bin").chunks)
    assert f.cache.usage()[1] >= chunks and len(files) * 4 <= chunks  # a file per few MiB, not per chunk
    install()  # a new process reads them back
    requests = counting.requests
    assert repo.get(ref).read_bytes("big.bin") == (src / "big.bin").read_bytes()
    assert counting.requests == requests


def test_disk_cache_runs_legacy_files_and_other_processes(tmp_path: Path) -> None:
    import xxhash

    from tessera.diskcache import DiskCache

    pack = "ab" * 32
    one, two = DiskCache(tmp_path / "c", 1 << 30), DiskCache(tmp_path / "c", 1 << 30)
    assert (pack, 40) not in two  # two has looked (an empty cache) before one writes
    one.put_run(pack, [(40, b"x" * 100), (200, b"y" * 50)])
    assert one.get((pack, 200), 50) == b"y" * 50
    assert two.get((pack, 40), 100) == b"x" * 100  # found by looking again on a miss
    legacy = tmp_path / "c" / pack[:2] / f"{pack}-1000"  # one chunk per file, from older versions
    legacy.write_bytes(xxhash.xxh3_64_intdigest(b"old").to_bytes(8, "little") + b"old")
    assert DiskCache(tmp_path / "c", 1 << 30).get((pack, 1000), 3) == b"old"
    legacy.write_bytes(legacy.read_bytes()[:-1] + b"!")
    fresh = DiskCache(tmp_path / "c", 1 << 30)
    assert fresh.get((pack, 1000), 3) is None and not legacy.exists()
    assert fresh.usage() == (one.usage()[0], 2)
    small = DiskCache(tmp_path / "s", 2000)  # LRU by file
    for i in range(5):
        small.put_run(pack, [(i * 1000, bytes([i]) * 600)])
    assert small.usage()[1] == 3 and small.get((pack, 4000), 600) == bytes([4]) * 600
    assert small.get((pack, 0), 600) is None


def test_will_need_opens_the_stream_of_the_next_pack_before_the_reader_gets_there(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10)
    want = (src / "big.bin").read_bytes()
    locs = [repo.catalog.chunk(cid) for cid, _ in repo.get(ref).file_record("big.bin").chunks]
    first_of_next = next(i for i, loc in enumerate(locs) if loc.pack != locs[0].pack)
    start = sum(n for _, n in repo.get(ref).file_record("big.bin").chunks[:first_of_next])
    repo.chunks.will_need(locs[first_of_next:first_of_next + 4])  # a read-ahead says so, before any read
    assert f.stats.streams == 1 and f._streams[0].pack == locs[first_of_next].pack
    with repo.get(ref).open("big.bin") as fh:  # its own read-ahead hints the next pack too: no second stream
        assert fh.read(start - 1000) == want[:start - 1000]
        misses = f.stats.misses
        assert sum(s.pack == locs[first_of_next].pack for s in f._streams) == 1
        assert fh.read() == want[start - 1000:]
    assert f.stats.misses == misses  # the reader found every chunk of the next pack on its way


def test_a_wrong_hint_costs_little(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10, idle=0.3)
    loc = repo.catalog.chunk(repo.get(ref).file_record("big.bin").chunks[3][0])
    repo.get(ref).read_bytes("small/f000.bin")  # lazy reads in use
    requests = counting.requests
    f.will_need([loc])
    assert wait_until(lambda: not f._streams, 3)  # nobody came: closed
    assert counting.requests == requests + 1 and counting.streams[-1] <= (256 << 10) + (2 << 20)


def test_outage_raises_remote_error_then_recovers(lazy_repo) -> None:
    from tessera.vfs import VersionFS

    repo, ref, src, counting, install = lazy_repo
    install()
    fs = VersionFS(repo.get(ref))
    counting.down = True
    with pytest.raises(RemoteError):
        fs.read("big.bin", 0, 4096)
    assert fs.stat("big.bin").size == (src / "big.bin").stat().st_size  # metadata still answers
    counting.down = False
    assert fs.read("big.bin", 0, 4096) == (src / "big.bin").read_bytes()[:4096]


def test_concurrent_readers_share_requests(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install()
    v = repo.get(ref)
    want = (src / "big.bin").read_bytes()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            assert v.read_bytes("big.bin") == want
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counting.fetched < 2 * len(want)  # the same bytes are not fetched six times


def test_cache_size_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    from tessera.config import parse_size
    from tessera.diskcache import DEFAULT_CACHE_BYTES, cache_size
    from tessera.repo import Repo

    home = tmp_path / "h"
    with Repo(home) as repo:
        assert cache_size(repo.catalog) == DEFAULT_CACHE_BYTES
    out = cli("remote", "cache", "--size", "3G", env={"TESSERA_HOME": str(home)}, check=True).stdout
    assert "bound 3.0 GiB" in out
    monkeypatch.setenv("TESSERA_CACHE_SIZE", "512M")
    with Repo(home) as repo:
        assert cache_size(repo.catalog) == 512 << 20
    assert parse_size("1.5k") == 1536
    bad = cli("remote", "cache", "--size", "lots", env={"TESSERA_HOME": str(home)})
    assert bad.returncode == 2 and bad.stderr.startswith("error: bad size")
