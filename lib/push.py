"""Push: upload a version and what it needs to a remote, skipping what the remote already holds.

For one version, in this order (so a reader that finds a history entry finds every byte behind it):
data packs and their indexes, metadata packs (trees and file records the remote lacks), the version
object, the history entries, the tags. What the remote holds is known from the catalog
(``remote_objects``, ``remote_meta``), never by listing the bucket, and each key is recorded right after
its upload: a push interrupted at any point, re-run, uploads only what is still missing. Key names and
object encodings are `tessera.remote.wire`'s.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData, NotFound, PreconditionFailed
from tessera.faults import crash_point
from tessera.format.pack import KIND_FILE, KIND_TREE
from tessera.model import HistoryEntry
from tessera.parallel import run_parallel
from tessera.progress import NullProgress, Progress
from tessera.remote.base import Transport
from tessera.remote.wire import (
    META_PACK_TARGET,
    MetaPackBuilder,
    VersionObject,
    encode_history,
    encode_index,
    encode_tag,
    history_key,
    index_key,
    meta_key,
    pack_key,
    tag_key,
    version_key,
)
from tessera.remotes import Remote
from tessera.store import Store
from tessera.trees import Closure, version_closure

logger = logging.getLogger(__name__)

UPLOAD_WORKERS = 4


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
    packs_needed: int = 0  # data packs those versions need (the rest of them were on the remote already)

    def add(self, other: PushResult) -> None:
        self.packs += other.packs
        self.pack_bytes += other.pack_bytes
        self.indexes += other.indexes
        self.meta_packs += other.meta_packs
        self.objects += other.objects
        self.versions += other.versions
        self.packs_needed += other.packs_needed

    @property
    def uploaded(self) -> bool:
        return self.objects > 0

    def summary(self) -> str:
        if not self.uploaded:
            return f"{self.remote} already has {self.ref}"
        return (f"pushed {self.ref} to {self.remote}: {self.packs} packs ({self.pack_bytes / (1 << 20):.1f} MiB), "
                f"{self.meta_packs} metadata packs, {self.objects} objects")


class Pusher:
    """Pushes versions of this home to one remote (one transport, shared by the upload threads)."""

    def __init__(self, catalog: Catalog, store: Store, remote: Remote, transport: Transport,
                 progress: Progress | None = None) -> None:
        self.cat = catalog
        self.store = store
        self.remote = remote
        self.t = transport
        self.progress = progress or NullProgress()
        self._lock = threading.Lock()
        self._counted: set[str] = set()

    def push(self, dataset: str, hash: str) -> PushResult:
        """Upload ``dataset@hash`` (every history entry this home has for it) and what it needs."""
        res = PushResult(f"{dataset}@{hash}", self.remote.name)
        history = [(history_key(e), e) for e in self.cat.history_for(dataset, hash)]
        done = rs.known_keys(self.cat, self.remote.name, [version_key(hash)] + [k for k, _ in history])
        if len(done) < 1 + len(history):
            closure = version_closure(self.cat, hash)
            self._push_packs(res.ref, closure, res)
            meta = self._push_meta(closure, res)
            crash_point("push-before-version")
            self._push_version(hash, closure, meta, res)
            crash_point("push-before-history")
            self._push_history([h for h in history if h[0] not in done], res)
            res.versions += 1
        self._push_tags(dataset, hash, res)
        return res

    # data packs and their indexes, in parallel

    def _push_packs(self, ref: str, closure: Closure, res: PushResult) -> None:
        packs = sorted(closure.packs)
        res.packs_needed += len(closure.packs - self._counted)  # each pack once across this pusher's versions
        self._counted |= closure.packs
        known = rs.known_keys(self.cat, self.remote.name, [pack_key(p) for p in packs] + [index_key(p) for p in packs])
        todo = [(p, pack_key(p) not in known, index_key(p) not in known) for p in packs
                if pack_key(p) not in known or index_key(p) not in known]
        if not todo:
            return
        states = self.cat.pack_states([p for p, _, _ in todo])
        for p, _, _ in todo:
            if not states.get(p, (0, False))[1] or not self.store.has_pack_file(p):
                raise NotFound(f"cannot push {ref} to {self.remote.name}: pack {p[:12]} is not local "
                               f"(pull the version from the remote it came from first)")
        total = sum(states[p][0] for p, need, _ in todo if need)
        self.progress.start(f"push {ref[:ref.index('@') + 13]}", total)
        try:
            run_parallel(UPLOAD_WORKERS, [partial(self._push_pack, p, a, b, res) for p, a, b in todo])
        finally:
            self.progress.finish()

    def _push_pack(self, pack: str, need_pack: bool, need_index: bool, res: PushResult) -> None:
        size, chunks = self.store.pack_index(pack)
        if need_pack:
            self.t.put_file(pack_key(pack), str(self.store.pack_path(pack)), progress=self.progress.advance)
            rs.mark_keys(self.cat, self.remote.name, [pack_key(pack)])
            with self._lock:
                res.packs += 1
                res.pack_bytes += size
                res.objects += 1
            crash_point("push-after-pack")
        if need_index:
            self.t.put(index_key(pack), encode_index(pack, size, chunks))
            rs.mark_keys(self.cat, self.remote.name, [index_key(pack)])
            with self._lock:
                res.indexes += 1
                res.objects += 1

    # metadata packs: only trees and file records the remote lacks, children first

    def _push_meta(self, closure: Closure, res: PushResult) -> set[str]:
        trees = [bid for kind, bid in closure.blobs if kind == KIND_TREE]
        files = [bid for kind, bid in closure.blobs if kind == KIND_FILE]
        have = {KIND_TREE: rs.meta_locations(self.cat, self.remote.name, KIND_TREE, trees),
                KIND_FILE: rs.meta_locations(self.cat, self.remote.name, KIND_FILE, files)}
        builder = MetaPackBuilder()
        for kind, bid in closure.blobs:
            if bid in have[kind]:
                continue
            if kind == KIND_TREE:
                raw = self.cat.tree(bid)
            else:
                rec = self.cat.file(bid)
                raw = rec.chunks_to_bytes() if rec is not None else None
            if raw is None:
                raise CorruptData(f"{'tree' if kind == KIND_TREE else 'file record'} {bid[:12]} vanished during push")
            builder.add(kind, bid, raw)
            if builder.size >= META_PACK_TARGET:
                self._upload_meta(builder, have, res)
                builder = MetaPackBuilder()
        if builder.blobs:
            self._upload_meta(builder, have, res)
        return set(have[KIND_TREE].values()) | set(have[KIND_FILE].values())

    def _upload_meta(self, builder: MetaPackBuilder, have: dict[int, dict[str, str]], res: PushResult) -> None:
        pack, data = builder.finish()
        self.t.put(meta_key(pack), data)
        rs.mark_meta_pack(self.cat, self.remote.name, pack, builder.blobs)
        for kind, bid in builder.blobs:
            have[kind][bid] = pack
        res.meta_packs += 1
        res.objects += 1

    # the version object, history entries, tags

    def _push_version(self, hash: str, closure: Closure, meta: set[str], res: PushResult) -> None:
        key = version_key(hash)
        if rs.has_key(self.cat, self.remote.name, key):
            return
        obj = VersionObject(hash, closure.files, closure.size, tuple(sorted(meta)), tuple(sorted(closure.packs)))
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
