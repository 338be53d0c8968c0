"""Pull: bring a remote's versions into this home — their metadata (enough to browse, verify and mount
with lazy reads), and on request every data pack, so a version is fully local.

Everything fetched is a claim until checked (docs/format.md, "Trust rules"): history entries, version
objects, indexes and metadata packs are bounded in size and checked field by field (`tessera.remote.wire`),
trees and metadata packs against their SHA-256, every version's sizes against its trees; a downloaded pack
against its SHA-256 and every chunk its index lists. Chunk locations learnt from an index are recorded as
remote (``packs.local = 0``): reads verify each chunk, and no commit deduplicates against them.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.diskcache import DiskCache
from tessera.errors import CorruptData, NotFound, UsageError, raise_os_error
from tessera.format.pack import KIND_CHUNK, KIND_FILE, KIND_TREE, iter_blobs
from tessera.ids import check_dataset_name, check_tag, sha256_hex
from tessera.lazymeta import import_chunk_table
from tessera.model import ChunkLocation, FileRecord, HistoryEntry
from tessera.parallel import run_parallel
from tessera.progress import NullProgress, Progress
from tessera.remote.base import Transport
from tessera.format import table
from tessera.remote.wire import (
    INDEX_OBJECT_MAX,
    META_PACK_MAX,
    PACK_LIST_MAX,
    SMALL_OBJECT_MAX,
    TABLE_OBJECT_MAX,
    VERSION_OBJECT_MAX,
    RemoteTable,
    VersionObject,
    chunk_table_key,
    decode_history,
    decode_index,
    decode_pack_list,
    decode_tag,
    get_object,
    history_key_of_tombstone,
    history_prefix,
    index_key,
    iter_meta_pack,
    meta_key,
    meta_table_key,
    pack_key,
    pack_list_key,
    parse_history_key,
    tags_prefix,
    tombstone_prefix,
    version_key,
)
from tessera.remotes import Remote
from tessera.store import Store, decode_chunk, fsync_dir
from tessera.trees import Closure, closure_totals

logger = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 4
FETCH_WORKERS = 8
META_WORKERS = 2  # metadata packs fetched and imported at once (each up to 16 MiB, decoded a batch at a time)
TABLE_WORKERS = 2  # chunk tables fetched and imported at once (each up to ~40 MiB, read whole)
IMPORT_BATCH = 4096  # trees and file records decoded before they go to the catalog
_PROBLEM = "remote.problem"  # settings key prefix: a remote's history of a dataset that did not all read


@dataclass
class FetchResult:
    """What fetching a dataset's history found: entries on the remote, and the ones that could not be
    read or checked (the rest was imported)."""

    entries: int = 0
    problems: list[str] = field(default_factory=list)
    diverged_tags: list[tuple[str, str, str]] = field(default_factory=list)  # (tag, ours, theirs)


def fetch_dataset(catalog: Catalog, t: Transport, remote: Remote, dataset: str, *, lazy: bool = True) -> FetchResult:
    """Bring this home up to date with the remote's history of ``dataset``: history entries, tags, and
    the metadata of every version not yet local (``lazy``: of a format-2 version only its version object;
    its trees, file records and chunk locations are fetched as they are walked, `tessera.lazymeta`). An
    entry or version that fails its checks is skipped (the others are imported) and reported in
    ``problems``; the problem is remembered, so using the dataset warns (`remembered_problem`) until a
    later fetch reads every entry."""
    check_dataset_name(dataset)
    forgotten = {history_key_of_tombstone(info.key) for info in t.list(tombstone_prefix(dataset))}
    keys = [info.key for info in t.list(history_prefix(dataset)) if info.key not in forgotten]
    out = FetchResult(len(keys))
    if not keys:
        return out
    known = rs.known_keys(catalog, remote.name, keys)
    new = [k for k in keys if k not in known]
    entries: dict[str, HistoryEntry] = {}
    failed: dict[str, str] = {}
    lock = threading.Lock()

    def get_entry(key: str) -> None:
        try:
            e = decode_history(key, get_object(t, key, SMALL_OBJECT_MAX), f"{t.url}/{key}")
        except (CorruptData, NotFound) as exc:
            with lock:
                failed[key] = str(exc)
            return
        with lock:
            entries[key] = e

    run_parallel(FETCH_WORKERS, [partial(get_entry, k) for k in new])
    by_hash: dict[str, list[tuple[str, HistoryEntry]]] = {}
    for key, e in entries.items():
        by_hash.setdefault(e.hash, []).append((key, e))
    for h in sorted(by_hash, key=lambda h: min(e.time for _, e in by_hash[h])):
        found = by_hash[h]
        later: bytes | None = None
        objs: list[str]
        try:
            if catalog.has_version(h):
                files, size, objs = 0, 0, []
            else:
                files, size, objs, later = fetch_version(catalog, t, remote, h, lazy=lazy)
        except CorruptData as exc:
            failed.update((key, str(exc)) for key, _ in found)
            continue
        with catalog.write():
            catalog.import_version(h, files, size, [e for _, e in found])
            if later is not None:
                rs.mark_lazy(catalog, h, remote.name, later)
            rs.mark_keys(catalog, remote.name, [key for key, _ in found] + objs)
    out.diverged_tags = fetch_tags(catalog, t, remote, dataset)
    out.problems = [failed[k] for k in sorted(failed)]
    _remember_problem(catalog, remote, dataset, out.problems[-1] if out.problems else None)
    return out


def fetch_version(catalog: Catalog, t: Transport, remote: Remote, hash: str, *,
                  lazy: bool) -> tuple[int, int, list[str], bytes | None]:
    """Fetch and check one version's object, and unless it is format 2 and ``lazy``, all of its metadata
    (recorded, packs as not local). Returns (files, size, remote keys now known, the version object when
    the rest is to be fetched as walked)."""
    where = f"{t.url}/{version_key(hash)}"
    data = get_object(t, version_key(hash), VERSION_OBJECT_MAX, required_by=f"history (version {hash[:12]})")
    vobj = VersionObject.from_bytes(hash, data, where)
    if vobj.format == 1:
        return (*_fetch_v1(catalog, t, remote, vobj, where), None)
    if lazy:
        return vobj.files, vobj.size, [version_key(hash)], data
    return (*complete_metadata(catalog, t, remote, vobj, where), None)


def complete_lazy_version(catalog: Catalog, t: Transport, remote: Remote, hash: str, obj: bytes,
                          progress: Progress | None = None) -> None:
    """Fetch the rest of a lazily fetched version's metadata (what `fetch_version` left for later)."""
    where = f"{t.url}/{version_key(hash)}"
    _, _, keys = complete_metadata(catalog, t, remote, VersionObject.from_bytes(hash, obj, where), where, progress)
    with catalog.write():
        rs.drop_lazy(catalog, hash)
        rs.mark_keys(catalog, remote.name, keys)


def complete_metadata(catalog: Catalog, t: Transport, remote: Remote, vobj: VersionObject, where: str,
                      progress: Progress | None = None) -> tuple[int, int, list[str]]:
    """All the metadata of a format-2 version: its metadata packs (whole), pack lists and chunk tables
    (whole, each checked against its SHA-256; only the rows of packs the version lists are recorded),
    the packs its metadata tables cover; then the whole version is checked as a format-1 pull checks it."""
    hash = vobj.hash
    required_by = f"version {hash[:12]}"
    progress = progress or NullProgress()
    known = rs.known_keys(catalog, remote.name, [meta_key(m) for m in vobj.meta])
    todo = [m for m in vobj.meta if meta_key(m) not in known]
    progress.start(f"metadata {hash[:12]}", len(todo) + len(vobj.pack_lists) + len(vobj.chunk_tables))
    try:
        run_parallel(META_WORKERS, [partial(_get_meta_pack, catalog, t, remote, m, required_by, progress)
                                    for m in todo])
        packs: set[str] = set()
        lock = threading.Lock()

        def get_list(shard: str) -> None:
            key = pack_list_key(shard)
            ids = decode_pack_list(shard, get_object(t, key, PACK_LIST_MAX, required_by=required_by), f"{t.url}/{key}")
            with lock:
                packs.update(ids)
            progress.advance(1)

        run_parallel(FETCH_WORKERS, [partial(get_list, s) for s in vobj.pack_lists])
        if len(packs) != vobj.pack_count:
            raise CorruptData(f"{where} is malformed: its pack lists name {len(packs)} packs, it says "
                              f"{vobj.pack_count}")
        covered: set[str] = set()

        def get_chunk_table(name: str) -> None:
            key = chunk_table_key(name)
            mine = import_chunk_table(catalog, name, get_object(t, key, TABLE_OBJECT_MAX, required_by=required_by),
                                      f"{t.url}/{key}", packs)
            with lock:
                covered.update(mine)
            progress.advance(1)

        run_parallel(TABLE_WORKERS, [partial(get_chunk_table, x) for x in vobj.chunk_tables])
        missing = packs - covered
        if missing:
            raise CorruptData(f"{where} is malformed: no chunk table covers pack {min(missing)[:12]}")

        def get_meta_table_head(name: str) -> None:
            key = meta_table_key(name)
            head = RemoteTable(t, key, table.KIND_META).head()
            rs.mark_meta_pack(catalog, remote.name, name, [(rs.KIND_META_TABLE, p) for p, _ in head.packs], key=key)

        run_parallel(FETCH_WORKERS, [partial(get_meta_table_head, x) for x in vobj.meta_tables])
    finally:
        progress.finish()
    closure = _check_closure(catalog, t, vobj, where)
    keys = vobj.keys + [pack_key(p) for p in packs]
    return closure.files, closure.size, keys


def _get_meta_pack(catalog: Catalog, t: Transport, remote: Remote, pack: str, required_by: str,
                   progress: Progress | None = None) -> None:
    """Fetch metadata pack ``pack`` and record its trees and file records, a batch at a time (decoded and
    checked as they go; one transaction: a pack that fails a check leaves nothing behind)."""
    key = meta_key(pack)
    blobs = iter_meta_pack(pack, get_object(t, key, META_PACK_MAX, required_by=required_by), f"{t.url}/{key}")
    with catalog.write():
        while True:
            batch = list(islice(blobs, IMPORT_BATCH))
            if not batch:
                break
            trees = [b for b in batch if not isinstance(b, FileRecord)]
            files = [b for b in batch if isinstance(b, FileRecord)]
            catalog.add_trees(trees)
            catalog.add_files(files)
            rs.mark_meta_pack(catalog, remote.name, pack, [(KIND_TREE, i) for i, _ in trees] +
                              [(KIND_FILE, r.id) for r in files])
        rs.mark_meta_pack(catalog, remote.name, pack, [])  # the pack's key, whatever it held
    if progress is not None:
        progress.advance(1)


def _check_closure(catalog: Catalog, t: Transport, vobj: VersionObject, where: str) -> Closure:
    try:
        closure = closure_totals(catalog, vobj.hash)
    except CorruptData as exc:
        raise CorruptData(f"{t.url}: version {vobj.hash[:12]} is incomplete: {exc}") from None
    if closure.files != vobj.files or closure.size != vobj.size:
        raise CorruptData(f"{where} is malformed: it says {vobj.files} files / {vobj.size} bytes, its trees "
                          f"{closure.files} / {closure.size}")
    return closure


def _fetch_v1(catalog: Catalog, t: Transport, remote: Remote, vobj: VersionObject, where: str) -> tuple[int, int, list[str]]:
    """Format 1 (what tessera before remote format 2 wrote): every metadata pack and pack index."""
    hash = vobj.hash
    known = rs.known_keys(catalog, remote.name, [meta_key(m) for m in vobj.meta])
    required_by = f"version {hash[:12]}"
    run_parallel(FETCH_WORKERS, [partial(_get_meta_pack, catalog, t, remote, m, required_by)
                                 for m in vobj.meta if meta_key(m) not in known])
    local = catalog.pack_states(list(vobj.packs))

    def get_index(pack: str) -> None:
        key = index_key(pack)
        size, chunks = decode_index(pack, get_object(t, key, INDEX_OBJECT_MAX, required_by=required_by),
                                    f"{t.url}/{key}")
        catalog.add_remote_pack(pack, size, chunks)

    run_parallel(FETCH_WORKERS, [partial(get_index, p) for p in vobj.packs if p not in local])
    closure = _check_closure(catalog, t, vobj, where)
    return closure.files, closure.size, vobj.keys


def fetch_tags(catalog: Catalog, t: Transport, remote: Remote, dataset: str) -> list[tuple[str, str, str]]:
    """Set the remote's tags of ``dataset`` that this home lacks; returns ``(tag, ours, theirs)`` for
    tags that name another version here (ours is kept: `Repo.take_remote_tag` takes theirs)."""
    diverged = []
    for info in t.list(tags_prefix(dataset)):
        tag = info.key.rsplit("/", 1)[-1]
        try:
            check_tag(tag)
        except UsageError:
            logger.warning("%s: ignoring tag with a bad name: %s", t.url, info.key)
            continue
        theirs = remote_tag(t, dataset, tag)
        if catalog.has_version(theirs):
            ours = catalog.set_tag_if_missing(dataset, tag, theirs)
            if ours is not None:
                diverged.append((tag, ours, theirs))
    return diverged


def remote_tag(t: Transport, dataset: str, tag: str) -> str:
    """The version hash the remote's tag ``dataset:tag`` names (`NotFound` if it has none)."""
    key = tags_prefix(dataset) + tag
    return decode_tag(tag, get_object(t, key, SMALL_OBJECT_MAX), f"{t.url}/{key}")


def _remember_problem(catalog: Catalog, remote: Remote, dataset: str, problem: str | None) -> None:
    key = f"{_PROBLEM}.{dataset}"
    if problem is None:
        if catalog.setting(key) is not None:
            catalog.delete_setting(key)
        return
    catalog.set_setting(key, json.dumps({"remote": remote.name, "problem": problem}))


def remembered_problem(catalog: Catalog, dataset: str) -> str | None:
    """A one-line warning when the last fetch of ``dataset`` found history it could not read."""
    raw = catalog.setting(f"{_PROBLEM}.{dataset}")
    if raw is None:
        return None
    try:
        found = json.loads(raw)
        return f"{found['remote']}'s history of {dataset} has entries this home could not read ({found['problem']})"
    except (ValueError, KeyError, TypeError):
        return None


# -- data packs -------------------------------------------------------------------------------------

def download_packs(catalog: Catalog, store: Store, t: Transport, remote: Remote, hash: str, *,
                   cache: DiskCache | None = None, progress: Progress | None = None) -> int:
    """Download the data packs of version ``hash`` that are not local; returns how many."""
    closure = closure_totals(catalog, hash)
    states = catalog.pack_states(sorted(closure.packs))
    todo = [p for p, (_, local) in states.items() if not local or not store.has_pack_file(p)]
    if not todo:
        return 0
    progress = progress or NullProgress()
    progress.start(f"pull {hash[:12]}", sum(states[p][0] for p in todo))
    try:
        with store.writing():  # `tessera gc` waits: it must not take our files in tmp/ for garbage
            run_parallel(DOWNLOAD_WORKERS, [partial(_download_pack, catalog, store, t, remote, p, cache, progress)
                                            for p in todo])
    finally:
        progress.finish()
    return len(todo)


def _download_pack(catalog: Catalog, store: Store, t: Transport, remote: Remote, pack: str,
                   cache: DiskCache | None, progress: Progress) -> None:
    tmp = store.tmp_dir / f"pull-{pack[:16]}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            t.get_file(pack_key(pack), str(tmp), progress=progress.advance)
        except NotFound:
            raise CorruptData(f"{t.url}: pack {pack} is missing from the remote (pruned or never pushed)") from None
        check_downloaded_pack(tmp, pack, catalog.pack_chunks(pack), f"{t.url}/{pack_key(pack)}")
        final = store.pack_path(pack)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        raise_os_error(exc, f"downloading pack {pack[:12]}")
    finally:
        tmp.unlink(missing_ok=True)
    catalog.mark_pack_local(pack)
    rs.mark_keys(catalog, remote.name, [pack_key(pack)])
    if cache is not None:
        cache.drop_pack(pack)


def check_downloaded_pack(path: Path, pack: str, rows: Sequence[ChunkLocation], where: str) -> None:
    """The pack's SHA-256 is its id, and every chunk the catalog expects in it is there and decodes."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        if os.fstat(f.fileno()).st_size == 0:
            raise CorruptData(f"{where} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if sha256_hex(m) != pack:
                raise CorruptData(f"{where} fails its hash check")
            blobs = {b.offset: b for b in iter_blobs(m, where) if b.kind == KIND_CHUNK}
            for row in rows:
                b = blobs.get(row.offset)
                if b is None or (b.id, b.stored_len, b.raw_len, b.codec) != (row.id, row.stored_len, row.raw_len,
                                                                              row.codec):
                    raise CorruptData(f"{where}: its index lists chunk {row.id.hex()}, which the pack does not hold")
                decode_chunk(row, m[row.offset:row.offset + row.stored_len])


# -- listing a remote -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteDataset:
    name: str
    head: str
    versions: int
    time: float


def remote_datasets(t: Transport) -> list[RemoteDataset]:
    """The datasets a remote holds (from its history keys): name, newest version, version count."""
    found: dict[str, tuple[str, set[str]]] = {}
    forgotten = {history_key_of_tombstone(info.key) for info in t.list("tombstones/")}
    for info in t.list("history/"):
        if info.key in forgotten:
            continue
        parsed = parse_history_key(info.key)
        if parsed is None:
            logger.warning("%s: ignoring unexpected key %s", t.url, info.key)
            continue
        dataset, name, hash_ = parsed
        last, hashes = found.get(dataset, ("", set()))
        hashes.add(hash_)
        found[dataset] = (max(last, name), hashes)
    return [RemoteDataset(ds, last.split("-", 1)[1], len(hashes), int(last[:16]) / 1e6)
            for ds, (last, hashes) in sorted(found.items())]
