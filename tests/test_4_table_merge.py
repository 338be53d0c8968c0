"""Location tables merged over time (`tessera.tablemerge`, docs/format.md "Location tables").

A dataset pushed after every small change (the daemon's pattern) would otherwise name one more chunk table
and one more metadata table per push. Here: 20 pushes of a dataset growing by one small file each name at
most `FAN_IN` tables of each kind; a fresh home lists, reads (with a bounded number of requests, counted by
the proxy in front of moto), verifies and checks the last version; forgetting the older versions and
pruning deletes the superseded tables and keeps what the live version names; a push killed between the
merged table and the version object leaves a readable remote and finishes when run again; big tables are
left as they are (tiers); a home holding none of the packs (a distributed commit's driver) merges too; a
chunk or tree two tables locate in different packs keeps this home's location, and packs the version does
not use are left out.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inprocess import tessera_main

import tessera
from tessera import tablemerge
from tessera.catalog import remote_state as rs
from tessera.catalog.lifecycle_state import set_lifecycle_setting
from tessera.format import table
from tessera.ids import sha256_hex
from tessera.model import ChunkLocation
from tessera.remote import open_transport
from tessera.remote.wire import SessionObject, VersionObject, chunk_table_key, meta_table_key, version_key

STEPS = 20


def grow(src: Path, step: int) -> None:
    """Step ``step`` of a dataset that gains one small file per step."""
    src.mkdir(parents=True, exist_ok=True)
    (src / f"f{step:02d}.txt").write_text(f"file {step}\n" * (step + 1))


def push_steps(home: Path, url: str, src: Path, steps: range) -> list[str]:
    """Commit and push one version per step (what the daemon does); returns the version hashes."""
    hashes = []
    with tessera.Repo(home) as r:
        if not rs.remote_names(r.catalog):
            rs.add_remote(r.catalog, "origin", url, default=True)
        for step in steps:
            grow(src, step)
            hashes.append(r.commit("ds", src).hash)
            r.push("ds")
    return hashes


def version_object(url: str, hash: str) -> VersionObject:
    with open_transport(url) as t:
        return VersionObject.from_bytes(hash, t.get(version_key(hash)), hash)


def keys(url: str, prefix: str) -> set[str]:
    with open_transport(url) as t:
        return {i.key.removeprefix(prefix) for i in t.list(prefix)}


def env(home: Path, **extra: str) -> dict[str, str]:
    return {"TESSERA_HOME": str(home), **extra}


def ok(home: Path, *args: str) -> str:
    """`tessera ARGS` in this process (tests/inprocess.py): exit 0, its output."""
    proc = tessera_main(home, *args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def test_twenty_small_pushes_name_at_most_the_fan_in_then_prune_sweeps_the_superseded_tables(
        tmp_path: Path, s3_bucket: str, fault_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    src = tmp_path / "src"
    hashes = push_steps(tmp_path / "a", s3_bucket, src, range(STEPS))
    last = version_object(s3_bucket, hashes[-1])
    assert 1 <= len(last.chunk_tables) <= tablemerge.FAN_IN and 1 <= len(last.meta_tables) <= tablemerge.FAN_IN
    assert last.pack_count == STEPS and len(last.meta) == STEPS
    chunk_tables, meta_tables = keys(s3_bucket, "chunkidx/"), keys(s3_bucket, "metaidx/")
    # one table of each kind per push, plus the merged ones; pushing deleted nothing
    assert len(chunk_tables) > STEPS and len(meta_tables) > STEPS
    first = version_object(s3_bucket, hashes[0])
    assert set(first.chunk_tables) <= chunk_tables and set(first.meta_tables) <= meta_tables

    # a fresh home reads the last version lazily: the table probes are bounded by the tables it names
    stats = fault_proxy.stats
    with tessera.Repo(tmp_path / "fresh", remote=s3_bucket) as fresh:
        v = fresh.get("ds")
        assert v.hash == hashes[-1]
        for name in ("f00.txt", f"f{STEPS - 1:02d}.txt"):
            before = stats.requests
            assert v.read_bytes(name) == (src / name).read_bytes()
            used = stats.requests - before
            print(f"lazy read of {name}: {used} requests ({len(last.meta_tables)} metadata tables, "
                  f"{len(last.chunk_tables)} chunk tables)")
            # per metadata table probed: its head and a bucket (tree), a bucket (file record); per chunk
            # table: its head and the whole table; then the two metadata blobs and the chunk
            assert used <= 3 * len(last.meta_tables) + 2 * len(last.chunk_tables) + 3, stats.methods[-used:]
            assert used < 2 * STEPS  # naming one table of each kind per push, reading f00.txt took 44
    fresh_home = tmp_path / "fresh"
    assert ok(fresh_home, "ls", "ds").split() == [f"f{i:02d}.txt" for i in range(STEPS)]
    ok(fresh_home, "verify", "ds", str(src))
    ok(fresh_home, "fsck")

    # forget all but the last version: prune sweeps every table only older versions named
    with tessera.Repo(tmp_path / "a") as a:
        for key, value in (("prune.margin", "2s"), ("prune.sweep_window", "20s"), ("prune.max_clock_skew", "60s")):
            set_lifecycle_setting(a.catalog, key, value)
    ok(tmp_path / "a", "forget", "--remote", "origin", "ds", "--keep-last", "1")
    ok(tmp_path / "a", "prune")
    ok(tmp_path / "a", "prune", "--wait")
    assert keys(s3_bucket, "chunkidx/") == set(last.chunk_tables)
    assert keys(s3_bucket, "metaidx/") == set(last.meta_tables)
    assert keys(s3_bucket, "versions/") == {hashes[-1]}
    ok(tmp_path / "after", "remote", "add", "origin", s3_bucket)
    ok(tmp_path / "after", "verify", "ds", str(src))
    # the home that pushed goes on: its next versions name the live tables and merge again
    hashes += push_steps(tmp_path / "a", s3_bucket, src, range(STEPS, STEPS + tablemerge.FAN_IN))
    nxt = version_object(s3_bucket, hashes[-1])
    assert len(nxt.chunk_tables) <= tablemerge.FAN_IN and len(nxt.meta_tables) <= tablemerge.FAN_IN
    ok(tmp_path / "later", "remote", "add", "origin", s3_bucket)
    ok(tmp_path / "later", "verify", "ds", str(src))


@pytest.mark.parametrize("point", ["merge-after-table", "push-after-merge"])
def test_a_push_killed_after_the_merged_table_leaves_a_readable_remote_and_finishes_when_run_again(
        tmp_path: Path, point: str) -> None:
    url = f"file://{tmp_path / 'remote'}"
    src = tmp_path / "src"
    home = tmp_path / "a"
    hashes = push_steps(home, url, src, range(tablemerge.FAN_IN))
    ok(home, "prune")  # layout 2 from now on: pushes announce what they write in a session
    grow(src, tablemerge.FAN_IN)
    with tessera.Repo(home) as r:
        ninth = r.commit("ds", src).hash
    killed = subprocess.run(["tessera", "push", "ds"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, **env(home, TESSERA_CRASH_AT=point)}, timeout=120)
    assert killed.returncode == -9, killed.stderr
    named = {x for h in hashes for x in version_object(url, h).chunk_tables}
    new = keys(url, "chunkidx/") - named
    assert len(new) == 2 and ninth not in keys(url, "versions/")  # the 9th push's own table and the merged one
    with open_transport(url) as t:
        heads = {x: table.decode(t.get(chunk_table_key(x)), x, kind=table.KIND_CHUNKS)[0] for x in new}
        [merged] = [x for x, head in heads.items() if len(head.packs) > 1]
        [session] = [SessionObject.from_bytes(i.key, t.get(i.key), i.key) for i in t.list("sessions/")]
    assert chunk_table_key(merged) in session.keys  # announced before it was written
    fresh = tmp_path / "fresh"
    ok(fresh, "remote", "add", "origin", url)
    assert ok(fresh, "log", "ds", "--json").count('"hash"') == tablemerge.FAN_IN
    assert ok(fresh, "cat", f"ds@{hashes[-1]}", "f00.txt") == "file 0\n"

    ok(home, "push", "ds")
    v = version_object(url, ninth)
    assert v.chunk_tables == (merged,) and len(v.meta_tables) == 1
    assert keys(url, "chunkidx/") - named == new  # the same merged table, written again or kept
    again = tmp_path / "again"
    ok(again, "remote", "add", "origin", url)
    ok(again, "verify", "ds", str(src))
    ok(again, "fsck")


def test_tables_near_the_caps_stay_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiers: with caps of 4 packs a table, tables of 2 packs or more are settled: merged once, never again."""
    monkeypatch.setattr(tablemerge, "TABLE_PACKS", 4)
    url = f"file://{tmp_path / 'remote'}"
    src = tmp_path / "src"
    hashes = push_steps(tmp_path / "a", url, src, range(9))
    ninth = version_object(url, hashes[-1])
    with open_transport(url) as t:
        def npacks(name: str) -> int:
            return len(table.decode(t.get(chunk_table_key(name)), name, kind=table.KIND_CHUNKS)[0].packs)

        assert sorted(npacks(x) for x in ninth.chunk_tables) == [1, 4, 4]  # 9 tables of 1 pack, merged by 4
        settled = {x for x in ninth.chunk_tables if npacks(x) == 4}
        hashes += push_steps(tmp_path / "a", url, src, range(9, STEPS))
        last = version_object(url, hashes[-1])
        assert settled <= set(last.chunk_tables)  # never merged again
        assert all(npacks(x) <= 4 for x in last.chunk_tables) and len(last.chunk_tables) <= tablemerge.FAN_IN
    ok(tmp_path / "fresh", "remote", "add", "origin", url)
    ok(tmp_path / "fresh", "verify", "ds", str(src))


def test_a_home_whose_packs_are_not_local_merges_too(tmp_path: Path) -> None:
    """A distributed commit's driver holds none of the packs (its workers uploaded them): it merges from
    the tables on the remote all the same."""
    from tessera.distributed import LocalExecutor

    url = f"file://{tmp_path / 'remote'}"
    src = tmp_path / "src"
    with tessera.Repo(tmp_path / "driver") as r:
        rs.add_remote(r.catalog, "origin", url, default=True)
        for step in range(tablemerge.FAN_IN + 1):
            grow(src, step)
            h = r.commit("ds", src, executor=LocalExecutor(1)).hash
        assert r.catalog.query_one("SELECT count(*) FROM packs WHERE local = 1")[0] == 0
    v = version_object(url, h)
    assert len(v.chunk_tables) == 1 and len(v.meta_tables) == 1 and v.pack_count == tablemerge.FAN_IN + 1
    ok(tmp_path / "fresh", "remote", "add", "origin", url)
    ok(tmp_path / "fresh", "verify", "ds", str(src))


@pytest.mark.parametrize("kind", [rs.KIND_PACK_TABLE, rs.KIND_META_TABLE])
@pytest.mark.parametrize("preferred", [0, 1])
def test_a_key_two_tables_locate_keeps_the_location_this_home_uses(tmp_path: Path, preferred: int, kind: int) -> None:
    """A chunk stored in two packs (a commit's own copy of a chunk it knew only from a remote), or a tree
    sent in two metadata packs, is one row of a merged table: the one in the pack this home's versions
    list, so none of them depends on the other pack. Packs of the small tables the version does not use
    are left out (and stay covered by their old table)."""
    url = f"file://{tmp_path / 'remote'}"
    tkind = table.KIND_CHUNKS if kind == rs.KIND_PACK_TABLE else table.KIND_META
    table_key = chunk_table_key if kind == rs.KIND_PACK_TABLE else meta_table_key
    twice, once, third = (bytes(range(16)), bytes(range(1, 17)), bytes(range(2, 18))) if tkind == table.KIND_CHUNKS \
        else (bytes(range(32)) + b"\x01", bytes(range(1, 33)) + b"\x02", bytes(range(2, 34)) + b"\x02")
    packs = ["a" * 64, "b" * 64]
    unused = "c" * 64  # in the first table, not in the version
    offsets = [100, 150]
    with tessera.Repo(tmp_path / "home") as r, open_transport(url) as t:
        names = []
        for pack, offset in zip(packs, offsets):
            rows = [table.Row(twice, pack, offset, 10, 10, 0), table.Row(once, pack, 40, 10, 10, 0)]
            covered = [pack] if names else [pack, unused]
            if not names:
                rows.append(table.Row(third, unused, 200, 10, 10, 0))
            data = table.encode(tkind, [(p, 1000) for p in covered], rows)
            names.append(sha256_hex(data))
            key = table_key(names[-1])
            t.put(key, data)
            rs.mark_meta_pack(r.catalog, "origin", names[-1], [(kind, p) for p in covered], key=key)
        if kind == rs.KIND_PACK_TABLE:
            with r.catalog.write():
                r.catalog.add_remote_pack(packs[preferred], 1000,
                                          [ChunkLocation(twice, packs[preferred], offsets[preferred], 10, 10, 0)])
        else:
            rs.mark_meta_pack(r.catalog, "origin", packs[preferred], [(1, twice[:32].hex())])
        [merged] = tablemerge.merge_tables(r.catalog, t, "origin", kind, packs, fan_in=1)
        assert sorted(merged.tables) == sorted(names) and merged.packs == 2 and merged.rows == 2
        head, rows = table.decode(t.get(table_key(merged.name)), "merged", kind=tkind)
        assert head.packs == (("a" * 64, 1000), ("b" * 64, 1000))
        assert table.find(rows, twice) == table.Row(twice, packs[preferred], offsets[preferred], 10, 10, 0)
        assert table.find(rows, third) is None  # the unused pack's row
        assert rs.meta_locations(r.catalog, "origin", kind, packs) == dict.fromkeys(packs, merged.name)
        assert rs.meta_locations(r.catalog, "origin", kind, [unused]) == {unused: names[0]}
        # a version naming one table needs no merge
        assert tablemerge.merge_tables(r.catalog, t, "origin", kind, packs, fan_in=1) == []
