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


def decompress(codec: int, stored: bytes, raw_len: int) -> bytes:
    if codec == RAW:
        return stored
    if codec == ZSTD:
        dctx = getattr(_local, "dctx", None)
        if dctx is None:
            dctx = _local.dctx = zstandard.ZstdDecompressor()
        try:
            return dctx.decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptData(f"zstd stream does not decode: {exc}") from None
    raise CorruptData(f"unknown codec byte {codec}")
