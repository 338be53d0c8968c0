"""Per-chunk codecs. Each codec has a stable on-disk id byte (never reuse a number)."""
from __future__ import annotations

import threading

import zstandard

from tessera.errors import CorruptData

RAW = 0
ZSTD = 1
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd"}

# A chunk is stored compressed only when zstd saves at least this fraction (else: raw, so reads are a pread).
MIN_SAVING = 0.03
_SAMPLE = 4096
_SAMPLE_MIN = 32 * 1024


class Compressor:
    """zstd at a fixed level with an incompressibility probe; one per thread (see `thread_compressor`)."""

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self._zc = zstandard.ZstdCompressor(level=level)
        self._probe = zstandard.ZstdCompressor(level=1)

    def compress(self, data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        """Return (codec, stored bytes). Random-looking data (JPEG, PNG, npz) is detected on a 4 KiB
        sample first, so we do not pay for compressing what will not shrink."""
        n = len(data)
        if n == 0:
            return RAW, data
        if n >= _SAMPLE_MIN:
            mid = n // 2
            sample = data[mid:mid + _SAMPLE]
            if len(self._probe.compress(sample)) > len(sample) * (1 - MIN_SAVING):
                return RAW, data
        packed = self._zc.compress(data)
        if len(packed) > n * (1 - MIN_SAVING):
            return RAW, data
        return ZSTD, packed


_local = threading.local()


def thread_compressor(level: int) -> Compressor:
    comp = getattr(_local, "compressor", None)
    if comp is None or comp.level != level:
        comp = _local.compressor = Compressor(level)
    return comp


MAX_CHUNK = 16 * 1024 * 1024  # no chunker setting cuts bigger chunks (ChunkParams refuses them)
META_BLOB_MAX = 256 * 1024 * 1024  # a tree or file record: ~1.8 M entries in one directory
META_RATIO = 64  # trees and chunk lists hold hashes: they never shrink 64-fold (a bomb does)


def meta_blob_limit(stored_len: int) -> int:
    """The most raw bytes a metadata blob of ``stored_len`` stored bytes may decode to."""
    return min(META_BLOB_MAX, max(64 * 1024, META_RATIO * stored_len))


def decompress(codec: int, stored: bytes | memoryview, raw_len: int, limit: int = MAX_CHUNK) -> bytes:
    """The raw bytes of one blob, exactly ``raw_len`` of them (else `CorruptData`).

    Bounded before anything is allocated: ``raw_len`` must not pass ``limit``, and a zstd frame whose
    header declares a different size is refused unread (python-zstandard allocates what a frame
    declares). A frame that declares nothing is decoded through a reader that stops at ``raw_len``."""
    if not 0 <= raw_len <= limit:
        raise CorruptData(f"blob claims {raw_len} raw bytes, more than the {limit} allowed")
    if codec == RAW:
        if len(stored) != raw_len:
            raise CorruptData(f"raw blob has {len(stored)} bytes, expected {raw_len}")
        return bytes(stored)
    if codec != ZSTD:
        raise CorruptData(f"unknown codec byte {codec}")
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        declared = zstandard.frame_content_size(stored)
        if declared == -1:  # no size in the header: read at most one byte more than expected
            with dctx.stream_reader(stored) as reader:
                data = reader.read(raw_len + 1)
        elif declared != raw_len:
            raise CorruptData(f"zstd frame declares {declared} bytes, expected {raw_len}")
        else:
            data = dctx.decompress(stored, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"zstd stream does not decode: {exc}") from None
    if len(data) != raw_len:
        raise CorruptData(f"zstd stream decodes to {len(data)} bytes, expected {raw_len}")
    return data
