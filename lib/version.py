"""A committed version as the Python API sees it: browse, read, filter.

    v = repo.get("coco@3f2a9c")
    for e in v.walk("train/"):
        print(e.path, e.size, e.sha256, e.meta)
    with v.open("annotations.json") as f: ...
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.errors import NotFound, UsageError
from tessera.model import DIR, FILE, Entry, FileRecord, HistoryEntry, Tree, TreeEntry
from tessera.reader import FileReader
from tessera.sources import ChunkSource, TreeSource
from tessera.trees import iter_trees


def split_path(path: str) -> list[str]:
    return [p for p in path.strip("/").split("/") if p and p != "."]


class Version:
    """An immutable snapshot: ``name@hash`` plus its history entry (time, message, meta).

    It reads through two roles (`tessera.sources`): ``trees`` for its directories and file records,
    ``chunks`` for file bytes; ``home`` is where a mount of it is registered."""

    def __init__(self, info: HistoryEntry, trees: TreeSource, chunks: ChunkSource, home: str | Path) -> None:
        self.info = info
        self.trees = trees
        self.chunks = chunks
        self.home = Path(home)

    name = property(lambda self: self.info.dataset)
    hash = property(lambda self: self.info.hash)
    time = property(lambda self: self.info.time)
    message = property(lambda self: self.info.message)
    meta = property(lambda self: self.info.meta)
    files = property(lambda self: self.info.files)
    size = property(lambda self: self.info.size)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.hash}"

    def __repr__(self) -> str:
        return f"<Version {self.name}@{self.hash[:12]} files={self.files} size={self.size}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and other.hash == self.hash and other.name == self.name

    def __hash__(self) -> int:
        return hash((self.name, self.hash))

    # -- browsing ---------------------------------------------------------------------------------

    def tree(self, tree_id: str | None = None) -> Tree:
        return self.trees.load_tree(tree_id or self.hash)

    def entry(self, path: str) -> Entry:
        parts = split_path(path)
        if not parts:
            return Entry("", DIR, 0o755, self.size, tree_id=self.hash)
        tree = self.tree()
        for i, name in enumerate(parts):
            te = tree.by_name.get(name)
            if te is None:
                raise NotFound(f"{self.name}@{self.hash[:12]} has no path {path!r}")
            rel = "/".join(parts[: i + 1])
            if i == len(parts) - 1:
                return _to_entry(rel, te)
            if te.kind != DIR:
                raise NotFound(f"{self.name}@{self.hash[:12]}: {'/'.join(parts[:i + 1])!r} is not a directory")
            tree = self.tree(te.id)
        raise AssertionError("unreachable")

    def listdir(self, path: str = "") -> list[Entry]:
        e = self.entry(path)
        if e.kind != DIR:
            raise UsageError(f"{path!r} is not a directory")
        base = e.path
        return [_to_entry(f"{base}/{te.name}" if base else te.name, te) for te in self.tree(e.tree_id).entries]

    def walk(self, prefix: str = "", *, dirs: bool = False) -> Iterator[Entry]:
        """Every entry under ``prefix`` (depth first, sorted); directories only with ``dirs=True``."""
        start = self.entry(prefix)
        if start.kind != DIR or start.tree_id is None:
            yield start
            return
        for path, _, tree in iter_trees(self.trees.load_tree, start.tree_id, base=start.path):
            for te in tree.entries:
                if te.kind != DIR or dirs:
                    yield _to_entry(f"{path}/{te.name}" if path else te.name, te)

    def __iter__(self) -> Iterator[Entry]:
        return self.walk()

    # -- reading ----------------------------------------------------------------------------------

    def file_record(self, entry: Entry | str) -> FileRecord:
        e = self.entry(entry) if isinstance(entry, str) else entry
        if e.kind != FILE or e.sha256 is None:
            raise UsageError(f"{e.path!r} is not a file")
        return self.trees.file_record(e.sha256)

    def reader(self, entry: Entry | str) -> FileReader:
        """The file's bytes by offset (what `open`, the mount and fsspec read through)."""
        return FileReader(self.chunks, self.file_record(entry))

    def open(self, path: str | Entry) -> VersionFile:
        """A seekable binary file object; reads only the chunks it needs, with read-ahead."""
        return VersionFile(self.reader(path))

    def read_bytes(self, path: str) -> bytes:
        with self.open(path) as f:
            return f.read()

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding)

    # -- deriving ---------------------------------------------------------------------------------

    def filter(self, fn: Callable[[Entry], bool], prefix: str = "") -> "Selection":
        """Entries (files and symlinks) for which ``fn(entry)`` is true; commit them with
        ``repo.commit_version(name, selection)`` to make a derived dataset without copying bytes."""
        return Selection([e for e in self.walk(prefix) if fn(e)], source=self)

    def mount(self, mountpoint: str, **options: Any) -> AbstractContextManager[str]:
        """``with v.mount('/mnt/data'): ...`` mounts this version read-only for the block."""
        from tessera.mounting import mounted

        return mounted(self.home, self.ref, mountpoint, **options)


@dataclass
class Selection:
    entries: list[Entry]
    source: Version | None = None

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def filter(self, fn: Callable[[Entry], bool]) -> "Selection":
        return Selection([e for e in self.entries if fn(e)], self.source)


def _to_entry(path: str, te: TreeEntry) -> Entry:
    return Entry(path, te.kind, te.mode, te.size, te.id if te.kind == FILE else None, te.target, te.meta,
                 te.id if te.kind == DIR else None)


class VersionFile(io.RawIOBase):
    """A seekable, read-only binary file over a `FileReader`: reads only the chunks it needs, and a
    sequential reader gets the reader's read-ahead."""

    def __init__(self, reader: FileReader) -> None:
        super().__init__()
        self._reader = reader
        self._pos = 0

    @property
    def size(self) -> int:
        return self._reader.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._reader.size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        for seg in self._reader.read_plan(self._pos, len(view)):
            if isinstance(seg, bytes):
                view[done:done + len(seg)] = seg
                done += len(seg)
            else:  # a verified range of a local pack: read it straight into the caller's buffer
                done += seg.read_into(view[done:])
        self._pos += done
        return done

    def readall(self) -> bytes:
        data = self._reader.read(self._pos, max(0, self._reader.size - self._pos))
        self._pos += len(data)
        return data


@dataclass(frozen=True)
class Change:
    status: str  # "added" | "removed" | "modified"
    path: str
    old: Entry | None
    new: Entry | None


def diff_versions(a: Version, b: Version) -> list[Change]:
    """Paths added, removed or modified from ``a`` to ``b``; unchanged subtrees are skipped by id."""
    out: list[Change] = []

    def walk(ta: str | None, tb: str | None, base: str) -> None:
        if ta == tb:
            return
        ea = {e.name: e for e in a.tree(ta).entries} if ta else {}
        eb = {e.name: e for e in b.tree(tb).entries} if tb else {}
        for name in sorted(set(ea) | set(eb)):
            x, y = ea.get(name), eb.get(name)
            path = f"{base}/{name}" if base else name
            xd = x is not None and x.kind == DIR
            yd = y is not None and y.kind == DIR
            if xd or yd:
                if x is not None and not xd:
                    out.append(Change("removed", path, _to_entry(path, x), None))
                if y is not None and not yd:
                    out.append(Change("added", path, None, _to_entry(path, y)))
                walk(x.id if xd else None, y.id if yd else None, path)  # type: ignore[union-attr]
            elif x is None:
                assert y is not None
                out.append(Change("added", path, None, _to_entry(path, y)))
            elif y is None:
                out.append(Change("removed", path, _to_entry(path, x), None))
            elif x != y:
                out.append(Change("modified", path, _to_entry(path, x), _to_entry(path, y)))

    walk(a.hash, b.hash, "")
    return sorted(out, key=lambda c: c.path)


def entries_of(source: "Version | Selection | Iterable[Entry]") -> list[Entry]:
    if isinstance(source, Version):
        return list(source.walk(dirs=True))
    return list(source)
