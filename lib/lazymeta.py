"""Metadata fetched as it is walked (git's partial clone): a format-2 version from a remote is browsable
before its metadata is here.

A fresh home that resolves ``big`` on a remote records the version object only (`tessera.pull`,
``lazy_versions``). `LazyMeta` then finds each tree, file record or chunk location a reader asks for in
the version's location tables (`tessera.remote.wire.RemoteTable`: one ranged read of a table's head, then
one per bucket of rows) and fetches it with a ranged read of its metadata pack, checked as a full pull
checks it (blob header, bounded decompression, a tree's SHA-256 and rules), and records it in the catalog
so it is fetched once. `LazyTrees` (a `TreeSource`) and `LazyChunks` (a `ChunkSource`) put it behind the
roles every reader takes, so `ls`, the mount, `Version.open`, fsspec and the torch datasets read a
million-file version by fetching what they touch. Whatever walks a whole version (pull, push, export,
verify, fsck) first completes its metadata (`tessera.pull.complete_lazy_version`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import closing

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData
from tessera.format import table
from tessera.format.pack import KIND_FILE, KIND_TREE
from tessera.model import ChunkLocation, FileRecord, Tree
from tessera.remote.base import Transport
from tessera.remote.wire import (
    WHOLE_TABLE_MAX,
    RemoteTable,
    VersionObject,
    chunk_location,
    check_index_rows,
    chunk_table_key,
    fetch_meta_blobs,
    iter_chunk_table,
    meta_key_of,
    meta_table_key,
    pack_key,
    version_key,
)
from tessera.sources import ChunkSource, Segment
from tessera.trees import CatalogTrees


def import_chunk_table(catalog: Catalog, name: str, data: bytes, where: str,
                       wanted: Container[str] | None = None) -> list[str]:
    """Record the rows of chunk table ``name`` (``data``, whole: checked against its SHA-256) for its
    packs in ``wanted`` (all when None) that are not local here (rows a lazy lookup recorded are
    completed); returns those packs of the table, local or not. Rows go to the catalog as they are
    decoded, not held; each pack's layout is then checked there in offset order, all in one transaction:
    a table that fails a check leaves nothing behind."""
    table_packs, rows = iter_chunk_table(name, data, where)
    del data  # the generator holds the bytes until its last row
    mine = [p for p, _ in table_packs if wanted is None or p in wanted]
    local = catalog.pack_states(mine)
    record = {p for p in mine if not local.get(p, (0, False))[1]}
    counts = dict.fromkeys(record, 0)

    def recorded() -> Iterator[ChunkLocation]:
        for c in rows:
            if c.pack in record:
                counts[c.pack] += 1
                yield c

    with catalog.write():
        catalog.add_remote_chunks(recorded())
        catalog.add_remote_packs((p, size, counts[p]) for p, size in table_packs if p in record)
        for p, size in table_packs:
            if p in record:
                with closing(catalog.iter_pack_chunks(p)) as found:
                    problem = check_index_rows(found, size)
                if problem:
                    raise CorruptData(f"{where}: pack {p[:12]}: {problem}")
    return mine


class LazyMeta:
    """The metadata of one format-2 version on one remote, fetched by the piece and recorded here."""

    def __init__(self, catalog: Catalog, remote: str, transport: Callable[[], Transport], vobj: VersionObject) -> None:
        self.catalog = catalog
        self.remote = remote
        self.vobj = vobj
        self._transport = transport
        self._t: Transport | None = None
        self._tables: dict[str, RemoteTable] = {}
        self._imported: set[str] = set()  # chunk tables read whole and recorded
        self._lock = threading.Lock()

    @classmethod
    def of(cls, catalog: Catalog, hash: str, transport: Callable[[str], Transport]) -> LazyMeta | None:
        """The lazy metadata of version ``hash``, or None when its metadata is all here."""
        found = rs.lazy_version(catalog, hash)
        if found is None:
            return None
        remote, obj = found
        vobj = VersionObject.from_bytes(hash, obj, f"{remote}/{version_key(hash)}")
        return cls(catalog, remote, lambda: transport(remote), vobj)

    def _table(self, key: str, kind: int) -> RemoteTable:
        with self._lock:
            if self._t is None:
                self._t = self._transport()
            found = self._tables.get(key)
            if found is None:
                found = self._tables[key] = RemoteTable(self._t, key, kind)
            return found

    def _lookup(self, keys: list[bytes], tables: Sequence[str], kind: int) -> dict[bytes, table.Row]:
        """Rows for ``keys``, asking each table in turn for the keys still missing."""
        out: dict[bytes, table.Row] = {}
        for name in tables:
            left = [k for k in keys if k not in out]
            if not left:
                break
            out.update(self._table(name, kind).lookup(left))
        return out

    def fetch_meta(self, trees: Sequence[str] = (), files: Sequence[str] = ()) -> None:
        """Fetch and record these trees and file records (`CorruptData` naming the first one the remote
        does not have)."""
        keys = [meta_key_of(KIND_TREE, i) for i in trees] + [meta_key_of(KIND_FILE, i) for i in files]
        rows = self._lookup(keys, [meta_table_key(x) for x in self.vobj.meta_tables], table.KIND_META)
        missing = [k for k in keys if k not in rows]
        if missing:
            what = "tree" if missing[0][32] == KIND_TREE else "file record"
            raise CorruptData(f"{self.remote}: version {self.vobj.hash[:12]} needs {what} {missing[0][:32].hex()[:12]}, "
                              "which none of its metadata tables locates")
        assert self._t is not None
        got_trees, got_files = fetch_meta_blobs(self._t, list(rows.values()))
        with self.catalog.write():
            self.catalog.add_trees(got_trees)
            self.catalog.add_files(got_files)

    def chunk_locations(self, ids: Sequence[bytes]) -> dict[bytes, ChunkLocation]:
        """Where these chunks are on the remote (recorded as remote chunk locations); ids no chunk table
        of the version locates are absent.

        A chunk table up to `WHOLE_TABLE_MAX` is read whole the first time it is needed (one GET, checked
        against its SHA-256) and every row of it recorded: readers then know each pack's layout, which
        the lazy fetcher's coalesced reads and streams need. A bigger table is read by ranges."""
        found = self.catalog.chunks_by_id(list(ids))
        for name in self.vobj.chunk_tables:
            left = [i for i in ids if i not in found]
            if not left:
                break
            with self._lock:
                if name in self._imported:
                    continue
            t = self._table(chunk_table_key(name), table.KIND_CHUNKS)
            head = t.head()
            if head.size <= WHOLE_TABLE_MAX:
                packs = import_chunk_table(self.catalog, name, t.whole(), t.where)
                rs.mark_keys(self.catalog, self.remote, [pack_key(p) for p in packs])
                with self._lock:
                    self._imported.add(name)
            else:
                by_pack: dict[str, list[ChunkLocation]] = {}
                for r in t.lookup(left).values():
                    by_pack.setdefault(r.pack, []).append(chunk_location(r))
                self._record(by_pack, dict(head.packs))
            found.update(self.catalog.chunks_by_id(left))
        return found

    def _record(self, by_pack: dict[str, list[ChunkLocation]], sizes: dict[str, int]) -> None:
        with self.catalog.write():
            for pack, locs in by_pack.items():
                self.catalog.add_remote_pack(pack, sizes[pack], locs)
            rs.mark_keys(self.catalog, self.remote, [pack_key(p) for p in by_pack])


class LazyTrees(CatalogTrees):
    """Trees and file records from the catalog, else fetched from the remote (`LazyMeta`) and recorded."""

    def __init__(self, catalog: Catalog, meta: LazyMeta) -> None:
        super().__init__(catalog)
        self.meta = meta

    def load_tree(self, tree_id: str) -> Tree:
        try:
            return super().load_tree(tree_id)
        except CorruptData:  # not in the catalog yet
            self.meta.fetch_meta(trees=[tree_id])
            return super().load_tree(tree_id)

    def file_record(self, file_id: str) -> FileRecord:
        if self.catalog.file(file_id) is None:
            self.meta.fetch_meta(files=[file_id])
        return super().file_record(file_id)

    def file_records(self, file_ids: Sequence[str]) -> dict[str, FileRecord]:
        found = super().file_records(file_ids)
        missing = [i for i in file_ids if i not in found]
        if missing:
            self.meta.fetch_meta(files=missing)
            found.update(super().file_records(missing))
        return found


class LazyChunks:
    """A `ChunkSource` that asks the version's chunk tables for locations the catalog lacks."""

    def __init__(self, base: ChunkSource, meta: LazyMeta) -> None:
        self.base = base
        self.meta = meta

    def locations(self, chunk_ids: Sequence[bytes]) -> dict[bytes, ChunkLocation]:
        found = self.base.locations(chunk_ids)
        missing = [i for i in chunk_ids if i not in found]
        if missing:
            found.update(self.meta.chunk_locations(missing))
        return found

    def is_local(self, pack: str) -> bool:
        return self.base.is_local(pack)

    def read_chunk(self, loc: ChunkLocation) -> bytes:
        return self.base.read_chunk(loc)

    def segment(self, loc: ChunkLocation, lo: int, hi: int) -> Segment:
        return self.base.segment(loc, lo, hi)

    def will_need(self, locs: Sequence[ChunkLocation]) -> None:
        self.base.will_need(locs)
