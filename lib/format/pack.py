"""Pack files: many blobs appended to one file, each with a self-describing header.

    pack   := PACK_MAGIC blob*
    blob   := header id stored_bytes
    header := BLOB_MAGIC(4) kind(u8) codec(u8) id_len(u8) reserved(u8) raw_len(u32 LE) stored_len(u32 LE)

The pack id is the SHA-256 of the whole pack file. Because every blob carries its id, codec and
lengths, a pack's index can always be rebuilt from the pack alone (`iter_blobs`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from tessera.errors import CorruptData

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


def iter_blobs(data: bytes | memoryview, name: str = "pack") -> Iterator[BlobInfo]:
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
