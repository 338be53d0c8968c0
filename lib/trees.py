"""Trees from the catalog (a `TreeSource` with an LRU of parsed trees) and the one Merkle-tree walker.

`walk_trees` is how anything walks a version: `Version.walk` (every path, in order), `version_closure`
(each tree once, children before parents: what push uploads and pull checks) and `tessera fsck`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tessera.catalog import Catalog
from tessera.errors import CorruptData
from tessera.format.pack import KIND_FILE, KIND_TREE
from tessera.lru import LRUCache
from tessera.model import DIR, ENTRY_BYTES, FILE, FileRecord, Tree

TREE_CACHE_BYTES = 64 * 1024 * 1024


class CatalogTrees:
    """Trees and file records of the local catalog, parsed trees kept in a bounded LRU."""

    def __init__(self, catalog: Catalog, cache_bytes: int = TREE_CACHE_BYTES) -> None:
        self.catalog = catalog
        self._trees: LRUCache[Tree] = LRUCache(cache_bytes, sizeof=lambda t: ENTRY_BYTES * len(t.entries) + 100)

    def load_tree(self, tree_id: str) -> Tree:
        tree = self._trees.get(tree_id)
        if tree is None:
            data = self.catalog.tree(tree_id)
            if data is None:
                raise CorruptData(f"tree {tree_id[:12]} is missing from the catalog")
            tree = Tree.from_bytes(data)
            self._trees.put(tree_id, tree)
        return tree

    def file_record(self, file_id: str) -> FileRecord:
        rec = self.catalog.file(file_id)
        if rec is None:
            raise CorruptData(f"file record {file_id[:12]} is missing from the catalog")
        return rec

    def file_records(self, file_ids: Sequence[str]) -> dict[str, FileRecord]:
        return self.catalog.files_by_id(file_ids)


def walk_trees(load: Callable[[str], Tree], root: str, *, seen: set[str] | None = None, reverse: bool = False,
               base: str = "") -> Iterator[tuple[bool, str, str, Tree]]:
    """Depth-first events ``(leaving, path, tree id, tree)``: each tree is entered (``leaving`` False)
    before its subtrees and left after them.

    Subdirectories are visited in name order (``reverse``: the opposite). ``seen``: tree ids to skip,
    with their subtrees; each tree entered is added, so a tree shared by several paths or versions is
    walked once. Without it every path is walked (what a listing needs)."""
    stack: list[tuple[str, str, Tree | None]] = [(base, root, None)]
    while stack:
        path, tid, left = stack.pop()
        if left is not None:
            yield True, path, tid, left
            continue
        if seen is not None:
            if tid in seen:
                continue
            seen.add(tid)
        tree = load(tid)
        yield False, path, tid, tree
        stack.append((path, tid, tree))
        subdirs = [(f"{path}/{e.name}" if path else e.name, e.id, None) for e in tree.entries
                   if e.kind == DIR and e.id is not None]
        stack.extend(subdirs if reverse else reversed(subdirs))


def iter_trees(load: Callable[[str], Tree], root: str, *, seen: set[str] | None = None,
               base: str = "") -> Iterator[tuple[str, str, Tree]]:
    """``(path, tree id, tree)`` of ``root`` and every tree below it, parents first, in name order."""
    for leaving, path, tid, tree in walk_trees(load, root, seen=seen, base=base):
        if not leaving:
            yield path, tid, tree


@dataclass
class Closure:
    """Everything a version references: trees and file records (children before their parents, so a
    prefix of this list never names a tree whose subtrees come later) and the data packs."""

    blobs: list[tuple[int, str]] = field(default_factory=list)
    packs: set[str] = field(default_factory=set)
    files: int = 0  # file entries (paths), counting duplicates
    size: int = 0


def version_closure(catalog: Catalog, root: str, trees: CatalogTrees | None = None) -> Closure:
    """Walk a version in the catalog. `CorruptData` if a tree, file record or chunk is missing, or if
    a recorded size disagrees with what it sums up (a file's chunks, a directory's entries).

    The order of ``blobs`` is part of what push writes (metadata pack ids): file records when their
    tree is entered, the tree when it is left, subdirectories last name first."""
    walk = ClosureWalk(catalog, root, trees)
    out = Closure()
    for batch in walk:
        out.blobs.extend(batch)
    out.packs, out.files, out.size = walk.packs, walk.files, walk.size
    return out


def closure_totals(catalog: Catalog, root: str) -> Closure:
    """`version_closure` without its blob list (packs, files, size; every check): bounded memory."""
    walk = ClosureWalk(catalog, root, seen_limit=100_000)
    for _ in walk:
        pass
    return Closure(packs=walk.packs, files=walk.files, size=walk.size)


class ClosureWalk:
    """`version_closure` in batches, for what must not hold a million-file version in memory (push):
    iterate for the blobs (``batch`` at a time, the same order), then read ``packs``, ``files``, ``size``.

    ``seen_limit``: remember at most this many file ids to skip a file record met again (the oldest are
    forgotten: a duplicate further apart is yielded twice, which consumers must tolerate); None: all."""

    def __init__(self, catalog: Catalog, root: str, trees: CatalogTrees | None = None, *, batch: int = 4096,
                 seen_limit: int | None = None) -> None:
        self.catalog = catalog
        self.root = root
        self.source = trees or CatalogTrees(catalog, cache_bytes=0)
        self.batch = batch
        self.seen_limit = seen_limit
        self.packs: set[str] = set()
        self.files = 0
        self.size = 0

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        root, catalog = self.root, self.catalog
        sizes: dict[str, int] = {}
        seen_files: dict[str, None] = {}
        pending: list[bytes] = []
        out: list[tuple[int, str]] = []
        self.packs, self.files = set(), 0
        for leaving, _, tid, tree in walk_trees(self.source.load_tree, root, seen=set(), reverse=True):
            if leaving:
                for e in tree.entries:
                    if e.kind == DIR and e.id is not None:
                        if sizes[e.id] != e.size:
                            raise CorruptData(f"version {root[:12]}: directory {e.name!r} says {e.size} bytes, its "
                                              f"entries {sizes[e.id]}")
                sizes[tid] = tree.size
                out.append((KIND_TREE, tid))
            else:
                ids = []
                for e in tree.entries:
                    if e.kind != FILE or e.id is None:
                        continue
                    self.files += 1
                    if e.id not in seen_files:
                        seen_files[e.id] = None
                        ids.append((e.id, e.size))
                if self.seen_limit is not None:
                    while len(seen_files) > self.seen_limit:
                        del seen_files[next(iter(seen_files))]
                for i in range(0, len(ids), 512):
                    part = ids[i:i + 512]
                    recs = catalog.files_by_id([fid for fid, _ in part])
                    for fid, size in part:
                        rec = recs.get(fid)
                        if rec is None:
                            raise CorruptData(f"version {root[:12]}: file record {fid[:12]} is missing")
                        if rec.size != size:
                            raise CorruptData(f"version {root[:12]}: file {fid[:12]} has {rec.size} bytes of chunks, "
                                              f"its tree entry says {size}")
                        out.append((KIND_FILE, fid))
                        pending.extend(cid for cid, _ in rec.chunks)
                    if len(pending) >= 4096:
                        _add_packs(catalog, root, pending, self.packs)
            if len(out) >= self.batch:
                yield out
                out = []
        _add_packs(catalog, root, pending, self.packs)
        if out:
            yield out
        self.size = sizes[root]


def _add_packs(catalog: Catalog, root: str, ids: list[bytes], packs: set[str]) -> None:
    if not ids:
        return
    unique = list(dict.fromkeys(ids))
    found = catalog.chunks_by_id(unique)
    for cid in unique:
        loc = found.get(cid)
        if loc is None:
            raise CorruptData(f"version {root[:12]} needs chunk {cid.hex()}, which is not in the store")
        packs.add(loc.pack)
    ids.clear()
