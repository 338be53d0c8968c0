"""Build Merkle trees bottom-up: one directory at a time (`encode_tree`, `TreeBatch`: what a commit does as
each directory completes) or from a flat list of entries (`build_trees`: derived datasets)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from tessera.catalog import Catalog
from tessera.errors import UsageError
from tessera.ids import sha256_hex
from tessera.model import DIR, FILE, Entry, Tree, TreeEntry


@dataclass
class BuiltTrees:
    root_id: str
    trees: list[tuple[str, bytes]]
    files: int
    size: int
    dirs: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # rel path -> (tree id, size, files)


@dataclass(frozen=True, slots=True)
class BuiltTree:
    """One directory's tree: its id, canonical bytes, total file bytes and file count below it."""

    id: str
    data: bytes
    size: int
    files: int


def encode_tree(entries: Iterable[TreeEntry], files_below: int = 0) -> BuiltTree:
    """The tree of one directory from its entries (any order). ``files_below``: files in its subdirectories."""
    tree = Tree.of(entries)
    data = tree.to_bytes()
    files = files_below + sum(1 for e in tree.entries if e.kind == FILE)
    return BuiltTree(sha256_hex(data), data, tree.size, files)


class TreeBatch:
    """Trees waiting to be written to the catalog, written in batches of about ``max_bytes`` (children are
    added before their parents, so a tree in the catalog always has its subtrees there too)."""

    def __init__(self, catalog: Catalog, max_bytes: int = 4 << 20) -> None:
        self.catalog = catalog
        self.max_bytes = max_bytes
        self._trees: list[tuple[str, bytes]] = []
        self.bytes = 0
        self.written = 0

    def add(self, tree: BuiltTree) -> None:
        self._trees.append((tree.id, tree.data))
        self.bytes += len(tree.data) + 150
        if self.bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self._trees:
            self.catalog.add_trees(self._trees)
            self.written += len(self._trees)
        self._trees = []
        self.bytes = 0


def check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise UsageError(f"unsafe path in version: {path!r}")
    return path


def build_trees(entries: Iterable[Entry], prebuilt: dict[str, tuple[str, int, int]] | None = None) -> BuiltTrees:
    """Entries are files, symlinks and (optionally, for empty dirs or dir metadata) dirs; parent
    directories are implied by paths. ``prebuilt`` maps directory paths to an existing
    (tree id, size, files) whose contents are not listed in ``entries``."""
    prebuilt = prebuilt or {}
    children: dict[str, dict[str, Entry | None]] = {"": {}}
    for path in prebuilt:
        parent, _, name = check_path(path).rpartition("/")
        children.setdefault(parent, {})[name] = None
    dir_meta: dict[str, Entry] = {}
    for e in entries:
        parent, _, name = check_path(e.path).rpartition("/")
        if e.kind == DIR:
            dir_meta[e.path] = e
            children.setdefault(e.path, {})
        else:
            kids = children.get(parent)
            if kids is None:
                kids = children[parent] = {}
            if name in kids:
                raise UsageError(f"duplicate path in version: {e.path!r}")
            kids[name] = e
    # every directory is listed in its parent (creating implied ancestors)
    for d in list(children) + list(prebuilt):
        while d:
            parent, _, name = d.rpartition("/")
            kids = children.setdefault(parent, {})
            if name in kids:
                if kids[name] is not None:
                    raise UsageError(f"path is both a file and a directory: {d!r}")
                break
            kids[name] = None
            d = parent
    trees: list[tuple[str, bytes]] = []
    built: dict[str, tuple[str, int, int]] = {}
    for dir_path in sorted(children, key=lambda p: p.count("/") + (1 if p else 0), reverse=True):
        out: list[TreeEntry] = []
        nfiles = 0
        prefix = f"{dir_path}/" if dir_path else ""
        for name, child in children[dir_path].items():
            if child is None:
                tid, size, n = built[prefix + name] if prefix + name in built else prebuilt[prefix + name]
                meta = dir_meta[prefix + name].meta if prefix + name in dir_meta else {}
                out.append(TreeEntry(name, DIR, 0o755, size, tid, None, meta))
                nfiles += n
            else:
                out.append(TreeEntry(name, child.kind, child.mode, child.size, child.sha256, child.target, child.meta))
                nfiles += child.kind == FILE
        tree = Tree.of(out)
        data = tree.to_bytes()
        tid = sha256_hex(data)
        trees.append((tid, data))
        built[dir_path] = (tid, tree.size, nfiles)
    root_id, size, nfiles = built[""]
    return BuiltTrees(root_id, trees, nfiles, size, built)
