"""Pack files: many blobs appended to one file, each with a self-describing header.

    pack   := PACK_MAGIC blob*
    blob   := header id stored_bytes
    header := BLOB_MAGIC(4) kind(u8) codec(u8) id_len(u8) reserved(u8) raw_len(u32 LE) stored_len(u32 LE)

The pack id is the SHA-256 of the whole pack file. Because every blob carries its id, codec and
lengths, a pack's index can always be rebuilt from the pack alone (`iter_blobs`).
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tessera.errors import CorruptData
from tessera.ids import Buffer

PACK_MAGIC = b"TSPACK01"
BLOB_MAGIC = b"TSB1"
HEADER = struct.Struct("<4sBBBBII")

KIND_CHUNK = 0  # file bytes; id = xxh3-128 of the raw bytes
KIND_TREE = 1   # canonical tree bytes; id = SHA-256
KIND_FILE = 2   # a file record (chunk list); id = the file's SHA-256


@dataclass(frozen=True)
class BlobInfo:
    """Where one blob sits in a pack. `offset` points at the stored bytes (after header and id)."""

    kind: int
    codec: int
    id: bytes
    offset: int
    raw_len: int
    stored_len: int


def encode_header(kind: int, codec: int, blob_id: bytes, raw_len: int, stored_len: int) -> bytes:
    return HEADER.pack(BLOB_MAGIC, kind, codec, len(blob_id), 0, raw_len, stored_len) + blob_id


Piece = bytes | memoryview


class PackBuilder:
    """Lays out one pack: the magic, then each blob's header, id and stored bytes, keeping the running
    SHA-256 (the pack id) and the index of its blobs. Where the bytes go is the caller's business:
    ``write`` receives the pieces of each blob in order (a file for data packs, memory for metadata packs).
    With ``index=False`` it keeps no `BlobInfo` (``blobs`` stays empty: the caller keeps what `add` returns).
    """

    def __init__(self, write: Callable[[Sequence[Piece]], None], *, index: bool = True) -> None:
        self._write = write
        self._index = index
        self._hash = hashlib.sha256(PACK_MAGIC)
        write((PACK_MAGIC,))
        self.size = len(PACK_MAGIC)
        self.blobs: list[BlobInfo] = []

    def add(self, kind: int, codec: int, blob_id: bytes, stored: Piece, raw_len: int) -> BlobInfo:
        header = encode_header(kind, codec, blob_id, raw_len, len(stored))
        self._write((header, stored))
        self._hash.update(header)
        self._hash.update(stored)
        info = BlobInfo(kind, codec, blob_id, self.size + len(header), raw_len, len(stored))
        if self._index:
            self.blobs.append(info)
        self.size += len(header) + len(stored)
        return info

    @property
    def id(self) -> str:
        """The pack id: SHA-256 of every byte written so far."""
        return self._hash.hexdigest()


def iter_blobs(data: Buffer, name: str = "pack") -> Iterator[BlobInfo]:
    """Parse a whole pack held in memory (or mmap); raises CorruptData on any inconsistency."""
    view = memoryview(data)
    if bytes(view[: len(PACK_MAGIC)]) != PACK_MAGIC:
        raise CorruptData(f"{name}: not a tessera pack (bad magic)")
    pos = len(PACK_MAGIC)
    end = len(view)
    while pos < end:
        if end - pos < HEADER.size:
            raise CorruptData(f"{name}: truncated blob header at offset {pos}")
        magic, kind, codec, id_len, _, raw_len, stored_len = HEADER.unpack_from(view, pos)
        if magic != BLOB_MAGIC:
            raise CorruptData(f"{name}: bad blob magic at offset {pos}")
        start = pos + HEADER.size + id_len
        if start + stored_len > end:
            raise CorruptData(f"{name}: truncated blob at offset {pos}")
        blob_id = bytes(view[pos + HEADER.size: start])
        yield BlobInfo(kind, codec, blob_id, start, raw_len, stored_len)
        pos = start + stored_len
