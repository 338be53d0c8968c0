"""Trust: what a remote says is a claim until its bytes are checked (docs/format.md, "Trust rules").

Written the way the problems were found: a fresh home that browsed a remote then commits; a hand-tampered
remote (a false index, a decompression bomb in a chunk and in metadata, a missing pack, an impossible
directory size, a broken newest history entry); a bomb on a real mount next to good files.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import xxhash
import zstandard

from trees import write_random, write_text

MiB = 1 << 20


def env(home: Path) -> dict[str, str]:
    return {"TESSERA_HOME": str(home)}


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The last stderr line is the one ``error:`` line (CLI notices may precede it), no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert all(ln.startswith("tessera: ") for ln in lines[:-1]) and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


# Runs a command and reports its peak RSS. It must be the command's parent: a process forked from this
# (big) pytest process inherits its high-water mark through exec, a grandchild of a small one does not.
_MEASURE = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print('maxrss', usage.ru_maxrss, file=sys.stderr)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(args: list[str], home: Path) -> tuple[int, str, int, float]:
    """Run `tessera ARGS`: (exit code, its stderr, its peak RSS in KiB, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, shutil.which("tessera") or "tessera", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **env(home)}, stdin=subprocess.DEVNULL, timeout=300)
    *err, last = proc.stderr.strip().splitlines()
    assert last.startswith("maxrss "), proc.stderr
    return proc.returncode, "\n".join(err), int(last.split()[1]), time.monotonic() - start


@pytest.fixture
def published(tmp_path: Path, cli):
    """Home A committed ``src`` as ds (1 MiB packs) and pushed it to a file:// remote."""
    from tessera.config import RepoSettings
    from tessera.repo import Repo

    src = tmp_path / "src"
    write_random(src / "shared.bin", 3 * MiB, 1)
    write_text(src / "table.csv", 2 * MiB, 2)
    for i in range(20):
        (src / "small" / f"f{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (src / "small" / f"f{i:02d}.txt").write_text(f"small file {i}\n" * 50)
    a = tmp_path / "a"
    Repo(a, settings=RepoSettings(pack_target=MiB)).close()
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    ref = cli("commit", "ds", str(src), env=env(a), check=True).stdout.strip().splitlines()[-1]
    cli("push", "ds", "--remote", url, env=env(a), check=True)
    return src, remote, url, ref


def fresh(tmp_path: Path, cli, url: str, name: str = "b") -> Path:
    home = tmp_path / name
    cli("remote", "add", "origin", url, env=env(home), check=True)
    return home


def _remote_objects(remote: Path, prefix: str) -> list[Path]:
    return sorted(p for p in (remote / prefix).rglob("*") if p.is_file())


def _rewrite_version(remote: Path, hash_: str, **changes: object) -> None:
    from tessera.remote.wire import VersionObject

    path = remote / "versions" / hash_
    obj = VersionObject.from_bytes(hash_, path.read_bytes(), "test")
    path.write_bytes(VersionObject(**{**obj.__dict__, **changes}).to_bytes())  # type: ignore[arg-type]


# -- 1. a commit never depends on bytes only a remote has -------------------------------------------------

def test_commit_after_browsing_a_remote_stores_its_own_bytes(published, tmp_path: Path, cli) -> None:
    src, remote, url, ref = published
    b = fresh(tmp_path, cli, url)
    cli("ls", "ds", env=env(b), check=True)  # metadata only: ds's chunks are known as remote locations
    src2 = tmp_path / "src2"
    src2.mkdir()
    shutil.copy(src / "shared.bin", src2 / "shared.bin")
    (src2 / "mine.txt").write_text("only mine\n")
    ref2 = cli("commit", "ds2", str(src2), env=env(b), check=True).stdout.strip().splitlines()[-1]
    stats = json.loads(cli("stats", "--json", env=env(b), check=True).stdout)
    local = sum(p.stat().st_size for p in (b / "packs").rglob("*.pack"))
    assert local >= 3 * MiB, stats  # the shared file's bytes are here, not just named
    shutil.rmtree(remote)  # the remote is gone
    out = tmp_path / "out"
    cli("export", ref2, str(out), env=env(b), check=True)
    cli("verify", ref2, str(out), env=env(b), check=True)
    fsck = cli("fsck", env=env(b))
    assert fsck.returncode == 0 and "ds2@" not in fsck.stdout, fsck.stdout  # ds2 is whole here
    assert f"ds@{ref.split('@')[1][:12]} reads lazily" in fsck.stdout  # ds is browsed, and says where


def test_a_false_index_cannot_poison_later_commits_and_fsck_finds_and_repairs_it(published, tmp_path: Path,
                                                                                cli) -> None:
    """A hostile bucket lists the chunk of a file the user will commit later at garbage offsets of a
    garbage pack. The commit must store its own copy; a home damaged by an older tessera (its chunk row
    pointing at the claim) is named by fsck and repaired from its local packs."""
    from tessera.format.pack import PACK_MAGIC
    from tessera.remote.wire import decode_pack_list, encode_chunk_table, shard_pack_list

    src, remote, url, ref = published
    secret = b"a file the victim commits later\n" * 100  # one chunk (smaller than the minimum)
    cid = xxhash.xxh3_128_digest(secret)
    garbage = PACK_MAGIC + os.urandom(64 * 1024)
    gpack = hashlib.sha256(garbage).hexdigest()
    (remote / "packs" / gpack).write_bytes(garbage)
    from tessera.model import ChunkLocation

    # a chunk table placing the victim's chunk in the garbage pack, and the version naming both
    table = encode_chunk_table([(gpack, len(garbage))], [ChunkLocation(cid, gpack, 40, len(secret), len(secret), 0)])
    tname = hashlib.sha256(table).hexdigest()
    (remote / "chunkidx" / tname).write_bytes(table)
    version = ref.split("@")[1]
    from tessera.remote.wire import VersionObject

    obj = VersionObject.from_bytes(version, (remote / "versions" / version).read_bytes(), "test")
    packs = [p for s in obj.pack_lists for p in decode_pack_list(s, (remote / "packlist" / s).read_bytes(), s)]
    shards = shard_pack_list(sorted((*packs, gpack)))
    for s in shards:
        (remote / "packlist" / hashlib.sha256(s).hexdigest()).write_bytes(s)
    _rewrite_version(remote, version, chunk_tables=tuple(sorted((*obj.chunk_tables, tname))),
                     pack_lists=tuple(sorted(hashlib.sha256(s).hexdigest() for s in shards)),
                     pack_count=obj.pack_count + 1)

    b = fresh(tmp_path, cli, url)
    cli("pull", "ds", "--metadata-only", env=env(b), check=True)  # the claim is recorded as a remote location
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_bytes(secret)
    ref2 = cli("commit", "ds2", str(victim), env=env(b), check=True).stdout.strip().splitlines()[-1]
    assert cli("cat", ref2, "secret.txt", env=env(b), check=True).stdout.encode() == secret
    assert cli("fsck", env=env(b)).returncode == 0

    # what an older tessera left: the victim's chunk row pointing at the claim
    with sqlite3.connect(b / "catalog.db") as db:
        db.execute("UPDATE chunks SET pack = ?, offset = 40, stored_len = ?, raw_len = ?, codec = 0 WHERE id = ?",
                   (gpack, len(secret), len(secret), cid))
    one_line_error(cli("cat", ref2, "secret.txt", env=env(b)), 5, "hash check")
    proc = cli("fsck", env=env(b))
    assert proc.returncode == 5 and f"ds2@{ref2.split('@')[1][:12]}" in proc.stdout, proc.stdout
    assert "committed here" in proc.stdout
    remote_check = cli("fsck", "--remote", env=env(b))
    assert remote_check.returncode == 5 and "fails its hash check" in remote_check.stdout, remote_check.stdout
    assert "false location" in remote_check.stdout  # and names the version using it
    repaired = cli("fsck", "--repair", env=env(b))
    assert "repair:" in repaired.stdout and repaired.returncode == 0, repaired.stdout
    assert cli("cat", ref2, "secret.txt", env=env(b), check=True).stdout.encode() == secret
    assert cli("fsck", "--remote", "--repair", env=env(b)).returncode == 0  # the false claim is forgotten
    assert cli("fsck", "--remote", env=env(b)).returncode == 0


# -- 2. decompression bombs ---------------------------------------------------------------------------

def _zstd_bomb(declared: int) -> bytes:
    """A zstd frame whose header declares ``declared`` bytes and holds none (16 bytes)."""
    descriptor = bytes([0b1110_0000])  # 8-byte content size, single segment, no checksum, no dict
    return b"\x28\xb5\x2f\xfd" + descriptor + declared.to_bytes(8, "little") + bytes([1, 0, 0])  # last raw block, 0 B


def _first_zstd_chunk(b: Path, path: str, ref: str) -> object:
    from tessera.repo import Repo

    with Repo(b) as repo:
        v = repo.get(ref)
        for cid, _ in v.file_record(path).chunks:
            loc = v.chunks.locations([cid])[cid]  # from the remote's chunk table when not known yet
            if loc.codec == 1:
                return loc
    raise AssertionError("no compressed chunk")


def _mount(cli, home: Path, ref: str, mnt: Path) -> Path:
    mnt.mkdir()
    from fuse_probe import fuse_unavailable_reason

    why = fuse_unavailable_reason()
    if why is not None:
        pytest.skip(f"FUSE unavailable here: {why}")
    proc = cli("mount", ref, str(mnt), env=env(home), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return mnt


def _plant_bomb(cli, b: Path, remote: Path, ref: str) -> None:
    """Home ``b`` browses ds; then the remote's first compressed chunk of table.csv becomes a zstd frame
    declaring 100 GB (the pack keeps its layout, so only that chunk is bad)."""
    from tessera.model import ChunkLocation

    cli("ls", "ds", env=env(b), check=True)
    loc = _first_zstd_chunk(b, "table.csv", ref)
    assert isinstance(loc, ChunkLocation)
    pack = remote / "packs" / loc.pack
    data = bytearray(pack.read_bytes())
    bomb = _zstd_bomb(100 * 10**9)
    data[loc.offset:loc.offset + loc.stored_len] = bomb + bytes(loc.stored_len - len(bomb))
    pack.write_bytes(bytes(data))


def test_a_bomb_chunk_is_refused_before_allocating(published, tmp_path: Path, cli) -> None:
    src, remote, url, ref = published
    b = fresh(tmp_path, cli, url)
    _plant_bomb(cli, b, remote, ref)
    for args in (["cat", ref, "table.csv"], ["export", ref, str(tmp_path / "out")], ["pull", ref]):
        code, err, rss_kib, _ = run_measured(args, b)
        assert code == 5 and err.strip().splitlines()[-1].startswith("error: "), err
        assert "Traceback" not in err and "MemoryError" not in err, err
        assert rss_kib < 400 * 1024, rss_kib
    assert cli("cat", ref, "small/f03.txt", env=env(b), check=True).stdout == "small file 3\n" * 50


def test_a_metadata_bomb_is_refused_fast_and_small(published, tmp_path: Path, cli) -> None:
    from tessera.format.compress import ZSTD
    from tessera.format.pack import KIND_TREE, PackBuilder
    from tessera.model import HistoryEntry
    from tessera.remote.wire import VersionObject, encode_history, history_key

    src, remote, url, ref = published
    out = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(MiB)
    stored = b"".join(out.compress(zeros) for _ in range(1024)) + out.flush()  # 1 GiB of zeros in ~32 KiB
    parts: list[bytes] = []
    builder = PackBuilder(lambda pieces: parts.extend(bytes(p) for p in pieces))
    root = hashlib.sha256(b"what the bomb pretends to be").hexdigest()
    builder.add(KIND_TREE, ZSTD, bytes.fromhex(root), stored, 1 << 30)
    meta = builder.id
    (remote / "meta" / meta).write_bytes(b"".join(parts))
    (remote / "versions" / root).write_bytes(VersionObject(root, 0, 0, (meta,), ()).to_bytes())
    e = HistoryEntry("bomb", root, None, time.time(), "mallory", "", {}, 0, 0)
    (remote / history_key(e)).parent.mkdir(parents=True, exist_ok=True)
    (remote / history_key(e)).write_bytes(encode_history(e))
    b = fresh(tmp_path, cli, url)
    code, err, rss_kib, _ = run_measured(["ls", "bomb"], b)
    assert code == 5 and "raw bytes, more than" in err.strip().splitlines()[-1], err
    assert rss_kib < 250 * 1024, rss_kib  # refused before the 1 GiB is allocated (the bug took 1 GB)
    assert cli("ls", "ds", env=env(b)).returncode == 0  # the rest of the remote still reads


@pytest.mark.fuse
def test_a_bomb_on_a_mount_fails_its_file_only(published, tmp_path: Path, cli) -> None:
    src, remote, url, ref = published
    b = fresh(tmp_path, cli, url)
    _plant_bomb(cli, b, remote, ref)
    mnt = _mount(cli, b, ref, tmp_path / "mnt")
    try:
        with pytest.raises(OSError) as exc:
            (mnt / "table.csv").read_bytes()
        assert exc.value.errno == errno.EIO
        for i in range(20):  # its neighbours in the same pack still read
            assert (mnt / "small" / f"f{i:02d}.txt").read_bytes() == (src / "small" / f"f{i:02d}.txt").read_bytes()
        assert (mnt / "shared.bin").read_bytes() == (src / "shared.bin").read_bytes()
    finally:
        cli("umount", str(mnt), env=env(b))


# -- 7. smaller holes -------------------------------------------------------------------------------------

@pytest.mark.fuse
def test_a_pack_gone_from_the_remote_is_eio_on_the_mount(published, tmp_path: Path, cli) -> None:
    src, remote, url, ref = published
    b = fresh(tmp_path, cli, url)
    mnt = _mount(cli, b, ref, tmp_path / "mnt")
    try:
        for p in _remote_objects(remote, "packs"):
            p.unlink()
        assert (mnt / "table.csv").stat().st_size == (src / "table.csv").stat().st_size  # the file exists
        with pytest.raises(OSError) as exc:
            (mnt / "table.csv").read_bytes()
        assert exc.value.errno == errno.EIO
    finally:
        cli("umount", str(mnt), env=env(b))
    one_line_error(cli("cat", ref, "table.csv", env=env(b)), 5, "missing from the remote")


def test_an_impossible_directory_size_is_refused(tmp_path: Path, cli) -> None:
    from tessera.format.pack import KIND_TREE
    from tessera.model import HistoryEntry
    from tessera.remote.wire import MetaPackBuilder, VersionObject, encode_history, history_key

    def tree(entries: list[dict[str, object]]) -> tuple[str, bytes]:
        raw = json.dumps({"format": 1, "entries": entries}, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest(), raw

    sub_id, sub = tree([])
    root_id, root = tree([{"name": "d", "kind": "dir", "mode": 0o755, "size": 2**62, "id": sub_id}])
    b = MetaPackBuilder()
    b.add(KIND_TREE, sub_id, sub)
    b.add(KIND_TREE, root_id, root)
    meta, data = b.finish()
    remote = tmp_path / "remote"
    for key, body in ((f"meta/{meta}", data), (f"versions/{root_id}", VersionObject(root_id, 0, 2**62, (meta,), ()).to_bytes())):
        (remote / key).parent.mkdir(parents=True, exist_ok=True)
        (remote / key).write_bytes(body)
    e = HistoryEntry("huge", root_id, None, time.time(), "mallory", "", {}, 0, 2**62)
    (remote / history_key(e)).parent.mkdir(parents=True, exist_ok=True)
    (remote / history_key(e)).write_bytes(encode_history(e))
    home = fresh(tmp_path, cli, f"file://{remote}")
    one_line_error(cli("ls", "huge", env=env(home)), 5, "directory 'd' says")


def test_a_broken_newest_history_entry_warns_every_time(published, tmp_path: Path, cli) -> None:
    src, remote, url, ref = published
    a = tmp_path / "a"
    (src / "new.txt").write_text("a second version\n")
    ref2 = cli("commit", "ds", str(src), env=env(a), check=True).stdout.strip().splitlines()[-1]
    cli("push", "ds", "--remote", url, env=env(a), check=True)
    newest = _remote_objects(remote, "history/ds")[-1]
    assert newest.name.endswith(ref2.split("@")[1])
    newest.write_bytes(b"{broken")
    b = fresh(tmp_path, cli, url)
    for _ in range(2):  # the first use fetches, the second answers locally: both say so
        proc = cli("ls", "ds", env=env(b), check=True)
        assert "could not read" in proc.stderr and "new.txt" not in proc.stdout, proc.stderr
    one_line_error(cli("pull", "ds", env=env(b)), 5, "refusing to take an older version")
    cli("pull", ref, env=env(b), check=True)  # one named version still pulls


# -- issue 9: a lazily fetched chunk is decompressed and hashed once -------------------------------------

def test_a_lazily_fetched_chunk_is_decoded_once(published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                cli) -> None:
    import tessera.store as store_module
    from tessera.repo import Repo

    src, remote, url, ref = published
    b = fresh(tmp_path, cli, url)
    with Repo(b, chunk_cache_bytes=0) as repo:
        v = repo.get(ref)
        chunks = v.file_record("table.csv").chunks
        decoded: list[bytes] = []  # the id of every chunk decompressed, and of every chunk hashed
        hashed: list[bytes] = []
        real_decompress, real_chunk_id = store_module.decompress, store_module.chunk_id

        def decompress(*a: object, **k: object) -> bytes:
            data = real_decompress(*a, **k)  # type: ignore[arg-type]
            decoded.append(xxhash.xxh3_128_digest(data))
            return data

        def chunk_id(data: bytes) -> bytes:
            hashed.append(real_chunk_id(data))
            return hashed[-1]

        monkeypatch.setattr(store_module, "decompress", decompress)
        monkeypatch.setattr(store_module, "chunk_id", chunk_id)
        with v.open("table.csv") as f:  # sequential, with read-ahead: streams and coalesced GETs
            assert f.read() == (src / "table.csv").read_bytes()
        # every chunk read (the file's, and neighbours a stream passed) decompressed and hashed once
        assert Counter(decoded) == Counter(hashed) and max(Counter(decoded).values()) == 1
        assert {cid for cid, _ in chunks} <= set(decoded)
