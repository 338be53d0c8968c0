"""Push: upload a version and what it needs to a remote, skipping what the remote already holds.

For one version, in this order (so a reader that finds a history entry finds every byte behind it):
data packs and their indexes, metadata packs (trees and file records the remote lacks), the version
object, the history entries, the tags. What the remote holds is known from the catalog
(``remote_objects``, ``remote_meta``), never by listing the bucket, and each key is recorded right after
its upload: a push interrupted at any point, re-run, uploads only what is still missing. Key names and
object encodings are `tessera.remote.wire`'s.

On a remote somebody forgot or pruned on (layout 2), a push that has something to send also skips the
history entries a tombstone forgot, announces what it relies on in a session, and respects prune plans
(`tessera.sessions`): it trusts its record of the remote for nothing a plan names.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData, NotFound, PreconditionFailed
from tessera.faults import crash_point
from tessera.format import table
from tessera.format.pack import KIND_FILE, KIND_TREE
from tessera.ids import sha256_hex
from tessera.model import ChunkLocation, HistoryEntry
from tessera.parallel import run_parallel
from tessera.progress import NullProgress, Progress
from tessera.remote.base import Transport
from tessera.remote.wire import (
    META_PACK_TARGET,
    VERSION_FORMAT,
    MetaPackBuilder,
    VersionObject,
    chunk_table_key,
    encode_history,
    encode_tag,
    history_key,
    meta_key,
    meta_table_key,
    pack_key,
    pack_list_key,
    shard_pack_list,
    tag_key,
    tombstone_prefix,
    version_key,
    upload_table,
    write_chunk_rows,
)
from tessera.remotes import Remote
from tessera.sessions import Plans, PushSession, remote_layout
from tessera.store import Store
from tessera.tablemerge import TABLE_PACKS, TABLE_ROWS, merge_tables
from tessera.trees import Closure, ClosureWalk

logger = logging.getLogger(__name__)

UPLOAD_WORKERS = 4
SESSION_EXPIRY = 3600.0
CHUNK_TABLE_PACKS = TABLE_PACKS  # data packs per chunk table (~48 GiB of data)
CHUNK_TABLE_ROWS = TABLE_ROWS  # chunks per chunk table (~37 MiB of table, built through temporary files)
META_TABLE_PACKS = 8  # metadata packs per metadata table (~128 MiB of trees and file records)
SEEN_FILES = 8192  # file ids a push's walk remembers to skip a record met twice (older repeats are found in the catalog)


@dataclass
class PushResult:
    ref: str
    remote: str
    packs: int = 0
    pack_bytes: int = 0
    indexes: int = 0
    meta_packs: int = 0
    objects: int = 0  # every object written (packs, indexes, meta, version, history, tags)
    versions: int = 0  # versions this push sent (not already on the remote)
    forgotten: int = 0  # versions not sent: the remote forgot every history entry of them (tombstones)
    resent: int = 0  # objects this home thought the remote had, found gone after a prune: sent again
    packs_needed: int = 0  # data packs those versions need (the rest of them were on the remote already)

    def add(self, other: PushResult) -> None:
        self.packs += other.packs
        self.pack_bytes += other.pack_bytes
        self.indexes += other.indexes
        self.meta_packs += other.meta_packs
        self.objects += other.objects
        self.versions += other.versions
        self.forgotten += other.forgotten
        self.resent += other.resent
        self.packs_needed += other.packs_needed

    @property
    def uploaded(self) -> bool:
        return self.objects > 0

    def summary(self) -> str:
        if not self.uploaded and self.forgotten and not self.versions:
            return f"{self.remote} forgot {self.ref} (`tessera forget --remote`): not pushed again"
        if not self.uploaded:
            return f"{self.remote} already has {self.ref}"
        return (f"pushed {self.ref} to {self.remote}: {self.packs} packs ({self.pack_bytes / (1 << 20):.1f} MiB), "
                f"{self.meta_packs} metadata packs, {self.objects} objects")


class Pusher:
    """Pushes versions of this home to one remote (one transport, shared by the upload threads)."""

    def __init__(self, catalog: Catalog, store: Store, remote: Remote, transport: Transport,
                 progress: Progress | None = None, *, session_expiry: float = SESSION_EXPIRY) -> None:
        self.cat = catalog
        self.store = store
        self.remote = remote
        self.t = transport
        self.progress = progress or NullProgress()
        self.session_expiry = session_expiry
        self._lock = threading.Lock()
        self._counted: set[str] = set()
        self._layout: int | None = None
        self._session: PushSession | None = None
        self._tombstones: dict[str, set[str]] = {}

    def close(self) -> None:
        """End the push session, if one was opened (call when done pushing)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(self, dataset: str, hash: str) -> PushResult:
        """Upload ``dataset@hash`` (every history entry this home has for it) and what it needs."""
        res = PushResult(f"{dataset}@{hash}", self.remote.name)
        history = [(history_key(e), e) for e in self.cat.history_for(dataset, hash)]
        done = rs.known_keys(self.cat, self.remote.name, [version_key(hash)] + [k for k, _ in history])
        if len(done) < 1 + len(history):
            guarded = self._layout_of_remote() >= 2
            if guarded:
                forgotten = self._forgotten(dataset)
                history = [h for h in history if h[0] not in forgotten]
                if not history:
                    res.forgotten += 1
                    return res
            # the version is walked twice in batches (never held whole: a million files stay in bounded
            # memory): for its packs and sizes (and what it relies on), then for its metadata
            walk = ClosureWalk(self.cat, hash, seen_limit=SEEN_FILES)
            relied: set[str] = set()
            for batch in walk:
                if guarded:
                    relied.update(m for kind in self._meta_have(batch).values() for m in kind.values())
            closure = Closure(packs=walk.packs, files=walk.files, size=walk.size)
            if guarded:
                res.resent += self._guard(hash, closure, relied)
            self._push_packs(res.ref, closure, res)
            meta = self._push_meta(walk, res)
            crash_point("push-before-version")
            if self._session is not None:
                self._session.check_alive()
            self._push_version(hash, closure, meta, res)
            crash_point("push-before-history")
            self._push_history([h for h in history if h[0] not in done], res)
            res.versions += 1
        self._push_tags(dataset, hash, res)
        return res

    @property
    def _announce(self) -> Callable[[Iterable[str]], None] | None:
        """The session's announce (what a prune must keep, said before it exists), when one is open."""
        return self._session.announce if self._session is not None else None

    # what a forget or prune on the remote asks of a push (layout 2)

    def _layout_of_remote(self) -> int:
        if self._layout is None:
            self._layout = remote_layout(self.cat, self.t, self.remote)
        return self._layout

    def _forgotten(self, dataset: str) -> set[str]:
        """History keys of ``dataset`` the remote has tombstones for (a forgotten entry is never sent again)."""
        found = self._tombstones.get(dataset)
        if found is None:
            found = {"history/" + info.key.removeprefix("tombstones/") for info in self.t.list(tombstone_prefix(dataset))}
            self._tombstones[dataset] = found
        return found

    def _guard(self, hash: str, closure: Closure, meta_packs: set[str]) -> int:
        """Announce what this version relies on (its packs, the metadata packs already holding its trees
        and file records, the tables covering them), then make sure no prune plan took any of it: wait
        for a running sweep, HEAD what a plan names, forget from the catalog what is gone (it is sent
        again). Returns how many objects were found gone."""
        keys = {pack_key(p) for p in closure.packs} | {version_key(hash)}
        keys |= {meta_key(m) for m in meta_packs}
        keys |= {chunk_table_key(x) for x in self._tables(rs.KIND_PACK_TABLE, closure.packs).values()}
        keys |= {meta_table_key(x) for x in self._tables(rs.KIND_META_TABLE, meta_packs).values()}
        keys |= {pack_list_key(sha256_hex(s)) for s in shard_pack_list(sorted(closure.packs))}
        if self._session is None:
            self._session = PushSession(self.t, self.session_expiry)
        self._session.announce(keys)
        plans = Plans.load(self.cat, self.t, self.remote)
        named = plans.settle(keys)
        cached = sorted(rs.known_keys(self.cat, self.remote.name, sorted(named)))
        present: set[str] = set()
        gone: list[str] = []
        lock = threading.Lock()

        def check(key: str) -> None:
            found = self.t.head(key) is not None
            with lock:
                (present.add(key) if found else gone.append(key))

        run_parallel(8, [partial(check, k) for k in cached])
        if gone:
            logger.info("%s no longer has %d objects a prune plan named; sending them again", self.remote.name,
                        len(gone))
            rs.forget_keys(self.cat, self.remote.name, gone)
        plans.finish(present)
        return len(gone)

    def _tables(self, kind: int, packs: Iterable[str]) -> dict[str, str]:
        """The location table (``chunkidx/``, ``metaidx/``) on the remote covering each pack, for those covered."""
        return rs.meta_locations(self.cat, self.remote.name, kind, sorted(packs))

    # data packs, in parallel, then chunk tables locating their chunks

    def _push_packs(self, ref: str, closure: Closure, res: PushResult) -> None:
        packs = sorted(closure.packs)
        res.packs_needed += len(closure.packs - self._counted)  # each pack once across this pusher's versions
        self._counted |= closure.packs
        known = rs.known_keys(self.cat, self.remote.name, [pack_key(p) for p in packs])
        todo = [p for p in packs if pack_key(p) not in known]
        if todo:
            states = self.cat.pack_states(todo)
            for p in todo:
                if not states.get(p, (0, False))[1] or not self.store.has_pack_file(p):
                    raise NotFound(f"cannot push {ref} to {self.remote.name}: pack {p[:12]} is not local "
                                   f"(pull the version from the remote it came from first)")
            self.progress.start(f"push {ref[:ref.index('@') + 13]}", sum(states[p][0] for p in todo))
            try:
                run_parallel(UPLOAD_WORKERS, [partial(self._push_pack, p, res) for p in todo])
            finally:
                self.progress.finish()
        covered = self._tables(rs.KIND_PACK_TABLE, packs)
        uncovered = [p for p in packs if p not in covered]
        blobs = self.cat.pack_blob_counts(uncovered)
        group: list[str] = []
        rows = 0
        for p in uncovered:  # tables of whole packs, up to a number of packs or rows
            group.append(p)
            rows += blobs.get(p, 0)
            if len(group) >= CHUNK_TABLE_PACKS or rows >= CHUNK_TABLE_ROWS:
                self._push_chunk_table(group, res)
                group, rows = [], 0
        if group:
            self._push_chunk_table(group, res)

    def _push_pack(self, pack: str, res: PushResult) -> None:
        self.t.put_file(pack_key(pack), str(self.store.pack_path(pack)), progress=self.progress.advance)
        rs.mark_keys(self.cat, self.remote.name, [pack_key(pack)])
        with self._lock:
            res.packs += 1
            res.pack_bytes += self.store.pack_path(pack).stat().st_size
            res.objects += 1
        crash_point("push-after-pack")

    def _push_chunk_table(self, packs: list[str], res: PushResult) -> None:
        """One ``chunkidx/<id>`` locating every chunk of ``packs`` (rebuilt from local pack files, or
        the catalog's rows for packs a distributed commit's workers uploaded)."""
        states = self.cat.pack_states(packs)
        sizes = [(p, states[p][0]) for p in packs]

        def rows() -> Iterator[ChunkLocation]:  # one pack's rows at a time
            for p in packs:
                if states[p][1] and self.store.has_pack_file(p):
                    yield from self.store.iter_pack_index(p)
                else:
                    yield from self.cat.pack_chunks(p)

        with tempfile.TemporaryFile() as spill:
            write_chunk_rows(spill, sizes, rows())
            name, key = upload_table(self.t, table.KIND_CHUNKS, sizes, spill, self._announce)
        rs.mark_meta_pack(self.cat, self.remote.name, name, [(rs.KIND_PACK_TABLE, p) for p in packs], key=key)
        with self._lock:
            res.indexes += 1
            res.objects += 1

    # metadata packs: only trees and file records the remote lacks, children first

    def _meta_have(self, blobs: list[tuple[int, str]], pending: Container[str] = ()) -> dict[int, dict[str, str]]:
        """For these trees and file records, the metadata pack on the remote holding each (only packs a
        metadata table covers, or ``pending``: packs this push uploaded whose table is still to come;
        blobs of older pushes without one are sent again, so a format-2 version object can name tables
        locating all of its metadata)."""
        trees = [bid for kind, bid in blobs if kind == KIND_TREE]
        files = [bid for kind, bid in blobs if kind == KIND_FILE]
        have = {KIND_TREE: rs.meta_locations(self.cat, self.remote.name, KIND_TREE, trees),
                KIND_FILE: rs.meta_locations(self.cat, self.remote.name, KIND_FILE, files)}
        covered = self._tables(rs.KIND_META_TABLE, {m for kind in have.values() for m in kind.values()
                                                    if m not in pending})
        return {kind: {b: m for b, m in found.items() if m in covered or m in pending} for kind, found in have.items()}

    def _push_meta(self, walk: ClosureWalk, res: PushResult) -> set[str]:
        """Upload the trees and file records of the version the remote lacks, batch by batch; returns
        every metadata pack holding one of them. Memory: the pack being built (its bytes, its blobs'
        table rows and ids, to skip a blob met twice); the table rows of the packs uploaded since the
        last metadata table wait in a temporary file; what was sent before is looked up in the catalog."""
        builder = MetaPackBuilder()
        pending: list[tuple[str, int]] = []  # metadata packs uploaded, not yet in a table: (id, size)
        building: set[bytes] = set()  # blob ids (+ kind) in the builder
        used: set[str] = set()
        with tempfile.TemporaryFile(prefix="tessera-metaidx-rows-") as rows:
            for batch in walk:
                have = self._meta_have(batch, {p for p, _ in pending})
                used.update(m for kind in have.values() for m in kind.values())
                for kind, bid in batch:
                    key = bytes.fromhex(bid) + bytes((kind,))
                    if bid in have[kind] or key in building:
                        continue
                    if kind == KIND_TREE:
                        raw = self.cat.tree(bid)
                    else:
                        rec = self.cat.file(bid)
                        raw = rec.chunks_to_bytes() if rec is not None else None
                    if raw is None:
                        raise CorruptData(f"{'tree' if kind == KIND_TREE else 'file record'} {bid[:12]} vanished during push")
                    builder.add(kind, bid, raw)
                    building.add(key)
                    if builder.size >= META_PACK_TARGET:
                        pending.append(self._upload_meta(builder, len(pending), rows, res))
                        used.add(pending[-1][0])
                        builder = MetaPackBuilder()
                        building.clear()
                        if len(pending) >= META_TABLE_PACKS:
                            self._push_meta_table(pending, rows, res)
            if builder.count:
                pending.append(self._upload_meta(builder, len(pending), rows, res))
                used.add(pending[-1][0])
            if pending:
                self._push_meta_table(pending, rows, res)
        return used

    def _upload_meta(self, builder: MetaPackBuilder, ordinal: int, rows: IO[bytes], res: PushResult) -> tuple[str, int]:
        """Upload the built pack, append its table rows (as the table's pack ``ordinal``) to ``rows``;
        returns (its id, its size)."""
        pack, data = builder.finish()
        if self._session is not None:
            self._session.announce([meta_key(pack)])  # before it exists: a sweep must never see it unannounced
        self.t.put(meta_key(pack), data)
        rs.mark_meta_pack(self.cat, self.remote.name, pack, builder.blobs, sent=True)
        res.meta_packs += 1
        res.objects += 1
        rows.write(builder.packed_rows(ordinal))
        return pack, len(data)

    def _push_meta_table(self, pending: list[tuple[str, int]], rows: IO[bytes], res: PushResult) -> None:
        """One ``metaidx/<id>`` locating every blob of the metadata packs just uploaded (``pending``, whose
        table rows are in ``rows``; both are emptied)."""
        name, key = upload_table(self.t, table.KIND_META, pending, rows, self._announce)
        rs.mark_meta_pack(self.cat, self.remote.name, name, [(rs.KIND_META_TABLE, p) for p, _ in pending], key=key)
        res.objects += 1
        pending.clear()
        rows.seek(0)
        rows.truncate()

    # the version object, history entries, tags

    def _push_version(self, hash: str, closure: Closure, meta: set[str], res: PushResult) -> None:
        key = version_key(hash)
        if rs.has_key(self.cat, self.remote.name, key):
            return
        shards = []
        for data in shard_pack_list(sorted(closure.packs)):
            name = sha256_hex(data)
            shards.append(name)
            if not rs.has_key(self.cat, self.remote.name, pack_list_key(name)):
                if self._session is not None:
                    self._session.announce([pack_list_key(name)])
                self.t.put(pack_list_key(name), data)
                rs.mark_keys(self.cat, self.remote.name, [pack_list_key(name)])
                res.objects += 1
        for kind, packs in ((rs.KIND_PACK_TABLE, closure.packs), (rs.KIND_META_TABLE, meta)):  # tables merged over time
            res.objects += len(merge_tables(self.cat, self.t, self.remote.name, kind, packs,
                                            announce=self._announce))
        chunk_tables = set(self._tables(rs.KIND_PACK_TABLE, closure.packs).values())
        meta_tables = set(self._tables(rs.KIND_META_TABLE, meta).values())
        obj = VersionObject(hash, closure.files, closure.size, tuple(sorted(meta)), format=VERSION_FORMAT,
                            meta_tables=tuple(sorted(meta_tables)), chunk_tables=tuple(sorted(chunk_tables)),
                            pack_lists=tuple(sorted(shards)), pack_count=len(closure.packs))
        try:
            self.t.put(key, obj.to_bytes(), if_none_match=True)
            res.objects += 1
        except PreconditionFailed:
            logger.info("%s already has version object %s", self.remote.name, hash[:12])
        rs.mark_keys(self.cat, self.remote.name, [key])

    def _push_history(self, history: list[tuple[str, HistoryEntry]], res: PushResult) -> None:
        for key, e in history:
            try:
                self.t.put(key, encode_history(e), if_none_match=True)
                res.objects += 1
            except PreconditionFailed:
                logger.info("%s already has history entry %s", self.remote.name, key)
            rs.mark_keys(self.cat, self.remote.name, [key])

    def _push_tags(self, dataset: str, hash: str, res: PushResult) -> None:
        for tag in self.cat.tags_at(dataset, hash):
            key = tag_key(dataset, tag)
            body = encode_tag(dataset, tag, hash)
            try:
                if self.t.get(key) == body:
                    continue
            except NotFound:
                pass
            self.t.put(key, body)
            res.objects += 1
