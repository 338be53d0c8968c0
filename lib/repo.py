"""`Repo`: the facade over catalog, store, snapshot and (later) remotes. The CLI calls only this."""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tessera.cache import LRUCache
from tessera.catalog import Catalog, ChunkLocation, DatasetInfo
from tessera.checkout import VerifyReport, export_version, verify_dir
from tessera.config import RepoSettings, default_author, default_home
from tessera.errors import AmbiguousRef, CorruptData, NotFound, UsageError
from tessera.format.chunker import ChunkParams
from tessera.faults import crash_point
from tessera.fsck import FsckReport, fsck, remove_garbage
from tessera.ids import Ref, check_dataset_name, check_tag, parse_ref
from tessera.model import Entry, FileRecord, HistoryEntry, Tree
from tessera.progress import Progress
from tessera.snapshot import MetaFor, SnapshotOptions, SnapshotStats, snapshot_dir
from tessera.store import Store
from tessera.treebuild import build_trees
from tessera.version import Change, Selection, Version, diff_versions, entries_of

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.db"
TREE_CACHE_BYTES = 64 * 1024 * 1024
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


@dataclass
class CommitResult:
    version: Version
    created: bool
    stats: SnapshotStats


class Repo:
    """A tessera home: ``Repo()`` uses ``$TESSERA_HOME`` or ``~/.tessera`` and creates it if needed."""

    def __init__(self, home: str | Path | None = None, *, remote: str | None = None,
                 settings: RepoSettings | None = None) -> None:
        """``remote``: the remote (a configured name or a URL) that push, pull and lazy reads use when
        none is named; default: the remote marked default, or the only one."""
        self.home = Path(home).expanduser() if home is not None else default_home()
        if self.home.exists() and not self.home.is_dir():
            raise UsageError(f"tessera home {self.home} is not a directory")
        self.home.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.home / CATALOG_FILE)
        self.store = Store(self.home, self.catalog)
        self.settings = self._load_settings(settings)
        self._trees: LRUCache[Tree] = LRUCache(TREE_CACHE_BYTES, sizeof=lambda t: 200 * len(t.entries) + 100)
        self._chunks: LRUCache[bytes] = LRUCache(CHUNK_CACHE_BYTES)
        self.remote = remote
        self._transports: Any = None
        self._lazy: Any = None
        self._remote_packs: set[str] = set()
        self._sync_lock = threading.RLock()
        self.store.remote_fetch = self._fetch_remote_chunk
        self.store.remote_will_need = self._will_need_remote_chunks

    def _load_settings(self, wanted: RepoSettings | None) -> RepoSettings:
        if self.catalog.setting("chunk.avg_size") is None:
            chosen = wanted or RepoSettings()
            with self.catalog.write():
                for k, v in chosen.to_items().items():
                    self.catalog.set_setting(k, v)
            return chosen
        current = RepoSettings.from_items({k: self.catalog.setting(k) or "" for k in RepoSettings().to_items()})
        if wanted is not None and wanted != current:
            raise UsageError(f"{self.home} already exists with other store settings; they are fixed at init")
        return current

    def close(self) -> None:
        if self._lazy is not None:
            self._lazy.close()
        if self._transports is not None:
            self._transports.close()
        self.store.close()
        self.catalog.close()

    def __enter__(self) -> "Repo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Repo {self.home}>"

    # -- refs -------------------------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> HistoryEntry:
        """The history entry ``ref`` names. A dataset or version this home does not have is looked for
        on the default remote (its metadata is fetched; chunks are read lazily)."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        try:
            return self.resolve_local(r)
        except NotFound:
            remote = self._fetch_missing(r)
            if remote is None:
                raise
        try:
            return self.resolve_local(r)
        except NotFound as exc:
            raise NotFound(f"{exc} (remote {remote} has the dataset but not this version)") from None

    def _fetch_missing(self, r: Ref) -> str | None:
        """Fetch ``r``'s dataset from the default remote; the remote's name, or None when there is no
        default remote or it does not have the dataset."""
        from tessera import sync

        with self._sync_lock:
            found = sync.fetch_for_ref(self, r)
        return found.name if found is not None else None

    def resolve_local(self, ref: str | Ref) -> HistoryEntry:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        exists, head = self.catalog.dataset_head(r.dataset)
        if not exists:
            raise NotFound(f"unknown dataset {r.dataset!r}" + self._known_datasets_hint())
        if r.prefix:
            found = self.catalog.find_versions(r.dataset, r.prefix)
            if not found:
                raise NotFound(f"dataset {r.dataset!r} has no version {r.prefix}")
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

    def _known_datasets_hint(self) -> str:
        names = [d.name for d in self.catalog.datasets()]
        return f" (known: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})" if names else " (no datasets yet)"

    def get(self, ref: str, *, lock: bool = True) -> Version:
        """``NAME`` (latest), ``NAME@HASHPREFIX`` (>= 6 hex chars) or ``NAME:TAG``. A bare ``NAME``
        pinned by the nearest ``tessera.lock`` is its pinned version unless ``lock=False``."""
        if lock:
            from tessera.lockfile import pinned_ref

            ref = pinned_ref(self, ref)
        return Version(self, self.resolve(ref))

    def datasets(self) -> list[DatasetInfo]:
        return self.catalog.datasets()

    def log(self, name: str, limit: int | None = None) -> list[HistoryEntry]:
        check_dataset_name(name)
        if not self.catalog.dataset_head(name)[0] and self._fetch_missing(Ref(name)) is None:
            raise NotFound(f"unknown dataset {name!r}" + self._known_datasets_hint())
        return self.catalog.history(name, limit)

    def tags(self, name: str) -> dict[str, list[str]]:
        return self.catalog.tags(name)

    def tag(self, ref: str, tag: str) -> Version:
        v = self.get(ref)
        self.catalog.set_tag(v.name, check_tag(tag), v.hash)
        return v

    # -- reading ----------------------------------------------------------------------------------

    def load_tree(self, tree_id: str) -> Tree:
        tree = self._trees.get(tree_id)
        if tree is None:
            data = self.catalog.tree(tree_id)
            if data is None:
                raise CorruptData(f"tree {tree_id[:12]} is missing from the catalog")
            tree = Tree.from_bytes(data)
            self._trees.put(tree_id, tree)
        return tree

    def _fetch_remote_chunk(self, loc: ChunkLocation) -> bytes:
        """`Store.read_stored` calls this for a chunk whose pack file is not here: a lazy remote read
        when the pack lives on a remote (``packs.local = 0``), else the store is damaged."""
        if loc.pack not in self._remote_packs:
            from tessera.catalog.remote_state import pack_states
            from tessera.errors import CorruptData

            _, local = pack_states(self.catalog, [loc.pack]).get(loc.pack, (0, True))
            if local:
                raise CorruptData(f"pack {loc.pack} holding chunk {loc.id.hex()} is missing")
            self._remote_packs.add(loc.pack)
        if self._lazy is None:
            from tessera.lazy import LazyFetcher

            with self._sync_lock:
                if self._lazy is None:
                    self._lazy = LazyFetcher.for_repo(self)
        return self._lazy.fetch(loc)

    def _will_need_remote_chunks(self, locs: list[ChunkLocation]) -> None:
        """`Store.will_need`: let lazy reads (once in use) start on chunks a reader is about to read."""
        if self._lazy is None:
            return
        unknown = {loc.pack for loc in locs} - self._remote_packs
        if unknown:
            from tessera.catalog.remote_state import pack_states

            for pack, (_, local) in pack_states(self.catalog, sorted(unknown)).items():
                if not local:
                    self._remote_packs.add(pack)
        self._lazy.will_need([loc for loc in locs if loc.pack in self._remote_packs])

    def read_chunk(self, cid: bytes) -> bytes:
        data = self._chunks.get(cid)
        if data is None:
            data = self.store.read_chunk(cid)
            self._chunks.put(cid, data)
        return data

    # -- writing ----------------------------------------------------------------------------------

    def commit_dir(self, name: str, path: str | Path, *, message: str = "", meta: dict[str, Any] | None = None,
                   meta_for: MetaFor | None = None, tag: str | None = None, author: str | None = None,
                   exclude: Callable[[str], bool] | None = None, progress: Progress | None = None,
                   workers: int = 0, keep_busy: bool = False) -> CommitResult:
        """Snapshot ``path`` as a new version of ``name``; unchanged content reports the head.

        A file that keeps changing while it is read fails the commit (`SourceError`), unless
        ``keep_busy``: then it keeps its content from the dataset's head version (or is left out if
        it is new) and is listed in ``stats.busy``. The daemon commits this way."""
        check_dataset_name(name)
        if tag is not None:
            check_tag(tag)
        if meta is not None and not isinstance(meta, dict):
            raise UsageError("version metadata must be a JSON object")
        opts = SnapshotOptions(self.settings.chunk, self.settings.compression_level, self.settings.pack_target,
                               workers=workers, meta_for=meta_for, exclude=exclude,
                               previous=self._previous_records(name) if keep_busy else None)
        snap = snapshot_dir(self.catalog, self.store, path, opts, progress)
        version, created = self._record(name, snap.root_id, snap.trees, snap.files, snap.size,
                                        message, meta or {}, author)
        if tag is not None:
            self.catalog.set_tag(name, tag, version.hash)
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
               meta_for: MetaFor | str | Path | None = None, tag: str | None = None) -> Version:
        """Snapshot a directory. ``meta_for`` is a callable ``path -> dict`` or a JSON file mapping
        paths to per-entry metadata dicts."""
        if isinstance(meta_for, (str, Path)):
            meta_for = load_entry_meta(meta_for)
        return self.commit_dir(name, path, message=message, meta=meta, meta_for=meta_for, tag=tag).version

    def commit_version(self, name: str, source: Version | Selection | Iterable[Entry], *, message: str = "",
                       meta: dict[str, Any] | None = None) -> Version:
        """Make a version from existing entries (a filtered selection, another version) without
        copying any bytes: only new trees are written."""
        check_dataset_name(name)
        entries = entries_of(source)
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

    def export(self, ref: str, target: str | Path, *, force: bool = False, progress: Progress | None = None) -> int:
        return export_version(self.get(ref), target, force=force, progress=progress)

    def verify(self, ref: str, target: str | Path, *, extra_ok: bool = False,
               progress: Progress | None = None) -> VerifyReport:
        return verify_dir(self.get(ref), target, extra_ok=extra_ok, progress=progress)

    # -- remotes ----------------------------------------------------------------------------------

    @property
    def transports(self) -> Any:
        """Open remote transports, shared by this repo's threads (`tessera.sync.Transports`)."""
        if self._transports is None:
            from tessera.sync import Transports

            with self._sync_lock:
                if self._transports is None:
                    self._transports = Transports()
        return self._transports

    def push(self, ref: str, remote: str | None = None, progress: Progress | None = None) -> Any:
        """Upload version ``ref`` (NAME, NAME@PREFIX or NAME:TAG) and what it needs to ``remote`` (a
        configured name or URL; default: the default remote); returns a `tessera.sync.PushResult`.
        Raises `RemoteError` subclasses when the remote fails."""
        from tessera import sync

        return sync.push(self, ref, remote, progress=progress)

    def pull(self, ref: str, remote: str | None = None, *, metadata_only: bool = False,
             progress: Progress | None = None) -> Version:
        """Fetch ``ref`` from ``remote``: metadata only (browse, verify, mount with lazy reads) or,
        by default, every pack it needs so the version is fully local."""
        from tessera import sync

        return sync.pull(self, ref, remote, metadata_only=metadata_only, progress=progress)

    def fsck(self, progress: Progress | None = None) -> FsckReport:
        return fsck(self.catalog, self.store, progress)

    def gc(self) -> list[str]:
        return remove_garbage(self.store, self.catalog)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.catalog.stats())
        out["home"] = str(self.home)
        out["disk_bytes"] = sum(p.stat().st_size for p in self.home.rglob("*") if p.is_file())
        out["chunk_params"] = self.settings.chunk.to_dict()
        out["compression_level"] = self.settings.compression_level
        return out


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
