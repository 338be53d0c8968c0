"""Layer 5: the FUSE path's packed directories (tessera.fuse.lowlevel) and big directories through real
mounts (forced with ``--fuse``: the kernel path has its own tests in test_5_kernel_mount.py).

The packed form is checked against an independent decoder of the kernel's wire format; the batching
against every batch size a kernel could ask for; and a 50,000-entry directory through a real mount,
each entry's name, kind, size, mode and inode against the version. Timings belong in tests/bench.
"""
from __future__ import annotations

import errno
import os
import random
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import tessera
from fuse_probe import fuse_unavailable_reason, require_fuse
from tessera.model import Entry
from tessera.mounting import is_mounted
from trees import tree_digest

pytestmark = pytest.mark.fuse

BIG = 50_000
_DIRENTPLUS = struct.Struct("<QQQQII" + "QQQQQQIIIIIIIIII" + "QQII")


@pytest.fixture(scope="module", autouse=True)
def _fuse_available() -> None:
    require_fuse()


def _cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tessera", *args], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                          env={**os.environ, "TESSERA_HOME": str(home), **(env or {})})


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A version with a 50,000-entry directory (names of many lengths, files, an executable, symlinks
    and subdirectories), made from a few real files without copying bytes; mounted once."""
    base = tmp_path_factory.mktemp("listing")
    src = base / "src"
    src.mkdir()
    rng = random.Random(3)
    for k in range(7):
        (src / f"blob{k}").write_bytes(rng.randbytes(rng.randrange(0, 300_000)))
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "tool").chmod(0o755)
    home = base / "home"
    with tessera.Repo(home) as repo:
        seed = repo.commit("seed", src)
        files = [e for e in seed.walk() if e.is_file]
        entries = []
        for i in range(BIG):
            name = f"e{i:05d}" + "x" * rng.randrange(0, 120) + (".bin" if i % 3 else "")
            if i % 1000 == 7:
                entries.append(Entry(f"flat/{name}", "symlink", 0o777, 0, target=f"../target/{i}"))
            elif i % 5000 == 11:
                entries.append(Entry(f"flat/{name}/inner", files[0].kind, files[0].mode, files[0].size,
                                     files[0].sha256))
            else:
                f = files[i % len(files)]
                entries.append(Entry(f"flat/{name}", f.kind, f.mode, f.size, f.sha256))
        v = repo.commit_version("big", entries)
        want = {e.path: e for e in v.walk(dirs=True)}
    mp = base / "mnt"
    mp.mkdir()
    p = _cli(home, "mount", "--fuse", v.ref, str(mp))
    assert p.returncode == 0, p.stderr
    yield {"home": home, "ref": v.ref, "mnt": mp, "want": want, "time": v.time, "base": base, "src": src}
    if is_mounted(str(mp)):
        assert _cli(home, "umount", str(mp)).returncode == 0


def test_big_directory_lists_every_entry_once_in_order_with_its_attributes(big: dict) -> None:
    mnt, want = big["mnt"], big["want"]
    with tessera.Repo(big["home"]) as repo:
        from tessera.vfs import VersionFS

        fs = VersionFS(repo.get(big["ref"]))
        expect = [(name, a) for name, a in fs.readdir("flat")]
    assert len(expect) == BIG
    names = os.listdir(mnt / "flat")  # getdents in the kernel's batches: each entry exactly once, in order
    assert names == [n for n, _ in expect]
    with os.scandir(mnt / "flat") as it:
        scanned = [(e.name, e.inode(), e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it]
    assert scanned == [(n, a.ino, stat.S_ISDIR(a.mode), stat.S_ISLNK(a.mode)) for n, a in expect]
    mtime = int(round(big["time"] * 1e9))
    for name, a in expect:  # readdirplus brought the attributes: these stats agree with the version
        st = os.lstat(mnt / "flat" / name)
        e = want[f"flat/{name}"]
        assert (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink) == \
            (a.ino, a.mode, a.size, mtime, 1), name
        if e.is_file:
            assert st.st_size == e.size and st.st_mode & 0o777 == e.mode
        elif e.is_symlink:
            assert os.readlink(mnt / "flat" / name) == e.target


def test_big_directory_reads_lookups_and_misses(big: dict) -> None:
    mnt, want, src = big["mnt"], big["want"], big["src"]
    blobs = {p.read_bytes() for p in src.iterdir()}
    rng = random.Random(8)
    files = [p for p, e in want.items() if e.is_file]
    for rel in rng.sample(files, 200):
        data = (mnt / rel).read_bytes()
        assert data in blobs and len(data) == want[rel].size
        assert os.getxattr(mnt / rel, "user.tessera.sha256").decode() == want[rel].sha256
    for missing in ("flat/nope", "flat/e00000", "flat/" + "e" * 255, "nope/deeper"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / missing)
    with pytest.raises(OSError) as info:
        os.listdir(mnt / files[0])
    assert info.value.errno == errno.ENOTDIR
    dirs = [p for p, e in want.items() if e.kind == "dir" and p != "flat"]
    assert dirs and all(os.listdir(mnt / d) == ["inner"] for d in dirs)


def test_second_listing_is_the_same(big: dict) -> None:
    first = sorted(os.listdir(big["mnt"] / "flat"))
    assert sorted(os.listdir(big["mnt"] / "flat")) == first  # (served from the kernel's cache of the listing)
    out = subprocess.run(["find", str(big["mnt"]), "-type", "f"], capture_output=True, text=True, check=True)
    assert len(out.stdout.splitlines()) == sum(1 for e in big["want"].values() if e.is_file)


# -- the packed form, without a mount ----------------------------------------------------------------

def _decode(blob: bytes) -> list[tuple]:
    """Records of a READDIRPLUS reply, decoded independently of tessera.fuse.lowlevel."""
    out, at = [], 0
    while at < len(blob):
        f = _DIRENTPLUS.unpack_from(blob, at)
        namelen = f[24]
        name = blob[at + _DIRENTPLUS.size: at + _DIRENTPLUS.size + namelen].decode("utf-8", "surrogateescape")
        out.append((name, f))
        at += (_DIRENTPLUS.size + namelen + 7) & ~7
    assert at == len(blob)
    return out


def test_packed_directory_matches_the_version_and_batches_cover_it_once(big: dict) -> None:
    from tessera.fuse._binding import load_lowlevel
    from tessera.fuse.lowlevel import LowLevelServer, record_batch
    from tessera.vfs import VersionFS

    with tessera.Repo(big["home"]) as repo:
        fs = VersionFS(repo.get(big["ref"]))
        server = LowLevelServer(load_lowlevel(), fs)
        root = server._dir(1)
        flat_node = (1 << 32) | (root.names[b"flat"] + 1)
        packed = server._dir(flat_node)
        expect = fs.readdir("flat")
        records = _decode(packed.blob)
        assert [r[0] for r in records] == [".", ".."] + [n for n, _ in expect]
        mtime_s, mtime_ns = divmod(fs.mtime_ns, 10**9)
        for i, ((name, f), (_, a)) in enumerate(zip(records[2:], expect)):
            (node, gen, entry_valid, attr_valid, _, _, ino, size, blocks, atime, mtime, ctime, _, mns, _, mode, nlink,
             uid, gid, _, blksize, _, d_ino, d_off, namelen, d_type) = f
            assert node >> 32 == packed.slot and (node & 0xFFFFFFFF) - 1 == i and gen == 0
            assert (ino, size, blocks, mode, nlink, mtime, mns) == (a.ino, a.size, a.blocks, a.mode, 1, mtime_s, mtime_ns)
            assert (d_ino, d_off, d_type) == (a.ino, i + 3, a.mode >> 12) and entry_valid == attr_valid > 0
            assert packed.names[name.encode("utf-8", "surrogateescape")] == i
        assert records[0][1][0] == records[1][1][0] == 0  # "." and "..": no node, so the kernel skips them
        rng = random.Random(1)
        for _ in range(6):  # any batch size from 4 KiB up: every record once, in order, only whole records
            off, got = 0, []
            while True:
                start, stop = record_batch(packed.starts, rng.choice([4096, 8192, 32768, rng.randrange(4096, 70000)]),
                                           off)
                if stop == start:
                    break
                batch = _decode(packed.blob[start:stop])
                got.extend(batch)
                off = batch[-1][1][23]  # the last record's d_off: where the kernel asks next
            assert [r[0] for r in got] == [r[0] for r in records]
        assert record_batch(packed.starts, 4096, len(records)) == (0, 0)


def test_highlevel_fallback_still_serves(big: dict, tmp_path: Path) -> None:
    mp = tmp_path / "hl"
    mp.mkdir()
    env = {"TESSERA_FUSE_API": "highlevel"}
    with tessera.Repo(big["home"]) as repo:
        seed = repo.get("seed")
    p = _cli(big["home"], "mount", "--fuse", seed.ref, str(mp), env=env)
    assert p.returncode == 0, p.stderr
    try:
        assert tree_digest(mp) == tree_digest(big["src"])
        with pytest.raises(OSError) as info:
            (mp / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        log = max((big["home"] / "mounts").glob("*.log"), key=os.path.getmtime).read_text()
        assert "mfusepy over libfuse 3" in log
    finally:
        assert _cli(big["home"], "umount", str(mp)).returncode == 0
