"""Sorted location tables: where blobs sit in packs, looked up with a few ranged reads.

The consolidated chunk index and the metadata index of remote layout 3 (docs/format.md, "Location
tables") are this one format, like git's pack ``.idx`` with its fan-out:

    table  := header packs fanout rows
    header := MAGIC(8) kind(u8) key_len(u8) fanout_bits(u8) reserved(u8) npacks(u32) nrows(u64) reserved(u64)
    packs  := (pack id: 32 bytes, pack size: u64) * npacks
    fanout := u64 * 2**fanout_bits     the number of rows whose key's top ``fanout_bits`` bits are <= i
    rows   := (key: key_len bytes, pack: u32, offset: u64, stored_len: u32, raw_len: u32, codec: u8) * nrows

Rows are sorted by key, and a key appears once. A reader fetches the head (header, packs, fan-out) once,
then for any key one bucket of rows (about 64 of them): `bucket_span` says which bytes. Nothing here
trusts the bytes: counts are bounded before anything is allocated and every row is checked as decoded.
"""
from __future__ import annotations

import bisect
import io
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from tessera.errors import CorruptData
from tessera.format.compress import CODEC_NAMES, MAX_CHUNK, RAW

MAGIC = b"TSTAB001"
HEADER = struct.Struct("<8sBBBBIQQ")
PACK = struct.Struct("<32sQ")
VALUE = struct.Struct("<IQIIB")
FANOUT = struct.Struct("<Q")

KIND_CHUNKS = 1  # key: a chunk id (xxh3-128, 16 bytes); packs are data packs
KIND_META = 2  # key: a blob id (SHA-256, 32 bytes) + its blob kind (1 tree, 2 file record); packs are metadata packs
KEY_LEN = {KIND_CHUNKS: 16, KIND_META: 33}

MAX_PACKS = 1 << 20
MAX_ROWS = 1 << 32
MAX_FANOUT_BITS = 20
ROWS_PER_BUCKET = 64
MAX_META_BLOB = 256 << 20  # metadata blobs are bounded again when decoded (tessera.format.compress)


@dataclass(frozen=True)
class Row:
    """One blob: ``key`` (chunk id, or blob id + kind) and where its stored bytes sit in ``pack``."""

    key: bytes
    pack: str
    offset: int
    stored_len: int
    raw_len: int
    codec: int


@dataclass(frozen=True)
class Head:
    """What a reader learns from the first bytes of a table: enough to find any key's bucket."""

    kind: int
    key_len: int
    bits: int
    packs: tuple[tuple[str, int], ...]
    nrows: int
    fanout: tuple[int, ...]

    @property
    def row_len(self) -> int:
        return self.key_len + VALUE.size

    @property
    def rows_start(self) -> int:
        return head_len(len(self.packs), self.bits)

    @property
    def size(self) -> int:
        return self.rows_start + self.nrows * self.row_len

    def bucket(self, key: bytes) -> int:
        return int.from_bytes(key[:4], "big") >> (32 - self.bits) if self.bits else 0

    def bucket_span(self, b: int) -> tuple[int, int]:
        """Rows ``[first, end)`` of bucket ``b``."""
        return (self.fanout[b - 1] if b else 0), self.fanout[b]


def head_len(npacks: int, bits: int) -> int:
    return HEADER.size + npacks * PACK.size + (1 << bits) * FANOUT.size


def fanout_bits(nrows: int) -> int:
    bits = 0
    while bits < MAX_FANOUT_BITS and (nrows >> bits) > ROWS_PER_BUCKET:
        bits += 1
    return bits


def packed_row(key: bytes, pack: int, offset: int, stored_len: int, raw_len: int, codec: int) -> bytes:
    """One row as a table stores it (``pack``: the ordinal of its pack in the table's pack list)."""
    return key + VALUE.pack(pack, offset, stored_len, raw_len, codec)


def encode(kind: int, packs: Sequence[tuple[str, int]], rows: Iterable[Row]) -> bytes:
    """The table of ``rows`` (any order; a key given twice is kept once) over ``packs`` ((id, size))."""
    key_len = KEY_LEN[kind]
    ordinal = {p: i for i, (p, _) in enumerate(packs)}
    pieces: list[bytes] = []
    piece = bytearray()
    for r in rows:
        if len(r.key) != key_len:
            raise ValueError(f"key of {len(r.key)} bytes in a table of {key_len}-byte keys")
        piece += packed_row(r.key, ordinal[r.pack], r.offset, r.stored_len, r.raw_len, r.codec)
        if len(piece) >= PIECE:
            pieces.append(bytes(piece))
            piece.clear()
    pieces.append(bytes(piece))
    return encode_packed(kind, packs, pieces)


PIECE = 1 << 20  # bytes of packed rows `encode` gathers before handing them on
SORT_BITS = 16  # rows are distributed into at most 2**SORT_BITS buckets by their keys' top bits, each sorted apart


def encode_packed(kind: int, packs: Sequence[tuple[str, int]], pieces: list[bytes]) -> bytes:
    """The table of the packed rows in ``pieces`` (each whole rows as `packed_row` makes them, any order;
    a key given twice is kept once). Costs about the table's size in memory: ``pieces`` is emptied as its
    rows are distributed into buckets by their keys' top bits (keys are hashes: uniform), each bucket is
    sorted on its own, and the table is written bucket by bucket, freeing each."""
    key_len = KEY_LEN[kind]
    row_len = key_len + VALUE.size
    nrows = 0
    for piece in pieces:
        if len(piece) % row_len:
            raise ValueError(f"a piece of {len(piece)} bytes is not whole {row_len}-byte rows")
        nrows += len(piece) // row_len
    sort_bits = min(fanout_bits(nrows), SORT_BITS)
    buckets = _distribute(pieces, row_len, sort_bits)
    unique = 0
    for b, rows in enumerate(buckets):  # sort each bucket, keep each key once
        if rows:
            buckets[b] = _sort_unique(rows, row_len, key_len)
            unique += len(buckets[b]) // row_len
    bits = fanout_bits(unique)
    out = io.BytesIO()  # grown in place and handed over without a copy (getvalue of an unshared buffer)
    out.write(HEADER.pack(MAGIC, kind, key_len, bits, 0, len(packs), unique, 0))
    for p, size in packs:
        out.write(PACK.pack(bytes.fromhex(p), size))
    total = 0
    for c in _fanout_counts(buckets, sort_bits, bits, row_len):
        total += c
        out.write(FANOUT.pack(total))
    for b in range(len(buckets)):
        out.write(buckets[b])
        buckets[b] = b""
    return out.getvalue()


def _distribute(pieces: list[bytes], row_len: int, bits: int) -> list[bytes | bytearray]:
    """The rows of ``pieces`` (emptied, each piece freed once read) in ``2**bits`` buckets by their keys'
    top ``bits`` bits."""
    if not bits:
        whole = b"".join(pieces)
        pieces.clear()
        return [whole]
    parts = [bytearray() for _ in range(1 << bits)]
    shift = 32 - bits
    pieces.reverse()
    while pieces:
        piece = pieces.pop()
        for pos in range(0, len(piece), row_len):
            parts[int.from_bytes(piece[pos:pos + 4], "big") >> shift] += piece[pos:pos + row_len]
        del piece
    return list[bytes | bytearray](parts)


def _sort_unique(rows: bytes | bytearray, row_len: int, key_len: int) -> bytes:
    """The rows of one bucket sorted, a key given twice kept once (its smallest row)."""
    split = sorted(bytes(rows[i:i + row_len]) for i in range(0, len(rows), row_len))
    return b"".join(row for i, row in enumerate(split) if i == 0 or row[:key_len] != split[i - 1][:key_len])


def _fanout_counts(buckets: list[bytes | bytearray], sort_bits: int, bits: int, row_len: int) -> list[int]:
    """Rows per fan-out bucket of ``bits`` bits, from sorted buckets of ``sort_bits`` bits."""
    counts = [0] * (1 << bits)
    if bits <= sort_bits:
        for b, rows in enumerate(buckets):
            counts[b >> (sort_bits - bits)] += len(rows) // row_len
        return counts
    shift = 32 - bits
    for rows in buckets:
        for pos in range(0, len(rows), row_len):
            counts[int.from_bytes(rows[pos:pos + 4], "big") >> shift] += 1
    return counts


def decode_head(data: bytes, where: str, *, kind: int) -> Head:
    """The head of a table from its first bytes (`NeedMore` when ``data`` is too short to hold it)."""
    if len(data) < HEADER.size:
        raise CorruptData(f"{where} is malformed: shorter than a table header")
    magic, k, key_len, bits, _, npacks, nrows, _ = HEADER.unpack_from(data)
    if magic != MAGIC or k != kind or key_len != KEY_LEN.get(kind) or bits > MAX_FANOUT_BITS:
        raise CorruptData(f"{where} is malformed: not a tessera location table of this kind")
    if npacks > MAX_PACKS or nrows > MAX_ROWS:
        raise CorruptData(f"{where} is malformed: {npacks} packs / {nrows} rows is more than a table holds")
    need = head_len(npacks, bits)
    if len(data) < need:
        raise NeedMore(need)
    packs = []
    pos = HEADER.size
    for _ in range(npacks):
        pid, size = PACK.unpack_from(data, pos)
        packs.append((pid.hex(), size))
        pos += PACK.size
    fanout = struct.unpack_from(f"<{1 << bits}Q", data, pos)
    if any(b < a for a, b in zip(fanout, fanout[1:])) or fanout[-1] != nrows:
        raise CorruptData(f"{where} is malformed: its fan-out is not a running count of its rows")
    return Head(kind, key_len, bits, tuple(packs), nrows, tuple(fanout))


class NeedMore(Exception):
    """The head is longer than the bytes given: read ``size`` bytes from the start."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def decode_rows(head: Head, data: bytes, first: int, where: str, *, bucket: int | None = None) -> list[Row]:
    """Rows ``first, first + 1, ...`` from ``data`` (which starts at row ``first``), each checked: keys
    strictly increasing (and in ``bucket`` when given), a known pack, inside it, lengths a chunker or a
    metadata pack could make."""
    return list(iter_rows(head, data, first, where, bucket=bucket))


def iter_rows(head: Head, data: bytes | memoryview, first: int, where: str, *,
              bucket: int | None = None) -> Iterator[Row]:
    """`decode_rows`, one row at a time (each checked before it is given)."""
    n = len(data) // head.row_len
    prev = b""
    limit = MAX_CHUNK if head.kind == KIND_CHUNKS else MAX_META_BLOB
    for i in range(n):
        pos = i * head.row_len
        key = bytes(data[pos:pos + head.key_len])
        p, offset, stored, raw, codec = VALUE.unpack_from(data, pos + head.key_len)
        if key <= prev or (bucket is not None and head.bucket(key) != bucket):
            raise CorruptData(f"{where} is malformed: row {first + i} is out of order")
        prev = key
        if p >= len(head.packs):
            raise CorruptData(f"{where} is malformed: row {first + i} names pack {p} of {len(head.packs)}")
        pack, size = head.packs[p]
        if (codec not in CODEC_NAMES or offset + stored > size or raw > limit
                or (stored != raw if codec == RAW else stored >= raw)):
            raise CorruptData(f"{where} is malformed: row {first + i} has impossible lengths or place")
        yield Row(key, pack, offset, stored, raw, codec)


def decode(data: bytes, where: str, *, kind: int) -> tuple[Head, list[Row]]:
    """A whole table (a full metadata pull reads them whole)."""
    head, rows = iter_table(data, where, kind=kind)
    return head, list(rows)


def iter_table(data: bytes, where: str, *, kind: int) -> tuple[Head, Iterator[Row]]:
    """A whole table's head (checked now) and its rows (each checked as it is given)."""
    try:
        head = decode_head(data, where, kind=kind)
    except NeedMore:
        raise CorruptData(f"{where} is malformed: truncated") from None
    if len(data) != head.size:
        raise CorruptData(f"{where} is malformed: {len(data)} bytes, its header says {head.size}")
    return head, iter_rows(head, memoryview(data)[head.rows_start:], 0, where)


def find(rows: Sequence[Row], key: bytes) -> Row | None:
    """The row of ``key`` in sorted ``rows``."""
    i = bisect.bisect_left([r.key for r in rows], key)
    return rows[i] if i < len(rows) and rows[i].key == key else None
