"""Lazy reads (`tessera.lazy`) on the in-memory remote: coalescing, prefetch, verification, the LRU disk
cache, outages. No S3 server, no mount: the store's remote hook and `VersionFS` are driven directly. A
counting wrapper (a real `Transport` around the memory backend) counts the requests."""
from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path

import pytest

from tessera.errors import CorruptData, RemoteError
from tessera.remote.base import Transport
from trees import write_random


class Counting(Transport):
    """Forwards to a real transport, counting GETs; ``down`` makes every call fail like an outage."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.url = inner.url
        self.gets: list[int] = []
        self.down = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise RemoteError(f"{self.url}: get failed after 3 attempts: connection refused")

    def get(self, key, start=None, end=None):
        self._check()
        data = self.inner.get(key, start, end)
        with self._lock:
            self.gets.append(len(data))
        return data

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
    from tessera.lazy import DiskCache, LazyFetcher
    from tessera.remote import open_transport
    from tessera.repo import Repo

    url, ref, src = remote_version
    repo = Repo(tmp_path / "b", remote=url)
    repo.pull(ref, metadata_only=True)
    counting = Counting(open_transport(url, retries=0))

    def install(cache_bytes: int = 1 << 30, **kw) -> "LazyFetcher":
        repo._lazy = LazyFetcher(repo.catalog, lambda pack: counting,
                                 DiskCache(tmp_path / "b" / "cache" / "chunks", cache_bytes), **kw)
        repo._chunks.max_bytes = 0  # no in-memory chunk cache: every read reaches the fetcher
        return repo._lazy

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
    # one request per window of neighbours, not one per file
    assert len(counting.gets) * 8 <= len(names), counting.gets
    assert f.stats.hits >= len(names) - len(counting.gets)


def test_sequential_read_prefetches_with_growing_windows(lazy_repo) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(min_window=256 << 10, max_window=4 << 20)
    want = (src / "big.bin").read_bytes()
    got = bytearray()
    with repo.get(ref).open("big.bin") as fh:
        while block := fh.read(128 << 10):
            got += block
    assert bytes(got) == want
    assert f.stats.prefetches >= 2
    assert max(counting.gets) > 256 << 10  # the window grew
    assert len(counting.gets) < len(repo.get(ref).file_record("big.bin").chunks)


def test_random_reads_through_the_vfs(lazy_repo) -> None:
    from tessera.vfs import VersionFS

    repo, ref, src, counting, install = lazy_repo
    install(min_window=64 << 10)
    fs = VersionFS(repo.get(ref), cache_bytes=1 << 20)
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
    n = len(counting.gets)
    install()  # a new fetcher (another process, a restart) finds the chunks on disk
    assert repo.get(ref).read_bytes("text.csv") == (src / "text.csv").read_bytes()
    assert len(counting.gets) == n


def test_disk_cache_is_bounded_lru(lazy_repo, tmp_path: Path) -> None:
    repo, ref, src, counting, install = lazy_repo
    f = install(cache_bytes=2 << 20, min_window=256 << 10)
    assert repo.get(ref).read_bytes("big.bin") == (src / "big.bin").read_bytes()
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


def test_outage_raises_remote_error_then_recovers(lazy_repo) -> None:
    from tessera.vfs import VersionFS

    repo, ref, src, counting, install = lazy_repo
    install()
    fs = VersionFS(repo.get(ref), cache_bytes=0)
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
    assert sum(counting.gets) < 2 * len(want)  # the same bytes are not fetched six times


def test_cache_size_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    from tessera.lazy import DEFAULT_CACHE_BYTES, cache_size, parse_size
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
