"""Location tables merged over time (LSM-style, as kopia's index compaction and restic's index consolidation).

Every push writes a chunk table for the data packs it uploads and a metadata table for its metadata packs
(`tessera.push`), and a version object names every table covering one of its packs. A dataset pushed every
few seconds (the daemon) would soon name hundreds of tiny tables, and a fresh home's lazy lookup probes
them in turn. So when a version is about to name more than `FAN_IN` tables of a kind, `merge_tables`
writes one table holding the rows of the small ones (tables already near the size caps stay as they
are: tiers) for the version's packs, records in the catalog that those packs are now covered by it
(`remote_meta` kinds 3 and 4), and the version object names the merged table instead. Rows of packs the
version does not list are left out: its readers never need them, and a key also stored in such a pack
(a chunk stored twice) must not lead a lazy reader of the version to a pack a prune may delete. Later
pushes merge it again with the small tables that follow, until it is near the caps itself.

Rows come from the old tables, each read whole from the remote and checked against its SHA-256 (its
name): a metadata table's rows (where each tree and file record sits in its metadata pack) exist nowhere
else, a home whose packs are not local can merge too, and the merged rows are exactly rows a push wrote.
The inputs are bounded (each is small, together at most the caps), their rows are decoded a slice at a
time and merged in key order (`heapq.merge`), so memory is bounded by the caps, not by the dataset.

A merged table is an ordinary table (docs/format.md, "Location tables"): no format change. The old tables
stay while older version objects name them; a prune sweeps them once no kept version does. The merged
table is announced in the push's session before it is written, and its name is a pure function of its
inputs, the version's packs and this home's catalog, so a push killed after writing it writes the same
object again.
"""
from __future__ import annotations

import heapq
import logging
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData, NotFound
from tessera.faults import crash_point
from tessera.format import table
from tessera.ids import sha256_hex
from tessera.parallel import run_parallel
from tessera.remote.base import Transport
from tessera.remote.wire import TABLE_HEAD_GUESS, chunk_table_key, meta_table_key, upload_table

logger = logging.getLogger(__name__)

FAN_IN = 8
"""A version names at most this many tables of a kind before the small ones are merged (more only once
more than half of them are near the caps: then at most those plus ``FAN_IN // 2`` small ones)."""
TABLE_PACKS = 1024
"""Packs per location table: push cuts chunk tables here, a merged table (either kind) stops here."""
TABLE_ROWS = 1 << 20
"""Rows per location table (~37 MiB of chunk table, ~57 MiB of metadata table), likewise."""
READ_WORKERS = 4
ROWS_PER_SLICE = 4096  # rows of an input table decoded at once while merging

_TABLE_KIND = {rs.KIND_PACK_TABLE: table.KIND_CHUNKS, rs.KIND_META_TABLE: table.KIND_META}
_KEY = {rs.KIND_PACK_TABLE: chunk_table_key, rs.KIND_META_TABLE: meta_table_key}


@dataclass(frozen=True)
class Source:
    """One table a merge may read: its head, and its bytes when the first read brought all of them."""

    name: str
    head: table.Head
    data: bytes | None

    @property
    def small(self) -> bool:
        return not is_settled(len(self.head.packs), self.head.nrows)


@dataclass(frozen=True)
class Merged:
    """A merged table written to the remote: its name, the tables it replaces, its packs and rows."""

    name: str
    kind: int
    tables: tuple[str, ...]
    packs: int
    rows: int


def is_settled(npacks: int, nrows: int) -> bool:
    """A table this big is left as it is (merging it again would rewrite most of a full table)."""
    return npacks >= TABLE_PACKS // 2 or nrows >= TABLE_ROWS // 2


def should_merge(small: int, settled: int, fan_in: int) -> bool:
    """Whether a version naming ``small`` small and ``settled`` big tables of a kind merges the small ones."""
    return small >= 2 and small > max(fan_in - settled, fan_in // 2)


def merge_tables(catalog: Catalog, t: Transport, remote: str, kind: int, packs: Collection[str], *,
                 announce: Callable[[Iterable[str]], None] | None = None, fan_in: int | None = None) -> list[Merged]:
    """Before a version naming the tables that cover ``packs`` (data packs: ``kind`` `rs.KIND_PACK_TABLE`;
    metadata packs: `rs.KIND_META_TABLE`) is written: when that is more than ``fan_in`` tables, merge the
    small ones into as few tables as the caps allow, write them (``announce`` first: the push's session)
    and record that they cover those packs. Returns what was written (usually nothing)."""
    fan_in = FAN_IN if fan_in is None else fan_in
    covering = rs.meta_locations(catalog, remote, kind, sorted(packs))
    by_table: dict[str, list[str]] = {}
    for p, name in covering.items():
        by_table.setdefault(name, []).append(p)
    if len(by_table) <= fan_in:
        return []
    blobs = catalog.pack_blob_counts(sorted(covering)) if kind == rs.KIND_PACK_TABLE else {}
    settled = {x for x, ps in by_table.items() if is_settled(len(ps), sum(blobs.get(p, 0) for p in ps))}
    candidates = sorted(set(by_table) - settled)
    if not should_merge(len(candidates), len(settled), fan_in):
        return []
    heads = _read_heads(catalog, t, remote, kind, candidates)
    small = [h for h in heads if h.small]
    if not should_merge(len(small), len(by_table) - len(small), fan_in):
        return []
    mine = set(covering)
    return [_write_merged(catalog, t, remote, kind, group, mine, announce) for group in _groups(small)]


def _read_heads(catalog: Catalog, t: Transport, remote: str, kind: int, names: list[str]) -> list[Source]:
    """The heads of tables ``names`` (one ranged read each, which brings a small table whole)."""
    found: dict[str, Source] = {}
    lock = threading.Lock()

    def one(name: str) -> None:
        key = _KEY[kind](name)
        where = f"{t.url}/{key}"
        data = _get(catalog, t, remote, key, TABLE_HEAD_GUESS)
        try:
            head = table.decode_head(data, where, kind=_TABLE_KIND[kind])
        except table.NeedMore as more:
            data = _get(catalog, t, remote, key, more.size)
            head = table.decode_head(data, where, kind=_TABLE_KIND[kind])
        with lock:
            found[name] = Source(name, head, data if len(data) >= head.size else None)

    run_parallel(READ_WORKERS, [partial(one, n) for n in names])
    return [found[n] for n in names]


def _get(catalog: Catalog, t: Transport, remote: str, key: str, size: int) -> bytes:
    try:
        return t.get(key, 0, size)
    except NotFound:
        rs.forget_keys(catalog, remote, [key])  # its packs are uncovered now: the next push indexes them again
        raise CorruptData(f"{t.url}/{key} is missing (pruned?) though this home recorded it on {remote}: "
                          "push again (what it covered is then written again)") from None


def _whole(catalog: Catalog, t: Transport, remote: str, kind: int, source: Source) -> bytes:
    """All of a small table, checked against its SHA-256 (its name)."""
    key = _KEY[kind](source.name)
    data = source.data if source.data is not None else _get(catalog, t, remote, key, source.head.size + 1)
    if len(data) != source.head.size or sha256_hex(data) != source.name:
        raise CorruptData(f"{t.url}/{key} fails its hash check")
    return data


def _groups(sources: list[Source]) -> list[list[Source]]:
    """Small tables in groups within the caps, smallest first; a group of one is not merged."""
    groups: list[list[Source]] = []
    group: list[Source] = []
    npacks = nrows = 0
    for s in sorted(sources, key=lambda s: (s.head.nrows, s.name)):
        if group and (npacks + len(s.head.packs) > TABLE_PACKS or nrows + s.head.nrows > TABLE_ROWS):
            groups.append(group)
            group, npacks, nrows = [], 0, 0
        group.append(s)
        npacks += len(s.head.packs)
        nrows += s.head.nrows
    groups.append(group)
    return [g for g in groups if len(g) >= 2]


def _write_merged(catalog: Catalog, t: Transport, remote: str, kind: int, group: list[Source], mine: set[str],
                  announce: Callable[[Iterable[str]], None] | None) -> Merged:
    """Read the tables of ``group`` whole (checked), merge their rows for the packs ``mine`` (the version's),
    write the merged table, record that it covers those packs."""
    datas: dict[str, bytes] = {}

    def read(s: Source) -> None:
        datas[s.name] = _whole(catalog, t, remote, kind, s)

    run_parallel(READ_WORKERS, [partial(read, s) for s in group])
    sizes: dict[str, int] = {}
    for s in group:
        for p, size in s.head.packs:
            if p in mine and sizes.setdefault(p, size) != size:
                raise CorruptData(f"{t.url}: location tables disagree on the size of pack {p[:12]}")
    packs = sorted(sizes.items())
    counted: list[int] = [0]

    def rows() -> Iterator[table.Row]:
        for row in _merged_rows(catalog, remote, kind, group, datas, set(sizes), f"{t.url}/{_KEY[kind]('')}"):
            counted[0] += 1
            yield row

    with tempfile.TemporaryFile() as spill:  # written and uploaded in bounded memory, as push's tables
        table.write_row_objects(spill, _TABLE_KIND[kind], packs, rows())
        name, key = upload_table(t, _TABLE_KIND[kind], packs, spill, announce)
    crash_point("merge-after-table")
    rs.cover_packs(catalog, remote, kind, name, [p for p, _ in packs], key=key)
    merged = Merged(name, kind, tuple(s.name for s in group), len(packs), counted[0])
    logger.info("%s: merged %d %s tables into %s (%d packs, %d rows)", remote, len(group),
                "chunk" if kind == rs.KIND_PACK_TABLE else "metadata", key, merged.packs, merged.rows)
    crash_point("push-after-merge")
    return merged


def _merged_rows(catalog: Catalog, remote: str, kind: int, group: list[Source], datas: dict[str, bytes],
                 packs: set[str], where: str) -> Iterator[table.Row]:
    """Every row of the tables of ``group`` in one of ``packs``, in key order, each key once. A key two tables locate in
    different places (a chunk stored in two packs, a tree sent twice) keeps the place this home's catalog
    gives it: the pack a version pushed from here lists, so no version naming the merged table depends
    on a pack it does not list (else the first table's row, deterministically)."""
    same: list[table.Row] = []
    for row in heapq.merge(*(_rows_of(s.head, datas[s.name], where + s.name) for s in group), key=lambda r: r.key):
        if row.pack not in packs:
            continue
        if same and row.key != same[0].key:
            yield _choose(catalog, remote, kind, same)
            same = []
        same.append(row)
    if same:
        yield _choose(catalog, remote, kind, same)


def _rows_of(head: table.Head, data: bytes, where: str) -> Iterator[table.Row]:
    prev = b""
    for first in range(0, head.nrows, ROWS_PER_SLICE):
        end = min(head.nrows, first + ROWS_PER_SLICE)
        start = head.rows_start + first * head.row_len
        part = table.decode_rows(head, data[start:start + (end - first) * head.row_len], first, where)
        if part and part[0].key <= prev:
            raise CorruptData(f"{where} is malformed: row {first} is out of order")
        prev = part[-1].key if part else prev
        yield from part


def _choose(catalog: Catalog, remote: str, kind: int, rows: list[table.Row]) -> table.Row:
    if len(rows) == 1:
        return rows[0]
    places = {(r.pack, r.offset, r.stored_len, r.raw_len, r.codec) for r in rows}
    if len(places) == 1:
        return rows[0]
    key = rows[0].key
    if kind == rs.KIND_PACK_TABLE:
        loc = catalog.chunks_by_id([key]).get(key)
        preferred = loc.pack if loc is not None else None
    else:
        preferred = rs.meta_locations(catalog, remote, key[32], [key[:32].hex()]).get(key[:32].hex())
    return next((r for r in rows if r.pack == preferred), rows[0])
