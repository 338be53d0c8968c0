"""Layer 1: the catalog alone — migrations, the query surface, and the rules it keeps about where chunks are."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tessera.catalog import Catalog
from tessera.catalog.schema import SCHEMA_VERSION
from tessera.errors import SchemaTooNew
from tessera.format.pack import KIND_CHUNK, BlobInfo
from tessera.model import ChunkLocation, HistoryEntry


@pytest.fixture
def cat(tmp_path: Path):
    c = Catalog(tmp_path / "catalog.db")
    yield c
    c.close()


def _blob(cid: bytes, offset: int, n: int = 10) -> BlobInfo:
    return BlobInfo(KIND_CHUNK, 0, cid, offset, n, n)


def test_a_new_catalog_is_migrated_to_the_current_schema(tmp_path: Path, cat: Catalog) -> None:
    assert cat.setting("schema_version") == str(SCHEMA_VERSION)
    tables = {r[0] for r in cat.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"datasets", "versions", "history", "tags", "trees", "files", "packs", "chunks", "stat_cache",
            "dir_cache", "remotes", "remote_objects", "remote_meta", "push_queue", "watch_status"} <= tables
    cat.close()
    again = Catalog(tmp_path / "catalog.db")  # reopening applies nothing and keeps the data
    assert again.setting("schema_version") == str(SCHEMA_VERSION)
    again.close()


def test_a_catalog_from_a_newer_tessera_is_refused(tmp_path: Path, cat: Catalog) -> None:
    cat.set_setting("schema_version", str(SCHEMA_VERSION + 1))
    cat.close()
    with pytest.raises(SchemaTooNew, match="upgrade tessera"):
        Catalog(tmp_path / "catalog.db")


def test_select_in_asks_in_batches(cat: Catalog) -> None:
    ids = [i.to_bytes(16, "big") for i in range(1234)]
    cat.add_pack("p" * 64, 1 << 20, [_blob(cid, 40 + 100 * i) for i, cid in enumerate(ids)])
    found = cat.chunks_by_id(ids + [b"\xff" * 16])
    assert len(found) == 1234 and found[ids[777]].offset == 40 + 77700
    assert cat.local_chunks(ids) == set(ids)


def test_a_commit_may_only_count_on_local_chunks_and_local_bytes_win(cat: Catalog) -> None:
    a, b = b"a" * 16, b"b" * 16
    remote, local = "r" * 64, "l" * 64
    cat.add_remote_pack(remote, 1000, [ChunkLocation(a, remote, 40, 10, 10, 0), ChunkLocation(b, remote, 82, 10, 10, 0)])
    assert cat.local_chunks([a, b]) == set()  # a remote index is a claim
    cat.add_pack(local, 500, [_blob(a, 40)])
    assert cat.chunk(a).pack == local and cat.local_chunks([a, b]) == {a}  # the local copy takes over
    cat.add_remote_pack("s" * 64, 1000, [ChunkLocation(a, "s" * 64, 40, 10, 10, 0)])
    assert cat.chunk(a).pack == local  # and no remote index moves it back
    cat.add_pack("m" * 64, 500, [_blob(a, 40)])
    assert cat.chunk(a).pack == local  # a second local copy does not move it either
    cat.mark_pack_local(remote)
    assert cat.local_chunks([a, b]) == {a, b}  # a pulled pack (checked whole) counts


def test_imported_history_sets_the_head_by_time(cat: Catalog) -> None:
    now = time.time()
    old = HistoryEntry("ds", "1" * 64, None, now - 10, "a", "old", {}, 1, 1)
    new = HistoryEntry("ds", "2" * 64, "1" * 64, now, "a", "new", {}, 1, 1)
    cat.import_version(new.hash, 1, 1, [new])
    cat.import_version(old.hash, 1, 1, [old])  # learnt later, but older
    assert cat.dataset_head("ds") == (True, new.hash)
    cat.import_version(old.hash, 1, 1, [old])  # again: nothing new
    assert [e.hash for e in cat.history("ds")] == [old.hash, new.hash]  # by when this home learnt them
    assert cat.dataset_hashes("ds") == [new.hash, old.hash]
    assert cat.datasets_of(old.hash) == ["ds"]


def test_tags_learnt_from_a_remote_never_overwrite_ours(cat: Catalog) -> None:
    e = HistoryEntry("ds", "1" * 64, None, time.time(), "a", "", {}, 1, 1)
    cat.import_version(e.hash, 1, 1, [e])
    cat.set_tag("ds", "v1", "1" * 64)
    assert cat.set_tag_if_missing("ds", "v1", "2" * 64) == "1" * 64  # diverged: ours is kept, and said
    assert cat.tag("ds", "v1") == "1" * 64
    assert cat.set_tag_if_missing("ds", "v2", "2" * 64) is None and cat.tag("ds", "v2") == "2" * 64


def test_only_the_catalog_speaks_sql() -> None:
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*(root / "lib").rglob("*.py"), *(root / "fuse").rglob("*.py"), *(root / "daemon").rglob("*.py")]:
        if "catalog" in path.parts:
            continue
        text = path.read_text()
        if "import sqlite3" in text or "SELECT " in text or "INSERT " in text:
            offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders


def test_write_transactions_roll_back_on_error(cat: Catalog) -> None:
    with pytest.raises(RuntimeError):
        with cat.write() as c:
            c.execute("INSERT INTO settings VALUES ('x', '1')")
            raise RuntimeError("boom")
    assert cat.setting("x") is None
    with pytest.raises(sqlite3.IntegrityError):
        with cat.write() as c:
            c.execute("INSERT INTO settings VALUES ('y', '1')")
            c.execute("INSERT INTO settings VALUES ('y', '2')")
    assert cat.setting("y") is None
