"""A directory on disk next to a version: what is there, and how it differs (`status`, `diff REF DIR`).

A directory is scanned with `lstat` only; a file's SHA-256 comes from the stat cache (the same one
`commit` fills, and `checkout` fills for what it writes) when its (dev, inode, size, mtime, ctime) is
unchanged, and is computed only for a file whose size equals the version's but whose stat changed.
So an unchanged tree reads no file bytes, and `tessera status` on it takes about as long as `ls -R`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tessera.catalog import Catalog, StatRow
from tessera.catalog.worktree_state import WorktreeRecord, real_dir, worktree
from tessera.errors import SourceError, UsageError
from tessera.ignore import IgnoreRules
from tessera.model import DIR, FILE, SYMLINK, Entry, normalize_mode
from tessera.version import Version

logger = logging.getLogger(__name__)

HASH_WORKERS = 4
_READ = 1 << 20
# Temporary files of export/checkout: short (a 255-byte name still fits), recognisable, ours to remove.
TEMP_RE = re.compile(r"^\.tessera-[0-9a-f]{12}\.tmp$")


@dataclass
class Found:
    """One path under a directory on disk (kind ``other`` for sockets, FIFOs, devices)."""

    path: str
    kind: str
    mode: int
    size: int
    st: os.stat_result
    target: str | None = None
    sha256: str | None = None  # known from the stat cache, or once hashed


@dataclass
class ScannedDir:
    st: os.stat_result
    names: list[str] = field(default_factory=list)  # kept children
    dirs: list[str] = field(default_factory=list)   # kept child directories (relative paths)
    all_cached: bool = True  # every file hit the stat cache
    excluded: bool = False   # a rule left something out here


@dataclass
class Scan:
    root: str  # real path
    found: dict[str, Found] = field(default_factory=dict)
    dirs: dict[str, ScannedDir] = field(default_factory=dict)  # "" is the root
    leftovers: list[str] = field(default_factory=list)  # our temporary files from an interrupted run
    excluded: int = 0
    stat_hits: int = 0

    def clean_trees(self, catalog: Catalog) -> dict[str, str]:
        """Directories whose tree id is known without reading anything (commit's directory cache:
        the directory's own stat unchanged, every file a stat-cache hit, nothing excluded, every
        subdirectory clean too): relative path -> tree id."""
        rows = catalog.dir_rows([f"{self.root}/{rel}" if rel else self.root for rel in self.dirs])
        clean: dict[str, str] = {}
        for rel in sorted(self.dirs, key=lambda r: r.count("/") + (1 if r else 0), reverse=True):
            d = self.dirs[rel]
            row = rows.get(f"{self.root}/{rel}" if rel else self.root)
            if (row is not None and d.all_cached and not d.excluded and all(c in clean for c in d.dirs)
                    and (row.dev, row.ino, row.mtime_ns, row.ctime_ns)
                    == (d.st.st_dev, d.st.st_ino, d.st.st_mtime_ns, d.st.st_ctime_ns)):
                clean[rel] = row.tree_id
        return clean


def scan_dir(catalog: Catalog, root: str | Path, rules: IgnoreRules | None = None) -> Scan:
    """Every path under ``root`` (symlinks not followed), with file ids from the stat cache."""
    top = real_dir(root)
    scan = Scan(top)
    scan.dirs[""] = ScannedDir(os.stat(top))
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        node = scan.dirs[rel_dir]
        abs_dir = f"{top}/{rel_dir}" if rel_dir else top
        cache = catalog.stat_keys(abs_dir)
        try:
            with os.scandir(abs_dir) as it:
                items = list(it)
        except OSError as exc:
            raise SourceError(f"cannot read directory {abs_dir}: {exc.strerror}") from None
        for d in items:
            rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone while we looked
            except OSError as exc:
                raise SourceError(f"cannot stat {d.path}: {exc.strerror}") from None
            is_dir = stat.S_ISDIR(st.st_mode)
            if stat.S_ISREG(st.st_mode) and TEMP_RE.match(d.name):
                scan.leftovers.append(rel)
                continue
            if rules is not None and rules.excludes(rel + "/" if is_dir else rel):
                scan.excluded += 1
                node.excluded = True
                continue
            node.names.append(d.name)
            if is_dir:
                scan.found[rel] = Found(rel, DIR, 0o755, 0, st)
                scan.dirs[rel] = ScannedDir(st)
                node.dirs.append(rel)
                stack.append(rel)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(d.path)
                scan.found[rel] = Found(rel, SYMLINK, 0o777, len(os.fsencode(target)), st, target)
            elif stat.S_ISREG(st.st_mode):
                f = Found(rel, FILE, normalize_mode(FILE, st.st_mode), st.st_size, st)
                hit = cache.get(d.name)
                if hit and hit[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    f.sha256 = hit[1]
                    scan.stat_hits += 1
                else:
                    node.all_cached = False
                scan.found[rel] = f
            else:
                scan.found[rel] = Found(rel, "other", 0, 0, st)
                node.all_cached = False
    return scan


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        while block := f.read(_READ):
            h.update(block)
    return h.hexdigest()


def hash_files(root: str, files: Sequence[Found]) -> int:
    """Fill in ``sha256`` of ``files`` (reading them, in parallel); returns the bytes read."""
    def one(f: Found) -> int:
        try:
            f.sha256 = sha256_file(f"{root}/{f.path}")
        except FileNotFoundError:
            f.sha256 = ""  # vanished: differs from anything
        except OSError as exc:
            raise SourceError(f"cannot read {root}/{f.path}: {exc.strerror}") from None
        return f.size

    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        return sum(pool.map(one, files))


def locally_stored(catalog: Catalog, file_ids: Iterable[str]) -> set[str]:
    """The file ids whose every chunk is in a local pack: only those may go into the stat cache (a
    later commit takes a stat-cache hit's bytes as stored here)."""
    ids = set(file_ids)
    packs = catalog.packs()
    if all(p.local for p in packs):
        return ids & catalog.known_files(list(ids))
    local = {p.id for p in packs if p.local}
    records = catalog.files_by_id(list(ids))
    locs = catalog.chunks_by_id(list({cid for r in records.values() for cid, _ in r.chunks}))
    return {fid for fid, r in records.items()
            if all(cid in locs and locs[cid].pack in local for cid, _ in r.chunks)}


def save_stat_rows(catalog: Catalog, root: str, rows: Iterable[tuple[str, os.stat_result, str]]) -> None:
    """Stat-cache rows for files known to hold ``file id``: (relative path, lstat, id)."""
    by_dir: dict[str, list[StatRow]] = {}
    for rel, st, fid in rows:
        parent, _, name = rel.rpartition("/")
        by_dir.setdefault(f"{root}/{parent}" if parent else root, []).append(
            StatRow(name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, fid))
    if by_dir and not catalog.read_only:
        with catalog.write():
            for d, r in by_dir.items():
                catalog.put_stat_rows(d, r)


# -- comparing ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathChange:
    """``status``: added, removed, modified (content or kind), or mode (only the executable bit)."""

    status: str
    path: str

    MARKS = {"added": "+", "removed": "-", "modified": "M", "mode": "m"}

    @property
    def mark(self) -> str:
        return self.MARKS[self.status]

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "path": self.path}


@dataclass
class Comparison:
    """A directory against a version: the changes and what it cost to find them."""

    root: str
    ref: str
    changes: list[PathChange]
    files: int = 0
    bytes: int = 0
    stat_hits: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    excluded: int = 0
    seconds: float = 0.0
    record: WorktreeRecord | None = None

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in PathChange.MARKS}
        for c in self.changes:
            out[c.status] += 1
        return out


class _Walk:
    """The version's trees against a scan, directory by directory; subtrees whose tree id the scan
    knows to be equal (`Scan.clean_trees`) are skipped without being read."""

    def __init__(self, version: Version, scan: Scan, clean: Mapping[str, str], dir_is_new: bool) -> None:
        self.version = version
        self.scan = scan
        self.clean = clean
        self.add, self.rem = ("added", "removed") if dir_is_new else ("removed", "added")
        self.out: list[PathChange] = []
        self.pending: list[tuple[Entry, Found]] = []  # same size, id unknown: decided once hashed

    def run(self) -> None:
        self._dir("", self.version.hash)

    def _dir(self, rel: str, tree_id: str) -> None:
        if self.clean.get(rel) == tree_id:
            return
        tree = self.version.tree(tree_id)
        want = {te.name: te for te in tree.entries}
        node = self.scan.dirs[rel]
        for name in sorted(set(want) | set(node.names)):
            path = f"{rel}/{name}" if rel else name
            te, f = want.get(name), self.scan.found.get(path)
            if f is None and name in want:
                self._gone(path, te)
            elif te is None:
                self._new(path)
            elif f is not None:
                self._both(path, te, f)

    def _gone(self, path: str, te: Any) -> None:
        if te.kind != DIR:
            self.out.append(PathChange(self.rem, path))
            return
        entries = self.version.tree(te.id).entries
        if not entries:
            self.out.append(PathChange(self.rem, path + "/"))
        for child in entries:
            self._gone(f"{path}/{child.name}", child)

    def _new(self, path: str) -> None:
        f = self.scan.found[path]
        if f.kind != DIR:
            self.out.append(PathChange(self.add, path))
            return
        names = self.scan.dirs[path].names
        if not names:
            self.out.append(PathChange(self.add, path + "/"))
        for name in names:
            self._new(f"{path}/{name}")

    def _both(self, path: str, te: Any, f: Found) -> None:
        if te.kind != f.kind:
            self.out.append(PathChange("modified", path))
            if te.kind == DIR:
                self._gone(path, te)  # what the version had below it is gone
            elif f.kind == DIR:
                for name in self.scan.dirs[path].names:
                    self._new(f"{path}/{name}")
        elif te.kind == DIR:
            self._dir(path, te.id)
        elif te.kind == SYMLINK:
            if te.target != f.target:
                self.out.append(PathChange("modified", path))
        elif te.kind == FILE:
            e = Entry(path, FILE, te.mode, te.size, te.id)
            if te.size != f.size:
                self.out.append(PathChange("modified", path))
            elif f.sha256 is None:
                self.pending.append((e, f))
            else:
                self._file(e, f)

    def _file(self, e: Entry, f: Found) -> None:
        if f.sha256 != e.sha256:
            self.out.append(PathChange("modified", e.path))
        elif e.mode != f.mode:
            self.out.append(PathChange("mode", e.path))

    def finish(self) -> list[PathChange]:
        for e, f in self.pending:
            self._file(e, f)
        return sorted(self.out, key=lambda c: c.path)


def compare_dir(catalog: Catalog, version: Version, directory: str | Path, *, dir_is_new: bool = True,
                rules: IgnoreRules | None = None, refresh: bool = True) -> Comparison:
    """Scan ``directory`` and compare it with ``version``, reading only the trees of directories that
    may differ and hashing only files the stat cache cannot vouch for whose size matches.
    ``refresh`` puts files found equal into the stat cache, so the next status reads nothing."""
    t0 = time.monotonic()
    root = Path(directory)
    if not root.exists():
        raise UsageError(f"{directory}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{directory}: not a directory")
    if rules is None:
        rules = IgnoreRules.for_dir(root)
    scan = scan_dir(catalog, root, rules)
    walk = _Walk(version, scan, scan.clean_trees(catalog), dir_is_new)
    walk.run()
    todo = [f for _, f in walk.pending]
    hashed_bytes = hash_files(scan.root, todo)
    changes = walk.finish()
    if refresh and walk.pending:
        same = [(e, f) for e, f in walk.pending if f.sha256 == e.sha256]
        ok = locally_stored(catalog, {f.sha256 for _, f in same if f.sha256})
        save_stat_rows(catalog, scan.root, ((f.path, f.st, f.sha256) for _, f in same if f.sha256 in ok))
    files = [f for f in scan.found.values() if f.kind == FILE]
    return Comparison(scan.root, version.ref, changes, len(files), sum(f.size for f in files), scan.stat_hits,
                      len(todo), hashed_bytes, scan.excluded, time.monotonic() - t0)


def rules_for(directory: str | Path, record: WorktreeRecord | None) -> IgnoreRules:
    """What `status` leaves out: the directory's .tesseraignore plus the --exclude lines of the
    commit that made the recorded version."""
    return IgnoreRules.for_dir(directory, exclude=record.excludes if record else ())


def status_dir(catalog: Catalog, directory: str | Path, get_version: Callable[[str], Version]) -> Comparison:
    """What changed in ``directory`` since the version it was committed as, exported or checked out
    from (`tessera status DIR`)."""
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"{directory}: {'not a directory' if root.exists() else 'no such directory'}")
    record = worktree(catalog, root)
    if record is None:
        raise UsageError(f"{directory} has no recorded version (it was never committed, exported or checked out "
                         "from this home): compare it with `tessera diff REF DIR`")
    version = get_version(record.ref)
    result = compare_dir(catalog, version, root, rules=rules_for(root, record))
    result.record = record
    return result

