"""Push and pull: move versions between the local store and a remote (S3, a directory, memory).

The remote holds the same pack files as the local store plus small objects describing them (the
full spec is docs/format.md, "Remote layout")::

    packs/<id>                       data packs, byte-identical to $TESSERA_HOME/packs/..
    index/<id>                       the chunk list of pack <id> (JSON)
    meta/<id>                        metadata packs: trees and file records, same pack format
    versions/<hash>                  one small JSON object per version: the packs it needs
    history/<dataset>/<µs>-<hash>    append-only history entries (conditional writes)
    refs/<dataset>/tags/<tag>        tags

Push uploads, in this order, data packs and their indexes, metadata packs, the version object and
the history entries, so a reader that finds a history entry finds every byte behind it. What the
remote already holds is known from the catalog (``remote_objects``), never by listing the bucket,
and each key is recorded right after its upload: a push interrupted at any point, re-run, uploads
only what is still missing.

A pull (or the first use of a dataset this home does not know) fetches history entries, version
objects, metadata packs and indexes: enough to browse, verify and mount, with chunks read lazily
(`tessera.lazy`). A full pull then downloads the data packs. Everything fetched is verified: packs
and metadata packs against their SHA-256 ids, trees against theirs, chunks against their xxh3 ids.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import re
import threading
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tessera.catalog import Catalog, ChunkLocation
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData, NotFound, PreconditionFailed, TesseraError, UsageError
from tessera.faults import crash_point
from tessera.format.compress import CODEC_NAMES, Compressor, decompress
from tessera.format.pack import KIND_CHUNK, KIND_FILE, KIND_TREE, PACK_MAGIC, encode_header, iter_blobs
from tessera.ids import Ref, check_dataset_name, check_tag, parse_ref, sha256_hex
from tessera.model import DIR, FILE, SYMLINK, FileRecord, HistoryEntry, Tree
from tessera.progress import NullProgress, Progress
from tessera.remote.base import Transport, parse_url
from tessera.store import decode_chunk, fsync_dir, raise_os_error

if TYPE_CHECKING:
    from tessera.repo import Repo
    from tessera.version import Version

logger = logging.getLogger(__name__)

FORMAT = 1
META_PACK_TARGET = 16 * 1024 * 1024
SINGLE_PUT_MAX = 64 * 1024 * 1024  # packs (target 48 MiB) go up in one PUT: ~22 PUTs per GiB
UPLOAD_WORKERS = 4
DOWNLOAD_WORKERS = 4
FETCH_WORKERS = 8
LAZY_RETRIES = 2  # a lazy read during an outage fails (EIO) within a second or two

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HISTORY_NAME = re.compile(r"^(\d{16})-([0-9a-f]{64})$")
_FILE_MODES = (0o644, 0o755)


# -- remotes and transports -------------------------------------------------------------------------

@dataclass(frozen=True)
class Remote:
    """A remote as push and pull see it. ``name`` keys what the catalog records about it: a configured
    remote's name, or the URL itself for a remote used without `tessera remote add`."""

    name: str
    url: str


def connect(url: str, *, timeout: float | None = None, retries: int | None = None) -> Transport:
    """Open a transport for ``url`` with the retry wrapper. Timeout and retries default to
    ``$TESSERA_REMOTE_TIMEOUT`` (10 s) and ``$TESSERA_REMOTE_RETRIES`` (5)."""
    from tessera.remote.base import open_transport
    from tessera.remote.retry import Retrying

    timeout = _env_number("TESSERA_REMOTE_TIMEOUT", 10.0) if timeout is None else timeout
    retries = int(_env_number("TESSERA_REMOTE_RETRIES", 5)) if retries is None else retries
    parsed = parse_url(url)
    if parsed.scheme != "s3":
        return open_transport(url, timeout=timeout, retries=retries)
    from tessera.remote.s3 import S3Transport

    # One PUT per pack (not 8 MiB multipart parts): fewer requests, and parallelism comes from
    # uploading several packs at once.
    return Retrying(S3Transport(parsed.location, parsed.prefix, timeout=timeout, part_size=SINGLE_PUT_MAX),
                    retries=retries)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"${name} must be a number, not {text!r}") from None


def resolve_remote(repo: "Repo", name: str | None = None) -> Remote:
    """The remote called ``name`` (a configured name or a URL); by default ``Repo(remote=...)``, the
    remote marked default, or the only one."""
    wanted = name if name is not None else repo.remote
    cat = repo.catalog
    if wanted is None:
        found = rs.default_remote(cat)
        if found is not None:
            return Remote(found.name, found.url)
        names = [r.name for r in rs.remotes(cat)]
        if not names:
            raise NotFound("no remote configured: add one with `tessera remote add origin s3://BUCKET/PREFIX`")
        raise UsageError(f"several remotes ({', '.join(names)}) and none is the default: name one with "
                         "--remote, or make one the default with `tessera remote default NAME`")
    if "://" in wanted:
        parse_url(wanted)
        for r in rs.remotes(cat):
            if r.url == wanted:
                return Remote(r.name, r.url)
        return Remote(wanted, wanted)
    found = rs.get_remote(cat, wanted)
    if found is None:
        names = [r.name for r in rs.remotes(cat)]
        hint = f" (configured: {', '.join(names)})" if names else " (none configured: see `tessera remote add`)"
        raise NotFound(f"unknown remote {wanted!r}{hint}")
    return Remote(found.name, found.url)


def default_remote_or_none(repo: "Repo") -> Remote | None:
    try:
        return resolve_remote(repo)
    except TesseraError:
        return None


class Transports:
    """The open transports of one `Repo`, shared by its threads; closed with the repo."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, bool], Transport] = {}
        self._lock = threading.Lock()

    def get(self, url: str, *, lazy: bool = False) -> Transport:
        key = (url, lazy)
        with self._lock:
            t = self._open.get(key)
            if t is None:
                t = self._open[key] = connect(url, retries=LAZY_RETRIES if lazy else None)
            return t

    def close(self) -> None:
        with self._lock:
            for t in self._open.values():
                try:
                    t.close()
                except Exception:  # noqa: BLE001 - closing must not mask the real outcome
                    logger.debug("closing %s failed", t, exc_info=True)
            self._open.clear()


def transport_for_pack(repo: "Repo", pack: str) -> Transport:
    """The transport lazy reads of ``pack`` go to: a remote known to hold it, preferring the default."""
    holders = rs.remotes_holding(repo.catalog, f"packs/{pack}")
    default = default_remote_or_none(repo)
    if default is not None and (default.name in holders or not holders):
        return repo.transports.get(default.url, lazy=True)
    for name in holders:
        found = rs.get_remote(repo.catalog, name)
        if found is not None:
            return repo.transports.get(found.url, lazy=True)
        if "://" in name:
            return repo.transports.get(name, lazy=True)
    raise CorruptData(f"pack {pack} is not local and no configured remote holds it "
                      "(add the remote it came from with `tessera remote add`)")


# -- remote keys and objects --------------------------------------------------------------------------

def pack_key(pack: str) -> str:
    return f"packs/{pack}"


def index_key(pack: str) -> str:
    return f"index/{pack}"


def meta_key(pack: str) -> str:
    return f"meta/{pack}"


def version_key(hash: str) -> str:
    return f"versions/{hash}"


def history_key(e: HistoryEntry) -> str:
    return f"history/{e.dataset}/{int(round(e.time * 1e6)):016d}-{e.hash}"


def tag_key(dataset: str, tag: str) -> str:
    return f"refs/{dataset}/tags/{tag}"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise CorruptData(f"{where} is malformed: not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptData(f"{where} is malformed: not a format-{FORMAT} tessera object")
    return obj


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CorruptData(f"{where} is malformed: {what}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def encode_history(e: HistoryEntry) -> bytes:
    return _dumps({"format": FORMAT, "dataset": e.dataset, "hash": e.hash, "parent": e.parent, "time": e.time,
                   "author": e.author, "message": e.message, "meta": e.meta, "files": e.files, "size": e.size})


def decode_history(key: str, data: bytes, where: str) -> HistoryEntry:
    obj = _loads(data, where)
    dataset, _, name = key.removeprefix("history/").partition("/")
    m = _HISTORY_NAME.match(name)
    _need(m is not None, where, "bad history key")
    _need(obj.get("dataset") == dataset and obj.get("hash") == m.group(2), where,  # type: ignore[union-attr]
          "dataset or hash disagrees with its key")
    parent = obj.get("parent")
    _need(parent is None or (isinstance(parent, str) and bool(_HEX64.match(parent))), where, "bad parent")
    t = obj.get("time")
    _need(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0, where, "bad time")
    _need(isinstance(obj.get("author"), str) and isinstance(obj.get("message"), str), where, "bad author or message")
    _need(isinstance(obj.get("meta"), dict), where, "meta is not an object")
    _need(_is_count(obj.get("files")) and _is_count(obj.get("size")), where, "bad files or size")
    return HistoryEntry(dataset, obj["hash"], parent, float(t), obj["author"], obj["message"], obj["meta"],
                        obj["files"], obj["size"])


@dataclass(frozen=True)
class VersionObject:
    hash: str
    files: int
    size: int
    meta: tuple[str, ...]
    packs: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return _dumps({"format": FORMAT, "hash": self.hash, "files": self.files, "size": self.size,
                       "meta": list(self.meta), "packs": list(self.packs)})

    @classmethod
    def from_bytes(cls, hash: str, data: bytes, where: str) -> "VersionObject":
        obj = _loads(data, where)
        _need(obj.get("hash") == hash, where, "its hash disagrees with its key")
        _need(_is_count(obj.get("files")) and _is_count(obj.get("size")), where, "bad files or size")
        for name in ("meta", "packs"):
            ids = obj.get(name)
            _need(isinstance(ids, list) and all(isinstance(i, str) and _HEX64.match(i) for i in ids), where,
                  f"bad {name} list")
        return cls(hash, obj["files"], obj["size"], tuple(obj["meta"]), tuple(obj["packs"]))


def encode_index(pack: str, size: int, chunks: Sequence[ChunkLocation]) -> bytes:
    return _dumps({"format": FORMAT, "pack": pack, "size": size,
                   "chunks": [[c.id.hex(), c.offset, c.stored_len, c.raw_len, c.codec] for c in chunks]})


def decode_index(pack: str, data: bytes, where: str) -> tuple[int, list[ChunkLocation]]:
    obj = _loads(data, where)
    _need(obj.get("pack") == pack, where, "its pack id disagrees with its key")
    size = obj.get("size")
    _need(_is_count(size), where, "bad size")
    rows = obj.get("chunks")
    _need(isinstance(rows, list), where, "no chunk list")
    out = []
    for row in rows:
        ok = (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str) and bool(_HEX32.match(row[0]))
              and all(_is_count(x) for x in row[1:]))
        _need(ok, where, f"bad chunk row {str(row)[:80]}")
        cid, offset, stored, raw, codec = row
        _need(codec in CODEC_NAMES and offset >= len(PACK_MAGIC) and offset + stored <= size, where,
              f"chunk {cid} lies outside the pack or has an unknown codec")
        out.append(ChunkLocation(bytes.fromhex(cid), pack, offset, stored, raw, codec))
    return size, out


def read_pack_index(path: Path, pack: str) -> tuple[int, list[ChunkLocation]]:
    """Check a local pack against its id and list its chunks (what ``index/<id>`` holds)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if sha256_hex(m) != pack:
                raise CorruptData(f"local pack {pack} fails its hash check (run `tessera fsck`)")
            chunks = [ChunkLocation(b.id, pack, b.offset, b.stored_len, b.raw_len, b.codec)
                      for b in iter_blobs(m, f"pack {pack}") if b.kind == KIND_CHUNK]
    return size, chunks


def check_tree(tree: Tree, where: str) -> None:
    """What `TreeEntry.from_obj` does not already refuse: modes a commit never makes (setuid ...),
    ids that are not hashes, NUL in symlink targets."""
    for e in tree.entries:
        bad = None
        if e.kind == FILE:
            if e.mode not in _FILE_MODES or not isinstance(e.id, str) or not _HEX64.match(e.id) or e.size < 0:
                bad = "a bad file entry"
        elif e.kind == DIR:
            if e.mode != 0o755 or not isinstance(e.id, str) or not _HEX64.match(e.id):
                bad = "a bad directory entry"
        elif e.kind == SYMLINK:
            if not isinstance(e.target, str) or "\0" in e.target or e.mode != 0o777:
                bad = "a bad symlink entry"
        if bad:
            raise CorruptData(f"{where}: {bad} {e.name!r}")


def decode_meta_pack(pack: str, data: bytes, where: str) -> tuple[list[tuple[str, bytes]], list[FileRecord]]:
    """Trees and file records of a metadata pack, each checked."""
    if sha256_hex(data) != pack:
        raise CorruptData(f"{where} fails its hash check")
    trees: list[tuple[str, bytes]] = []
    files: list[FileRecord] = []
    for b in iter_blobs(data, where):
        raw = decompress(b.codec, data[b.offset:b.offset + b.stored_len], b.raw_len)
        _need(len(raw) == b.raw_len and len(b.id) == 32, where, "bad blob")
        bid = b.id.hex()
        if b.kind == KIND_TREE:
            if sha256_hex(raw) != bid:
                raise CorruptData(f"{where}: tree {bid[:12]} fails its hash check")
            try:
                tree = Tree.from_bytes(raw)
            except CorruptData as exc:
                raise CorruptData(f"{where}: tree {bid[:12]}: {exc}") from None
            check_tree(tree, f"{where}: tree {bid[:12]}")
            trees.append((bid, raw))
        elif b.kind == KIND_FILE:
            chunks = FileRecord.chunks_from_bytes(raw)
            files.append(FileRecord(bid, sum(n for _, n in chunks), chunks))
        else:
            raise CorruptData(f"{where}: unexpected blob kind {b.kind}")
    return trees, files


class MetaPackBuilder:
    """Trees and file records packed like chunks (zstd when it pays), held in memory up to a target."""

    def __init__(self) -> None:
        self._parts: list[bytes] = [PACK_MAGIC]
        self.size = len(PACK_MAGIC)
        self.blobs: list[tuple[int, str]] = []
        self._comp = Compressor(3)

    def add(self, kind: int, blob_id: str, raw: bytes) -> None:
        codec, stored = self._comp.compress(raw)
        stored = bytes(stored)
        header = encode_header(kind, codec, bytes.fromhex(blob_id), len(raw), len(stored))
        self._parts += [header, stored]
        self.size += len(header) + len(stored)
        self.blobs.append((kind, blob_id))

    def finish(self) -> tuple[str, bytes]:
        data = b"".join(self._parts)
        return sha256_hex(data), data


# -- what a version needs -----------------------------------------------------------------------------

@dataclass
class Closure:
    """Everything a version references: trees and file records (children before their parents, so a
    prefix of this list never names a tree whose subtrees come later) and the data packs."""

    blobs: list[tuple[int, str]] = field(default_factory=list)
    packs: set[str] = field(default_factory=set)
    files: int = 0  # file entries (paths), counting duplicates
    size: int = 0


def version_closure(catalog: Catalog, root: str) -> Closure:
    """Walk a version in the catalog; `CorruptData` if a tree, file record or chunk is missing."""
    out = Closure()
    seen_trees: set[str] = set()
    seen_files: set[str] = set()
    pending: list[bytes] = []
    stack: list[tuple[str, bool]] = [(root, False)]
    while stack:
        tid, done = stack.pop()
        if done:
            out.blobs.append((KIND_TREE, tid))
            continue
        if tid in seen_trees:
            continue
        seen_trees.add(tid)
        data = catalog.tree(tid)
        if data is None:
            raise CorruptData(f"version {root[:12]}: tree {tid[:12]} is missing")
        tree = Tree.from_bytes(data)
        if tid == root:
            out.size = tree.size
        stack.append((tid, True))
        for e in tree.entries:
            if e.kind == DIR and e.id:
                stack.append((e.id, False))
            elif e.kind == FILE and e.id:
                out.files += 1
                if e.id in seen_files:
                    continue
                seen_files.add(e.id)
                rec = catalog.file(e.id)
                if rec is None:
                    raise CorruptData(f"version {root[:12]}: file record {e.id[:12]} is missing")
                if rec.size != e.size:
                    raise CorruptData(f"version {root[:12]}: file {e.id[:12]} has {rec.size} bytes of chunks, "
                                      f"its tree entry says {e.size}")
                out.blobs.append((KIND_FILE, e.id))
                pending.extend(cid for cid, _ in rec.chunks)
                if len(pending) >= 4096:
                    _add_packs(catalog, root, pending, out.packs)
    _add_packs(catalog, root, pending, out.packs)
    return out


def _add_packs(catalog: Catalog, root: str, ids: list[bytes], packs: set[str]) -> None:
    if not ids:
        return
    unique = list(dict.fromkeys(ids))
    found = rs.chunk_packs(catalog, unique)
    for cid in unique:
        pack = found.get(cid)
        if pack is None:
            raise CorruptData(f"version {root[:12]} needs chunk {cid.hex()}, which is not in the store")
        packs.add(pack)
    ids.clear()


# -- push -------------------------------------------------------------------------------------------

@dataclass
class PushResult:
    ref: str
    remote: str
    packs: int = 0
    pack_bytes: int = 0
    indexes: int = 0
    meta_packs: int = 0
    objects: int = 0  # every object written (packs, indexes, meta, version, history, tags)

    def add(self, other: "PushResult") -> None:
        self.packs += other.packs
        self.pack_bytes += other.pack_bytes
        self.indexes += other.indexes
        self.meta_packs += other.meta_packs
        self.objects += other.objects

    @property
    def uploaded(self) -> bool:
        return self.objects > 0

    def summary(self) -> str:
        if not self.uploaded:
            return f"{self.remote} already has {self.ref}"
        return (f"pushed {self.ref} to {self.remote}: {self.packs} packs ({_mib(self.pack_bytes)}), "
                f"{self.meta_packs} metadata packs, {self.objects} objects")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def push(repo: "Repo", ref: str, remote: str | None = None, *, progress: Progress | None = None) -> PushResult:
    """Upload version ``ref`` (and what it needs) to ``remote``, skipping what it already holds.

    A bare dataset ``NAME`` pushes its whole history (every version the remote lacks, oldest first,
    like ``git push``); ``NAME@HASH`` and ``NAME:TAG`` push that one version. The result adds up
    what was uploaded; its ``ref`` is the version named (for ``NAME``: the latest)."""
    from tessera.version import Version

    rem = resolve_remote(repo, remote)
    r = parse_ref(ref)
    version = Version(repo, repo.resolve_local(r))
    pusher = _Pusher(repo, rem, progress)
    if r.prefix or r.tag:
        return pusher.push(version)
    total = PushResult(version.ref, rem.name)
    for h in rs.dataset_hashes(repo.catalog, r.dataset):
        if h != version.hash:
            total.add(pusher.push(Version(repo, repo.resolve_local(f"{r.dataset}@{h}"))))
    total.add(pusher.push(version))
    return total


def push_all(repo: "Repo", name: str | None = None, remote: str | None = None, *,
             progress: Progress | None = None) -> list[PushResult]:
    """Every version of dataset ``name`` (of every dataset when None), oldest first."""
    from tessera.version import Version

    rem = resolve_remote(repo, remote)
    names = [check_dataset_name(name)] if name else [d.name for d in repo.catalog.datasets()]
    pusher = _Pusher(repo, rem, progress)
    out = []
    for ds in names:
        if not repo.catalog.dataset_head(ds)[0]:
            raise NotFound(f"unknown dataset {ds!r}")
        for h in rs.dataset_hashes(repo.catalog, ds):
            out.append(pusher.push(Version(repo, repo.resolve_local(f"{ds}@{h}"))))
    return out


class _Pusher:
    def __init__(self, repo: "Repo", remote: Remote, progress: Progress | None) -> None:
        self.repo = repo
        self.cat = repo.catalog
        self.remote = remote
        self.progress = progress or NullProgress()
        self._t: Transport | None = None
        self._lock = threading.Lock()

    @property
    def t(self) -> Transport:
        if self._t is None:
            self._t = self.repo.transports.get(self.remote.url)
        return self._t

    def push(self, v: "Version") -> PushResult:
        res = PushResult(v.ref, self.remote.name)
        history = [(history_key(e), e) for e in rs.history_for(self.cat, v.name, v.hash)]
        done = rs.known_keys(self.cat, self.remote.name, [version_key(v.hash)] + [k for k, _ in history])
        if len(done) < 1 + len(history):
            closure = version_closure(self.cat, v.hash)
            self._push_packs(v, closure, res)
            meta = self._push_meta(closure, res)
            crash_point("push-before-version")
            self._push_version(v, closure, meta, res)
            crash_point("push-before-history")
            self._push_history([h for h in history if h[0] not in done], res)
        self._push_tags(v, res)
        return res

    # data packs and their indexes, in parallel

    def _push_packs(self, v: "Version", closure: Closure, res: PushResult) -> None:
        packs = sorted(closure.packs)
        known = rs.known_keys(self.cat, self.remote.name, [pack_key(p) for p in packs] + [index_key(p) for p in packs])
        todo = [(p, pack_key(p) not in known, index_key(p) not in known) for p in packs
                if pack_key(p) not in known or index_key(p) not in known]
        if not todo:
            return
        states = rs.pack_states(self.cat, [p for p, _, _ in todo])
        for p, _, _ in todo:
            if not states.get(p, (0, False))[1] or not self.repo.store.has_pack_file(p):
                raise NotFound(f"cannot push {v.ref} to {self.remote.name}: pack {p[:12]} is not local "
                               f"(pull the version from the remote it came from first)")
        total = sum(states[p][0] for p, need, _ in todo if need)
        self.progress.start(f"push {v.name}@{v.hash[:12]}", total)
        try:
            _run_parallel(UPLOAD_WORKERS, [lambda p=p, a=a, b=b: self._push_pack(p, a, b, res) for p, a, b in todo])
        finally:
            self.progress.finish()

    def _push_pack(self, pack: str, need_pack: bool, need_index: bool, res: PushResult) -> None:
        path = self.repo.store.pack_path(pack)
        size, chunks = read_pack_index(path, pack)
        if need_pack:
            self.t.put_file(pack_key(pack), str(path), progress=self.progress.advance)
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

    def _push_version(self, v: "Version", closure: Closure, meta: set[str], res: PushResult) -> None:
        key = version_key(v.hash)
        if rs.has_key(self.cat, self.remote.name, key):
            return
        obj = VersionObject(v.hash, closure.files, closure.size, tuple(sorted(meta)), tuple(sorted(closure.packs)))
        try:
            self.t.put(key, obj.to_bytes(), if_none_match=True)
            res.objects += 1
        except PreconditionFailed:
            logger.info("%s already has version object %s", self.remote.name, v.hash[:12])
        rs.mark_keys(self.cat, self.remote.name, [key])

    def _push_history(self, history: list[tuple[str, HistoryEntry]], res: PushResult) -> None:
        for key, e in history:
            try:
                self.t.put(key, encode_history(e), if_none_match=True)
                res.objects += 1
            except PreconditionFailed:
                logger.info("%s already has history entry %s", self.remote.name, key)
            rs.mark_keys(self.cat, self.remote.name, [key])

    def _push_tags(self, v: "Version", res: PushResult) -> None:
        for tag in rs.tags_at(self.cat, v.name, v.hash):
            key = tag_key(v.name, tag)
            body = _dumps({"format": FORMAT, "dataset": v.name, "tag": tag, "hash": v.hash})
            try:
                if self.t.get(key) == body:
                    continue
            except NotFound:
                pass
            self.t.put(key, body)
            res.objects += 1


def _run_parallel(workers: int, tasks: list[Callable[[], None]]) -> None:
    """Run tasks on a thread pool; on the first failure cancel what has not started and re-raise it."""
    if not tasks:
        return
    if len(tasks) == 1 or workers <= 1:
        for task in tasks:
            task()
        return
    pool = ThreadPoolExecutor(min(workers, len(tasks)), thread_name_prefix="tessera-sync")
    try:
        futures: list[Future[None]] = [pool.submit(task) for task in tasks]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for other in futures:
                    other.cancel()
                raise f.exception()  # type: ignore[misc]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- fetching metadata --------------------------------------------------------------------------------

def fetch_dataset(repo: "Repo", remote: Remote, dataset: str, progress: Progress | None = None) -> int:
    """Bring this home up to date with the remote's history of ``dataset``: history entries, tags, and
    the metadata of every version not yet local. Returns how many history entries the remote has."""
    check_dataset_name(dataset)
    t = repo.transports.get(remote.url)
    keys = [info.key for info in t.list(f"history/{dataset}/")]
    if not keys:
        return 0
    cat = repo.catalog
    known = rs.known_keys(cat, remote.name, keys)
    new = [k for k in keys if k not in known]
    entries: dict[str, HistoryEntry] = {}
    lock = threading.Lock()

    def get_entry(key: str) -> None:
        e = decode_history(key, t.get(key), f"{remote.url}/{key}")
        with lock:
            entries[key] = e

    _run_parallel(FETCH_WORKERS, [lambda k=k: get_entry(k) for k in new])
    by_hash: dict[str, list[tuple[str, HistoryEntry]]] = {}
    for key in new:
        by_hash.setdefault(entries[key].hash, []).append((key, entries[key]))
    order = sorted(by_hash, key=lambda h: min(e.time for _, e in by_hash[h]))
    for h in order:
        if cat.has_version(h):
            rs.import_version(cat, remote.name, h, 0, 0, by_hash[h], [])
            continue
        files, size, objs = fetch_version_metadata(repo, remote, h)
        rs.import_version(cat, remote.name, h, files, size, by_hash[h], objs)
    fetch_tags(repo, remote, dataset)
    return len(keys)


def fetch_version_metadata(repo: "Repo", remote: Remote, hash: str) -> tuple[int, int, list[str]]:
    """Fetch and check the version object, metadata packs and pack indexes of one version and record
    them (packs as not local). Returns (files, size, remote keys now known)."""
    t = repo.transports.get(remote.url)
    cat = repo.catalog
    where = f"{remote.url}/{version_key(hash)}"
    try:
        vobj = VersionObject.from_bytes(hash, t.get(version_key(hash)), where)
    except NotFound:
        raise CorruptData(f"{remote.url}: history names version {hash[:12]} but {version_key(hash)} is missing") from None
    known = rs.known_keys(cat, remote.name, [meta_key(m) for m in vobj.meta])

    def required(key: str) -> bytes:
        try:
            return t.get(key)
        except NotFound:
            raise CorruptData(f"{remote.url}: version {hash[:12]} needs {key}, which is missing") from None

    def get_meta(pack: str) -> None:
        key = meta_key(pack)
        data = required(key)
        trees, files = decode_meta_pack(pack, data, f"{remote.url}/{key}")
        rs.add_metadata(cat, trees, files)
        rs.mark_meta_pack(cat, remote.name, pack, [(KIND_TREE, i) for i, _ in trees] +
                          [(KIND_FILE, r.id) for r in files])

    _run_parallel(FETCH_WORKERS, [lambda m=m: get_meta(m) for m in vobj.meta if meta_key(m) not in known])
    local = rs.pack_states(cat, list(vobj.packs))

    def get_index(pack: str) -> None:
        key = index_key(pack)
        data = required(key)
        size, chunks = decode_index(pack, data, f"{remote.url}/{key}")
        rs.add_remote_pack(cat, pack, size, chunks)

    _run_parallel(FETCH_WORKERS, [lambda p=p: get_index(p) for p in vobj.packs if p not in local])
    try:
        closure = version_closure(cat, hash)
    except CorruptData as exc:
        raise CorruptData(f"{remote.url}: version {hash[:12]} is incomplete: {exc}") from None
    if closure.files != vobj.files or closure.size != vobj.size:
        raise CorruptData(f"{where} is malformed: it says {vobj.files} files / {vobj.size} bytes, its trees "
                          f"{closure.files} / {closure.size}")
    keys = [version_key(hash)] + [meta_key(m) for m in vobj.meta]
    keys += [k for p in vobj.packs for k in (pack_key(p), index_key(p))]
    return closure.files, closure.size, keys


def fetch_tags(repo: "Repo", remote: Remote, dataset: str) -> None:
    t = repo.transports.get(remote.url)
    for info in t.list(f"refs/{dataset}/tags/"):
        tag = info.key.rsplit("/", 1)[-1]
        try:
            check_tag(tag)
        except UsageError:
            logger.warning("%s: ignoring tag with a bad name: %s", remote.url, info.key)
            continue
        where = f"{remote.url}/{info.key}"
        obj = _loads(t.get(info.key), where)
        h = obj.get("hash")
        _need(isinstance(h, str) and bool(_HEX64.match(h)) and obj.get("tag") == tag, where, "bad tag object")
        if repo.catalog.has_version(h):
            rs.set_tag_if_missing(repo.catalog, dataset, tag, h)


def fetch_for_ref(repo: "Repo", ref: Ref) -> Remote | None:
    """Called when ``ref`` is not local: fetch its dataset from the default remote. Returns the remote
    asked (None when there is none, or it does not have the dataset)."""
    rem = default_remote_or_none(repo)
    if rem is None:
        return None
    if fetch_dataset(repo, rem, ref.dataset) == 0:
        return None
    return rem


# -- pull -------------------------------------------------------------------------------------------

def pull(repo: "Repo", ref: str, remote: str | None = None, *, metadata_only: bool = False,
         progress: Progress | None = None) -> "Version":
    """Fetch ``ref`` from the remote: metadata (enough to browse, verify and mount with lazy reads),
    then, unless ``metadata_only``, every data pack it needs, so it is fully local."""
    from tessera.version import Version

    r = parse_ref(ref)
    rem = resolve_remote(repo, remote)
    if fetch_dataset(repo, rem, r.dataset, progress) == 0 and not repo.catalog.dataset_head(r.dataset)[0]:
        raise NotFound(f"remote {rem.name} has no dataset {r.dataset!r}")
    try:
        version = Version(repo, repo.resolve_local(r))
    except NotFound as exc:
        raise NotFound(f"{exc} (remote {rem.name} does not have it either)") from None
    if not metadata_only:
        download_packs(repo, rem, version, progress)
    return version


def download_packs(repo: "Repo", remote: Remote, version: "Version", progress: Progress | None = None) -> int:
    """Download the data packs of ``version`` that are not local; returns how many."""
    cat, store = repo.catalog, repo.store
    closure = version_closure(cat, version.hash)
    states = rs.pack_states(cat, sorted(closure.packs))
    todo = [p for p, (_, local) in states.items() if not local or not store.has_pack_file(p)]
    if not todo:
        return 0
    progress = progress or NullProgress()
    progress.start(f"pull {version.name}@{version.hash[:12]}", sum(states[p][0] for p in todo))
    t = repo.transports.get(remote.url)
    try:
        with store.writing():  # `tessera gc` waits: it must not take our files in tmp/ for garbage
            _run_parallel(DOWNLOAD_WORKERS, [lambda p=p: _download_pack(repo, remote, t, p, progress) for p in todo])
    finally:
        progress.finish()
    return len(todo)


def _download_pack(repo: "Repo", remote: Remote, t: Transport, pack: str, progress: Progress) -> None:
    store, cat = repo.store, repo.catalog
    tmp = store.tmp_dir / f"pull-{pack[:16]}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            t.get_file(pack_key(pack), str(tmp), progress=progress.advance)
        except NotFound:
            raise CorruptData(f"{remote.url}: {pack_key(pack)} is missing") from None
        check_downloaded_pack(tmp, pack, cat.pack_chunks(pack), f"{remote.url}/{pack_key(pack)}")
        final = store.pack_path(pack)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        raise_os_error(exc, f"downloading pack {pack[:12]}")
    finally:
        tmp.unlink(missing_ok=True)
    rs.mark_pack_local(cat, pack)
    rs.mark_keys(cat, remote.name, [pack_key(pack)])
    from tessera.lazy import cache_dir

    for cached in (cache_dir(repo.home) / pack[:2]).glob(f"{pack}-*"):  # local now: lazy copies are dead weight
        cached.unlink(missing_ok=True)


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


def remote_datasets(repo: "Repo", remote: str | None = None) -> list[RemoteDataset]:
    """The datasets a remote holds (from its history keys): name, newest version, version count."""
    rem = resolve_remote(repo, remote)
    t = repo.transports.get(rem.url)
    found: dict[str, tuple[str, set[str]]] = {}
    for info in t.list("history/"):
        dataset, _, name = info.key.removeprefix("history/").partition("/")
        m = _HISTORY_NAME.match(name)
        if m is None:
            logger.warning("%s: ignoring unexpected key %s", rem.url, info.key)
            continue
        last, hashes = found.get(dataset, ("", set()))
        hashes.add(m.group(2))
        found[dataset] = (max(last, name), hashes)
    return [RemoteDataset(ds, last.split("-", 1)[1], len(hashes), int(last[:16]) / 1e6)
            for ds, (last, hashes) in sorted(found.items())]

