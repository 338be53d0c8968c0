"""Layer 5: the FUSE path's packed directories (tessera.fuse.lowlevel) and big directories through real
mounts (forced with ``--fuse``: the kernel path has its own tests in test_5_kernel_mount.py).

Listing replies are checked against an independent decoder of the kernel's wire format, against every
batch size a kernel could ask for; a 50,000-entry directory through a real mount, each entry's name,
kind, size, mode and inode against the version; what a find asks the server in each listing mode
(counted by the server, logged at unmount); and that the server keeps nothing per entry listed.
Timings belong in tests/bench.
"""
from __future__ import annotations

import errno
import os
import random
import re
import stat
import struct
import subprocess
import sys
import time
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
_DIRENT = struct.Struct("<QQII")


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


def _decode_plain(blob: bytes) -> list[tuple]:
    """Records of a READDIR reply (fuse_dirent: ino, off, namelen, type, name padded to 8 bytes)."""
    out, at = [], 0
    while at < len(blob):
        f = _DIRENT.unpack_from(blob, at)
        out.append((blob[at + _DIRENT.size: at + _DIRENT.size + f[2]].decode("utf-8", "surrogateescape"), f))
        at += (_DIRENT.size + f[2] + 7) & ~7
    assert at == len(blob)
    return out


def _batches(server, node: int, plus: bool, decode) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Every record of a directory as a kernel asks for them: batches of random sizes from 4 KiB up,
    each from the offset after the last record of the one before."""
    rng = random.Random(1)
    off, got = 0, []
    while True:
        batch = decode(server.listing_batch(node, off, rng.choice([4096, 8192, 32768, rng.randrange(4096, 70000)]),
                                            plus=plus))
        if not batch:
            return got
        got.extend(batch)
        off = batch[-1][1][23 if plus else 1]  # the last record's d_off: where the kernel asks next


def test_listing_batches_match_the_version_and_cover_it_once(big: dict) -> None:
    from tessera.fuse._binding import load_lowlevel
    from tessera.fuse.lowlevel import LowLevelServer
    from tessera.vfs import VersionFS

    with tessera.Repo(big["home"]) as repo:
        fs = VersionFS(repo.get(big["ref"]))
        server = LowLevelServer(load_lowlevel(), fs)
        _, root = server._dir(1)
        flat_node = (1 << 32) | (root.index("flat") + 1)
        slot, _ = server._dir(flat_node)
        expect = fs.readdir("flat")
        records = _decode(server.listing_batch(flat_node, 0, 1 << 30, plus=True))
        assert [r[0] for r in records] == [".", ".."] + [n for n, _ in expect]
        mtime_s, mtime_ns = divmod(fs.mtime_ns, 10**9)
        for i, ((name, f), (_, a)) in enumerate(zip(records[2:], expect)):
            (node, gen, entry_valid, attr_valid, _, _, ino, size, blocks, atime, mtime, ctime, _, mns, _, mode, nlink,
             uid, gid, _, blksize, _, d_ino, d_off, namelen, d_type) = f
            assert node >> 32 == slot and (node & 0xFFFFFFFF) - 1 == i and gen == 0
            assert (ino, size, blocks, mode, nlink, mtime, mns) == (a.ino, a.size, a.blocks, a.mode, 1, mtime_s, mtime_ns)
            assert (d_ino, d_off, d_type) == (a.ino, i + 3, a.mode >> 12) and entry_valid == attr_valid > 0
            assert fs.directory("flat").index(name) == i
            looked_up = server.entry_reply(slot, fs.directory("flat"), i)  # what a LOOKUP of this name answers
            assert looked_up == server.listing_batch(flat_node, i + 2, 4096, plus=True)[:len(looked_up)]
        assert records[0][1][0] == records[1][1][0] == 0  # "." and "..": no node, so the kernel skips them
        # any batch size from 4 KiB up: every record once, in order, only whole records
        assert [(n, f) for n, f in _batches(server, flat_node, True, _decode)] == records
        plain = _batches(server, flat_node, False, _decode_plain)
        assert [(n, f[0], f[1], f[3]) for n, f in plain] == [(n, f[22], f[23], f[25]) for n, f in records]
        assert server.listing_batch(flat_node, len(records), 4096, plus=True) == b""
        assert fs.directory("flat").index("nope") is None and fs.directory("flat").index("e00000") is None


def _served(home: Path, mountpoint: Path) -> tuple[int, int]:
    """(lookups, listing requests) the last server of this mountpoint answered, from its log line at unmount."""
    for log in sorted((home / "mounts").glob("*.log"), key=os.path.getmtime, reverse=True):
        text = log.read_text()
        if str(mountpoint) in text:
            served = re.findall(r"served (\d+) lookups, \d+ getattrs, (\d+) listing requests", text)
            assert served, text[-2000:]
            return int(served[-1][0]), int(served[-1][1])  # the last mount at this mountpoint
    raise AssertionError(f"no mount log names {mountpoint}")


@pytest.fixture(scope="module")
def wide(big: dict) -> dict:
    """40 directories of 150 entries (files, and a symlink in each), no bytes copied."""
    with tessera.Repo(big["home"]) as repo:
        f = next(e for e in repo.get("seed").walk() if e.is_file)
        entries = [Entry(f"d{d:02d}/f{i:03d}", f.kind, f.mode, f.size, f.sha256) for d in range(40) for i in range(149)]
        entries += [Entry(f"d{d:02d}/link", "symlink", 0o777, 0, target="f000") for d in range(40)]
        v = repo.commit_version("wide", entries)
    return {"ref": v.ref, "paths": sorted(e.path for e in entries), "dirs": 40}


@pytest.mark.parametrize("listing", ["names", "attrs"])
def test_what_a_find_and_a_stat_of_every_entry_ask_the_server(big: dict, wide: dict, listing: str,
                                                              tmp_path: Path) -> None:
    """``names``: a find costs no LOOKUP of a file (the kernel got names and types only), each stat one;
    ``attrs`` (READDIRPLUS): neither costs any LOOKUP at all."""
    home, mp = big["home"], tmp_path / listing
    p = _cli(home, "mount", "--fuse", "--listing", listing, wide["ref"], str(mp))
    assert p.returncode == 0, p.stderr
    try:
        out = subprocess.run(["find", str(mp), "-type", "f"], capture_output=True, text=True, check=True).stdout
        assert sorted(os.path.relpath(x, mp) for x in out.split()) == [x for x in wide["paths"] if "link" not in x]
        after_find = None
        if listing == "names":  # the kernel must look each entry up now: count them apart
            assert _cli(home, "umount", str(mp)).returncode == 0
            after_find = _served(home, mp)
            assert _cli(home, "mount", "--fuse", "--listing", listing, wide["ref"], str(mp)).returncode == 0
            subprocess.run(["find", str(mp), "-type", "f"], capture_output=True, check=True)
        for rel in wide["paths"]:
            st = os.lstat(mp / rel)
            assert stat.S_ISLNK(st.st_mode) == rel.endswith("link") and st.st_nlink == 1
    finally:
        assert _cli(home, "umount", str(mp)).returncode == 0
    lookups, listings = _served(home, mp)
    assert listings >= wide["dirs"] + 1  # every directory was listed by the server (then cached by the kernel)
    if listing == "attrs":
        assert lookups == 0
    else:
        assert after_find is not None and after_find[0] <= wide["dirs"]  # find looked up directories only
        assert lookups == after_find[0] + len(wide["paths"])  # then each stat, once per entry


def test_a_bad_listing_mode_is_a_one_line_error(big: dict, wide: dict, tmp_path: Path) -> None:
    p = _cli(big["home"], "mount", "--fuse", "--listing", "sizes", wide["ref"], str(tmp_path / "m"))
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert "'attrs', 'names'" in p.stderr and not (tmp_path / "m").exists()
    from tessera.errors import UsageError

    with tessera.Repo(big["home"]) as repo:
        with pytest.raises(UsageError, match="listing must be one of attrs, names"):
            with repo.get(wide["ref"]).mount(str(tmp_path / "m"), listing="sizes"):
                pass


def test_server_keeps_nothing_per_entry_listed(big: dict, wide: dict) -> None:
    """Listing and looking up every entry leaves the server holding one row per directory and a
    directory cache within its byte budget, however many entries went by."""
    from tessera.fuse._binding import load_lowlevel
    from tessera.fuse.lowlevel import LowLevelServer
    from tessera.model import ENTRY_BYTES
    from tessera.vfs import VersionFS

    budget = 400 * ENTRY_BYTES  # fewer entries than the version has
    with tessera.Repo(big["home"]) as repo:
        fs = VersionFS(repo.get(wide["ref"]), listing_cache_bytes=budget)
        server = LowLevelServer(load_lowlevel(), fs)
        _, root = server._dir(1)
        seen = 0
        for d in range(len(root.entries)):
            node = (1 << 32) | (d + 1)
            records = _decode(server.listing_batch(node, 0, 1 << 20, plus=True))
            slot, listing = server._dir(node)
            for name, f in records[2:]:
                assert server.entry_reply(slot, listing, listing.index(name))[:8] == f[0].to_bytes(8, "little")
                seen += 1
            assert fs.cached_entries * ENTRY_BYTES <= budget
        assert seen == len(wide["paths"]) > budget // ENTRY_BYTES
        assert len(server._dirs) == len(root.entries) + 2  # slot 0, the root, one per directory


def test_a_listing_has_the_directories_a_walk_lists_next_parsed_in_the_background(big: dict, wide: dict) -> None:
    from tessera.vfs import LIST_AHEAD, VersionFS

    def resolved(paths: list[str]) -> bool:
        deadline = time.monotonic() + 60
        while not all(p in fs._listings for p in paths):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    with tessera.Repo(big["home"]) as repo:
        fs = VersionFS(repo.get(wide["ref"]))
        try:
            fs.listed(fs.directory(""))  # the first subdirectories
            assert resolved([f"d{d:02d}" for d in range(LIST_AHEAD)])
            assert f"d{LIST_AHEAD:02d}" not in fs._listings
            fs.listed(fs.directory("d20"))  # a directory without subdirectories: its next siblings
            assert resolved([f"d{d:02d}" for d in range(21, 21 + LIST_AHEAD)])
            assert "d19" not in fs._listings and f"d{21 + LIST_AHEAD:02d}" not in fs._listings
        finally:
            fs.close()


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
