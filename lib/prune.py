"""Forgetting versions on a shared remote (`tessera forget --remote`) and deleting what nothing needs any
more (`tessera prune --remote`), safe while other homes push, with no lock a crashed client could leave.

**Forget** writes a tombstone next to each forgotten history entry (``tombstones/<dataset>/<entry>``,
``If-None-Match``), then deletes the entry. Readers and pushes honour tombstones, so no home's push brings
a forgotten entry back. The remote head of the dataset and tagged versions are always kept.

**Prune** is two marks a margin apart (kopia's two GC cycles; rustic's marked packs; git's cruft packs):

1. *mark and plan*: list the remote, find what kept versions (history entries without a tombstone, and
   tags) reach through their version objects, add what live push sessions announce; everything else of
   kind packs/index/meta/versions is a candidate. Publish ``prune/plans/<name>`` (each candidate with
   its size, etag and ``LastModified``).
2. *sweep* (a later run, at least ``prune.margin`` after the plan by the remote's clock): claim the plan
   with ``prune/sweeping/<name>`` (``If-None-Match``), **then** read the sessions, **then** mark again, and
   delete only candidates that are still unreachable, unchanged since planned (size, etag, LastModified:
   a push that re-uploaded one rescued it) and announced by no live session; stop at the end of
   ``prune.sweep_window``; write ``prune/done/<name>``.

Why this is safe (docs/format.md has the whole argument): a push writes its session before it reads the
plans, and a sweep writes its marker before it reads the sessions. Either the sweep sees the session and
spares what it announced, or the push sees the marker and waits for the sweep to end before it checks
(HEAD) and re-sends what the plan named. The clock is the remote's (``LastModified``, the ``Date`` of a
HEAD); prune refuses to run when the local clock is off by more than ``prune.max_clock_skew``.

Packs that kept versions still use in part are reported with their dead bytes; rewriting remote packs
is left for later.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial

from tessera.catalog import Catalog
from tessera.catalog.lifecycle_state import LifecycleSettings
from tessera.errors import AccessDenied, AmbiguousRef, CorruptData, NotFound, PreconditionFailed, RemoteError, UsageError
from tessera.lifecycle import Fate
from tessera.model import ChunkLocation
from tessera.parallel import run_parallel
from tessera.progress import NullProgress, Progress
from tessera.remote.base import ObjectInfo, Transport
from tessera.remote.wire import (
    DONE,
    INDEX_OBJECT_MAX,
    META_PACK_MAX,
    PACK_LIST_MAX,
    PLAN_MAX,
    PLANS,
    SESSION_MAX,
    SESSIONS,
    SMALL_OBJECT_MAX,
    SWEEPING,
    TABLE_OBJECT_MAX,
    VERSION_OBJECT_MAX,
    Planned,
    PlanObject,
    SessionObject,
    VersionObject,
    chunk_table_key,
    decode_chunk_table,
    decode_index,
    decode_meta_pack,
    decode_pack_list,
    decode_tag,
    done_key,
    encode_sweep_mark,
    encode_tombstone,
    get_object,
    history_key_of_tombstone,
    history_prefix,
    index_key,
    is_sweepable_key,
    meta_key,
    pack_key,
    pack_list_key,
    parse_history_key,
    plan_key,
    plan_name,
    sweeping_key,
    tags_prefix,
    tombstone_key,
    tombstone_prefix,
    version_key,
)
from tessera.remotes import Remote
from tessera.retention import Candidate, KeepPolicy, apply_policy, format_duration
from tessera.sessions import ensure_layout

logger = logging.getLogger(__name__)

DELETE_WORKERS = 8
CLOCK_STEP = 1.0  # S3 stamps LastModified and Date to the second
DELETE_BATCH = 64
_BLOB_OVERHEAD = 32
_PACK_MAGIC_LEN = 8


def check_delete_permission(t: Transport, remote: Remote, what: str) -> None:
    """Refuse, before changing anything, a remote that does not let us delete (S3 answers a DELETE it
    does not permit with 403 whether or not the key exists, so a missing key is a harmless probe)."""
    try:
        t.delete(f"prune/probe-{uuid.uuid4().hex}")
    except AccessDenied as exc:
        raise AccessDenied(f"{what} needs permission to delete objects on {remote.name}, which refuses it "
                           f"({exc}); nothing was changed") from None


def check_clock(t: Transport, max_skew: float) -> float:
    """The offset of the remote's clock from ours (remote = local - offset); `RemoteError` past ``max_skew``."""
    before = time.time()
    remote_now = t.server_time()
    local = (before + time.time()) / 2
    skew = local - remote_now
    if abs(skew) > max_skew:
        raise RemoteError(f"the local clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the clock of "
                          f"{t.url} (at most {format_duration(max_skew)} allowed, prune.max_clock_skew): refusing to "
                          "prune; fix the clock (NTP) and run again")
    return skew


# -- reading what a remote keeps ----------------------------------------------------------------------

@dataclass
class Listing:
    """One listing of the whole remote."""

    objects: dict[str, ObjectInfo]

    @classmethod
    def of(cls, t: Transport) -> Listing:
        return cls({info.key: info for info in t.list("")})

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.objects if k.startswith(prefix)]

    def forgotten(self) -> set[str]:
        return {history_key_of_tombstone(k) for k in self.keys("tombstones/")}

    def entries(self) -> list[str]:
        """History keys without a tombstone."""
        gone = self.forgotten()
        return [k for k in self.keys("history/") if k not in gone and parse_history_key(k) is not None]

    def size(self, keys: Iterable[str]) -> int:
        return sum(self.objects[k].size for k in keys if k in self.objects)


class VersionObjects:
    """Version objects read from a remote, kept for one run (keyed by etag, so a rewritten one is read again)."""

    def __init__(self, t: Transport) -> None:
        self.t = t
        self._cache: dict[tuple[str, str | None], VersionObject] = {}
        self._shards: dict[str, list[str]] = {}
        self.requests = 0
        self._lock = threading.Lock()

    def get(self, hash: str, info: ObjectInfo | None) -> VersionObject:
        key = (hash, info.etag if info is not None else None)
        with self._lock:
            found = self._cache.get(key)
        if found is None or info is None or info.etag is None:
            data = get_object(self.t, version_key(hash), VERSION_OBJECT_MAX)
            with self._lock:
                self.requests += 1
            found = VersionObject.from_bytes(hash, data, f"{self.t.url}/{version_key(hash)}")
            if found.format >= 2:  # its data packs are in its pack lists (shared by many versions: read once)
                found = replace(found, packs=tuple(p for s in found.pack_lists for p in self._pack_list(s)))
            with self._lock:
                self._cache[key] = found
        return found

    def _pack_list(self, shard: str) -> list[str]:
        with self._lock:
            found = self._shards.get(shard)
        if found is None:
            key = pack_list_key(shard)
            found = decode_pack_list(shard, get_object(self.t, key, PACK_LIST_MAX), f"{self.t.url}/{key}")
            with self._lock:
                self.requests += 1
                self._shards[shard] = found
        return found

    def many(self, hashes: Iterable[str], listing: Listing) -> dict[str, VersionObject]:
        out: dict[str, VersionObject] = {}
        lock = threading.Lock()

        def one(h: str) -> None:
            v = self.get(h, listing.objects.get(version_key(h)))
            with lock:
                out[h] = v

        run_parallel(DELETE_WORKERS, [partial(one, h) for h in sorted(set(hashes))])
        return out


def tag_versions(t: Transport, listing: Listing) -> dict[str, list[str]]:
    """Version hash -> ``dataset:tag`` names of the remote's tags."""
    out: dict[str, list[str]] = {}
    for key in listing.keys("refs/"):
        parts = key.split("/")
        if len(parts) != 4 or parts[2] != "tags":
            continue
        try:
            h = decode_tag(parts[3], get_object(t, key, SMALL_OBJECT_MAX), f"{t.url}/{key}")
        except NotFound:
            continue
        out.setdefault(h, []).append(f"{parts[1]}:{parts[3]}")
    return out


def kept_hashes(t: Transport, listing: Listing, forget: set[str] | None = None) -> dict[str, list[str]]:
    """Every version the remote keeps -> why (history entries without a tombstone, tags); ``forget``:
    history keys to count as forgotten already (a dry run)."""
    out: dict[str, list[str]] = {}
    for key in listing.entries():
        if forget and key in forget:
            continue
        parsed = parse_history_key(key)
        assert parsed is not None
        out.setdefault(parsed[2], []).append("history")
    for h, names in tag_versions(t, listing).items():
        out.setdefault(h, []).extend(f"tag {n}" for n in names)
    return out


def reachable(t: Transport, listing: Listing, kept: Iterable[str], vobjs: VersionObjects) -> tuple[set[str], dict[str, VersionObject]]:
    """The objects kept versions reach: their version objects, metadata packs, data packs and indexes
    (format 1), location tables and pack lists (format 2). A kept version without a readable version
    object (or pack list) stops the run: what it needs cannot be known."""
    kept = sorted(set(kept))
    try:
        found = vobjs.many(kept, listing)
    except (NotFound, CorruptData) as exc:
        raise CorruptData(f"prune stopped, nothing was deleted: a version the remote keeps cannot be read ({exc}); "
                          "push that version again from a home that has it, or forget it with "
                          "`tessera forget --remote`") from None
    keys: set[str] = set()
    for v in found.values():
        keys.update(v.keys)
        keys.update(pack_key(p) for p in v.packs)
    return keys, found


@dataclass
class Sessions:
    live: list[SessionObject]
    expired: list[str]  # keys of sessions past their expiry

    @property
    def keys(self) -> set[str]:
        return {k for s in self.live for k in s.keys}


def read_sessions(t: Transport, now: float) -> Sessions:
    """Every push session on the remote: the live ones (with what they announce) and the expired ones.
    An unreadable session stops the run (it might announce anything)."""
    infos = list(t.list(SESSIONS))
    live: list[SessionObject] = []
    expired: list[str] = []
    for info in infos:
        try:
            s = SessionObject.from_bytes(info.key, get_object(t, info.key, SESSION_MAX), f"{t.url}/{info.key}")
        except NotFound:
            continue  # it ended meanwhile
        except CorruptData as exc:
            raise CorruptData(f"prune stopped, nothing was deleted: {exc}") from None
        if (info.modified or now) + s.expiry < now:
            expired.append(info.key)
        else:
            live.append(s)
    return Sessions(live, expired)


# -- forget --remote ----------------------------------------------------------------------------------

@dataclass
class RemoteForgetReport:
    remote: str
    dataset: str
    rule: str
    fates: list[Fate]
    dry_run: bool = False
    tombstones: int = 0
    entries_deleted: int = 0
    freed_bytes: int | None = None  # dry run: bytes a prune would delete once these are forgotten

    @property
    def forgotten(self) -> list[Fate]:
        return [f for f in self.fates if not f.keep]


def forget_remote(catalog: Catalog, t: Transport, remote: Remote, dataset: str, *, policy: KeepPolicy | None = None,
                  only: str | None = None, dry_run: bool = False, author: str = "") -> RemoteForgetReport:
    """Forget versions of ``dataset`` on the remote by keep rules or one version (a hash prefix)."""
    if only is None and (policy is None or policy.empty):
        raise UsageError(f"forget --remote {dataset} needs a keep rule (--keep-last N, --keep-daily N, ... "
                         f"--keep-within 30d, --keep-tag TAG) or a version ({dataset}@HASH); to keep only the newest "
                         "version use --keep-last 1")
    forgotten = {history_key_of_tombstone(i.key) for i in t.list(tombstone_prefix(dataset))}
    entries = [i.key for i in t.list(history_prefix(dataset)) if i.key not in forgotten]
    if not entries:
        raise NotFound(f"remote {remote.name} has no dataset {dataset!r}")
    by_hash: dict[str, list[str]] = {}
    for key in sorted(entries):
        parsed = parse_history_key(key)
        if parsed is not None:
            by_hash.setdefault(parsed[2], []).append(key)
    head = parse_history_key(max(entries))[2]  # type: ignore[index]
    tags: dict[str, list[str]] = {}
    for info in t.list(tags_prefix(dataset)):
        tag = info.key.rsplit("/", 1)[-1]
        try:
            tags.setdefault(decode_tag(tag, get_object(t, info.key, SMALL_OBJECT_MAX), f"{t.url}/{info.key}"),
                            []).append(tag)
        except (NotFound, CorruptData):
            continue

    def when(h: str) -> float:
        return max(int(k.rsplit("/", 1)[1][:16]) for k in by_hash[h]) / 1e6

    if only is not None:
        hits = [h for h in by_hash if h.startswith(only)]
        if not hits:
            raise NotFound(f"remote {remote.name} has no version {dataset}@{only}")
        if len(hits) > 1:
            raise AmbiguousRef(f"{dataset}@{only} is ambiguous on {remote.name}: it matches "
                               f"{', '.join(h[:12] for h in hits[:10])}")
        fates = [Fate(h, when(h), len(by_hash[h]), [] if h == hits[0] else ["not selected"]) for h in by_hash]
    else:
        assert policy is not None
        verdicts = {v.key: v for v in apply_policy(policy, [Candidate(h, when(h), tuple(tags.get(h, ())))
                                                          for h in by_hash])}
        fates = [Fate(h, when(h), len(by_hash[h]), list(verdicts[h].reasons)) for h in by_hash]
    for f in fates:
        always = (["remote head"] if f.hash == head else []) + [f"tag {x}" for x in tags.get(f.hash, ())]
        if only is not None and not f.reasons and always:
            raise UsageError(f"cannot forget {dataset}@{f.hash[:12]} on {remote.name}: it is kept ({', '.join(always)})"
                             + ("; the newest version of a dataset stays" if f.hash == head else
                                f"; delete the tag first (on the remote too)"))
        f.reasons += always
    fates.sort(key=lambda f: (f.time, f.hash), reverse=True)
    rule = policy.describe() if only is None and policy is not None else f"{dataset}@{only}"
    report = RemoteForgetReport(remote.name, dataset, rule, fates, dry_run)
    gone_keys = [k for f in report.forgotten for k in by_hash[f.hash]]
    if dry_run:
        report.freed_bytes = _freed_if_forgotten(t, set(gone_keys))
        return report
    if not gone_keys:
        return report
    check_delete_permission(t, remote, "forget --remote")
    ensure_layout(catalog, t, remote)
    for key in gone_keys:
        parsed = parse_history_key(key)
        assert parsed is not None
        try:
            t.put_conditional(tombstone_key(key), encode_tombstone(key, parsed[2], time.time(), author))
            report.tombstones += 1
        except PreconditionFailed:
            pass  # forgotten already
    run_parallel(DELETE_WORKERS, [partial(t.delete, k) for k in gone_keys])
    report.entries_deleted = len(gone_keys)
    return report


def _freed_if_forgotten(t: Transport, gone: set[str]) -> int:
    listing = Listing.of(t)
    vobjs = VersionObjects(t)
    now_keys, _ = reachable(t, listing, kept_hashes(t, listing), vobjs)
    after_keys, _ = reachable(t, listing, kept_hashes(t, listing, gone), vobjs)
    return listing.size(now_keys - after_keys)


# -- prune --remote -----------------------------------------------------------------------------------

@dataclass
class Sweep:
    plan: str
    deleted: int = 0
    deleted_bytes: int = 0
    spared: int = 0
    stopped_early: bool = False


@dataclass
class PruneReport:
    remote: str
    dry_run: bool = False
    kept_versions: int = 0
    objects: int = 0
    object_bytes: int = 0
    sweeps: list[Sweep] = field(default_factory=list)
    planned: int = 0
    planned_bytes: int = 0
    plan: str | None = None
    sweep_after: float | None = None  # when the newest plan may be swept (local clock)
    live_sessions: int = 0
    sessions_removed: int = 0
    partial: list[tuple[str, int, int]] = field(default_factory=list)  # (pack, size, dead bytes)
    skew: float = 0.0
    requests: int = 0

    @property
    def deleted(self) -> int:
        return sum(s.deleted for s in self.sweeps)

    @property
    def deleted_bytes(self) -> int:
        return sum(s.deleted_bytes for s in self.sweeps)

    @property
    def partial_dead_bytes(self) -> int:
        return sum(d for _, _, d in self.partial)


@dataclass
class _PlanInfo:
    name: str
    modified: float
    sweeping: bool
    done: bool


def _plans(t: Transport) -> list[_PlanInfo]:
    plans: dict[str, float] = {}
    sweeping: set[str] = set()
    done: set[str] = set()
    for info in t.list("prune/"):
        name = info.key.rsplit("/", 1)[-1]
        if info.key.startswith(PLANS):
            plans[name] = info.modified or 0.0
        elif info.key.startswith(SWEEPING):
            sweeping.add(name)
        elif info.key.startswith(DONE):
            done.add(name)
    return [_PlanInfo(n, m, n in sweeping, n in done) for n, m in sorted(plans.items())]


def prune_remote(catalog: Catalog, t: Transport, remote: Remote, settings: LifecycleSettings, *,
                 dry_run: bool = False, wait: bool = False, progress: Progress | None = None,
                 host: str = "") -> PruneReport:
    """One prune run (see the module doc): sweep every plan old enough, then publish a plan of what is
    unreachable now (unless a younger plan is still waiting). ``wait``: then wait out the margin and sweep
    that plan too. Refuses before changing anything when deleting is not allowed or the clock is off."""
    report = PruneReport(remote.name, dry_run)
    skew = check_clock(t, settings.max_clock_skew)
    report.skew = skew

    def now() -> float:  # the remote's clock, from ours and the measured offset
        return time.time() - skew

    if not dry_run:
        check_delete_permission(t, remote, "prune")
        ensure_layout(catalog, t, remote)
    vobjs = VersionObjects(t)
    progress = progress or NullProgress()
    due = _cycle(t, settings, report, vobjs, now, dry_run, host, progress)
    if wait and not dry_run and due is not None:
        # LastModified and Date have one-second steps: wait a step more than the margin
        pause = due + CLOCK_STEP - now()
        if pause > 0:
            logger.info("waiting %s for the prune margin", format_duration(pause))
            time.sleep(pause)
        _cycle(t, settings, report, vobjs, now, dry_run, host, progress)
    report.requests += vobjs.requests
    return report


def _cycle(t: Transport, settings: LifecycleSettings, report: PruneReport, vobjs: VersionObjects,
           now: Callable[[], float], dry_run: bool, host: str, progress: Progress) -> float | None:
    """Sweep what is due, plan what is unreachable; returns when the newest plan is due (remote clock)."""
    plans = _plans(t)
    for p in plans:
        if not p.sweeping and not p.done and p.modified + _margin_of(t, p.name, settings) <= now():
            if dry_run:
                continue
            sweep = _sweep(t, p.name, settings, vobjs, now, host, progress)
            if sweep is not None:
                report.sweeps.append(sweep)
    young = [p for p in _plans(t) if not p.sweeping and not p.done
             and _margin_of(t, p.name, settings) != float("inf")]  # an unreadable plan is never swept
    sessions = read_sessions(t, now())
    listing = Listing.of(t)
    kept = kept_hashes(t, listing)
    keys, found = reachable(t, listing, kept, vobjs)
    keys |= sessions.keys
    report.kept_versions = len(kept)
    report.objects = len(listing.objects)
    report.object_bytes = listing.size(listing.objects)
    report.live_sessions = len(sessions.live)
    candidates = [listing.objects[k] for k in sorted(listing.objects) if is_sweepable_key(k) and k not in keys]
    report.partial = _partial_packs(t, listing, candidates, found, vobjs)
    report.planned = len(candidates)
    report.planned_bytes = sum(c.size for c in candidates)
    report.plan = None
    due: float | None = None
    if young:
        newest = max(young, key=lambda p: p.modified)
        report.plan = newest.name
        due = newest.modified + _margin_of(t, newest.name, settings)
    elif candidates and not dry_run:
        name = plan_name(time.time(), uuid.uuid4().hex)
        plan = PlanObject(name, time.time(), settings.prune_margin, settings.sweep_window,
                          tuple(Planned(c.key, c.size, c.etag, c.modified) for c in candidates),
                          tuple(report.partial))
        t.put_conditional(plan_key(name), plan.to_bytes())
        info = t.head(plan_key(name))
        report.plan = name
        due = (info.modified if info is not None and info.modified is not None else now()) + settings.prune_margin
    report.sweep_after = None if due is None else due + (time.time() - now())  # on the local clock
    if not dry_run and sessions.expired:
        run_parallel(DELETE_WORKERS, [partial(t.delete, k) for k in sessions.expired])
        report.sessions_removed += len(sessions.expired)
    return due


_plans_read: dict[tuple[str, str], PlanObject] = {}  # plans never change: read once per process


def _plan(t: Transport, name: str) -> PlanObject:
    plan = _plans_read.get((t.url, name))
    if plan is None:
        plan = PlanObject.from_bytes(name, get_object(t, plan_key(name), PLAN_MAX), f"{t.url}/{plan_key(name)}")
        _plans_read[(t.url, name)] = plan
    return plan


def _margin_of(t: Transport, name: str, settings: LifecycleSettings) -> float:
    """A plan waits the margin it was made with, or this home's, whichever is longer."""
    try:
        return max(_plan(t, name).margin, settings.prune_margin)
    except (NotFound, CorruptData):
        return float("inf")


def _sweep(t: Transport, name: str, settings: LifecycleSettings, vobjs: VersionObjects, now: Callable[[], float],
           host: str, progress: Progress) -> Sweep | None:
    """Sweep plan ``name``: claim it, read the sessions, mark again, delete what is still dead."""
    plan = _plan(t, name)
    try:
        t.put_conditional(sweeping_key(name), encode_sweep_mark(name, time.time(), host))
    except PreconditionFailed:
        return None  # another prune claimed it
    info = t.head(sweeping_key(name))
    started = info.modified if info is not None and info.modified is not None else now()
    window = min(plan.window, settings.sweep_window) if settings.sweep_window else plan.window
    deadline = started + window - min(5.0, window / 10)
    out = Sweep(name)
    deleted: list[str] = []
    try:
        sessions = read_sessions(t, now())
        listing = Listing.of(t)
        keys, _ = reachable(t, listing, kept_hashes(t, listing), vobjs)
        keys |= sessions.keys
        doomed: list[Planned] = []
        for c in plan.candidates:
            cur = listing.objects.get(c.key)
            if cur is None:
                continue  # gone already
            if c.key in keys or not _unchanged(c, cur):
                out.spared += 1
                continue
            doomed.append(c)
        progress.start(f"prune: sweep {name}", len(doomed), unit="object")
        for i in range(0, len(doomed), DELETE_BATCH):
            if now() > deadline:
                out.stopped_early = True
                logger.warning("prune: the sweep window of plan %s ended; the rest waits for the next plan", name)
                break
            batch = doomed[i:i + DELETE_BATCH]
            run_parallel(DELETE_WORKERS, [partial(t.delete, c.key) for c in batch])
            deleted.extend(c.key for c in batch)
            out.deleted += len(batch)
            out.deleted_bytes += sum(c.size for c in batch)
            progress.advance(len(batch))
        progress.finish()
    finally:
        try:
            t.put_conditional(done_key(name), encode_sweep_mark(name, time.time(), host, deleted, out.spared))
        except PreconditionFailed:
            pass
    return out


def _unchanged(planned: Planned, current: ObjectInfo) -> bool:
    if planned.size != current.size:
        return False
    if planned.etag is not None and current.etag is not None and planned.etag != current.etag:
        return False
    if planned.modified is not None and current.modified is not None and abs(planned.modified - current.modified) > 1e-3:
        return False
    return True


def _partial_packs(t: Transport, listing: Listing, candidates: list[ObjectInfo], kept: dict[str, VersionObject],
                   vobjs: VersionObjects) -> list[tuple[str, int, int]]:
    """Data packs kept versions still use that also hold chunks only unreachable versions used: each with
    its size and the bytes a repack of it would free (read from the versions' metadata and the indexes)."""
    dead_versions = [c.key.split("/", 1)[1] for c in candidates if c.key.startswith("versions/")]
    if not dead_versions:
        return []
    shared: set[str] = set()
    for h in dead_versions:
        try:
            shared.update(vobjs.get(h, listing.objects.get(version_key(h))).packs)
        except (NotFound, CorruptData):
            continue
    live_packs = {p for v in kept.values() for p in v.packs}
    shared &= live_packs
    if not shared:
        return []
    used: set[bytes] = set()
    metas = sorted({m for v in kept.values() if shared & set(v.packs) for m in v.meta})
    for m in metas:
        try:
            _, files = decode_meta_pack(m, get_object(t, meta_key(m), META_PACK_MAX), f"{t.url}/{meta_key(m)}")
        except (NotFound, CorruptData):
            return []  # cannot tell: report nothing rather than a wrong figure
        for rec in files:
            used.update(cid for cid, _ in rec.chunks)
    from_tables: dict[str, tuple[int, list[ChunkLocation]]] = {}
    for x in sorted({x for v in kept.values() if shared & set(v.packs) for x in v.chunk_tables}):
        try:
            found = decode_chunk_table(x, get_object(t, chunk_table_key(x), TABLE_OBJECT_MAX),
                                       f"{t.url}/{chunk_table_key(x)}")
        except (NotFound, CorruptData):
            continue
        from_tables.update((p, rows) for p, rows in found.items() if p in shared)
    out = []
    for p in sorted(shared):
        try:
            size, rows = from_tables.get(p) or decode_index(p, get_object(t, index_key(p), INDEX_OBJECT_MAX),
                                                            f"{t.url}/{index_key(p)}")
        except (NotFound, CorruptData):
            continue
        live = sum(r.stored_len + _BLOB_OVERHEAD for r in rows if r.id in used)
        live += _PACK_MAGIC_LEN if live else 0
        if size > live:
            out.append((p, size, size - live))
    return out
