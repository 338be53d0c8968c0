"""A commit spread over many machines: plan units of work, commit each unit on a worker, combine.

The directory lies on a file system every worker sees. The driver (`plan_units`) splits it into subtrees
balanced by bytes: a directory too big for one unit is split into its subdirectories (each its own unit,
split again if still too big) and a unit for the files and symlinks directly in it. `commit_units` runs on
a worker: it snapshots its units into a temporary home on the worker's disk, uploads each data pack
to the remote as soon as it is sealed (content-addressed keys from `tessera.remote.wire`: a retried or
duplicated task writes the same keys again, harmlessly), and returns the metadata: trees, file records
and the chunk rows of every pack it uploaded. The driver (`Repo.commit` with an ``executor``) records
those in its catalog as packs that live on the remote (like a metadata pull), builds the trees of the
split directories (`combine`), records the version and pushes it (`tessera.push`: the chunk table
locating the workers' chunks, metadata packs and their table, pack list, version object, history). Trees are built by the same code as a local commit, so the
version hash is the one a single machine would compute, whatever the number of workers.

An executor runs the worker function over the units: `LocalExecutor` here (in this process, in order:
the reference, and what tests without a cluster use), `tessera.raycluster.RayExecutor` on Ray.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.config import RepoSettings
from tessera.errors import SourceError, UsageError
from tessera.faults import crash_once
from tessera.model import DIR, ChunkLocation, FileRecord, Tree, TreeEntry
from tessera.remote import open_transport
from tessera.remote.base import Transport
from tessera.remote.wire import pack_key
from tessera.snapshot import SnapshotOptions, SnapshotStats, snapshot_dir
from tessera.store import Store
from tessera.treebuild import BuiltTree, encode_tree

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

UNITS_PER_TASK = 4  # more, smaller units than tasks: the last ones to finish are small
MAX_UNIT_FILES = 200_000  # a unit's metadata travels back to the driver in one result
# The environment a worker needs to reach the remote (credentials, endpoint, tessera's remote settings).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "TESSERA_REMOTE_TIMEOUT", "TESSERA_REMOTE_RETRIES",
                 "TESSERA_CRASH_ONCE")


class Executor(Protocol):
    """Runs a function over items, possibly elsewhere; yields the results as they complete."""

    tasks: int

    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]: ...


class LocalExecutor:
    """Runs every task in this process, one after another (``tasks`` only shapes the plan)."""

    def __init__(self, tasks: int = 1) -> None:
        if tasks < 1:
            raise UsageError("the number of tasks must be at least 1")
        self.tasks = tasks

    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        for item in items:
            yield fn(item)


# -- the plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A subtree (``recursive``) or only the files and symlinks directly in a directory."""

    rel: str  # relative to the committed directory; "" is the directory itself
    recursive: bool
    bytes: int
    files: int


@dataclass
class Plan:
    units: list[Unit]
    split: dict[str, list[str]]  # each directory split into units -> its subdirectories (rel paths)
    bytes: int
    files: int

    def bins(self, n: int) -> list[list[Unit]]:
        """The units in ``n`` groups of about equal bytes (largest first onto the lightest group)."""
        groups: list[tuple[int, list[Unit]]] = [(0, []) for _ in range(n)]
        for u in sorted(self.units, key=lambda u: (-u.bytes, -u.files, u.rel, u.recursive)):
            i = min(range(n), key=lambda k: (groups[k][0], k))
            groups[i] = (groups[i][0] + u.bytes + 1, groups[i][1] + [u])
        return [g for _, g in groups if g]


@dataclass
class _Measured:
    bytes: int = 0
    files: int = 0
    own_bytes: int = 0  # files directly in the directory
    own_files: int = 0
    children: list[tuple[str, int, int]] = field(default_factory=list)  # subdirectory rel, bytes, files


def _measure(root: str, rel: str, exclude: Callable[[str], bool] | None) -> _Measured:
    """Bytes and files below ``rel``, and of each of its subdirectories (one walk, depth-first)."""
    out = _Measured()
    top = os.path.join(root, rel) if rel else root
    prefix = f"{rel}/" if rel else ""
    for d in _scandir(top):
        crel = prefix + d.name
        if _excluded(exclude, crel, d):
            continue
        st = d.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            n, f = _du(d.path, crel, exclude)
            out.children.append((crel, n, f))
            out.bytes += n
            out.files += f
        elif stat.S_ISREG(st.st_mode):
            out.own_bytes += st.st_size
            out.own_files += 1
    out.bytes += out.own_bytes
    out.files += out.own_files
    return out


def _du(path: str, rel: str, exclude: Callable[[str], bool] | None) -> tuple[int, int]:
    total = files = 0
    stack = [(path, rel)]
    while stack:
        p, r = stack.pop()
        for d in _scandir(p):
            crel = f"{r}/{d.name}"
            if _excluded(exclude, crel, d):
                continue
            st = d.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append((d.path, crel))
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                files += 1
    return total, files


def _excluded(exclude: Callable[[str], bool] | None, rel: str, d: os.DirEntry[str]) -> bool:
    """Asked as the snapshot asks (`tessera.ignore`): a directory with a trailing ``/``."""
    return exclude is not None and exclude(rel + "/" if d.is_dir(follow_symlinks=False) else rel)


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as exc:
        raise SourceError(f"cannot read directory {path}: {exc.strerror}") from None


def plan_units(root: str | Path, tasks: int, exclude: Callable[[str], bool] | None = None,
               max_unit_files: int = MAX_UNIT_FILES) -> Plan:
    """Split ``root`` into units of at most about 1/(4 x tasks) of its bytes (and ``max_unit_files``
    files) where its directories allow it. Walks the tree once per level of splitting; holds one
    directory's subdirectory list at a time."""
    top = str(root)
    measured = _measure(top, "", exclude)
    target = max(1, measured.bytes // (tasks * UNITS_PER_TASK))
    plan = Plan([], {}, measured.bytes, measured.files)
    todo: list[tuple[str, _Measured]] = [("", measured)]
    while todo:
        rel, m = todo.pop()
        if (m.bytes <= target and m.files <= max_unit_files) or not m.children or tasks == 1:
            plan.units.append(Unit(rel, True, m.bytes, m.files))
            continue
        plan.units.append(Unit(rel, False, m.own_bytes, m.own_files))
        plan.split[rel] = [c for c, _, _ in m.children]
        for crel, nbytes, nfiles in m.children:
            if nbytes <= target and nfiles <= max_unit_files:
                plan.units.append(Unit(crel, True, nbytes, nfiles))
            else:
                todo.append((crel, _measure(top, crel, exclude)))
    return plan


# -- on a worker ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerJob:
    """What one task commits: its units of ``root``, with the driver's store settings, to ``remote``."""

    root: str
    units: tuple[Unit, ...]
    remote: str  # URL
    settings: RepoSettings
    exclude: Callable[[str], bool] | None = None
    env: tuple[tuple[str, str], ...] = ()
    memory: int | None = None
    workers: int = 0


@dataclass
class UnitResult:
    unit: Unit
    tree: BuiltTree | None  # a recursive unit's tree (its bytes are among ``trees`` too)
    entries: list[TreeEntry]  # a directory's own files and symlinks (a unit that is not recursive)
    trees: list[tuple[str, bytes]]
    files: list[tuple[str, int, bytes]]  # file id, size, chunk list bytes
    packs: list[tuple[str, int, list[tuple[bytes, int, int, int, int]]]]  # id, size, (chunk, offset, ...)
    stats: SnapshotStats


def job_env() -> tuple[tuple[str, str], ...]:
    """The variables of this process a worker needs to reach the remote."""
    return tuple((k, os.environ[k]) for k in FORWARDED_ENV if k in os.environ)


def commit_units(job: WorkerJob) -> list[UnitResult]:
    """The task: snapshot each unit of ``job`` into a temporary home, uploading every pack as soon as it
    is sealed. Runs on a worker; imports nothing of Ray."""
    for k, v in job.env:
        os.environ[k] = v
    transport = open_transport(job.remote)
    try:
        return [_commit_unit(job, u, transport) for u in job.units]
    finally:
        transport.close()


def _commit_unit(job: WorkerJob, unit: Unit, transport: Transport) -> UnitResult:
    home = Path(tempfile.mkdtemp(prefix="tessera-unit-"))
    catalog = Catalog(home / "catalog.db")
    try:
        store = Store(home, catalog)
        uploaded: list[str] = []

        def upload(pack: str) -> None:
            transport.put_file(pack_key(pack), str(store.pack_path(pack)))  # its chunks: the driver's chunk table
            uploaded.append(pack)
            store.pack_path(pack).unlink()  # on the remote now; this home only remembers its chunks
            crash_once("ray-unit-uploaded")

        path = os.path.join(job.root, unit.rel) if unit.rel else job.root
        opts = SnapshotOptions(job.settings.chunk, job.settings.compression_level, job.settings.pack_target,
                               workers=job.workers, exclude=_unit_exclude(job, unit), on_sealed=upload)
        if job.memory is not None:
            opts.memory = job.memory
        snap = snapshot_dir(catalog, store, path, opts)
        data = catalog.tree(snap.root_id)
        assert data is not None
        if unit.recursive:
            tree: BuiltTree | None = BuiltTree(snap.root_id, b"", snap.size, snap.files)
            entries: list[TreeEntry] = []
        else:
            tree, entries = None, [e for e in Tree.from_bytes(data).entries if e.kind != DIR]
        trees = [(tid, raw) for tid, raw in catalog.tree_rows()] if unit.recursive else []
        files = [(fid, size, chunks) for fid, size, chunks in catalog.file_rows()]
        packs = [(p, store_size, [(c.id, c.offset, c.stored_len, c.raw_len, c.codec) for c in catalog.pack_chunks(p)])
                 for p, store_size in ((p.id, p.size) for p in catalog.packs())]
        return UnitResult(unit, tree, entries, trees, files, packs, snap.stats)
    finally:
        catalog.close()
        shutil.rmtree(home, ignore_errors=True)


def _unit_exclude(job: WorkerJob, unit: Unit) -> Callable[[str], bool] | None:
    """The user's exclude rules, seen from the unit's directory; a unit that is not recursive also
    leaves out its subdirectories (other units commit them). Directories are asked with a trailing
    ``/`` (`tessera.ignore`)."""
    user, base = job.exclude, unit.rel

    def exclude(rel: str) -> bool:
        full = f"{base}/{rel}" if base else rel
        if user is not None and user(full):
            return True
        return not unit.recursive and rel.endswith("/") and "/" not in rel[:-1]

    return exclude if (user is not None or not unit.recursive) else None


# -- back on the driver -----------------------------------------------------------------------------

def record_result(catalog: Catalog, remote: str, res: UnitResult) -> None:
    """Record a unit's metadata: its packs as remote-only (local = 0) and known to be on ``remote`` (so the
    push that follows skips them, and writes the chunk table locating their chunks), file records, trees."""
    for pack, size, rows in res.packs:
        catalog.add_remote_pack(pack, size, [ChunkLocation(cid, pack, off, stored, raw, codec)
                                             for cid, off, stored, raw, codec in rows])
        rs.mark_keys(catalog, remote, [pack_key(pack)])
    catalog.add_files(FileRecord(fid, size, FileRecord.chunks_from_bytes(chunks)) for fid, size, chunks in res.files)
    catalog.add_trees(res.trees)


def combine(plan: Plan, results: dict[str, UnitResult]) -> tuple[BuiltTree, list[BuiltTree]]:
    """The trees of the split directories, deepest first, from their units' results: the root tree and
    every tree built here."""
    built: dict[str, BuiltTree] = {rel: r.tree for rel, r in results.items() if r.unit.recursive and r.tree}
    made: list[BuiltTree] = []
    for rel in sorted(plan.split, key=lambda r: (-(r.count("/") + (1 if r else 0)), r)):
        own = results[f"-{rel}"]
        entries = list(own.entries)
        below = 0
        for child in plan.split[rel]:
            t = built[child]
            entries.append(TreeEntry(child.rpartition("/")[2], DIR, 0o755, t.size, t.id, None, {}))
            below += t.files
        tree = encode_tree(entries, below)
        built[rel] = tree
        made.append(tree)
    return built[""], made


def result_key(unit: Unit) -> str:
    return unit.rel if unit.recursive else f"-{unit.rel}"


def add_stats(total: SnapshotStats, part: SnapshotStats) -> None:
    for name in ("files", "dirs", "symlinks", "skipped", "bytes_total", "files_read", "bytes_read",
                 "stat_cache_hits", "new_chunks", "new_bytes_stored", "checkpoints", "trees_built", "excluded"):
        setattr(total, name, getattr(total, name) + getattr(part, name))


def describe(plan: Plan, n: int) -> dict[str, Any]:
    return {"units": len(plan.units), "split": len(plan.split), "tasks": n, "bytes": plan.bytes, "files": plan.files}
