"""Forgetting versions in this home (`tessera forget`, `tessera rm`) and where the bytes are (`tessera du`).

Forgetting deletes history entries (and the versions no entry records any more); the bytes go with the
next reclaim (`tessera.reclaim`, `tessera gc`). Some versions are never forgotten, whatever the rules say,
and the report names the reason: each dataset's **head**, every **tagged** version, every version a
**mount** of this home serves (the mount registry), every version **queued for push**, and the version
the **lock file in force** (`tessera.lock`, from the current directory) pins. Forgetting a
mounted version (FUSE or kernel path) is refused rather than pulled from under its readers: unmount first.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tessera.catalog import Catalog
from tessera.catalog import lifecycle_state as ls
from tessera.catalog.marks import UsageMarks
from tessera.errors import NotFound, UsageError
from tessera.ids import check_dataset_name
from tessera.model import DIR, FILE, Tree
from tessera.mounting import KERNEL, kernel_mounts, pid_alive, read_record, record_active, registry_dir
from tessera.retention import Candidate, KeepPolicy, apply_policy

logger = logging.getLogger(__name__)


def mounted_versions(home: str | Path) -> dict[str, list[str]]:
    """Version hash -> mountpoints of this home's mounts (the mount registry): a FUSE mount whose server
    is alive or whose mount the kernel still has; a kernel mount (EROFS + overlayfs) whose overlay is
    mounted or whose mounting process is still at work (`record_active`: its record has pid 0 once
    mounted). Mountpoints are never stat'ed (a hung server elsewhere must not hang a forget or a gc)."""
    rdir = registry_dir(home)
    if not rdir.is_dir():
        return {}
    kernel = {m.mountpoint for m in kernel_mounts()}
    out: dict[str, list[str]] = {}
    for path in sorted(rdir.glob("*.json")):
        rec = read_record(path)
        if rec is None or not rec.hash:
            continue
        active = record_active(rec) if rec.kind == KERNEL else (
            (rec.pid > 0 and pid_alive(rec.pid)) or rec.mountpoint in kernel)
        if active:
            out.setdefault(rec.hash, []).append(rec.mountpoint)
    return out


@dataclass
class Fate:
    """One version of a dataset in a forget: kept (with every reason) or forgotten."""

    hash: str
    time: float
    entries: int
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


@dataclass
class ForgetReport:
    dataset: str
    rule: str
    fates: list[Fate]  # newest first
    dry_run: bool = False
    max_seq: int = 0
    entries_deleted: int = 0
    freed_bytes: int | None = None  # bytes a gc could reclaim because of this forget (when measured)

    @property
    def forgotten(self) -> list[Fate]:
        return [f for f in self.fates if not f.keep]

    @property
    def kept(self) -> list[Fate]:
        return [f for f in self.fates if f.keep]


def plan_forget(catalog: Catalog, dataset: str, *, policy: KeepPolicy | None = None, only: str | None = None,
                mounted: dict[str, list[str]] | None = None, pinned: dict[str, str] | None = None) -> ForgetReport:
    """Decide which versions of ``dataset`` go: by ``policy`` (restic's keep rules), or just version
    ``only`` (a full hash). ``pinned`` maps a hash to the lock file that pins it (kept too). Nothing is
    changed."""
    check_dataset_name(dataset)
    exists, head = catalog.dataset_head(dataset)
    if not exists:
        raise NotFound(f"unknown dataset {dataset!r}")
    if only is None and (policy is None or policy.empty):
        raise UsageError(f"forget {dataset} needs a keep rule (--keep-last N, --keep-hourly/daily/weekly/monthly/"
                         f"yearly N, --keep-within 30d, --keep-tag TAG) or a version ({dataset}@HASH); to keep only "
                         f"the newest version use --keep-last 1, to delete the whole dataset `tessera rm {dataset}`")
    versions = ls.dataset_versions(catalog, dataset)
    tags = catalog.tags(dataset)
    queued = ls.queued_pushes(catalog)
    mounted = mounted or {}
    if only is not None:
        fates = [Fate(v.hash, v.time, v.entries, [] if v.hash == only else ["not selected"]) for v in versions]
    else:
        assert policy is not None
        verdicts = {v.key: v for v in apply_policy(policy, [Candidate(v.hash, v.time, tuple(tags.get(v.hash, ())))
                                                          for v in versions])}
        fates = [Fate(v.hash, v.time, v.entries, list(verdicts[v.hash].reasons)) for v in versions]
    for f in fates:
        always = []
        if f.hash == head:
            always.append("head")
        always += [f"tag {t}" for t in tags.get(f.hash, ())]
        always += [f"mounted at {m}" for m in mounted.get(f.hash, ())]
        if pinned and f.hash in pinned:
            always.append(f"pinned by {pinned[f.hash]}")
        always += [f"queued for push to {r}" for r in queued.get((dataset, f.hash), ())]
        if only is not None and f.hash == only and always:
            raise UsageError(f"cannot forget {dataset}@{only[:12]}: it is kept ({', '.join(always)})"
                             + _hint(always, dataset))
        f.reasons += always
    fates.sort(key=lambda f: (f.time, f.hash), reverse=True)
    return ForgetReport(dataset, policy.describe() if policy is not None and only is None else f"{dataset}@{only}",
                        fates, max_seq=max((v.seq for v in versions), default=0))


def _hint(reasons: Sequence[str], dataset: str) -> str:
    r = reasons[0]
    if r == "head":
        return f"; the head of a dataset stays until a newer version is committed, or `tessera rm {dataset}`"
    if r.startswith("tag "):
        return f"; delete the tag first: `tessera tag --delete {dataset}:{r[4:]}`"
    if r.startswith("mounted at "):
        return f"; unmount it first: `tessera umount {r[len('mounted at '):]}`"
    if r.startswith("pinned by "):
        return f"; move the pin first (`tessera update {dataset}`), or set TESSERA_LOCK=off"
    return "; push it first (`tessera push`) or let the daemon finish its queue"


def apply_forget(catalog: Catalog, report: ForgetReport) -> ForgetReport:
    """Delete the history entries of the forgotten versions (one transaction)."""
    gone = [f.hash for f in report.forgotten]
    if gone:
        report.entries_deleted = ls.forget_versions(catalog, report.dataset, gone, report.max_seq)
    return report


def remove_dataset(catalog: Catalog, dataset: str, mounted: dict[str, list[str]]) -> tuple[int, int, int]:
    """Delete dataset ``dataset`` (its history, tags and queued pushes); refused while one of its versions
    is mounted. Returns (history entries, tags, queued pushes) deleted."""
    check_dataset_name(dataset)
    if not catalog.dataset_head(dataset)[0]:
        raise NotFound(f"unknown dataset {dataset!r}")
    for h in catalog.dataset_hashes(dataset):
        if h in mounted:
            raise UsageError(f"cannot remove {dataset}: {dataset}@{h[:12]} is mounted at {mounted[h][0]} "
                             f"(unmount it first: `tessera umount {mounted[h][0]}`)")
    return ls.remove_dataset(catalog, dataset)


# -- where the bytes are ------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionUsage:
    dataset: str
    hash: str
    time: float
    files: int
    size: int  # file bytes (what an export writes)
    stored: int  # stored bytes of every chunk it uses
    unique: int  # stored bytes no other kept version uses: what forgetting it frees
    tags: tuple[str, ...] = ()

    @property
    def shared(self) -> int:
        return self.stored - self.unique


@dataclass(frozen=True)
class DatasetUsage:
    dataset: str
    versions: int
    stored: int
    unique: int  # stored bytes no other dataset's versions use: what `tessera rm` frees

    @property
    def shared(self) -> int:
        return self.stored - self.unique


_FILE_BATCH = 5000


def _mark_usage(catalog: Catalog, marks: UsageMarks, root: str) -> None:
    """Record the chunks version ``root`` uses (a missing tree or file record counts as empty: `du` is
    a report, `tessera fsck` says what is wrong)."""
    v = marks.add_version(root)
    stack = [root]
    files: list[str] = []
    while stack:
        tid = stack.pop()
        if not marks.enter_tree(v, tid):
            continue
        data = catalog.tree(tid)
        for e in Tree.from_bytes(data).entries if data is not None else ():
            if e.kind == DIR and e.id:
                stack.append(e.id)
            elif e.kind == FILE and e.id:
                files.append(e.id)
        if len(files) >= _FILE_BATCH:
            marks.add_files(v, files)
            files.clear()
    marks.add_files(v, files)


def disk_usage(catalog: Catalog, roots: Iterable[str], dataset: str | None = None, hash: str | None = None
               ) -> tuple[list[VersionUsage], list[DatasetUsage]]:
    """Usage of the versions of ``dataset`` (every dataset when None; only version ``hash`` when given),
    counted against every kept version (``roots``: a chunk another kept version uses is shared), and of
    the datasets themselves (a chunk another dataset uses is shared). The chunks each version uses are
    marked in TEMP tables of the catalog (`tessera.catalog.marks.UsageMarks`): memory stays flat
    whatever the number of files."""

    def wanted(name: str, h: str | None) -> bool:
        return (dataset is None or name == dataset) and (hash is None or h is None or h == hash)

    with UsageMarks(catalog) as marks:
        walked = sorted(set(roots))
        for h in walked:
            _mark_usage(catalog, marks, h)
        per_version = marks.version_bytes()
        versions: list[VersionUsage] = []
        members: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for info in catalog.datasets():
            tags = catalog.tags(info.name)
            for e in catalog.history(info.name):
                if e.hash not in per_version:
                    continue
                if wanted(info.name, e.hash) and not any(v.hash == e.hash and v.dataset == info.name for v in versions):
                    stored, unique = per_version[e.hash]
                    versions.append(VersionUsage(info.name, e.hash, e.time, e.files, e.size, stored, unique,
                                                 tuple(tags.get(e.hash, ()))))
            hashes = set(catalog.dataset_hashes(info.name))
            members[info.name] = sorted(hashes)
            counts[info.name] = len(hashes)
        by_dataset = marks.dataset_bytes(members)
    datasets = [DatasetUsage(name, counts[name], *by_dataset.get(name, (0, 0)))
                for name in sorted(members) if wanted(name, None)]
    versions.sort(key=lambda v: (v.dataset, -v.time))
    return versions, datasets


__all__ = ["ForgetReport", "Fate", "plan_forget", "apply_forget", "remove_dataset", "disk_usage",
           "mounted_versions", "VersionUsage", "DatasetUsage"]
