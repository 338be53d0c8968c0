"""The domain objects every layer shares: entries, trees, file records, history.

Trees have one canonical byte encoding (`Tree.to_bytes`); its SHA-256 is the tree id, and the root
tree id is the version hash. The encoding holds only content (names, kinds, modes, sizes, ids, symlink
targets, per-entry metadata), never time, machine or chunking, so equal directories hash equal anywhere.
"""
from __future__ import annotations

import json
import stat
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

from tessera.errors import CorruptData
from tessera.ids import sha256_hex

_new_object = object.__new__
FILE, DIR, SYMLINK = "file", "dir", "symlink"
KINDS = (FILE, DIR, SYMLINK)
TREE_FORMAT = 1
ENTRY_BYTES = 650  # memory of one parsed TreeEntry (object, attribute dict, name and id strings), measured


def normalize_mode(kind: str, st_mode: int) -> int:
    """Modes are kept like git keeps them: executable or not. Umask noise must not change hashes."""
    if kind == DIR:
        return 0o755
    if kind == SYMLINK:
        return 0o777
    return 0o755 if st_mode & 0o111 else 0o644


@dataclass(frozen=True)
class TreeEntry:
    """One child of a directory. `id` is the file's SHA-256, or the subtree id; None for symlinks."""

    name: str
    kind: str
    mode: int
    size: int
    id: str | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": self.name, "kind": self.kind, "mode": self.mode, "size": self.size}
        if self.id is not None:
            obj["id"] = self.id
        if self.target is not None:
            obj["target"] = self.target
        if self.meta:
            obj["meta"] = self.meta
        return obj

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> "TreeEntry":
        name = obj["name"]
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
            raise CorruptData(f"tree entry has an unsafe name: {name!r}")
        if obj["kind"] not in KINDS:
            raise CorruptData(f"tree entry {name!r} has unknown kind {obj['kind']!r}")
        # Trees are parsed entry by entry (a mount lists million-entry versions): filling the instance's
        # __dict__ directly is ~2.5x faster than the frozen dataclass's __init__ (one setattr per field).
        entry = _new_object(cls)
        entry.__dict__.update(name=name, kind=obj["kind"], mode=int(obj["mode"]), size=int(obj["size"]),
                              id=obj.get("id"), target=obj.get("target"), meta=obj.get("meta") or {})
        return entry


@dataclass(frozen=True)
class Tree:
    entries: tuple[TreeEntry, ...]

    @classmethod
    def of(cls, entries: Iterable[TreeEntry]) -> "Tree":
        return cls(tuple(sorted(entries, key=lambda e: e.name.encode("utf-8", "surrogateescape"))))

    def to_bytes(self) -> bytes:
        body = {"format": TREE_FORMAT, "entries": [e.to_obj() for e in self.entries]}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Tree":
        try:
            body = json.loads(data)
            if body.get("format") != TREE_FORMAT:
                raise CorruptData(f"tree has unknown format {body.get('format')!r}")
            return cls(tuple(TreeEntry.from_obj(e) for e in body["entries"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"malformed tree object: {exc}") from None

    @property
    def id(self) -> str:
        return sha256_hex(self.to_bytes())

    @cached_property
    def by_name(self) -> dict[str, TreeEntry]:
        return {e.name: e for e in self.entries}

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


_CHUNK_REF = struct.Struct("<16sI")


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file's identity and layout: SHA-256, size, and its chunks (xxh3-128 id, raw length) in order."""

    id: str
    size: int
    chunks: tuple[tuple[bytes, int], ...]

    def chunks_to_bytes(self) -> bytes:
        return b"".join(_CHUNK_REF.pack(cid, n) for cid, n in self.chunks)

    @staticmethod
    def chunks_from_bytes(data: bytes) -> tuple[tuple[bytes, int], ...]:
        if len(data) % _CHUNK_REF.size:
            raise CorruptData("malformed chunk list")
        return tuple(_CHUNK_REF.iter_unpack(data))


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where a chunk's stored bytes are: pack, offset of the stored bytes, lengths and codec."""

    id: bytes
    pack: str
    offset: int
    stored_len: int
    raw_len: int
    codec: int


@dataclass(frozen=True)
class Entry:
    """A path in a version, as the Python API and the CLI show it."""

    path: str
    kind: str
    mode: int
    size: int
    sha256: str | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tree_id: str | None = None

    @property
    def is_file(self) -> bool:
        return self.kind == FILE

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def is_symlink(self) -> bool:
        return self.kind == SYMLINK

    @property
    def st_mode(self) -> int:
        kind_bits = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}[self.kind]
        return kind_bits | self.mode

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "mode": self.mode, "size": self.size}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.target is not None:
            out["target"] = self.target
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass(frozen=True)
class HistoryEntry:
    """One commit of a dataset: which version, when, by whom, why. Not part of the version's identity."""

    dataset: str
    hash: str
    parent: str | None
    time: float
    author: str
    message: str
    meta: dict[str, Any]
    files: int = 0
    size: int = 0
    seq: int = 0
