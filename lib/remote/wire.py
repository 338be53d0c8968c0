"""What tessera writes on a remote: every key name and every object codec (docs/format.md, "Remote layout").

This is the executable half of the remote layout spec, and the only module that spells ``packs/…``,
``meta/…`` and the other keys. Encoders and decoders come in symmetric pairs. Decoders trust nothing:
each object is bounded in size before it is read, checked field by field, and a metadata pack's blobs
are bounded before they are decompressed (a hostile bucket can make a read fail, never exhaust memory
or slip a malformed object past). Transports move the bytes (`tessera.remote.base`); push and pull
decide what to move (`tessera.push`, `tessera.pull`).
"""
from __future__ import annotations

import io
import json
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from tessera.errors import CorruptData, NotFound
from tessera.format.compress import CODEC_NAMES, MAX_CHUNK, RAW, Compressor, decompress, meta_blob_limit
from tessera.format import table
from tessera.format.pack import BLOB_MAGIC, HEADER, KIND_FILE, KIND_TREE, PACK_MAGIC, PackBuilder, Piece, iter_blobs
from tessera.ids import sha256_hex
from tessera.model import DIR, FILE, SYMLINK, ChunkLocation, FileRecord, HistoryEntry, Tree
from tessera.remote.base import Transport

FORMAT = 1
VERSION_FORMAT = 2
"""Version objects this tessera writes: format 2 names location tables and pack lists instead of listing
every pack (docs/format.md, "Version objects, format 2"); format 1 is still read."""
META_PACK_TARGET = 16 * 1024 * 1024
PACK_LIST_SHARD = 65536  # pack ids per pack-list shard, on average

# The most bytes a reader fetches for one object of each kind (a bigger object is refused unread).
SMALL_OBJECT_MAX = 1 << 20  # history entries, tags
VERSION_OBJECT_MAX = 256 << 20
INDEX_OBJECT_MAX = 128 << 20
META_PACK_MAX = 512 << 20
TABLE_OBJECT_MAX = 4 << 30  # a location table is read by ranges; read whole only by a full metadata pull
TABLE_HEAD_GUESS = 64 << 10  # the first ranged read of a table: its head, usually whole
WHOLE_TABLE_MAX = 64 << 20  # a table read by many scattered lookups is read whole (and checked) up to this size
PACK_LIST_MAX = 64 << 20

HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HISTORY_NAME = re.compile(r"^(\d{16})-([0-9a-f]{64})$")
_FILE_MODES = (0o644, 0o755)
_BLOB_HEADER = 16 + 16  # blob header + a 16-byte chunk id: the least gap between two chunks of a data pack


# -- keys -------------------------------------------------------------------------------------------

def pack_key(pack: str) -> str:
    return f"packs/{pack}"


def index_key(pack: str) -> str:
    return f"index/{pack}"


def meta_key(pack: str) -> str:
    return f"meta/{pack}"


def version_key(hash: str) -> str:
    return f"versions/{hash}"


def chunk_table_key(table: str) -> str:
    return f"chunkidx/{table}"


def meta_table_key(table: str) -> str:
    return f"metaidx/{table}"


def pack_list_key(shard: str) -> str:
    return f"packlist/{shard}"


def history_prefix(dataset: str) -> str:
    return f"history/{dataset}/"


def history_key(e: HistoryEntry) -> str:
    return f"{history_prefix(e.dataset)}{int(round(e.time * 1e6)):016d}-{e.hash}"


def parse_history_key(key: str) -> tuple[str, str, str] | None:
    """``(dataset, name, version hash)`` of a ``history/<dataset>/<µs>-<hash>`` key, else None."""
    dataset, _, name = key.removeprefix("history/").partition("/")
    m = _HISTORY_NAME.match(name)
    return (dataset, name, m.group(2)) if m is not None and key.startswith("history/") else None


def tags_prefix(dataset: str) -> str:
    return f"refs/{dataset}/tags/"


def tag_key(dataset: str, tag: str) -> str:
    return f"{tags_prefix(dataset)}{tag}"


# -- reading objects, bounded ---------------------------------------------------------------------------

def get_object(t: Transport, key: str, limit: int, *, required_by: str | None = None) -> bytes:
    """The bytes of ``key``, at most ``limit`` of them (`CorruptData` beyond: never read whole). A missing
    object raises `NotFound`, or `CorruptData` naming ``required_by`` when something needs it."""
    try:
        data = t.get(key, 0, limit + 1)
    except NotFound:
        if required_by is None:
            raise
        raise CorruptData(f"{t.url}: {required_by} needs {key}, which is missing (pruned or never pushed)") from None
    if len(data) > limit:
        raise CorruptData(f"{t.url}/{key} is larger than any object of its kind ({limit} bytes): refused")
    return data


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(data: bytes, where: str, formats: tuple[int, ...] = (FORMAT,)) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise CorruptData(f"{where} is malformed: not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        fmt = obj.get("format") if isinstance(obj, dict) else None
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > max(formats):
            raise CorruptData(f"{where} is a format-{fmt} object; this tessera reads up to format {max(formats)}: "
                              "upgrade tessera")
        raise CorruptData(f"{where} is malformed: not a format-{'/'.join(map(str, formats))} tessera object")
    return obj


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CorruptData(f"{where} is malformed: {what}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# -- history entries, tags ------------------------------------------------------------------------------

def encode_history(e: HistoryEntry) -> bytes:
    return _dumps({"format": FORMAT, "dataset": e.dataset, "hash": e.hash, "parent": e.parent, "time": e.time,
                   "author": e.author, "message": e.message, "meta": e.meta, "files": e.files, "size": e.size})


def decode_history(key: str, data: bytes, where: str) -> HistoryEntry:
    obj = _loads(data, where)
    parsed = parse_history_key(key)
    if parsed is None:
        raise CorruptData(f"{where} is malformed: bad history key")
    dataset, _, hash_ = parsed
    _need(obj.get("dataset") == dataset and obj.get("hash") == hash_, where, "dataset or hash disagrees with its key")
    parent = obj.get("parent")
    _need(parent is None or (isinstance(parent, str) and bool(HEX64.match(parent))), where, "bad parent")
    t = obj.get("time")
    _need(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0, where, "bad time")
    _need(isinstance(obj.get("author"), str) and isinstance(obj.get("message"), str), where, "bad author or message")
    _need(isinstance(obj.get("meta"), dict), where, "meta is not an object")
    _need(_is_count(obj.get("files")) and _is_count(obj.get("size")), where, "bad files or size")
    return HistoryEntry(dataset, hash_, parent, float(obj["time"]), obj["author"], obj["message"], obj["meta"],
                        obj["files"], obj["size"])


def encode_tag(dataset: str, tag: str, hash: str) -> bytes:
    return _dumps({"format": FORMAT, "dataset": dataset, "tag": tag, "hash": hash})


def decode_tag(tag: str, data: bytes, where: str) -> str:
    """The version hash a tag object names."""
    obj = _loads(data, where)
    h = obj.get("hash")
    _need(isinstance(h, str) and bool(HEX64.match(h)) and obj.get("tag") == tag, where, "bad tag object")
    return str(h)


# -- version objects ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionObject:
    """``versions/<hash>``: what a version needs.

    Format 1 lists its metadata packs and every data pack (``packs``); each data pack has an
    ``index/<pack>``. Format 2 lists its metadata packs, the metadata tables that locate every tree and
    file record in them (``meta_tables``), the chunk tables that locate every chunk (``chunk_tables``),
    and its data packs as sorted shards (``pack_lists``, ``pack_count`` packs in all): a reader fetches
    only what it walks, and the object stays small at millions of packs."""

    hash: str
    files: int
    size: int
    meta: tuple[str, ...]
    packs: tuple[str, ...] = ()
    format: int = FORMAT
    meta_tables: tuple[str, ...] = ()
    chunk_tables: tuple[str, ...] = ()
    pack_lists: tuple[str, ...] = ()
    pack_count: int = 0

    def to_bytes(self) -> bytes:
        if self.format == 1:
            return _dumps({"format": 1, "hash": self.hash, "files": self.files, "size": self.size,
                           "meta": list(self.meta), "packs": list(self.packs)})
        return _dumps({"format": 2, "hash": self.hash, "files": self.files, "size": self.size,
                       "meta": list(self.meta), "meta_tables": list(self.meta_tables),
                       "chunk_tables": list(self.chunk_tables), "pack_lists": list(self.pack_lists),
                       "pack_count": self.pack_count})

    @property
    def keys(self) -> list[str]:
        """Every object this version object names (what a prune keeps while the version is kept), but the
        data packs of a format-2 version, which its pack lists name."""
        out = [version_key(self.hash)] + [meta_key(m) for m in self.meta]
        if self.format == 1:
            return out + [k for p in self.packs for k in (pack_key(p), index_key(p))]
        return (out + [meta_table_key(t) for t in self.meta_tables] + [chunk_table_key(t) for t in self.chunk_tables]
                + [pack_list_key(s) for s in self.pack_lists])

    @classmethod
    def from_bytes(cls, hash: str, data: bytes, where: str) -> VersionObject:
        obj = _loads(data, where, (1, VERSION_FORMAT))
        _need(obj.get("hash") == hash, where, "its hash disagrees with its key")
        _need(_is_count(obj.get("files")) and _is_count(obj.get("size")), where, "bad files or size")
        lists = ("meta", "packs") if obj["format"] == 1 else ("meta", "meta_tables", "chunk_tables", "pack_lists")
        for name in lists:
            ids = obj.get(name)
            _need(isinstance(ids, list) and all(isinstance(i, str) and HEX64.match(i) for i in ids), where,
                  f"bad {name} list")
        if obj["format"] == 1:
            return cls(hash, obj["files"], obj["size"], tuple(obj["meta"]), tuple(obj["packs"]))
        _need(_is_count(obj.get("pack_count")), where, "bad pack count")
        return cls(hash, obj["files"], obj["size"], tuple(obj["meta"]), (), 2, tuple(obj["meta_tables"]),
                   tuple(obj["chunk_tables"]), tuple(obj["pack_lists"]), obj["pack_count"])


# -- pack lists (format-2 version objects) -------------------------------------------------------------

PACK_LIST_MAGIC = b"TSPL0001"


def shard_pack_list(packs: Sequence[str]) -> list[bytes]:
    """A version's data packs as pack-list shards: sorted ids split by their leading bits into a power of
    two of shards of about `PACK_LIST_SHARD` ids, so a version that adds a few packs to its parent's
    rewrites a few shards and shares the rest (content-addressed: ``packlist/<SHA-256>``)."""
    ids = sorted(set(packs))
    bits = 0
    while (len(ids) >> bits) > PACK_LIST_SHARD and bits < 16:
        bits += 1
    shards: list[list[str]] = [[] for _ in range(1 << bits)]
    for p in ids:
        shards[int(p[:4], 16) >> (16 - bits) if bits else 0].append(p)
    return [PACK_LIST_MAGIC + b"".join(bytes.fromhex(p) for p in s) for s in shards if s]


def decode_pack_list(shard: str, data: bytes, where: str) -> list[str]:
    if sha256_hex(data) != shard:
        raise CorruptData(f"{where} fails its hash check")
    body = data[len(PACK_LIST_MAGIC):]
    _need(data.startswith(PACK_LIST_MAGIC) and len(body) % 32 == 0, where, "not a pack list")
    ids = [body[i:i + 32].hex() for i in range(0, len(body), 32)]
    _need(all(a < b for a, b in zip(ids, ids[1:])), where, "pack ids out of order")
    return ids


# -- pack indexes -------------------------------------------------------------------------------------

def encode_index(pack: str, size: int, chunks: Sequence[ChunkLocation]) -> bytes:
    return _dumps({"format": FORMAT, "pack": pack, "size": size,
                   "chunks": [[c.id.hex(), c.offset, c.stored_len, c.raw_len, c.codec] for c in chunks]})


def decode_index(pack: str, data: bytes, where: str) -> tuple[int, list[ChunkLocation]]:
    """The chunk list of data pack ``pack``. Beyond the types, the rows must describe a pack that could
    exist: in offset order, each after the previous one's end plus a blob header, inside the pack, with
    lengths a chunker makes (raw <= 16 MiB; stored = raw for raw chunks, less for compressed ones)."""
    obj = _loads(data, where)
    _need(obj.get("pack") == pack, where, "its pack id disagrees with its key")
    size = obj.get("size")
    _need(_is_count(size), where, "bad size")
    _need(isinstance(obj.get("chunks"), list), where, "no chunk list")
    out = []
    end = len(PACK_MAGIC)
    for row in obj["chunks"]:
        ok = (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str) and bool(_HEX32.match(row[0]))
              and all(_is_count(x) for x in row[1:]))
        _need(ok, where, f"bad chunk row {str(row)[:80]}")
        cid, offset, stored, raw, codec = row
        _need(codec in CODEC_NAMES and offset >= end + _BLOB_HEADER and offset + stored <= size, where,
              f"chunk {cid} overlaps another, lies outside the pack or has an unknown codec")
        _need(raw <= MAX_CHUNK and (stored == raw if codec == RAW else stored < raw), where,
              f"chunk {cid} has impossible lengths (stored {stored}, raw {raw})")
        end = offset + stored
        out.append(ChunkLocation(bytes.fromhex(cid), pack, offset, stored, raw, codec))
    return int(obj["size"]), out


def check_index_rows(rows: Iterable[ChunkLocation], size: int) -> str | None:
    """What is wrong with the chunk rows of one data pack (in offset order), or None: the same layout
    rules `decode_index` applies, for rows already in a catalog (`tessera fsck`)."""
    end = len(PACK_MAGIC)
    for x in rows:
        if x.offset < end + _BLOB_HEADER or x.offset + x.stored_len > size:
            return f"chunk {x.id.hex()} at offset {x.offset} overlaps another or lies outside the pack"
        if x.raw_len > MAX_CHUNK or (x.stored_len != x.raw_len if x.codec == RAW else x.stored_len >= x.raw_len):
            return f"chunk {x.id.hex()} has impossible lengths (stored {x.stored_len}, raw {x.raw_len})"
        end = x.offset + x.stored_len
    return None


# -- metadata packs ---------------------------------------------------------------------------------

def check_tree(tree: Tree, where: str) -> None:
    """What `TreeEntry.from_obj` does not already refuse: modes a commit never makes (setuid ...),
    ids that are not hashes, NUL in symlink targets."""
    for e in tree.entries:
        bad = None
        if e.kind == FILE:
            if e.mode not in _FILE_MODES or not isinstance(e.id, str) or not HEX64.match(e.id) or e.size < 0:
                bad = "a bad file entry"
        elif e.kind == DIR:
            if e.mode != 0o755 or not isinstance(e.id, str) or not HEX64.match(e.id) or e.size < 0:
                bad = "a bad directory entry"
        elif e.kind == SYMLINK:
            if not isinstance(e.target, str) or "\0" in e.target or e.mode != 0o777:
                bad = "a bad symlink entry"
        if bad:
            raise CorruptData(f"{where}: {bad} {e.name!r}")


def decode_meta_pack(pack: str, data: bytes, where: str) -> tuple[list[tuple[str, bytes]], list[FileRecord]]:
    """Trees and file records of a metadata pack, each checked; every blob is bounded (a hard ceiling
    and a ratio to its stored size) before it is decompressed."""
    trees: list[tuple[str, bytes]] = []
    files: list[FileRecord] = []
    for blob in iter_meta_pack(pack, data, where):
        if isinstance(blob, FileRecord):
            files.append(blob)
        else:
            trees.append(blob)
    return trees, files


def iter_meta_pack(pack: str, data: bytes, where: str) -> Iterator[tuple[str, bytes] | FileRecord]:
    """`decode_meta_pack`'s trees ((id, bytes)) and file records in pack order, one at a time: the pack
    is checked against its SHA-256 before the first, each blob before it is given."""
    if sha256_hex(data) != pack:
        raise CorruptData(f"{where} fails its hash check")
    for b in iter_blobs(data, where):
        _need(len(b.id) == 32, where, "bad blob id")
        try:
            raw = decompress(b.codec, data[b.offset:b.offset + b.stored_len], b.raw_len,
                             limit=meta_blob_limit(b.stored_len))
        except CorruptData as exc:
            raise CorruptData(f"{where}: blob {b.id.hex()[:12]}: {exc}") from None
        bid = b.id.hex()
        if b.kind == KIND_TREE:
            if sha256_hex(raw) != bid:
                raise CorruptData(f"{where}: tree {bid[:12]} fails its hash check")
            try:
                tree = Tree.from_bytes(raw)
            except CorruptData as exc:
                raise CorruptData(f"{where}: tree {bid[:12]}: {exc}") from None
            check_tree(tree, f"{where}: tree {bid[:12]}")
            yield bid, raw
        elif b.kind == KIND_FILE:
            chunks = FileRecord.chunks_from_bytes(raw)
            yield FileRecord(bid, sum(n for _, n in chunks), chunks)
        else:
            raise CorruptData(f"{where}: unexpected blob kind {b.kind}")


class MetaPackBuilder:
    """Trees and file records packed like chunks (zstd when it pays), held in memory up to a target: the
    pack's bytes and, per blob, its metadata-table row (`table.packed_row`), nothing else."""

    def __init__(self) -> None:
        self._data = io.BytesIO()  # handed over without a copy by `finish`
        self._pack = PackBuilder(self._write, index=False)
        self._rows = bytearray()  # the table row of each blob, pack ordinal 0
        self._comp = Compressor(3)

    def _write(self, pieces: Sequence[Piece]) -> None:
        for piece in pieces:
            self._data.write(piece)

    @property
    def size(self) -> int:
        return self._pack.size

    @property
    def count(self) -> int:
        """Blobs added."""
        return len(self._rows) // _META_ROW_LEN

    @property
    def blobs(self) -> Iterator[tuple[int, str]]:
        """(kind, id) of each blob added, in order."""
        for pos in range(0, len(self._rows), _META_ROW_LEN):
            yield self._rows[pos + 32], self._rows[pos:pos + 32].hex()

    def add(self, kind: int, blob_id: str, raw: bytes) -> None:
        codec, stored = self._comp.compress(raw)
        b = self._pack.add(kind, codec, bytes.fromhex(blob_id), bytes(stored), len(raw))
        self._rows += table.packed_row(b.id + bytes((kind,)), 0, b.offset, b.stored_len, b.raw_len, b.codec)

    def packed_rows(self, ordinal: int) -> bytes:
        """The metadata-table rows of this pack's blobs, packed (`table.packed_row`; the pack is
        ``ordinal`` in the table's pack list)."""
        if ordinal:
            for pos in range(_META_KEY_LEN, len(self._rows), _META_ROW_LEN):
                _ORDINAL.pack_into(self._rows, pos, ordinal)
        return bytes(self._rows)

    def finish(self) -> tuple[str, bytes]:
        """(pack id, pack bytes)."""
        return self._pack.id, self._data.getvalue()


_META_KEY_LEN = table.KEY_LEN[table.KIND_META]
_META_ROW_LEN = _META_KEY_LEN + table.VALUE.size
_ORDINAL = struct.Struct("<I")  # a row's pack ordinal: the first field of `table.VALUE`


# -- location tables (format-2 versions): where chunks and metadata blobs sit, found by ranged reads -------

def meta_key_of(kind: int, blob_id: str) -> bytes:
    """The key of a tree (kind 1) or file record (kind 2) in a metadata table."""
    return bytes.fromhex(blob_id) + bytes((kind,))


def encode_chunk_table(packs: Sequence[tuple[str, int]], chunks: Iterable[ChunkLocation]) -> bytes:
    """The chunk table over ``packs`` ((id, size)) locating ``chunks``."""
    out = io.BytesIO()
    write_chunk_table(packs, chunks, out)
    return out.getvalue()


def write_chunk_table(packs: Sequence[tuple[str, int]], chunks: Iterable[ChunkLocation], out: IO[bytes]) -> str:
    """`encode_chunk_table` written to ``out`` in bounded memory (rows spilled to a temporary file as they
    come, `table.encode_file`); returns the table's SHA-256 (its name)."""
    with tempfile.TemporaryFile() as spill:
        write_chunk_rows(spill, packs, chunks)
        return table.encode_file(table.KIND_CHUNKS, packs, spill, out)


def write_chunk_rows(f: IO[bytes], packs: Sequence[tuple[str, int]], chunks: Iterable[ChunkLocation]) -> None:
    """Append the chunk-table rows of ``chunks`` to ``f`` (packed, their packs numbered as in ``packs``)."""
    ordinal = {p: i for i, (p, _) in enumerate(packs)}
    table.write_rows(f, table.KIND_CHUNKS, ((c.id, ordinal[c.pack], c.offset, c.stored_len, c.raw_len, c.codec)
                                            for c in chunks))


def upload_table(t: Transport, kind: int, packs: Sequence[tuple[str, int]], rows: IO[bytes],
                 announce: "Callable[[Iterable[str]], None] | None" = None) -> tuple[str, str]:
    """Encode the location table of ``rows`` (packed rows, `table.write_rows`) over ``packs`` to a
    temporary file (bounded memory, `table.encode_file`), ``announce`` its key (a push session: before
    it exists), upload it; returns (its name, its key)."""
    with tempfile.NamedTemporaryFile(prefix="tessera-table-") as out:
        name = table.encode_file(kind, packs, rows, out)
        out.flush()
        key = chunk_table_key(name) if kind == table.KIND_CHUNKS else meta_table_key(name)
        if announce is not None:
            announce([key])
        t.put_file(key, out.name)
    return name, key


def chunk_location(row: table.Row) -> ChunkLocation:
    return ChunkLocation(row.key, row.pack, row.offset, row.stored_len, row.raw_len, row.codec)


def decode_chunk_table(name: str, data: bytes, where: str) -> dict[str, tuple[int, list[ChunkLocation]]]:
    """A whole chunk table, checked (its SHA-256, and each pack's rows as `decode_index` checks an index):
    ``{pack: (size, rows in offset order)}``."""
    packs, rows = iter_chunk_table(name, data, where)
    out: dict[str, tuple[int, list[ChunkLocation]]] = {p: (size, []) for p, size in packs}
    for c in rows:
        out[c.pack][1].append(c)
    for p, (size, locs) in out.items():
        locs.sort(key=lambda c: c.offset)
        problem = check_index_rows(locs, size)
        if problem:
            raise CorruptData(f"{where}: pack {p[:12]}: {problem}")
    return out


def iter_chunk_table(name: str, data: bytes, where: str) -> tuple[tuple[tuple[str, int], ...], Iterator[ChunkLocation]]:
    """A whole chunk table checked against its SHA-256: its packs ((id, size)) and its rows, one at a
    time in key order, each checked as a table row; each pack's layout (`check_index_rows`, rows in
    offset order) is the caller's to check."""
    if sha256_hex(data) != name:
        raise CorruptData(f"{where} fails its hash check")
    head, rows = table.iter_table(data, where, kind=table.KIND_CHUNKS)
    return head.packs, (chunk_location(r) for r in rows)


def decode_meta_table(name: str, data: bytes, where: str) -> list[table.Row]:
    """A whole metadata table, checked (its SHA-256, blob kinds)."""
    if sha256_hex(data) != name:
        raise CorruptData(f"{where} fails its hash check")
    _, rows = table.decode(data, where, kind=table.KIND_META)
    _need(all(r.key[32] in (KIND_TREE, KIND_FILE) for r in rows), where, "a row of an unknown blob kind")
    return rows


class RemoteTable:
    """A location table on a remote, read by ranges: its head once, then one bucket of rows per key
    (neighbouring buckets in one request). Rows are checked as read; the blob a row points to is checked
    when fetched (`fetch_meta_blobs`, the chunk reader), so a lying table can make reads fail, never return
    wrong bytes."""

    def __init__(self, t: Transport, key: str, kind: int) -> None:
        self.t = t
        self.key = key
        self.kind = kind
        self.where = f"{t.url}/{key}"
        self._head: table.Head | None = None
        self._whole: bytes | None = None  # the whole table, once lookups hit it often (checked: its SHA-256)
        self._lock = threading.Lock()
        self.requests = 0

    def _get(self, start: int, length: int) -> bytes:
        self.requests += 1
        try:
            return self.t.get(self.key, start, start + length)
        except NotFound:
            raise CorruptData(f"{self.where} is missing (pruned or never pushed)") from None

    def head(self) -> table.Head:
        with self._lock:
            if self._head is None:
                data = self._get(0, TABLE_HEAD_GUESS)
                try:
                    self._head = table.decode_head(data, self.where, kind=self.kind)
                except table.NeedMore as more:
                    data = self._get(0, more.size)
                    self._head = table.decode_head(data, self.where, kind=self.kind)
            return self._head

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, table.Row]:
        """The rows of ``keys`` that this table holds: each key's bucket, neighbouring buckets (rows less
        than 16 KiB apart) in one ranged read, or from the whole table once lookups spread over it."""
        head = self.head()
        wanted: dict[int, list[bytes]] = {}
        for k in keys:
            wanted.setdefault(head.bucket(k), []).append(k)
        spans = [s for s in sorted((*head.bucket_span(b), b) for b in wanted) if s[1] > s[0]]
        if self._whole is None and (len(spans) > 4 or self.requests >= 16) and head.size <= WHOLE_TABLE_MAX:
            self.whole()  # reads spread over the table: one GET of all of it beats many
        out: dict[bytes, table.Row] = {}
        i = 0
        while i < len(spans):
            j = i
            while (self._whole is None and j + 1 < len(spans)
                   and (spans[j + 1][0] - spans[j][1]) * head.row_len < 16 << 10):
                j += 1
            first, end = spans[i][0], spans[j][1]
            rows = table.decode_rows(head, self._rows(head, first, end), first, self.where)
            for _, _, b in spans[i:j + 1]:
                for k in wanted[b]:
                    row = table.find(rows, k)
                    if row is not None:
                        out[k] = row
            i = j + 1
        return out

    def _rows(self, head: table.Head, first: int, end: int) -> bytes:
        start, length = head.rows_start + first * head.row_len, (end - first) * head.row_len
        data = self._whole[start:start + length] if self._whole is not None else self._get(start, length)
        if len(data) != length:
            raise CorruptData(f"{self.where} is malformed: truncated")
        return data

    def whole(self) -> bytes:
        """All of the table, read once and checked against its SHA-256 (its name)."""
        head = self.head()
        with self._lock:
            if self._whole is None:
                data = self._get(0, head.size)
                if len(data) != head.size or sha256_hex(data) != self.key.rsplit("/", 1)[-1]:
                    raise CorruptData(f"{self.where} fails its hash check")
                self._whole = data
            return self._whole


def fetch_meta_blobs(t: Transport, rows: Sequence[table.Row]) -> tuple[list[tuple[str, bytes]], list[FileRecord]]:
    """Fetch the trees and file records ``rows`` point at (ranged reads of their metadata packs, neighbours
    coalesced), each checked as a full metadata pull checks it: its blob header, decompression bounded,
    a tree's SHA-256 and tree rules."""
    trees: list[tuple[str, bytes]] = []
    files: list[FileRecord] = []
    by_pack: dict[str, list[table.Row]] = {}
    for r in rows:
        by_pack.setdefault(r.pack, []).append(r)
    lead = HEADER.size + 32
    for pack, group in by_pack.items():
        group.sort(key=lambda r: r.offset)
        key = meta_key(pack)
        where = f"{t.url}/{key}"
        i = 0
        while i < len(group):
            j = i
            while j + 1 < len(group) and group[j + 1].offset - lead - (group[j].offset + group[j].stored_len) < 64 << 10:
                j += 1
            start = group[i].offset - lead
            end = group[j].offset + group[j].stored_len
            _need(start >= len(PACK_MAGIC) and end - start <= META_PACK_MAX, where, "a blob outside the pack")
            try:
                data = t.get(key, start, end)
            except NotFound:
                raise CorruptData(f"{where} is missing (pruned or never pushed)") from None
            _need(len(data) == end - start, where, "truncated")
            for r in group[i:j + 1]:
                pos = r.offset - lead - start
                magic, kind, codec, id_len, _, raw_len, stored_len = HEADER.unpack_from(data, pos)
                blob_id = r.key[:32]
                ok = (magic == BLOB_MAGIC and kind == r.key[32] and codec == r.codec and id_len == 32
                      and raw_len == r.raw_len and stored_len == r.stored_len
                      and data[pos + HEADER.size:pos + lead] == blob_id)
                _need(ok, where, f"blob {blob_id.hex()[:12]} is not where its table says")
                body = data[pos + lead:pos + lead + r.stored_len]
                try:
                    raw = decompress(r.codec, body, r.raw_len, limit=meta_blob_limit(r.stored_len))
                except CorruptData as exc:
                    raise CorruptData(f"{where}: blob {blob_id.hex()[:12]}: {exc}") from None
                bid = blob_id.hex()
                if kind == KIND_TREE:
                    if sha256_hex(raw) != bid:
                        raise CorruptData(f"{where}: tree {bid[:12]} fails its hash check")
                    try:
                        tree = Tree.from_bytes(raw)
                    except CorruptData as exc:
                        raise CorruptData(f"{where}: tree {bid[:12]}: {exc}") from None
                    check_tree(tree, f"{where}: tree {bid[:12]}")
                    trees.append((bid, raw))
                else:
                    chunks = FileRecord.chunks_from_bytes(raw)
                    files.append(FileRecord(bid, sum(n for _, n in chunks), chunks))
            i = j + 1
    return trees, files


# -- lifecycle: layout, tombstones, push sessions, prune plans (remote layout 2) ---------------------------

LAYOUT_KEY = "layout"
LAYOUT = 2
"""The remote layout this tessera writes. Layout 1 (no ``layout`` object) is what the first tessera wrote:
packs, indexes, metadata packs, versions, history and tags. Layout 2 adds tombstones (forgotten history
entries), push sessions and prune plans; layout-1 readers still read it (they see no forgotten entry,
whose history object is deleted)."""

TOMBSTONES = "tombstones/"
SESSIONS = "sessions/"
PLANS = "prune/plans/"
SWEEPING = "prune/sweeping/"
DONE = "prune/done/"
SESSION_MAX = 64 << 20
PLAN_MAX = 256 << 20
SWEEPABLE_PREFIXES = ("packs/", "index/", "meta/", "versions/", "chunkidx/", "metaidx/", "packlist/")
"""The only kinds of object a prune deletes (history is forgotten by tombstones, never by a sweep)."""

_SWEEPABLE = re.compile(r"^(packs|index|meta|versions|chunkidx|metaidx|packlist)/[0-9a-f]{64}$")
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
_PLAN_NAME = re.compile(r"^\d{16}-[0-9a-f]{16}$")


def encode_layout() -> bytes:
    return _dumps({"format": FORMAT, "layout": LAYOUT})


def decode_layout(data: bytes, where: str) -> int:
    obj = _loads(data, where)
    n = obj.get("layout")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CorruptData(f"{where} is malformed: bad layout number")
    return n


def is_sweepable_key(key: str) -> bool:
    return bool(_SWEEPABLE.match(key))


def tombstone_prefix(dataset: str) -> str:
    return f"{TOMBSTONES}{dataset}/"


def tombstone_key(history: str) -> str:
    """The tombstone of history entry ``history/<dataset>/<name>``: ``tombstones/<dataset>/<name>``."""
    return TOMBSTONES + history.removeprefix("history/")


def history_key_of_tombstone(key: str) -> str:
    return "history/" + key.removeprefix(TOMBSTONES)


def encode_tombstone(history: str, hash: str, when: float, author: str) -> bytes:
    return _dumps({"format": FORMAT, "entry": history, "hash": hash, "time": when, "author": author})


def decode_tombstone(key: str, data: bytes, where: str) -> str:
    """The history key a tombstone forgets (it must be the one its own key names)."""
    obj = _loads(data, where)
    entry = history_key_of_tombstone(key)
    _need(obj.get("entry") == entry and parse_history_key(entry) is not None, where, "names another entry")
    return entry


@dataclass(frozen=True)
class SessionObject:
    """``sessions/<id>``: a push (or prune) in flight and every object it relies on. It is alive while
    its ``LastModified`` (rewritten as a heartbeat) is less than ``expiry`` seconds old."""

    id: str
    kind: str
    host: str
    started: float
    expiry: float
    keys: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return _dumps({"format": FORMAT, "id": self.id, "kind": self.kind, "host": self.host, "started": self.started,
                       "expiry": self.expiry, "keys": sorted(self.keys)})

    @classmethod
    def from_bytes(cls, key: str, data: bytes, where: str) -> SessionObject:
        obj = _loads(data, where)
        sid = key.removeprefix(SESSIONS)
        _need(obj.get("id") == sid and bool(_SESSION_ID.match(sid)), where, "its id disagrees with its key")
        _need(obj.get("kind") in ("push", "prune") and isinstance(obj.get("host"), str), where, "bad kind or host")
        for name in ("started", "expiry"):
            v = obj.get(name)
            _need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, where, f"bad {name}")
        keys = obj.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) and is_sweepable_key(k) for k in keys):
            raise CorruptData(f"{where} is malformed: bad key list")
        return cls(sid, obj["kind"], obj["host"], float(obj["started"]), float(obj["expiry"]), tuple(keys))


def session_key(session_id: str) -> str:
    return f"{SESSIONS}{session_id}"


@dataclass(frozen=True)
class Planned:
    """One object a plan found unreachable, as it was then (a changed object is not swept)."""

    key: str
    size: int
    etag: str | None
    modified: float | None


@dataclass(frozen=True)
class PlanObject:
    """``prune/plans/<name>``: what one mark found unreachable. Swept no sooner than ``margin`` seconds
    after the plan's own ``LastModified``, and only within ``window`` seconds of the sweep's start."""

    name: str
    created: float
    margin: float
    window: float
    candidates: tuple[Planned, ...]
    partial: tuple[tuple[str, int, int], ...] = ()  # (pack, size, dead bytes): live packs a repack could shrink

    def to_bytes(self) -> bytes:
        return _dumps({"format": FORMAT, "name": self.name, "created": self.created, "margin": self.margin,
                       "window": self.window,
                       "candidates": [[c.key, c.size, c.etag, c.modified] for c in self.candidates],
                       "partial": [list(p) for p in self.partial]})

    @classmethod
    def from_bytes(cls, name: str, data: bytes, where: str) -> PlanObject:
        obj = _loads(data, where)
        _need(obj.get("name") == name and bool(_PLAN_NAME.match(name)), where, "its name disagrees with its key")
        for field_ in ("created", "margin", "window"):
            v = obj.get(field_)
            _need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, where, f"bad {field_}")
        cands = obj.get("candidates")
        if not isinstance(cands, list):
            raise CorruptData(f"{where} is malformed: no candidate list")
        out = []
        for row in cands:
            ok = (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and is_sweepable_key(row[0])
                  and _is_count(row[1]) and (row[2] is None or isinstance(row[2], str))
                  and (row[3] is None or (isinstance(row[3], (int, float)) and not isinstance(row[3], bool))))
            _need(ok, where, f"bad candidate {str(row)[:80]}")
            out.append(Planned(row[0], row[1], row[2], None if row[3] is None else float(row[3])))
        partial = obj.get("partial", [])
        _need(isinstance(partial, list) and all(
            isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and bool(HEX64.match(p[0]))
            and _is_count(p[1]) and _is_count(p[2]) for p in partial), where, "bad partial list")
        return cls(name, float(obj["created"]), float(obj["margin"]), float(obj["window"]), tuple(out),
                   tuple((p[0], p[1], p[2]) for p in partial))


def plan_name(when: float, salt: str) -> str:
    return f"{int(round(when * 1e6)):016d}-{salt[:16]}"


def is_plan_name(name: str) -> bool:
    return bool(_PLAN_NAME.match(name))


def plan_key(name: str) -> str:
    return f"{PLANS}{name}"


def sweeping_key(name: str) -> str:
    return f"{SWEEPING}{name}"


def done_key(name: str) -> str:
    return f"{DONE}{name}"


def encode_sweep_mark(plan: str, when: float, host: str, deleted: Sequence[str] = (), spared: int = 0) -> bytes:
    return _dumps({"format": FORMAT, "plan": plan, "time": when, "host": host, "deleted": sorted(deleted),
                   "spared": spared})


def decode_sweep_mark(name: str, data: bytes, where: str) -> tuple[list[str], int]:
    """(keys deleted, objects spared) of a ``prune/sweeping/<name>`` or ``prune/done/<name>`` object."""
    obj = _loads(data, where)
    _need(obj.get("plan") == name, where, "names another plan")
    deleted = obj.get("deleted", [])
    _need(isinstance(deleted, list) and all(isinstance(k, str) for k in deleted), where, "bad deleted list")
    _need(_is_count(obj.get("spared", 0)), where, "bad spared count")
    return list(deleted), int(obj.get("spared", 0))
