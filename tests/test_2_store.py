"""Layer 2: the local store alone — pack writing and sealing, in-flight dedup, reading back, decoding."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import xxhash
import zstandard

from tessera.catalog import Catalog
from tessera.errors import CorruptData
from tessera.format.compress import RAW, ZSTD
from tessera.format.pack import KIND_CHUNK, PackBuilder, iter_blobs
from tessera.ids import chunk_id
from tessera.model import ChunkLocation
from tessera.store import PackSet, Store, decode_chunk


@pytest.fixture
def store(tmp_path: Path):
    cat = Catalog(tmp_path / "catalog.db")
    s = Store(tmp_path, cat)
    yield s
    s.close()
    cat.close()


def test_packs_are_sealed_by_hash_indexed_and_read_back(store: Store) -> None:
    packs = PackSet(store, target_size=64 * 1024)
    data = [os.urandom(20_000) for _ in range(10)]
    for d in data:
        cid = chunk_id(d)
        assert packs.claim([cid]) == [True]
        packs.add(cid, RAW, d, len(d))
    sealed = packs.finish()
    assert len(sealed) >= 3  # the target closes packs as they fill
    assert not list(store.tmp_dir.iterdir())
    for p in sealed:
        raw = store.pack_path(p.id).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == p.id
        assert [b.id for b in iter_blobs(raw)] == [b.id for b in p.blobs]
        size, chunks = store.pack_index(p.id)
        assert size == len(raw) and [c.id for c in chunks] == [b.id for b in p.blobs]
    for d in data:
        loc = store.catalog.chunk(chunk_id(d))
        assert loc is not None and decode_chunk(loc, store.read_stored(loc)) == d


def test_a_chunk_is_stored_once_across_threads_and_commits(store: Store) -> None:
    d = b"same bytes" * 1000
    cid = chunk_id(d)
    packs = PackSet(store)
    results: list[bool] = []
    lock = threading.Lock()

    def claim() -> None:
        got = packs.claim([cid])[0]
        with lock:
            results.append(got)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1  # exactly one writer stores it
    packs.add(cid, RAW, d, len(d))
    packs.finish()
    assert PackSet(store).claim([cid]) == [False]  # known locally: the next commit reuses it


def test_an_aborted_pack_set_leaves_nothing(store: Store) -> None:
    packs = PackSet(store)
    d = os.urandom(5000)
    packs.claim([chunk_id(d)])
    packs.add(chunk_id(d), RAW, d, len(d))
    packs.abort()
    assert not list(store.tmp_dir.iterdir()) and not store.catalog.packs()


def test_pack_index_refuses_a_damaged_pack(store: Store) -> None:
    packs = PackSet(store)
    d = os.urandom(5000)
    packs.claim([chunk_id(d)])
    packs.add(chunk_id(d), RAW, d, len(d))
    (sealed,) = packs.finish()
    path = store.pack_path(sealed.id)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptData, match="fails its hash check"):
        store.pack_index(sealed.id)
    loc = store.catalog.chunk(chunk_id(d))
    assert loc is not None
    with pytest.raises(CorruptData, match="hash check"):
        decode_chunk(loc, store.read_stored(loc))


def test_decode_is_bounded_by_the_recorded_length() -> None:
    raw = b"x" * 100_000
    packed = zstandard.ZstdCompressor().compress(raw)
    loc = ChunkLocation(xxhash.xxh3_128_digest(raw), "p" * 64, 40, len(packed), len(raw), ZSTD)
    assert decode_chunk(loc, packed) == raw
    lying = ChunkLocation(loc.id, loc.pack, 40, len(packed), 1000, ZSTD)  # the frame says 100,000
    with pytest.raises(CorruptData, match="declares 100000 bytes"):
        decode_chunk(lying, packed)
    huge = ChunkLocation(loc.id, loc.pack, 40, len(packed), 64 << 20, ZSTD)  # more than any chunk
    with pytest.raises(CorruptData, match="more than"):
        decode_chunk(huge, packed)


def test_pack_builder_layout_is_what_iter_blobs_reads() -> None:
    parts: list[bytes] = []
    b = PackBuilder(lambda pieces: parts.extend(bytes(p) for p in pieces))
    infos = [b.add(KIND_CHUNK, RAW, bytes([i]) * 16, bytes([i]) * (i + 1), i + 1) for i in range(5)]
    data = b"".join(parts)
    assert b.id == hashlib.sha256(data).hexdigest() and b.size == len(data)
    assert list(iter_blobs(data)) == infos
    for info in infos:
        assert data[info.offset:info.offset + info.stored_len] == info.id[:1] * info.stored_len
