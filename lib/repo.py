"""`Repo`: the facade over a home — catalog, store, trees, the chunk reader, remotes. The CLI calls only this.

Nothing below this module imports it: the layers it composes take narrow roles instead (`Version` takes
a `TreeSource` and a `ChunkSource`; push and pull take a catalog, a store and a transport).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tessera import lifecycle
from tessera import prune as pruning
from tessera import distributed as dist
from tessera import pull as pulling
from tessera import reclaim
from tessera.catalog import Catalog, DatasetInfo
from tessera.catalog import lifecycle_state as ls
from tessera.catalog import remote_state as rs
from tessera.catalog.worktree_state import record_worktree
from tessera.checkout import CheckoutResult, VerifyReport, checkout_version, export_version, verify_dir
from tessera.config import RepoSettings, default_author, default_home
from tessera.diskcache import DiskCache, cache_dir, cache_size
from tessera.errors import AmbiguousRef, CorruptData, NotFound, UsageError
from tessera.faults import crash_point
from tessera.fsck import FsckReport, fsck
from tessera.home import catalog_path, home_exists, init_lock, is_read_only, read_only_error, require_home
from tessera.homeguard import check_not_home, home_below
from tessera.ids import Ref, check_dataset_name, check_tag, parse_ref
from tessera.ignore import combined_exclude
from tessera.lazy import LazyFetcher
from tessera.lazymeta import LazyChunks, LazyMeta, LazyTrees
from tessera.model import Entry, FileRecord, HistoryEntry
from tessera.progress import Progress
from tessera.push import Pusher, PushResult
from tessera.remote.base import Transport
from tessera.reader import ChunkReader
from tessera.remotes import Remote, Transports, remote_or_none
from tessera.retention import KeepPolicy
from tessera.snapshot import MEMORY_SETTING, MetaFor, SnapshotOptions, SnapshotStats, memory_budget, snapshot_dir
from tessera.store import Store
from tessera.treebuild import build_trees
from tessera.trees import CatalogTrees
from tessera.version import Change, Selection, Version, diff_versions, entries_of
from tessera.worktree import Comparison, compare_dir, status_dir

logger = logging.getLogger(__name__)

CHUNK_CACHE_BYTES = 64 * 1024 * 1024


@dataclass
class CommitResult:
    version: Version
    created: bool
    stats: SnapshotStats


class Repo:
    """A tessera home: ``Repo()`` uses ``$TESSERA_HOME`` or ``~/.tessera`` and creates it if needed."""

    def __init__(self, home: str | Path | None = None, *, remote: str | None = None,
                 settings: RepoSettings | None = None, create: bool = True,
                 chunk_cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        """``remote``: the remote (a configured name or a URL) that push, pull and lazy reads use when
        none is named; default: the remote marked default, or the only one. ``create=False``: a home
        that does not exist is `NoHome` (nothing is created). A home this process cannot write opens
        read-only: reads work, writes raise `ReadOnlyHome`. ``chunk_cache_bytes``: memory for decoded
        chunks read only in part (whole-chunk reads are not kept)."""
        self.home = Path(home).expanduser() if home is not None else default_home()
        if self.home.exists() and not self.home.is_dir():
            raise UsageError(f"tessera home {self.home} is not a directory")
        if not create:
            require_home(self.home)
        self.read_only = is_read_only(self.home)
        if self.read_only:
            if not home_exists(self.home):
                raise read_only_error(self.home)
            self.catalog = Catalog(catalog_path(self.home), read_only=True)
            self.store = Store(self.home, self.catalog, read_only=True)
            self.settings = self._load_settings(settings)
        else:
            try:
                self.home.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create tessera home {self.home}: {exc.strerror}") from None
            with init_lock(self.home):  # concurrent first commands: one creates, the others wait
                self.catalog = Catalog(catalog_path(self.home))
                self.store = Store(self.home, self.catalog)
                self.settings = self._load_settings(settings)
        self.trees = CatalogTrees(self.catalog)
        self._lazy: dict[str, LazyMeta] = {}
        self.transports = Transports(self.catalog, preferred=remote)
        self.chunks = ChunkReader(self.catalog, self.store, remote=self._open_lazy, cache_bytes=chunk_cache_bytes)
        # One-line messages for the user (the CLI prints them on stderr): "not here; asking origin", ...
        self.notice: Callable[[str], None] = _log_notice

    def _load_settings(self, wanted: RepoSettings | None) -> RepoSettings:
        """The store settings; written once, by the process that creates the home (under the init lock)."""
        if self.catalog.setting("chunk.avg_size") is None:
            if self.read_only:
                raise read_only_error(self.home)
            chosen = wanted or RepoSettings()
            with self.catalog.write():
                for k, v in chosen.to_items().items():
                    self.catalog.set_setting(k, v)
            return chosen
        current = RepoSettings.from_items({k: self.catalog.setting(k) or "" for k in RepoSettings().to_items()})
        if wanted is not None and wanted != current:
            raise UsageError(f"{self.home} already exists with other store settings; they are fixed at init")
        return current

    def _open_lazy(self) -> LazyFetcher:
        """The lazy fetcher of chunks in remote packs (made on the first such read)."""
        return LazyFetcher(self.catalog, self.transports.for_pack,
                           DiskCache(cache_dir(self.home), cache_size(self.catalog)))

    def close(self) -> None:
        self.chunks.close()
        self.transports.close()
        self.store.close()
        self.catalog.close()

    def __enter__(self) -> "Repo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Repo {self.home}>"

    # -- refs -------------------------------------------------------------------------------------

    def resolve(self, ref: str | Ref, *, remote: str | None = None) -> HistoryEntry:
        """The history entry ``ref`` names, resolved in this home first. Only a dataset this home does not
        have (or any ref when ``remote`` is given) is looked for on a remote: the one named, or the
        default; its metadata is fetched, chunks are read lazily. A prefix or tag that matches nothing in a
        dataset this home has is a fast local `NotFound`."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if remote is None and self.catalog.dataset_head(r.dataset)[0]:
            entry = self.resolve_local(r)
            if not (r.prefix or r.tag):
                problem = pulling.remembered_problem(self.catalog, r.dataset)
                if problem:
                    self.notice(f"warning: {problem}; using {r.dataset}@{entry.hash[:12]}, the newest readable version")
            return entry
        return self._resolve_fetched(r, self._fetch_dataset(r.dataset, remote))

    def _resolve_fetched(self, r: Ref, rem: Remote) -> HistoryEntry:
        """Resolve ``r`` right after fetching its dataset from ``rem``."""
        try:
            return self.resolve_local(r, hint=False)
        except NotFound as exc:
            raise NotFound(f"{exc} (remote {rem.name} does not have it either)") from None

    def _fetch_dataset(self, name: str, remote: str | None = None) -> Remote:
        """Bring this home up to date with a remote's history of dataset ``name`` (saying so)."""
        rem = remote_or_none(self.catalog, remote if remote is not None else self.transports.preferred)
        if rem is None:
            if remote is not None:
                self.transports.remote(remote)  # raises the reason (unknown remote, ...)
            raise NotFound(f"unknown dataset {name!r}" + self._known_datasets_hint())
        if not self.catalog.dataset_head(name)[0]:
            self.notice(f"{name} is not in this home; asking {rem.name} ({rem.url})")
        with self.store.writing():  # metadata rows are recorded before their versions: gc waits
            found = pulling.fetch_dataset(self.catalog, self.transports.get(rem.url), rem, name)
        if not self.catalog.dataset_head(name)[0]:
            if found.problems:  # nothing of it could be read: the first reason is the answer
                raise CorruptData(found.problems[0])
            raise NotFound(f"unknown dataset {name!r}: not in this home, nor on {rem.name}")
        problem = pulling.remembered_problem(self.catalog, name) if found.problems else None
        if problem:
            self.notice(f"warning: {problem}")
        for tag, ours, theirs in found.diverged_tags:
            self.notice(f"warning: tag {name}:{tag} is {ours[:12]} here but {theirs[:12]} on {rem.name}; keeping "
                        f"ours (`tessera tag --from-remote {name}:{tag}` takes theirs)")
        return rem

    def resolve_local(self, ref: str | Ref, *, hint: bool = True) -> HistoryEntry:
        """The history entry ``ref`` names in this home (never asking a remote)."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        exists, head = self.catalog.dataset_head(r.dataset)
        if not exists:
            raise NotFound(f"unknown dataset {r.dataset!r}" + self._known_datasets_hint())
        if r.prefix:
            found = self.catalog.find_versions(r.dataset, r.prefix)
            if not found:
                more = " here (`tessera pull` fetches a remote's newer versions)" if hint and self._has_remote() else ""
                raise NotFound(f"dataset {r.dataset!r} has no version {r.prefix}{more}")
            if len(found) > 1:
                cands = ", ".join(h[:12] for h in found[:10])
                raise AmbiguousRef(f"{r} is ambiguous: it matches {cands}{' ...' if len(found) > 10 else ''}")
            hash_ = found[0]
        elif r.tag:
            tagged = self.catalog.tag(r.dataset, r.tag)
            if tagged is None:
                raise NotFound(f"dataset {r.dataset!r} has no tag {r.tag!r}")
            hash_ = tagged
        else:
            if head is None:
                raise NotFound(f"dataset {r.dataset!r} has no versions")
            hash_ = head
        entry = self.catalog.history_entry(r.dataset, hash_)
        if entry is None:
            raise NotFound(f"version {hash_[:12]} of {r.dataset!r} is not in the catalog")
        return entry

    def _has_remote(self) -> bool:
        return remote_or_none(self.catalog, self.transports.preferred) is not None

    def _known_datasets_hint(self) -> str:
        names = [d.name for d in self.catalog.datasets()]
        return f" (known: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})" if names else " (no datasets yet)"

    def get(self, ref: str, *, remote: str | None = None, lock: bool = True) -> Version:
        """``NAME`` (latest), ``NAME@HASHPREFIX`` (>= 6 hex chars) or ``NAME:TAG``. A bare ``NAME``
        pinned by the nearest ``tessera.lock`` is its pinned version unless ``lock=False``."""
        if lock:
            from tessera.lockfile import pinned_ref

            ref = pinned_ref(self, ref)
        return self.version(self.resolve(ref, remote=remote))

    def version(self, info: HistoryEntry) -> Version:
        """The `Version` a history entry of this home records (a version fetched lazily from a remote
        reads its trees, file records and chunk locations from there as they are walked)."""
        meta = self._lazy.get(info.hash)
        if meta is None:
            meta = LazyMeta.of(self.catalog, info.hash, self._remote_transport)
            if meta is not None:
                self._lazy[info.hash] = meta  # one per version: its tables' heads are read once
        elif rs.lazy_version(self.catalog, info.hash) is None:
            del self._lazy[info.hash]  # completed since
            meta = None
        if meta is not None:
            return Version(info, LazyTrees(self.catalog, meta), LazyChunks(self.chunks, meta), self.home)
        return Version(info, self.trees, self.chunks, self.home)

    def _remote_transport(self, name: str) -> Transport:
        try:
            rem = self.transports.remote(name)  # a configured name, or a URL
        except NotFound:
            raise NotFound(f"the metadata of this version is on remote {name!r}, which is no longer configured "
                           f"(tessera remote add {name} URL)") from None
        return self.transports.get(rem.url, lazy=True)

    def complete(self, version: Version, progress: Progress | None = None) -> Version:
        """``version`` with all of its metadata here: what walks a whole version (export, verify, push,
        pull, a kernel mount) calls this first; a no-op for a version whose metadata is complete."""
        found = rs.lazy_version(self.catalog, version.hash)
        if found is None:
            return version
        self._require_writable()
        remote, obj = found
        with self.store.writing():
            pulling.complete_lazy_version(self.catalog, self._remote_transport(remote),
                                          self.transports.remote(remote), version.hash, obj, progress)
        return self.version(version.info)

    def _whole(self, ref: str) -> Version:
        return self.complete(self.get(ref))

    def datasets(self) -> list[DatasetInfo]:
        return self.catalog.datasets()

    def log(self, name: str, limit: int | None = None) -> list[HistoryEntry]:
        check_dataset_name(name)
        if not self.catalog.dataset_head(name)[0]:
            self._fetch_dataset(name)
        return self.catalog.history(name, limit)

    def tags(self, name: str) -> dict[str, list[str]]:
        return self.catalog.tags(name)

    def tag(self, ref: str, tag: str) -> Version:
        v = self.get(ref)
        self.catalog.set_tag(v.name, check_tag(tag), v.hash)
        return v

    def _pins(self, name: str) -> dict[str, str]:
        """The version of ``name`` the lock file in force pins (a root for `forget`), with that file."""
        from tessera.lockfile import lookup

        found = lookup(name)
        return {found[0].hash: str(found[1])} if found is not None else {}

    def take_remote_tag(self, name: str, tag: str, remote: str | None = None) -> Version:
        """Set tag ``name:tag`` to what the remote's tag of that name says (its version is fetched)."""
        check_dataset_name(name)
        check_tag(tag)
        rem = self.transports.remote(remote)
        try:
            theirs = pulling.remote_tag(self.transports.get(rem.url), name, tag)
        except NotFound:
            raise NotFound(f"remote {rem.name} has no tag {name}:{tag}") from None
        return self.tag(f"{name}@{theirs}", tag) if self.catalog.has_version(theirs) else \
            self.tag(self.get(f"{name}@{theirs}", remote=rem.name).ref, tag)

    # -- writing ----------------------------------------------------------------------------------

    def commit_dir(self, name: str, path: str | Path, *, message: str = "", meta: dict[str, Any] | None = None,
                   meta_for: MetaFor | None = None, tag: str | None = None, author: str | None = None,
                   exclude: Callable[[str], bool] | None = None, progress: Progress | None = None,
                   workers: int = 0, keep_busy: bool = False, excludes: Sequence[str] = (),
                   ignore_file: bool = True, open_at_start: set[str] | None = None,
                   memory: int | None = None) -> CommitResult:
        """Snapshot ``path`` as a new version of ``name``; unchanged content reports the head.

        Left out: what ``path/.tesseraignore`` (unless ``ignore_file`` is False) and the gitignore
        lines ``excludes`` match, and whatever ``exclude(relpath)`` is true for (a directory is asked
        as ``"dir/"``). A file that keeps changing while it is read fails the commit (`SourceError`),
        unless ``keep_busy``: then it keeps its content from the dataset's head version (or is left out
        if it is new) and is listed in ``stats.busy``, and so does any file read this time that some
        process held open for writing when the snapshot started or ended, or whose stat changed after
        it was read (``/proc`` is scanned twice; ``open_at_start`` is a scan the caller just made,
        `tessera.openfiles.open_for_writing`, used as the first). The daemon commits this way.

        The tessera home is never committed: ``path`` being the home or inside it is a `UsageError`;
        a ``path`` containing the home leaves it out (``stats.home_skipped``).

        ``memory``: the commit's memory budget in bytes (default: ``$TESSERA_COMMIT_MEMORY``, else the
        home's ``commit.memory`` setting, else 256 MiB). Records of files read wait for their packs to be
        sealed up to half of it; past that the commit checkpoints (seals its packs and writes what it read),
        so peak memory does not grow with the number of files."""
        check_dataset_name(name)
        exclude = combined_exclude(path, exclude, excludes, ignore_file=ignore_file)
        if tag is not None:
            check_tag(tag)
        if meta is not None and not isinstance(meta, dict):
            raise UsageError("version metadata must be a JSON object")
        check_not_home(path, self.home, "a commit source", allow_containing=True)
        inner = home_below(path, self.home)
        if inner is not None:
            exclude = _excluding(inner, exclude)
        opts = SnapshotOptions(self.settings.chunk, self.settings.compression_level, self.settings.pack_target,
                               workers=workers, meta_for=meta_for, exclude=exclude,
                               previous=self._previous_records(name) if keep_busy else None,
                               memory=memory_budget(self.catalog.setting(MEMORY_SETTING), memory))
        if keep_busy:
            opts.open_files = _open_for_writing
            opts.open_at_start = open_at_start
        with self.store.writing():  # what the snapshot wrote stays unreferenced until the version row: no gc
            snap = snapshot_dir(self.catalog, self.store, path, opts, progress)
            if inner is not None:
                snap.stats.home_skipped = str(self.home)
            version, created = self._record(name, snap.root_id, snap.trees, snap.files, snap.size,
                                            message, meta or {}, author)
        if tag is not None:
            self.catalog.set_tag(name, tag, version.hash)
        record_worktree(self.catalog, path, name, version.hash, "commit", excludes=excludes)  # for `status`
        return CommitResult(version, created, snap.stats)

    def _previous_records(self, name: str) -> Callable[[str], FileRecord | None]:
        exists, head = self.catalog.dataset_head(name)
        version = self.get(f"{name}@{head}") if exists and head else None

        def previous(rel: str) -> FileRecord | None:
            if version is None:
                return None
            try:
                e = version.entry(rel)
            except NotFound:
                return None
            return FileRecord(e.sha256, e.size, ()) if e.is_file and e.sha256 else None

        return previous

    def commit(self, name: str, path: str | Path, *, message: str = "", meta: dict[str, Any] | None = None,
               meta_for: MetaFor | str | Path | None = None, tag: str | None = None,
               executor: dist.Executor | None = None, remote: str | None = None) -> Version:
        """Snapshot a directory. ``meta_for`` is a callable ``path -> dict`` or a JSON file mapping
        paths to per-entry metadata dicts. With an ``executor`` (`tessera.raycluster.RayExecutor`) the
        commit is spread over its workers and lands on ``remote`` (see `commit_distributed`)."""
        if executor is not None:
            if meta_for is not None:
                raise UsageError("per-entry metadata is not supported by a distributed commit")
            return self.commit_distributed(name, path, executor, remote=remote, message=message, meta=meta,
                                           tag=tag).version
        if isinstance(meta_for, (str, Path)):
            meta_for = load_entry_meta(meta_for)
        return self.commit_dir(name, path, message=message, meta=meta, meta_for=meta_for, tag=tag).version

    def commit_distributed(self, name: str, path: str | Path, executor: dist.Executor, *, remote: str | None = None,
                           message: str = "", meta: dict[str, Any] | None = None, tag: str | None = None,
                           author: str | None = None, exclude: Callable[[str], bool] | None = None,
                           excludes: Sequence[str] = (), ignore_file: bool = True, memory: int | None = None,
                           progress: Progress | None = None) -> CommitResult:
        """Commit ``path`` (a directory every worker sees at that path) with ``executor``'s workers: they
        chunk, hash and pack subtrees balanced by bytes and upload the packs and their indexes straight
        to ``remote`` (default: the default remote); this home records the version with its packs on the
        remote only (like a metadata pull: browse, mount and export read lazily; `tessera pull` makes
        it local), builds the top trees and pushes the version (metadata, version object, history). The
        version hash is the one a plain commit of the same directory gives (the same exclude rules:
        ``.tesseraignore``, ``excludes``, ``exclude``, as in `commit_dir`)."""
        check_dataset_name(name)
        exclude = combined_exclude(path, exclude, excludes, ignore_file=ignore_file)
        if tag is not None:
            check_tag(tag)
        if meta is not None and not isinstance(meta, dict):
            raise UsageError("version metadata must be a JSON object")
        if self.read_only:
            raise read_only_error(self.home)
        check_not_home(path, self.home, "a commit source", allow_containing=True)
        inner = home_below(path, self.home)
        if inner is not None:
            exclude = _excluding(inner, exclude)
        src = Path(path)
        if not src.is_dir():
            raise UsageError(f"{path}: {'not a directory' if src.exists() else 'no such directory'}")
        root = str(src.resolve())
        rem = self.transports.remote(remote)
        plan = dist.plan_units(root, executor.tasks, exclude)
        jobs = [dist.WorkerJob(root, tuple(units), rem.url, self.settings, exclude, dist.job_env(), memory)
                for units in plan.bins(executor.tasks)]
        logger.info("distributed commit of %s: %s", root, dist.describe(plan, len(jobs)))
        stats = SnapshotStats()
        results: dict[str, dist.UnitResult] = {}
        with self.store.writing():
            for batch in executor.map_unordered(dist.commit_units, jobs):
                for res in batch:
                    dist.record_result(self.catalog, rem.name, res)
                    dist.add_stats(stats, res.stats)
                    results[dist.result_key(res.unit)] = dist.UnitResult(res.unit, res.tree, res.entries, [], [], [],
                                                                         res.stats)
            top, made = dist.combine(plan, results)
            split_dirs = sum(len(children) for children in plan.split.values())
            stats.dirs += split_dirs  # left out by their parent's unit (each is a unit of its own)
            stats.excluded -= split_dirs
            self.catalog.add_trees((t.id, t.data) for t in made)
            version, created = self._record(name, top.id, [], top.files, top.size, message, meta or {}, author)
        if tag is not None:
            self.catalog.set_tag(name, tag, version.hash)
        if inner is not None:
            stats.home_skipped = str(self.home)
        self._pusher(rem.name, progress).push(name, version.hash)
        record_worktree(self.catalog, root, name, version.hash, "commit", excludes=excludes)  # for `status`
        return CommitResult(version, created, stats)

    def commit_version(self, name: str, source: Version | Selection | Iterable[Entry], *, message: str = "",
                       meta: dict[str, Any] | None = None) -> Version:
        """Make a version from existing entries (a filtered selection, another version) without
        copying any bytes: only new trees are written."""
        check_dataset_name(name)
        entries = entries_of(source)
        with self.store.writing():  # gc must not take the file records this version is about to name
            for e in entries:
                if e.is_file and (e.sha256 is None or self.catalog.file(e.sha256) is None):
                    raise NotFound(f"{e.path!r}: its bytes are not in this store")
            built = build_trees(entries)
            meta = dict(meta or {})
            if isinstance(source, (Version, Selection)):
                src = source if isinstance(source, Version) else source.source
                if src is not None:
                    meta.setdefault("derived_from", src.ref)
            version, _ = self._record(name, built.root_id, built.trees, built.files, built.size, message, meta, None)
        return version

    def _record(self, name: str, root_id: str, trees: list[tuple[str, bytes]], files: int, size: int,
                message: str, meta: dict[str, Any], author: str | None) -> tuple[Version, bool]:
        _, head = self.catalog.dataset_head(name)
        entry = HistoryEntry(name, root_id, head, time.time(), author or default_author(), message, meta,
                             files, size)
        crash_point("before-record")
        created = self.catalog.record_version(entry, trees)
        crash_point("after-record")
        return self.get(f"{name}@{root_id}"), created

    # -- whole-version operations -----------------------------------------------------------------

    def diff(self, a: str, b: str) -> list[Change]:
        return diff_versions(self.get(a), self.get(b))

    def export(self, ref: str, target: str | Path, *, force: bool = False,
               progress: Progress | None = None) -> CheckoutResult:
        return export_version(self.catalog, self._whole(ref), target, force=force, progress=progress)

    def checkout(self, ref: str, target: str | Path, *, delete: bool = False,
                 progress: Progress | None = None) -> CheckoutResult:
        """Make ``target`` equal to version ``ref``, writing only what differs (resumable)."""
        return checkout_version(self.catalog, self._whole(ref), target, delete=delete, progress=progress)

    def status(self, directory: str | Path) -> Comparison:
        """What changed in ``directory`` since the version it was committed as or checked out from."""
        return status_dir(self.catalog, directory, self._whole)

    def diff_dir(self, ref: str, directory: str | Path, *, dir_is_new: bool = True) -> Comparison:
        """Changes from version ``ref`` to ``directory`` (or back, ``dir_is_new=False``)."""
        return compare_dir(self.catalog, self._whole(ref), directory, dir_is_new=dir_is_new)

    def verify(self, ref: str, target: str | Path, *, extra_ok: bool = False,
               progress: Progress | None = None) -> VerifyReport:
        return verify_dir(self._whole(ref), target, extra_ok=extra_ok, progress=progress)

    # -- remotes ----------------------------------------------------------------------------------

    def push(self, ref: str, remote: str | None = None, progress: Progress | None = None) -> PushResult:
        """Upload ``ref`` and what it needs to ``remote`` (a configured name or URL; default: the default
        remote). A bare dataset ``NAME`` pushes its whole history (every version the remote lacks, oldest
        first, like ``git push``); ``NAME@HASH`` and ``NAME:TAG`` push that one version. The result adds
        up what was uploaded; its ``ref`` is the version named (for ``NAME``: the latest). Raises
        `RemoteError` subclasses when the remote fails."""
        r = parse_ref(ref)
        with self._pusher(remote, progress) as pusher:
            head = self.resolve_local(r)
            if r.prefix or r.tag:
                self._complete_hashes([head.hash])
                return pusher.push(head.dataset, head.hash)
            total = PushResult(f"{head.dataset}@{head.hash}", pusher.remote.name)
            self._complete_hashes(self.catalog.dataset_hashes(r.dataset))
            for h in self.catalog.dataset_hashes(r.dataset):
                if h != head.hash:
                    total.add(pusher.push(r.dataset, h))
            total.add(pusher.push(head.dataset, head.hash))
            return total

    def push_all(self, name: str | None = None, remote: str | None = None, *,
                 progress: Progress | None = None) -> list[PushResult]:
        """Every version of dataset ``name`` (of every dataset when None), oldest first."""
        names = [check_dataset_name(name)] if name else [d.name for d in self.catalog.datasets()]
        out: list[PushResult] = []
        with self._pusher(remote, progress) as pusher:
            for ds in names:
                if not self.catalog.dataset_head(ds)[0]:
                    raise NotFound(f"unknown dataset {ds!r}")
                self._complete_hashes(self.catalog.dataset_hashes(ds))
                out.extend(pusher.push(ds, h) for h in self.catalog.dataset_hashes(ds))
        return out

    def _complete_hashes(self, hashes: Sequence[str]) -> None:
        lazy = rs.lazy_hashes(self.catalog)
        for h in hashes:
            if h in lazy:
                for ds in self.catalog.datasets_of(h)[:1]:
                    entry = self.catalog.history_entry(ds, h)
                    if entry is not None:
                        self.complete(self.version(entry))

    def _pusher(self, remote: str | None, progress: Progress | None) -> Pusher:
        rem = self.transports.remote(remote)
        return Pusher(self.catalog, self.store, rem, self.transports.get(rem.url), progress,
                      session_expiry=self.lifecycle_settings().session_expiry)

    def pull(self, ref: str, remote: str | None = None, *, metadata_only: bool = False,
             progress: Progress | None = None) -> Version:
        """Fetch ``ref`` from ``remote``: metadata only (browse, verify, mount with lazy reads) or,
        by default, every pack it needs so the version is fully local. Pulling a dataset's newest
        version (``NAME``) refuses while the remote's history of it has entries that do not read."""
        r = parse_ref(ref)
        rem = self._fetch_dataset(r.dataset, self.transports.remote(remote).name)
        problem = pulling.remembered_problem(self.catalog, r.dataset)
        if problem and not (r.prefix or r.tag):
            raise CorruptData(f"{problem}: refusing to take an older version as the newest (pull NAME@HASH to "
                              "pull one version)")
        version = self.complete(self.version(self._resolve_fetched(r, rem)), progress)
        if not metadata_only:
            pulling.download_packs(self.catalog, self.store, self.transports.get(rem.url), rem, version.hash,
                                   cache=DiskCache(cache_dir(self.home), cache_size(self.catalog)), progress=progress)
        return version

    def remote_datasets(self, remote: str | None = None) -> list[pulling.RemoteDataset]:
        """The datasets a remote holds (from its history keys): name, newest version, version count."""
        rem = self.transports.remote(remote)
        return pulling.remote_datasets(self.transports.get(rem.url))

    def fsck(self, progress: Progress | None = None, *, repair: bool = False, require_local: bool = False,
             read_remote: bool = False) -> FsckReport:
        """Check the home (see `tessera.fsck`); ``read_remote`` also fetches and checks the chunks of
        packs that are only on a remote."""
        return fsck(self.catalog, self.store, progress, repair=repair, require_local=require_local,
                    read_remote=self.transports.for_pack if read_remote else None)

    # -- forgetting and reclaiming ----------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.read_only:
            raise read_only_error(self.home)

    def lifecycle_settings(self) -> ls.LifecycleSettings:
        return ls.lifecycle_settings(self.catalog)

    def roots(self) -> set[str]:
        """Every version this home keeps, and every version one of its mounts serves."""
        return ls.root_versions(self.catalog) | set(lifecycle.mounted_versions(self.home))

    def forget(self, name: str, policy: KeepPolicy | None = None, *, version: str | None = None,
               dry_run: bool = False, measure: bool = False) -> lifecycle.ForgetReport:
        """Forget versions of dataset ``name`` by restic's keep rules, or one ``version`` (a ref of it);
        the bytes go with the next `gc`. ``measure``: also say how many bytes a gc could then reclaim."""
        self._require_writable()
        check_dataset_name(name)
        only = None
        if version is not None:
            entry = self.resolve_local(version)
            if entry.dataset != name:
                raise UsageError(f"{version} is not a version of {name}")
            only = entry.hash
        report = lifecycle.plan_forget(self.catalog, name, policy=policy, only=only,
                                       mounted=lifecycle.mounted_versions(self.home), pinned=self._pins(name))
        report.dry_run = dry_run
        gone = {f.hash for f in report.forgotten}
        if measure or dry_run:
            before = reclaim.measure(self.catalog, self.roots).dead_bytes if gone else 0
        if not dry_run:
            lifecycle.apply_forget(self.catalog, report)
        if (measure or dry_run) and gone:
            still = self._still_kept(name, gone)
            after = reclaim.measure(self.catalog, (lambda: self.roots() - (gone - still)) if dry_run else self.roots)
            report.freed_bytes = max(0, after.dead_bytes - before)
        elif measure or dry_run:
            report.freed_bytes = 0
        return report

    def _still_kept(self, name: str, hashes: set[str]) -> set[str]:
        """Of ``hashes``, those another dataset records too (forgetting them here keeps their bytes)."""
        return {h for h in hashes if any(d != name for d in self.catalog.datasets_of(h))}

    def remove_dataset(self, name: str) -> tuple[int, int, int]:
        """Delete dataset ``name`` (history, tags, queued pushes); the bytes go with the next `gc`."""
        self._require_writable()
        return lifecycle.remove_dataset(self.catalog, name, lifecycle.mounted_versions(self.home))

    def delete_tag(self, name: str, tag: str) -> str:
        """Delete tag ``name:tag``; returns the version hash it named."""
        self._require_writable()
        check_dataset_name(name)
        if not self.catalog.dataset_head(name)[0]:
            raise NotFound(f"unknown dataset {name!r}" + self._known_datasets_hint())
        found = ls.delete_tag(self.catalog, name, check_tag(tag))
        if found is None:
            tags = sorted({t for names in self.catalog.tags(name).values() for t in names})
            raise NotFound(f"dataset {name!r} has no tag {tag!r}" + (f" (tags: {', '.join(tags[:8])})" if tags
                                                                     else " (it has no tags)"))
        return found

    def gc(self, *, repack_threshold: float | None = None, dry_run: bool = False, lock_wait: float = reclaim.LOCK_WAIT,
           progress: Progress | None = None) -> reclaim.GcReport:
        """Reclaim space: delete what no kept version reaches, repack packs whose dead share passes
        ``repack_threshold`` (default: the ``gc.repack_threshold`` setting), remove crash garbage.
        ``lock_wait``: seconds to wait for a moment without commits before giving up."""
        self._require_writable()
        threshold = self.lifecycle_settings().repack_threshold if repack_threshold is None else repack_threshold
        return reclaim.collect(self.catalog, self.store, self.roots, repack_threshold=threshold,
                               pack_target=self.settings.pack_target, dry_run=dry_run, lock_wait=lock_wait,
                               progress=progress)

    def reclaimable(self) -> reclaim.Usage:
        """Bytes of the local packs no kept version uses (a full mark; changes nothing)."""
        return reclaim.measure(self.catalog, self.roots)

    def du(self, ref: str | None = None) -> tuple[list[lifecycle.VersionUsage], list[lifecycle.DatasetUsage]]:
        """Where the bytes are: per version (of ``ref``'s dataset, or only ``ref`` when it names a version)
        its size, the stored bytes only it holds and those it shares; per dataset the same."""
        name = hash_ = None
        if ref is not None:
            r = parse_ref(ref)
            name = r.dataset
            if not self.catalog.dataset_head(name)[0]:
                raise NotFound(f"unknown dataset {name!r}" + self._known_datasets_hint())
            if r.prefix or r.tag:
                hash_ = self.resolve_local(r).hash
        return lifecycle.disk_usage(self.catalog, self.roots(), name, hash_)

    def forget_remote(self, name: str, policy: KeepPolicy | None = None, *, version: str | None = None,
                      remote: str | None = None, dry_run: bool = False) -> pruning.RemoteForgetReport:
        """Forget versions of ``name`` on a remote (tombstones every home honours); `prune` then deletes
        their data. ``version``: a hash prefix of one version."""
        check_dataset_name(name)
        rem = self.transports.remote(remote)
        return pruning.forget_remote(self.catalog, self.transports.get(rem.url), rem, name, policy=policy,
                                     only=version, dry_run=dry_run, author=default_author())

    def prune(self, remote: str | None = None, *, dry_run: bool = False, wait: bool = False,
              progress: Progress | None = None) -> pruning.PruneReport:
        """Delete from a remote what no kept version, tag or live push session needs (two marks a margin
        apart; see `tessera.prune`)."""
        rem = self.transports.remote(remote)
        return pruning.prune_remote(self.catalog, self.transports.get(rem.url), rem, self.lifecycle_settings(),
                                    dry_run=dry_run, wait=wait, progress=progress, host=default_author())

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.catalog.stats())
        usage = None if self.read_only else self.reclaimable()  # marking needs TEMP tables: a writable catalog
        out["live_bytes"] = usage.live_bytes if usage is not None else None
        out["reclaimable_bytes"] = usage.dead_bytes if usage is not None else None
        out["home"] = str(self.home)
        out["disk_bytes"] = sum(p.stat().st_size for p in self.home.rglob("*") if p.is_file())
        out["chunk_params"] = self.settings.chunk.to_dict()
        out["compression_level"] = self.settings.compression_level
        return out


def _log_notice(msg: str) -> None:
    logger.log(logging.WARNING if msg.startswith("warning:") else logging.INFO, "%s", msg)


def _excluding(rel: str, exclude: Callable[[str], bool] | None) -> Callable[[str], bool]:
    """``exclude`` that also leaves out ``rel`` (the home, below a committed directory)."""
    return lambda path: path.rstrip("/") == rel or (exclude is not None and exclude(path))


def _open_for_writing(root: str) -> set[str]:
    from tessera.openfiles import open_for_writing

    return open_for_writing([root], skip_self=False)


def load_entry_meta(path: str | Path) -> MetaFor:
    """A sidecar JSON file ``{"relative/path": {...}, ...}`` as a ``meta_for`` callable."""
    try:
        with open(path) as f:
            table = json.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read metadata file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"metadata file {path} is not valid JSON: {exc}") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise UsageError(f"metadata file {path} must map paths to JSON objects")
    return lambda rel: table.get(rel)
