"""Layer 0: chunker, codecs and the pack format (bytes in, bytes out)."""
from __future__ import annotations

import io
import os
import random

import pytest

from tessera.errors import CorruptData, UsageError
from tessera.format.chunker import Chunker, ChunkParams
from tessera.format.compress import RAW, ZSTD, Compressor, decompress
from tessera.format.pack import KIND_CHUNK, PACK_MAGIC, encode_header, iter_blobs
from tessera.ids import chunk_id


def test_chunks_cover_stream_and_respect_bounds() -> None:
    params = ChunkParams(64 * 1024, 128 * 1024, 512 * 1024)
    data = random.Random(1).randbytes(8 << 20)
    pieces = [bytes(p) for p in Chunker(params).cut_stream(io.BytesIO(data))]
    assert b"".join(pieces) == data
    assert all(len(p) <= params.max_size for p in pieces)
    assert all(len(p) >= params.min_size for p in pieces[:-1])


def test_insert_changes_only_nearby_chunks() -> None:
    params = ChunkParams(16 * 1024, 32 * 1024, 128 * 1024)
    data = random.Random(2).randbytes(4 << 20)
    edited = data[: 2 << 20] + os.urandom(1000) + data[2 << 20:]
    ids_a = {chunk_id(p) for p in Chunker(params).cut_stream(io.BytesIO(data))}
    ids_b = [chunk_id(p) for p in Chunker(params).cut_stream(io.BytesIO(edited))]
    new = [i for i in ids_b if i not in ids_a]
    assert 1 <= len(new) <= 3


def test_bad_chunk_params_are_rejected() -> None:
    with pytest.raises(UsageError):
        ChunkParams(1 << 20, 1024, 2048)


def test_compression_keeps_random_raw_and_shrinks_text() -> None:
    comp = Compressor(3)
    random_bytes = os.urandom(256 * 1024)
    assert comp.compress(random_bytes)[0] == RAW
    text = b"label,x,y,width,height\n" * 20000
    codec, stored = comp.compress(text)
    assert codec == ZSTD and len(stored) < len(text) / 10
    assert decompress(codec, bytes(stored), len(text)) == text


def test_pack_blobs_parse_back_and_truncation_is_detected() -> None:
    blobs = [(chunk_id(b"a" * n), b"a" * n) for n in (1, 100, 5000)]
    pack = PACK_MAGIC + b"".join(encode_header(KIND_CHUNK, RAW, cid, len(d), len(d)) + d for cid, d in blobs)
    parsed = list(iter_blobs(pack))
    assert [p.id for p in parsed] == [cid for cid, _ in blobs]
    assert [pack[p.offset:p.offset + p.stored_len] for p in parsed] == [d for _, d in blobs]
    with pytest.raises(CorruptData):
        list(iter_blobs(pack[:-10]))
    with pytest.raises(CorruptData):
        list(iter_blobs(b"NOTAPACK" + pack[8:]))
