"""The narrow roles readers depend on (restic's ``BlobLoader``, dulwich's object containers).

`Version`, `VersionFS`, export and every other reader take these, never a `Repo`:

- a `TreeSource` gives trees and file records by id;
- a `ChunkSource` gives chunk locations and their bytes, verified, and takes read-ahead hints.

`tessera.trees.CatalogTrees` and `tessera.reader.ChunkReader` implement them over the local catalog and
store (with lazy remote fetches); a test or another backend can implement them over anything else.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Union

from tessera.model import ChunkLocation, FileRecord, Tree
from tessera.store import FileRange

Segment = Union[bytes, FileRange]
"""Part of a read: bytes in memory, or verified bytes in a local pack for the caller to ``pread``."""


class TreeSource(Protocol):
    def load_tree(self, tree_id: str) -> Tree:
        """The tree with this id (`CorruptData` if it is missing)."""

    def file_record(self, file_id: str) -> FileRecord:
        """The chunk list of the file with this SHA-256 (`CorruptData` if it is missing)."""

    def file_records(self, file_ids: Sequence[str]) -> dict[str, FileRecord]:
        """Many file records at once; ids not found are absent."""


class ChunkSource(Protocol):
    def locations(self, chunk_ids: Sequence[bytes]) -> dict[bytes, ChunkLocation]:
        """Where each chunk is; ids not found are absent."""

    def is_local(self, pack: str) -> bool:
        """Whether the pack's bytes are here (else reads of it go to a remote)."""

    def read_chunk(self, loc: ChunkLocation) -> bytes:
        """The chunk's raw bytes, verified against its id (`CorruptData`, `RemoteError` otherwise)."""

    def segment(self, loc: ChunkLocation, lo: int, hi: int) -> Segment:
        """Bytes ``[lo, hi)`` of the chunk, verified, as bytes or as a range of a local pack."""

    def will_need(self, locs: Sequence[ChunkLocation]) -> None:
        """A reader is about to read these chunks in this order (a hint: start fetching them)."""
