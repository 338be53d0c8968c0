"""Materialize a version into a directory (`export`, `checkout`) and check a directory against it (`verify`).

`export` and `checkout` share one engine, `materialize`: it scans the target (lstat only), plans what
differs from the version — refusing, before anything is written, a directory standing where the
version has a file unless extras may be deleted — and then writes only what differs:

- a file whose stat-cache row (dev, inode, size, mtime, ctime) names the version's SHA-256, or whose
  SHA-256 (read only when the size matches) is the version's, is kept; only a wrong mode is fixed;
- every other file is written to a short temporary name in its directory (``.tessera-<12 hex>.tmp``,
  so even a 255-byte name can be written) and renamed over the path; all-zero blocks are skipped and
  the file is ``ftruncate``d to its size, so sparse files stay sparse;
- each written file gets a stat-cache row (flushed every second), and the target is recorded as "being
  written from NAME@HASH" first and as "from NAME@HASH" at the end.

So an export or checkout stopped by Ctrl-C, SIGKILL or a full disk is resumed by running it again: the
temporary files it left are removed and only what is still missing is written.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tessera.catalog import Catalog, DirRow
from tessera.catalog.worktree_state import record_worktree, worktree
from tessera.errors import DiskFull, TesseraError, UsageError
from tessera.faults import crash_point
from tessera.homeguard import check_not_home
from tessera.ignore import IgnoreRules
from tessera.model import DIR, FILE, SYMLINK, Entry
from tessera.progress import NullProgress, Progress
from tessera.treebuild import check_path
from tessera.version import Version
from tessera.worktree import Found, hash_files, locally_stored, save_stat_rows, scan_dir

WORKERS = 4
_READ = 1 << 20
_HOLE = 64 * 1024  # all-zero runs of this size (aligned in the file) become holes
_ZERO = bytes(_HOLE)
STAT_FLUSH_SECONDS = 1.0
STAT_FLUSH_FILES = 2000


def _safe_target(root: Path, rel: str) -> Path:
    check_path(rel)  # remote metadata must never make us write outside the target
    return root / rel


@dataclass
class CheckoutResult:
    """What an export or checkout did. ``written`` files were (re)written, ``unchanged`` were already
    right (``hashed`` of them had to be read to know), ``modes`` only had their mode fixed."""

    ref: str
    target: str
    how: str
    files: int = 0
    bytes: int = 0
    written: int = 0
    bytes_written: int = 0
    unchanged: int = 0
    hashed: int = 0
    modes: int = 0
    symlinks: int = 0
    dirs: int = 0
    replaced: int = 0  # files, symlinks or directories standing where the version has something else
    deleted: int = 0   # extras removed (checkout --delete)
    extra: int = 0     # extras left in place
    leftovers: int = 0  # temporary files of an interrupted run, removed
    resumed: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __int__(self) -> int:
        return self.written


@dataclass
class _Plan:
    mkdirs: list[Entry] = field(default_factory=list)
    write: list[Entry] = field(default_factory=list)
    check: list[tuple[Entry, Found]] = field(default_factory=list)  # same size, unknown id: hash it
    keep: list[tuple[Entry, Found]] = field(default_factory=list)   # known to hold the right bytes
    links: list[Entry] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)  # in the way of what the version has (file, link, dir)
    under_removed: set[str] = field(default_factory=set)


def _plan(entries: list[Entry], found: dict[str, Found], delete: bool, target: str) -> _Plan:
    plan = _Plan()
    for e in entries:
        f = found.get(e.path)
        if e.kind == DIR:
            if f is None:
                plan.mkdirs.append(e)
            elif f.kind != DIR:
                plan.remove.append(e.path)
                plan.mkdirs.append(e)
            continue
        if f is not None and f.kind == DIR:
            if not delete:
                raise UsageError(f"{target}: a directory is in the way of {e.kind} {e.path!r} "
                                 "(checkout --delete replaces it; nothing was written)")
            plan.remove.append(e.path)
            f = None
        if e.kind == SYMLINK:
            if f is None or f.kind != SYMLINK or f.target != e.target:
                plan.links.append(e)
            continue
        if f is None or f.kind != FILE or f.size != e.size:
            plan.write.append(e)
        elif f.sha256 is None:
            plan.check.append((e, f))
        elif f.sha256 == e.sha256:
            plan.keep.append((e, f))
        else:
            plan.write.append(e)
    if plan.remove:
        gone = set(plan.remove)
        plan.under_removed = {p for p in found if _has_ancestor_in(p, gone)}
    return plan


def _has_ancestor_in(path: str, dirs: set[str]) -> bool:
    while "/" in path:
        path = path.rpartition("/")[0]
        if path in dirs:
            return True
    return False


def _write_nonzero(fd: int, block: bytes, pos: int) -> None:
    """pwrite ``block`` at ``pos`` into a new file, skipping all-zero pieces (up to each `_HOLE`-aligned
    boundary): a new file reads zeros where nothing was written, and whole skipped blocks stay holes."""
    n = len(block)
    view = memoryview(block)
    i, start = 0, -1  # start: beginning of the current run of data still to write
    while i < n:
        end = min(n, i + _HOLE - (pos + i) % _HOLE)
        if block[i:end] == _ZERO[:end - i]:
            if start >= 0:
                _pwrite_all(fd, view[start:i], pos + start)
                start = -1
        elif start < 0:
            start = i
        i = end
    if start >= 0:
        _pwrite_all(fd, view[start:n], pos + start)


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        done = os.pwrite(fd, data, pos)
        data, pos = data[done:], pos + done


def _temp_name(directory: Path) -> Path:
    return directory / f".tessera-{secrets.token_hex(6)}.tmp"


def _write_file(version: Version, root: Path, e: Entry, progress: Progress) -> tuple[Entry, os.stat_result]:
    dest = _safe_target(root, e.path)
    tmp = _temp_name(dest.parent)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        pos = 0
        with version.open(e.path) as src:
            while block := src.read(_READ):
                _write_nonzero(fd, block, pos)
                pos += len(block)
                progress.advance(len(block))
        os.ftruncate(fd, pos)
        os.fchmod(fd, e.mode)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, dest)
    return e, os.lstat(dest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class _StatRows:
    """Stat-cache rows for what was written, flushed every second so a killed run loses little."""

    def __init__(self, catalog: Catalog, root: str, file_ids: set[str]) -> None:
        self.catalog = catalog
        self.root = root
        self.ok = locally_stored(self.catalog, file_ids)
        self.rows: list[tuple[str, os.stat_result, str]] = []
        self.last = time.monotonic()

    def add(self, e: Entry, st: os.stat_result) -> None:
        if e.sha256 in self.ok:
            self.rows.append((e.path, st, e.sha256))
        if len(self.rows) >= STAT_FLUSH_FILES or time.monotonic() - self.last >= STAT_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        self.last = time.monotonic()
        save_stat_rows(self.catalog, self.root, rows)


def materialize(catalog: Catalog, version: Version, target: str | Path, *, how: str, delete: bool = False,
                progress: Progress | None = None) -> CheckoutResult:
    """Make ``target`` hold ``version``, writing only what differs (see the module docstring).
    Extras (paths the version does not have, and not left out by the target's .tesseraignore) are
    deleted with ``delete``, else kept and counted."""
    t0 = time.monotonic()
    root = Path(target)
    progress = progress or NullProgress()
    check_not_home(root, version.home, f"{how} target")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    result = CheckoutResult(version.ref, str(target), how, files=version.files, bytes=version.size)
    try:
        root.mkdir(parents=True, exist_ok=True)
        previous = worktree(catalog, root)
        result.resumed = previous is not None and not previous.complete and previous.hash == version.hash
        scan = scan_dir(catalog, root)
        if scan.clean_trees(catalog).get("") == version.hash and not scan.leftovers:
            # the directory cache vouches for the whole tree: nothing to read, write or delete
            record_worktree(catalog, root, version.name, version.hash, how)
            result.unchanged = version.files
            result.seconds = time.monotonic() - t0
            return result
        entries = list(version.walk(dirs=True))
        for e in entries:
            check_path(e.path)
        files = [e for e in entries if e.kind == FILE]
        plan = _plan(entries, scan.found, delete, str(target))
        record_worktree(catalog, root, version.name, version.hash, how, complete=False)
        for rel in scan.leftovers:
            (root / rel).unlink(missing_ok=True)
        result.leftovers = len(scan.leftovers)
        result.hashed = len(plan.check)
        hash_files(scan.root, [f for _, f in plan.check])
        for e, f in plan.check:
            if f.sha256 == e.sha256:
                plan.keep.append((e, f))
            else:
                plan.write.append(e)
        for rel in plan.remove:
            _remove(_safe_target(root, rel))
        result.replaced = len(plan.remove)
        for e in plan.mkdirs:
            _safe_target(root, e.path).mkdir(exist_ok=True)
        result.dirs = len(plan.mkdirs)
        rows = _StatRows(catalog, scan.root, {e.sha256 for e in files if e.sha256})
        checked = {id(f) for _, f in plan.check}
        try:
            for e, f in plan.keep:
                st = _fix_mode(root, e, f, result)
                if st is not f.st or id(f) in checked:  # a stat-cache hit that still holds needs no new row
                    rows.add(e, st)
            result.unchanged = len(plan.keep)
            progress.start(how, sum(e.size for e in plan.write))
            _write_all(version, root, plan.write, rows, result, progress)
        finally:
            rows.flush()
            progress.finish()
        for e in plan.links:
            dest = _safe_target(root, e.path)
            if dest.is_symlink() or dest.exists():
                _remove(dest)
            os.symlink(e.target or "", dest)
        result.symlinks = len(plan.links)
        left = _extras(root, entries, scan.found, plan, delete, result)
        if not left and len(rows.ok) == len({e.sha256 for e in files}) and not any(e.meta for e in entries):
            _save_dir_rows(catalog, version, scan.root, entries)
        record_worktree(catalog, root, version.name, version.hash, how)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing {target}: free some space and run the same command again "
                           "(what was written is kept and not written again)") from None
        raise TesseraError(f"error while writing {target}: {exc.strerror or exc}") from None
    result.seconds = time.monotonic() - t0
    return result


def _fix_mode(root: Path, e: Entry, f: Found, result: CheckoutResult) -> os.stat_result:
    if f.mode == e.mode:
        return f.st
    path = _safe_target(root, e.path)
    os.chmod(path, e.mode, follow_symlinks=False)
    result.modes += 1
    return os.lstat(path)


def _write_all(version: Version, root: Path, todo: list[Entry], rows: _StatRows, result: CheckoutResult,
               progress: Progress) -> None:
    """Write ``todo`` with `WORKERS` threads, at most a few files ahead of them (bounded memory for a
    million files). On an error or Ctrl-C no new file is started; the ones being written finish or
    remove their temporary file, and what was written keeps its stat-cache rows."""
    if not todo:
        return
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(WORKERS * 4)
    stop = threading.Event()
    failure: list[BaseException] = []

    def task(e: Entry) -> None:
        try:
            if stop.is_set():
                return
            e, st = _write_file(version, root, e, progress)
            with lock:
                result.written += 1
                result.bytes_written += e.size
                rows.add(e, st)
                n = result.written
            crash_point(f"checkout-after-file-{n}")
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            stop.set()
            with lock:
                failure.append(exc)
        finally:
            slots.release()

    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="checkout")
    try:
        for e in todo:
            slots.acquire()
            if stop.is_set():
                slots.release()
                break
            pool.submit(task, e)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if failure:
        raise failure[0]
    if result.written != len(todo):
        raise TesseraError(f"internal error: {len(todo) - result.written} of {len(todo)} files were not written")


def _save_dir_rows(catalog: Catalog, version: Version, root: str, entries: list[Entry]) -> None:
    """The directory cache for a target that now holds exactly the version (no extras, every file
    in the stat cache, no per-entry metadata): `status`, `checkout` and `commit` of it then read
    no tree and no file."""
    files_below: dict[str, int] = {}
    for e in entries:
        if e.kind == FILE:
            parent = e.path
            while "/" in parent:
                parent = parent.rpartition("/")[0]
                files_below[parent] = files_below.get(parent, 0) + 1
    dirs = [("", version.hash, version.size, version.files)] + [
        (e.path, e.tree_id or "", e.size, files_below.get(e.path, 0)) for e in entries if e.kind == DIR]
    rows = []
    for rel, tree_id, size, nfiles in dirs:
        path = f"{root}/{rel}" if rel else root
        st = os.lstat(path)
        rows.append(DirRow(path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, tree_id, size, nfiles))
    catalog.put_dir_rows(rows)


def _extras(root: Path, entries: list[Entry], found: dict[str, Found], plan: _Plan, delete: bool,
            result: CheckoutResult) -> int:
    """Count (or with ``delete`` remove) what the version does not have; returns how many paths
    are left over, ignored ones included."""
    wanted = {e.path for e in entries}
    rules = IgnoreRules.for_dir(root)  # the version's own .tesseraignore is in place now
    every = [p for p in found if p not in wanted and p not in plan.under_removed]
    extras = [p for p in every if not rules(p + "/" if found[p].kind == DIR else p)]
    if not delete:
        result.extra = sum(1 for p in extras if found[p].kind != DIR)
        return len(every)
    for p in sorted(extras, key=lambda x: x.count("/"), reverse=True):  # children before parents
        path = _safe_target(root, p)
        if found[p].kind == DIR:
            try:
                path.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                    raise
            continue
        path.unlink(missing_ok=True)
        result.deleted += 1
    return len(every) - len(extras) + sum(1 for p in extras if found[p].kind == DIR and _safe_target(root, p).exists())


def export_version(catalog: Catalog, version: Version, target: str | Path, *, force: bool = False,
                   progress: Progress | None = None) -> CheckoutResult:
    """Write every entry of ``version`` under ``target`` (empty, or any with ``force``); only what
    differs is written, and an interrupted export of the same version resumes without ``force``."""
    root = Path(target)
    progress = progress or NullProgress()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    if root.exists() and any(root.iterdir()) and not force:
        rec = worktree(catalog, root)
        if rec is None or rec.complete or rec.hash != version.hash:
            raise UsageError(f"{target}: directory is not empty (use --force to write into it, or "
                             "`tessera checkout` to make it equal to the version)")
    return materialize(catalog, version, root, how="export", progress=progress)


def checkout_version(catalog: Catalog, version: Version, target: str | Path, *, delete: bool = False,
                     progress: Progress | None = None) -> CheckoutResult:
    """Make ``target`` equal to ``version``: write what is missing or differs, fix modes, delete
    extras only with ``delete``."""
    return materialize(catalog, version, target, how="checkout", delete=delete, progress=progress)


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    seconds: float = 0.0
    modified: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.modified or self.missing or self.extra)


def verify_dir(version: Version, target: str | Path, *, extra_ok: bool = False,
               progress: Progress | None = None) -> VerifyReport:
    """SHA-256 of every file in ``target`` against the version (like ``quilt3 verify``)."""
    t0 = time.monotonic()
    root = Path(target)
    if not root.is_dir():
        raise UsageError(f"{target}: no such directory")
    progress = progress or NullProgress()
    report = VerifyReport()
    expected = {e.path: e for e in version.walk(dirs=True)}
    files = [e for e in expected.values() if e.kind == FILE]
    progress.start("verify", sum(e.size for e in files))

    def check(e: Entry) -> tuple[str, str | None, int]:
        p = root / e.path
        if p.is_symlink() or not p.is_file():
            return e.path, None, 0
        h = hashlib.sha256()
        n = 0
        with open(p, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
                n += len(block)
                progress.advance(len(block))
        return e.path, h.hexdigest(), n

    with ThreadPoolExecutor(WORKERS) as pool:
        for path, digest, n in pool.map(check, files):
            report.checked += 1
            report.bytes += n
            if digest is None:
                report.missing.append(path)
            elif digest != expected[path].sha256:
                report.modified.append(path)
    for e in expected.values():
        p = root / e.path
        if e.kind == SYMLINK and (not p.is_symlink() or os.readlink(p) != e.target):
            (report.missing if not p.is_symlink() else report.modified).append(e.path)
        elif e.kind == DIR and not p.is_dir():
            report.missing.append(e.path)
    if not extra_ok:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if rel not in expected:
                    report.extra.append(rel)
    progress.finish()
    for lst in (report.modified, report.missing, report.extra):
        lst.sort()
    report.seconds = time.monotonic() - t0
    return report

