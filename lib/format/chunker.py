"""Content-defined chunking (FastCDC 2020, normalized, compiled `pyfastcdc`).

Cut points depend only on content, so an insert in the middle of a big file changes only the chunks
around it. The parameters are a repository setting and part of the *store* format (they decide which
chunks exist), never of version identity (file ids are SHA-256 of whole files).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import BinaryIO, Iterator

import pyfastcdc

from tessera.errors import UsageError


@dataclass(frozen=True)
class ChunkParams:
    """FastCDC sizes in bytes. pyfastcdc's real mean chunk is about ``avg + min``."""

    min_size: int = 128 * 1024
    avg_size: int = 256 * 1024
    max_size: int = 2 * 1024 * 1024
    normalization: int = 1

    def __post_init__(self) -> None:
        if not (64 <= self.min_size <= self.avg_size <= self.max_size <= 16 * 1024 * 1024):
            raise UsageError(
                f"bad chunk sizes min={self.min_size} avg={self.avg_size} max={self.max_size}: "
                "need 64 <= min <= avg <= max <= 16 MiB"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Chunker:
    """Cuts files or buffers into content-defined chunks; one instance per thread."""

    def __init__(self, params: ChunkParams) -> None:
        self.params = params
        self._cdc = pyfastcdc.FastCDC(
            avg_size=params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
        )

    def cut_stream(self, stream: BinaryIO) -> Iterator[memoryview]:
        """Chunks of a stream, in order; each memoryview is valid until the next one is asked for."""
        for chunk in self._cdc.cut_stream(stream):
            yield chunk.data

    def cut_buf(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        if len(buf) <= self.params.min_size:
            yield memoryview(buf)
            return
        for chunk in self._cdc.cut_buf(buf):
            yield chunk.data
