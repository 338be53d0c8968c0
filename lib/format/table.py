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
import hashlib
import io
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

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
    spill = io.BytesIO()
    write_row_objects(spill, kind, packs, rows)
    out = io.BytesIO()
    encode_file(kind, packs, spill, out)
    return out.getvalue()


def write_row_objects(f: IO[bytes], kind: int, packs: Sequence[tuple[str, int]], rows: Iterable[Row]) -> None:
    """Append ``rows`` to ``f`` as `packed_row`s (their packs numbered by their place in ``packs``)."""
    ordinal = {p: i for i, (p, _) in enumerate(packs)}
    write_rows(f, kind, ((r.key, ordinal[r.pack], r.offset, r.stored_len, r.raw_len, r.codec) for r in rows))


def write_rows(f: IO[bytes], kind: int, rows: Iterable[tuple[bytes, int, int, int, int, int]]) -> None:
    """Append ``rows`` ((key, pack ordinal, offset, stored_len, raw_len, codec)) to ``f`` as `packed_row`s."""
    key_len = KEY_LEN[kind]
    piece = bytearray()
    for key, *value in rows:
        if len(key) != key_len:
            raise ValueError(f"key of {len(key)} bytes in a table of {key_len}-byte keys")
        piece += key + VALUE.pack(*value)
        if len(piece) >= BLOCK:
            f.write(piece)
            piece.clear()
    f.write(piece)


BLOCK = 1 << 20  # bytes of rows read or written at a time
SORT_BUDGET = 8 << 20  # bytes of rows sorted in memory at once; more are split into key ranges on disk
SORT_BITS = 16  # a range is sorted as at most 2**SORT_BITS buckets of rows (by their keys' top bits)


def encode_file(kind: int, packs: Sequence[tuple[str, int]], rows: IO[bytes], out: IO[bytes], *,
                budget: int = SORT_BUDGET) -> str:
    """Write the table of the packed rows in file ``rows`` (whole `packed_row`s from its start, any order;
    a key given twice is kept once) to ``out``; returns the table's SHA-256 (hex). Memory: about
    ``budget``. Rows beyond it are first split by their keys' top bits into temporary files (keys are
    hashes: the ranges come out even); each range is sorted in memory, a bucket of rows at a time."""
    key_len = KEY_LEN[kind]
    row_len = key_len + VALUE.size
    total = rows.seek(0, io.SEEK_END)
    rows.seek(0)
    if total % row_len:
        raise ValueError(f"{total} bytes of rows is not whole {row_len}-byte rows")
    nrows = total // row_len
    bits = fanout_bits(nrows)  # of the rows given: the table's own is this or fewer (keys given twice)
    part_bits = 0
    while total >> part_bits > budget and part_bits < min(bits, 8):
        part_bits += 1
    counts = [0] * (1 << bits)
    ranges: list[IO[bytes] | list[bytes]] = []
    if not part_bits:
        ranges.append(_sort_range(rows.read(), row_len, key_len, bits, 0, 1 << bits, counts))
    else:
        span = 1 << (bits - part_bits)
        for i, f in enumerate(_split(rows, row_len, part_bits)):
            f.seek(0)
            buckets = _sort_range(f.read(), row_len, key_len, bits, i * span, span, counts)
            f.seek(0)
            f.truncate()
            buckets.reverse()
            while buckets:  # each bucket freed once written
                f.write(buckets.pop())
            ranges.append(f)
    unique = sum(counts)
    while bits > fanout_bits(unique):  # fewer rows than given: a coarser fan-out (sum neighbouring buckets)
        counts = [counts[i] + counts[i + 1] for i in range(0, len(counts), 2)]
        bits -= 1
    digest = hashlib.sha256()

    def emit(data: bytes) -> None:
        digest.update(data)
        out.write(data)

    emit(HEADER.pack(MAGIC, kind, key_len, bits, 0, len(packs), unique, 0))
    emit(b"".join(PACK.pack(bytes.fromhex(p), size) for p, size in packs))
    running = 0
    fanout = bytearray()
    for c in counts:
        running += c
        fanout += FANOUT.pack(running)
    emit(bytes(fanout))
    for r in ranges:
        if isinstance(r, list):
            for bucket in r:
                emit(bucket)
            continue
        r.seek(0)
        while block := r.read(BLOCK):
            emit(block)
        r.close()
    return digest.hexdigest()


def _split(rows: IO[bytes], row_len: int, part_bits: int) -> list[IO[bytes]]:
    """The rows of ``rows`` in ``2**part_bits`` temporary files by their keys' top ``part_bits`` bits."""
    files: list[IO[bytes]] = [tempfile.TemporaryFile() for _ in range(1 << part_bits)]
    shift = 8 - part_bits
    step = BLOCK - BLOCK % row_len
    while block := rows.read(step):
        parts = [bytearray() for _ in files]
        for pos in range(0, len(block), row_len):
            parts[block[pos] >> shift] += block[pos:pos + row_len]
        for f, part in zip(files, parts):
            f.write(part)
    return files


def _sort_range(data: bytes, row_len: int, key_len: int, bits: int, first: int, span: int,
                counts: list[int]) -> list[bytes]:
    """The rows of ``data`` (whose keys' top ``bits`` bits lie in ``[first, first + span)``) sorted, each
    key once, as buckets of rows; adds each fan-out bucket's rows to ``counts``. Hand ``data`` over (no
    other reference): it is freed once its rows are in buckets."""
    sort_bits = min(bits, SORT_BITS)
    shift = 32 - sort_bits
    low = first >> (bits - sort_bits)
    if sort_bits:
        buckets = [bytearray() for _ in range(span >> (bits - sort_bits))]
        for pos in range(0, len(data), row_len):
            buckets[(int.from_bytes(data[pos:pos + 4], "big") >> shift) - low] += data[pos:pos + row_len]
    else:
        buckets = [bytearray(data)]
    del data
    out: list[bytes] = []
    for i in range(len(buckets)):
        if not buckets[i]:
            continue
        split = sorted(bytes(buckets[i][p:p + row_len]) for p in range(0, len(buckets[i]), row_len))
        buckets[i] = bytearray()
        rows = [row for j, row in enumerate(split) if j == 0 or row[:key_len] != split[j - 1][:key_len]]
        del split
        if bits == sort_bits:
            counts[low + i] += len(rows)
        else:
            for row in rows:
                counts[int.from_bytes(row[:4], "big") >> (32 - bits)] += 1
        out.append(b"".join(rows))
    return out


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
