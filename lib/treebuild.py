"""Build Merkle trees bottom-up from a flat list of entries (used by commit and derived datasets)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from tessera.errors import UsageError
from tessera.model import DIR, FILE, Entry, Tree, TreeEntry


@dataclass
class BuiltTrees:
    root_id: str
    trees: list[tuple[str, bytes]]
    files: int
    size: int


def check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise UsageError(f"unsafe path in version: {path!r}")
    return path


def build_trees(entries: Iterable[Entry]) -> BuiltTrees:
    """Entries are files, symlinks and (optionally, for empty dirs or dir metadata) dirs; parent
    directories are implied by paths."""
    children: dict[str, dict[str, Entry | None]] = {"": {}}
    for e in entries:
        parts = check_path(e.path).split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            here = "/".join(parts[: depth + 1])
            kids = children.setdefault(parent, {})
            if depth == len(parts) - 1:
                if e.kind == DIR:
                    children.setdefault(here, {})
                    kids[parts[depth]] = e
                else:
                    if parts[depth] in kids and kids[parts[depth]] is not None and e.kind != DIR:
                        raise UsageError(f"duplicate path in version: {e.path!r}")
                    kids[parts[depth]] = e
            else:
                children.setdefault(here, {})
                kids.setdefault(parts[depth], None)
    trees: list[tuple[str, bytes]] = []
    built: dict[str, tuple[str, int, int]] = {}
    for dir_path in sorted(children, key=lambda p: p.count("/") + (1 if p else 0), reverse=True):
        out: list[TreeEntry] = []
        nfiles = 0
        for name, e in children[dir_path].items():
            full = f"{dir_path}/{name}" if dir_path else name
            if full in built:
                tid, size, n = built[full]
                meta = e.meta if e is not None else {}
                out.append(TreeEntry(name, DIR, 0o755, size, tid, None, meta))
                nfiles += n
            elif e is None or e.kind == DIR:
                raise AssertionError(f"unbuilt directory {full}")
            else:
                out.append(TreeEntry(name, e.kind, e.mode, e.size, e.sha256, e.target, e.meta))
                nfiles += e.kind == FILE
        tree = Tree.of(out)
        data = tree.to_bytes()
        tid = hashlib.sha256(data).hexdigest()
        trees.append((tid, data))
        built[dir_path] = (tid, tree.size, nfiles)
    root_id, size, nfiles = built[""]
    return BuiltTrees(root_id, trees, nfiles, size)
