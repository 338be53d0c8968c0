"""Materialize a version into a directory (`export`) and check a directory against it (`verify`)."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import UsageError
from tessera.homeguard import check_not_home
from tessera.model import DIR, FILE, SYMLINK, Entry
from tessera.progress import NullProgress, Progress
from tessera.errors import raise_os_error
from tessera.treebuild import check_path
from tessera.version import Version

WORKERS = 4
_READ = 1 << 20


def _safe_target(root: Path, rel: str) -> Path:
    check_path(rel)  # remote metadata must never make us write outside the target
    return root / rel


def _make_dir(root: Path, rel: str) -> None:
    """Create a directory of the version. With --force, whatever already sits at that path (a
    symlink above all: writing through it could land outside the target) is replaced first.
    Parents come before children in the walk, so every ancestor is already a real directory."""
    p = _safe_target(root, rel)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink()
    p.mkdir(exist_ok=True)


def export_version(version: Version, target: str | Path, *, force: bool = False,
                   progress: Progress | None = None) -> int:
    """Write every entry of ``version`` under ``target``; returns the number of files written."""
    check_not_home(target, version.home, "an export target")
    root = Path(target)
    progress = progress or NullProgress()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    if root.exists() and any(root.iterdir()) and not force:
        raise UsageError(f"{target}: directory is not empty (use --force to write into it)")
    entries = list(version.walk(dirs=True))
    try:
        root.mkdir(parents=True, exist_ok=True)
        for e in entries:
            if e.kind == DIR:
                _make_dir(root, e.path)
        files = [e for e in entries if e.kind == FILE]
        progress.start("export", sum(e.size for e in files))
        with ThreadPoolExecutor(WORKERS) as pool:
            for _ in pool.map(lambda e: _write_file(version, root, e, progress), files):
                pass
        for e in entries:
            if e.kind == SYMLINK:
                dest = _safe_target(root, e.path)
                if dest.is_symlink() or dest.exists():
                    dest.unlink()
                os.symlink(e.target or "", dest)
        progress.finish()
    except OSError as exc:
        raise_os_error(exc, f"exporting to {target}")
    return len(files)


def _write_file(version: Version, root: Path, e: Entry, progress: Progress) -> None:
    dest = _safe_target(root, e.path)
    if dest.is_dir() and not dest.is_symlink():
        raise UsageError(f"cannot export file {e.path!r}: a directory is in the way")
    tmp = dest.with_name(f".{dest.name}.tessera-tmp")
    if os.path.lexists(tmp):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with version.open(e.path) as src, open(fd, "wb") as out:
        while True:
            block = src.read(_READ)
            if not block:
                break
            out.write(block)
            progress.advance(len(block))
    os.chmod(tmp, e.mode)
    os.replace(tmp, dest)


@dataclass
class VerifyReport:
    checked: int = 0
    modified: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.modified or self.missing or self.extra)


def verify_dir(version: Version, target: str | Path, *, extra_ok: bool = False,
               progress: Progress | None = None) -> VerifyReport:
    """SHA-256 of every file in ``target`` against the version (like ``quilt3 verify``)."""
    root = Path(target)
    if not root.is_dir():
        raise UsageError(f"{target}: no such directory")
    progress = progress or NullProgress()
    report = VerifyReport()
    expected = {e.path: e for e in version.walk(dirs=True)}
    files = [e for e in expected.values() if e.kind == FILE]
    progress.start("verify", sum(e.size for e in files))

    def check(e: Entry) -> tuple[str, str | None]:
        p = root / e.path
        if p.is_symlink() or not p.is_file():
            return e.path, None
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
                progress.advance(len(block))
        return e.path, h.hexdigest()

    with ThreadPoolExecutor(WORKERS) as pool:
        for path, digest in pool.map(check, files):
            report.checked += 1
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
    return report
