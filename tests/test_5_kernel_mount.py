"""Layer 5: the kernel mount path (whole-file cache + metadata-only EROFS image + overlayfs), real mounts.

The EROFS writer is checked first without mounting (and by erofs-utils' own ``fsck.erofs``), then the
checks test_5_fuse.py makes of the FUSE path run against ``tessera mount --kernel``. Skipped only when
kernel_probe.py proves this machine cannot make such mounts (the reason is printed); set
TESSERA_REQUIRE_KERNEL_MOUNT=1 to make that a failure instead.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import tessera
from kernel_probe import kernel_unavailable_reason
from tessera.erofs import Node, encode_xattrs, fits_inline, read_superblock, write_image
from tessera.mounting import is_mounted, list_mounts
from test_5_fuse import _PathDataset, assert_every_write_fails_with_erofs, make_extra, tessera_cli
from trees import tree_digest, write_random
from conftest import wait_until  # noqa: E402

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def _kernel_available() -> None:
    why = kernel_unavailable_reason()
    if why is None:
        return
    sys.stderr.write(f"\n{'!' * 78}\n!! kernel-mount tests SKIPPED: {why}\n{'!' * 78}\n")
    if os.environ.get("TESSERA_REQUIRE_KERNEL_MOUNT") == "1":
        pytest.fail(f"kernel mounts required (TESSERA_REQUIRE_KERNEL_MOUNT=1) but unavailable: {why}")
    pytest.skip(f"kernel mounts unavailable here: {why}")


def kmount(home: Path, ref: str, mp: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    mp.mkdir(parents=True, exist_ok=True)
    p = _cli(home, "mount", "--kernel", ref, str(mp), *extra, env=env)
    assert p.returncode == 0, p.stderr
    assert "kernel" in p.stdout and is_mounted(str(mp))
    return p.stderr


def umount(home: Path, mp: Path) -> None:
    if is_mounted(str(mp)):
        p = tessera_cli(home, "umount", str(mp))
        assert p.returncode == 0, p.stderr
    assert not is_mounted(str(mp))


def _cli(home: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "TESSERA_HOME": str(home), **(env or {})}
    return subprocess.run(["tessera", *args], capture_output=True, text=True, env=full, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _cached(home: Path) -> dict[str, Path]:
    root = home / "files"
    return {p.name: p for p in root.glob("??/*")} if root.is_dir() else {}


# -- the image writer, without mounting -------------------------------------------------------------

def _sample_tree() -> Node:
    files = [Node(f"f{i:05d}-{'x' * (i % 40)}".encode(), "file", 0o644, 1000 + i,
                  xattrs=[("user.tessera.sha256", b"%064d" % i)]) for i in range(3000)]
    odd = [Node(n, "file", 0o755, 5) for n in (b"-dash", b" space", b"\xc3\xa9t\xc3\xa9", b"~tilde", b"A", b"a")]
    return Node(b"", "dir", 0o755, children=[
        Node(b"many", "dir", 0o755, children=files + odd),
        Node(b"empty", "dir", 0o755),
        Node(b"huge.bin", "file", 0o644, 5 << 30),  # >= 4 GiB: the 64-byte inode form
        Node(b"zero", "file", 0o644, 0),
        Node(b"long-link", "symlink", 0o777, target=b"t" * 4000),
        Node(b"link", "symlink", 0o777, target=b"many/A"),
    ])


def test_image_is_deterministic_and_passes_fsck_erofs(tmp_path: Path) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    stats = write_image(a, _sample_tree(), mtime_ns=1_700_000_000_123_456_789)
    write_image(b, _sample_tree(), mtime_ns=1_700_000_000_123_456_789)
    assert a.getvalue() == b.getvalue() and len(a.getvalue()) == stats.bytes and stats.bytes % 4096 == 0
    sb = read_superblock(a.getvalue())
    assert sb["inos"] == stats.inodes == 3000 + 6 + 7 and sb["epoch"] == 1_700_000_000
    assert sb["fixed_nsec"] == 123_456_789 and sb["root_nid"] == 1
    assert stats.bytes < 3013 * 160 + 200_000, "metadata only: no file data in the image"
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs (erofs-utils) not installed")
    img = tmp_path / "t.erofs"
    img.write_bytes(a.getvalue())
    p = subprocess.run(["fsck.erofs", str(img)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_image_refuses_what_erofs_cannot_hold() -> None:
    from tessera.erofs import ImageError

    with pytest.raises(ImageError):
        write_image(io.BytesIO(), Node(b"", "dir", 0o755, children=[Node(b"n" * 256, "file", 0o644)]), mtime_ns=0)
    with pytest.raises(ImageError):
        write_image(io.BytesIO(), Node(b"", "dir", 0o755, children=[Node(b"a", "file", 0o644),
                                                                   Node(b"a", "file", 0o644)]), mtime_ns=0)


def test_image_mounted_directly_lists_and_looks_up_every_name(tmp_path: Path, _kernel_available: None) -> None:
    from tessera.kernelmount import MNT_DETACH, MS_RDONLY, _mount, _umount

    img = tmp_path / "t.erofs"
    tree = _sample_tree()
    with open(img, "wb") as f:
        write_image(f, tree, mtime_ns=1_700_000_000_000_000_001)
    mp = tmp_path / "m"
    mp.mkdir()
    _mount(str(img), str(mp), "erofs", MS_RDONLY, None)
    try:
        many = [c.name for c in tree.children[0].children]
        assert sorted(os.listdir(os.fsencode(mp / "many"))) == sorted(many)
        for name in many:  # each lookup is the kernel's binary search over the directory blocks
            st = os.lstat(os.path.join(os.fsencode(mp / "many"), name))
            assert stat.S_ISREG(st.st_mode) and st.st_mtime_ns == 1_700_000_000_000_000_001
        assert os.stat(mp / "huge.bin").st_size == 5 << 30 and os.stat(mp / "zero").st_size == 0
        assert os.readlink(mp / "long-link") == "t" * 4000 and os.readlink(mp / "link") == "many/A"
        assert os.getxattr(mp / "many" / "f00007-xxxxxxx", "user.tessera.sha256") == b"%064d" % 7
        with open(mp / "many" / "A", "rb") as f:
            assert f.read() == b"\0" * 5  # a hole: the image holds no data
    finally:
        _umount(str(mp), MNT_DETACH)


# -- real kernel mounts through the CLI ------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tricky_tree: Path, _kernel_available: None) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("kernel")
    home = base / "home"
    extra1, extra2 = make_extra(base / "extra1", 1), make_extra(base / "extra2", 2)
    with tessera.Repo(home) as repo:
        tricky = repo.commit("tricky", tricky_tree)
        e1 = repo.commit("extra", extra1)
        e2 = repo.commit("extra", extra2)
        info: dict[str, Any] = {
            "home": home, "base": base, "src": tricky_tree, "tricky": tricky.ref, "e1": e1.ref, "e2": e2.ref,
            "extra1": extra1, "extra2": extra2, "time": tricky.time,
            "paths": {e.path: e for e in tricky.walk(dirs=True)}}
    mp = base / "mnt"
    kmount(home, info["tricky"], mp)
    info["mnt"] = mp
    yield info
    umount(home, mp)
    for m in list_mounts(home):
        if m.mountpoint.startswith(str(base) + os.sep):
            umount(home, Path(m.mountpoint))


def test_mount_is_an_overlay_with_no_server(env: dict) -> None:
    from tessera.mounting import find_kernel_mount

    km = find_kernel_mount(str(env["mnt"]))
    assert km is not None and km.fstype == "overlay" and km.source.startswith("tessera:tricky@")
    rec = next(m for m in list_mounts(env["home"]) if m.mountpoint == str(env["mnt"]))
    assert rec.kind == "kernel" and rec.pid == 0 and rec.alive and rec.ref == env["tricky"]
    out = json.loads(tessera_cli(env["home"], "mounts", "--json").stdout)
    assert any(m["mountpoint"] == str(env["mnt"]) and m["kind"] == "kernel" for m in out)
    assert not list((env["home"] / "kernel" / "staging").glob("*")), "the staging mount is detached and removed"


def test_sha256sum_of_every_file_matches_source(env: dict) -> None:
    src, mnt = env["src"], env["mnt"]
    files = sorted(p for p, e in env["paths"].items() if e.is_file)

    def sums(root: Path) -> list[str]:
        out = subprocess.run(["sha256sum", "--", *files], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    assert sums(mnt) == sums(src)
    for rel in files:
        assert os.getxattr(mnt / rel, "user.tessera.sha256").decode() == env["paths"][rel].sha256


def test_walk_shows_kinds_modes_times_links_as_committed(env: dict) -> None:
    mnt = env["mnt"]
    seen = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            seen[str(p.relative_to(mnt))] = os.lstat(p)
    assert set(seen) == set(env["paths"])
    assert tree_digest(mnt) == tree_digest(env["src"])
    mtime = int(round(env["time"] * 1e9))
    assert os.stat(mnt).st_mtime_ns == mtime
    for rel, st in seen.items():
        e = env["paths"][rel]
        assert stat.S_IFMT(st.st_mode) == {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[e.kind]
        assert st.st_mtime_ns == mtime, rel
        assert st.st_mode & 0o777 == e.mode, rel
        if e.is_file:
            assert st.st_size == e.size
        if e.is_symlink:
            assert os.readlink(mnt / rel) == e.target
    assert os.listdir(mnt / "empty dir" / "nested empty") == []
    assert len({st.st_ino for st in seen.values()}) == len(seen)


def test_cp_tar_rsync_reproduce_the_tree(env: dict, tmp_path: Path) -> None:
    mnt, want = env["mnt"], tree_digest(env["src"])
    subprocess.run(["cp", "-a", f"{mnt}/.", str(tmp_path / "cp")], check=True)
    assert tree_digest(tmp_path / "cp") == want
    (tmp_path / "tar").mkdir()
    subprocess.run(f"tar -C '{mnt}' -cf - . | tar -C '{tmp_path / 'tar'}' -xf -", shell=True, check=True)
    assert tree_digest(tmp_path / "tar") == want
    subprocess.run(["rsync", "-a", f"{mnt}/", str(tmp_path / "rsync")], check=True)
    assert tree_digest(tmp_path / "rsync") == want


def test_random_offset_reads_match(env: dict) -> None:
    rng = random.Random(3)
    src, mnt = env["src"] / "big" / "big.bin", env["mnt"] / "big" / "big.bin"
    size = src.stat().st_size
    with open(src, "rb") as a, open(mnt, "rb", buffering=0) as b:
        for _ in range(1000):
            off = rng.randrange(0, size + 1000)
            n = rng.choice([1, 100, 4096, 65536, 1 << 20, rng.randrange(1, 3 << 20)])
            a.seek(off)
            assert os.pread(b.fileno(), n, off) == a.read(n), (off, n)


def test_every_kind_of_write_fails_with_erofs(env: dict) -> None:
    assert_every_write_fails_with_erofs(env["mnt"])  # on a/hello.txt: a small file, held by the image
    assert env["paths"]["a/hello.txt"].sha256 not in _cached(env["home"])
    deep = env["mnt"] / "a" / "b" / "c" / "deep.txt"  # 5,000 bytes: read through the shared file cache
    for flags in (os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as info:
            os.open(deep, flags)
        assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.truncate(deep, 0)
    assert info.value.errno == errno.EROFS
    cached = _cached(env["home"])[env["paths"]["a/b/c/deep.txt"].sha256]
    assert cached.read_bytes() == b"deep\n" * 1000 and cached.stat().st_mode & 0o777 == 0o444


def test_xattrs_and_stable_inodes_across_mounts(env: dict) -> None:
    home, mnt = env["home"], env["mnt"]
    assert os.getxattr(mnt, "user.tessera.ref").decode() == env["tricky"]
    with pytest.raises(OSError) as info:
        os.getxattr(mnt / "a" / "hello.txt", "user.other")
    assert info.value.errno == errno.ENODATA
    assert not [x for x in os.listxattr(mnt / "a" / "hello.txt") if x.startswith("trusted.")]
    inos = {rel: os.lstat(mnt / rel).st_ino for rel in env["paths"]}
    again = env["base"] / "again"
    kmount(home, env["tricky"], again)
    try:
        assert {rel: os.lstat(again / rel).st_ino for rel in env["paths"]} == inos
    finally:
        umount(home, again)


def test_two_versions_at_once_and_beside_a_fuse_mount(env: dict) -> None:
    home, base = env["home"], env["base"]
    m1, m2, m3 = base / "v1", base / "v2", base / "v2-fuse"
    kmount(home, env["e1"], m1)
    kmount(home, env["e2"], m2)
    m3.mkdir()
    p = tessera_cli(home, "mount", "--fuse", env["e2"], str(m3))
    assert p.returncode == 0, p.stderr
    try:
        assert tree_digest(m1) == tree_digest(env["extra1"])
        assert tree_digest(m2) == tree_digest(env["extra2"]) == tree_digest(m3)
        assert json.loads((m1 / "labels.json").read_text()) == {"version": 1}
        assert not (m1 / "only-in-v2.bin").exists() and (m2 / "only-in-v2.bin").exists()
        listed = {m.mountpoint: m for m in list_mounts(home)}
        assert listed[str(m1)].kind == listed[str(m2)].kind == "kernel" and listed[str(m3)].kind == "fuse"
        out = tessera_cli(home, "mounts").stdout
        assert f"{env['e1']}  {m1}  kernel" in out and f"pid {listed[str(m3)].pid}" in out
    finally:
        for m in (m1, m2, m3):
            umount(home, m)


def test_numpy_mmap_and_torch_dataloader_byte_exact(env: dict) -> None:
    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    mp = env["base"] / "np"
    kmount(env["home"], env["e2"], mp)
    try:
        arr = np.load(mp / "arr.npy", mmap_mode="r")
        assert np.array_equal(arr, np.load(env["extra2"] / "arr.npy"))
        del arr
    finally:
        umount(env["home"], mp)
    ds_cls = type("PathDataset", (_PathDataset, Dataset), {})
    rels = sorted(p for p, e in env["paths"].items() if e.is_file and e.size < 50 << 20) * 20
    seen = 0
    for rel, data in DataLoader(ds_cls(env["mnt"], rels), batch_size=None, num_workers=4, shuffle=True):
        assert data == (env["src"] / rel).read_bytes(), rel
        seen += 1
    assert seen == len(rels)


def test_python_api_context_manager_both_paths(env: dict) -> None:
    for path in ("kernel", "fuse"):
        mp = env["base"] / f"py-{path}"
        mp.mkdir()
        with tessera.Repo(env["home"]) as repo:
            with repo.get(env["e1"]).mount(mp, path=path) as where:
                assert Path(where) == mp and is_mounted(str(mp))
                kind = next(m.kind for m in list_mounts(env["home"]) if m.mountpoint == str(mp))
                assert kind == path
                assert (mp / "labels.json").read_text() == json.dumps({"version": 1})
        assert not is_mounted(str(mp)) and os.listdir(mp) == []


def test_umount_refuses_a_busy_mount_then_succeeds(env: dict) -> None:
    mp = env["base"] / "busy"
    kmount(env["home"], env["e1"], mp)
    f = open(mp / "labels.json", "rb")
    try:
        p = tessera_cli(env["home"], "umount", str(mp))
        assert p.returncode == 12 and "busy" in p.stderr and is_mounted(str(mp))
    finally:
        f.close()
    umount(env["home"], mp)


# -- small files held by the image ------------------------------------------------------------------

def test_inline_files_are_read_from_the_image_itself(tmp_path: Path, _kernel_available: None) -> None:
    from tessera.erofs import ImageError
    from tessera.kernelmount import MNT_DETACH, MS_RDONLY, _mount, _umount

    rng = random.Random(5)
    x = [("user.tessera.sha256", b"z" * 24)]
    most = 4096 - 32 - len(encode_xattrs(x))  # inode, xattrs and bytes in one block
    assert fits_inline(most, x) and not fits_inline(most + 1, x) and not fits_inline(0, [])
    sizes = [1, 2, 100, 2048, 3000, most]
    payload = {f"s{n}".encode(): rng.randbytes(n) for n in sizes}
    files = [Node(n, "file", 0o644, len(d), xattrs=x, inline=True, data=d) for n, d in payload.items()]
    tree = Node(b"", "dir", 0o755, children=[Node(b"d", "dir", 0o755, children=files),
                                             Node(b"hole", "file", 0o644, 10)])
    img = tmp_path / "i.erofs"
    with open(img, "wb") as f:
        write_image(f, tree, mtime_ns=0)
    if shutil.which("fsck.erofs"):
        p = subprocess.run(["fsck.erofs", str(img)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    mp = tmp_path / "m"
    mp.mkdir()
    _mount(str(img), str(mp), "erofs", MS_RDONLY, None)
    try:
        for name, data in payload.items():
            assert (mp / "d" / name.decode()).read_bytes() == data
        assert (mp / "hole").read_bytes() == b"\0" * 10
    finally:
        _umount(str(mp), MNT_DETACH)
    too_big = Node(b"", "dir", 0o755, children=[Node(b"f", "file", 0o644, most + 1, xattrs=x, inline=True, data=b"a" * (most + 1))])
    with pytest.raises(ImageError):
        write_image(io.BytesIO(), too_big, mtime_ns=0)
    short = Node(b"", "dir", 0o755, children=[Node(b"f", "file", 0o644, 10, inline=True, data=b"a" * 9)])
    with pytest.raises(ImageError):
        write_image(io.BytesIO(), short, mtime_ns=0)


def _small_files(root: Path, n: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        size = [0, 1, 2047, 2048, 2049, 5000][i % 6] if i < 12 else rng.randint(1, 1500)
        rel = f"d{i % 7}/f{i:04d}.txt"
        out[rel] = rng.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(out[rel])
    return out


def test_small_files_mount_without_caching_and_read_back_exactly(tmp_path: Path, _kernel_available: None) -> None:
    """Files of at most 2 KiB live in the image: the default mount takes the kernel path without caching
    them; only the larger files are in the file cache; every byte matches."""
    src = tmp_path / "src"
    files = _small_files(src, 600, 1)
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("small", src).ref
    mp = tmp_path / "mp"
    mp.mkdir()
    p = _cli(home, "mount", ref, str(mp))
    assert p.returncode == 0 and "kernel" in p.stdout and p.stderr == "", p.stderr
    try:
        for rel, data in files.items():
            assert (mp / rel).read_bytes() == data, rel
        big = {hashlib_sha256(d) for d in files.values() if len(d) > 2048}
        assert set(_cached(home)) == big and len(big) == 4
        inline = next(rel for rel, d in files.items() if len(d) == 2048)
        assert os.getxattr(mp / inline, "user.tessera.sha256").decode() == hashlib_sha256(files[inline])
        assert not [x for x in os.listxattr(mp / inline) if x.startswith("trusted.")]
        image = next((home / "images").glob("*.erofs"))
        if shutil.which("fsck.erofs"):
            q = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
            assert q.returncode == 0, q.stdout + q.stderr
    finally:
        umount(home, mp)
    assert _cli(home, "cache", "evict", "--all").returncode == 0  # the image goes too, not only files
    assert not list((home / "images").glob("*.erofs")) and not _cached(home)


def test_auto_takes_fuse_when_writing_the_image_would_take_too_long(tmp_path: Path,
                                                                    _kernel_available: None) -> None:
    src = tmp_path / "src"
    _small_files(src, 100, 3)
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("small", src).ref
    mp = tmp_path / "mp"
    mp.mkdir()
    quick = {"TESSERA_KERNEL_AUTO_SECONDS": "0.001"}  # 100 files: ~0.008 s of image at the assumed rate
    p = _cli(home, "mount", ref, str(mp), env=quick)
    assert p.returncode == 0 and "pid" in p.stdout, p.stderr
    assert p.stderr.strip() == ("mounting with FUSE: its image is not written yet; --kernel would first write it "
                                "(100 files, ~0 s), then later mounts take the kernel path at once")
    umount(home, mp)
    assert not (home / "images").is_dir() or not list((home / "images").iterdir())
    kmount(home, ref, mp)
    umount(home, mp)
    p = _cli(home, "mount", ref, str(mp), env=quick)  # the image exists: the kernel path, silently
    assert p.returncode == 0 and "kernel" in p.stdout and p.stderr == "", p.stderr
    umount(home, mp)


def test_lazy_remote_small_files_auto_takes_fuse_and_kernel_fetches(tmp_path: Path, _kernel_available: None) -> None:
    src = tmp_path / "src"
    files = _small_files(src, 60, 2)
    home, fresh = tmp_path / "home", tmp_path / "fresh"
    with tessera.Repo(home) as repo:
        ref = repo.commit("small", src).ref
    url = f"file://{tmp_path / 'remote'}"
    for h in (home, fresh):
        assert _cli(h, "remote", "add", "origin", url).returncode == 0
    assert _cli(home, "push", ref).returncode == 0
    mp = tmp_path / "mp"
    mp.mkdir()
    p = _cli(fresh, "mount", ref, str(mp))  # its bytes are on the remote only: FUSE, saying why
    assert p.returncode == 0 and "pid" in p.stdout, p.stderr
    assert p.stderr.startswith("mounting with FUSE:") and "not all local" in p.stderr
    umount(fresh, mp)
    kmount(fresh, ref, mp)  # forced: fetched while the image is written
    try:
        for rel, data in files.items():
            assert (mp / rel).read_bytes() == data, rel
    finally:
        umount(fresh, mp)


def hashlib_sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# -- the default choice -----------------------------------------------------------------------------

def test_auto_takes_fuse_for_a_big_remainder_and_says_what_kernel_costs(tmp_path: Path,
                                                                          _kernel_available: None) -> None:
    src = tmp_path / "src"
    write_random(src / "a.bin", 3 << 20, 1)
    write_random(src / "b.bin", 1 << 20, 2)
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("auto", src).ref
    mp = tmp_path / "mp"
    mp.mkdir()
    small = {"TESSERA_KERNEL_AUTO_BYTES": str(1 << 20)}
    p = _cli(home, "mount", ref, str(mp), env=small)
    assert p.returncode == 0, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith("mounting with FUSE:") and "--kernel would first cache" in line
    assert "4.0 MiB" in line and "pid" in p.stdout
    umount(home, mp)
    assert not _cached(home)
    kmount(home, ref, mp)  # forced: caches 4 MiB
    umount(home, mp)
    p = _cli(home, "mount", ref, str(mp), env=small)  # everything cached now: the kernel path, silently
    assert p.returncode == 0 and "kernel" in p.stdout and p.stderr == "", p.stderr
    umount(home, mp)
    p = _cli(home, "mount", ref, str(mp), env={"TESSERA_KERNEL_MOUNT": "0"})
    assert p.returncode == 0 and "pid" in p.stdout
    umount(home, mp)
    p = _cli(home, "mount", "--kernel", ref, str(mp), env={"TESSERA_KERNEL_MOUNT": "0"})
    assert p.returncode == 12 and "not available" in p.stderr and not is_mounted(str(mp))


def test_second_version_materializes_only_changed_files(tmp_path: Path, _kernel_available: None) -> None:
    from tessera.kernelmount import open_cache

    base = tmp_path
    v1, v2 = make_extra(base / "x1", 1), make_extra(base / "x2", 2)
    with tessera.Repo(base / "home") as repo:
        a, b = repo.commit("x", v1), repo.commit("x", v2)
        cache = open_cache(repo)
        first = cache.materialize(a)
        second = cache.materialize(b)
        again = cache.materialize(b)
    assert first.files_written == 3 and first.files_present == 0
    # arr.npy and labels.json changed, only-in-v2.bin is new; shared.csv is shared
    assert second.files_written == 3 and second.files_present == 1
    assert second.bytes_written < b.size and again.files_written == 0


# -- failures: nothing mounted, nothing lost --------------------------------------------------------

def test_bad_input_is_one_line_and_mounts_nothing(env: dict, tmp_path: Path) -> None:
    home = env["home"]
    mp = tmp_path / "mp"
    mp.mkdir()
    cases = [(["--kernel", "nosuch", str(mp)], 3, "unknown dataset"),
             (["--kernel", env["e1"], str(tmp_path / "missing" / "mp")], 2, "does not exist"),
             (["--kernel", "--foreground", env["e1"], str(mp)], 2, "--foreground"),
             (["--kernel", env["e1"], str(env["mnt"])], 12, "already a mount point")]
    for args, code, words in cases:
        p = tessera_cli(home, "mount", *args)
        assert p.returncode == code, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and words in p.stderr, p.stderr
        assert not is_mounted(str(mp))




@pytest.mark.parametrize("point", ["kernel-materialized", "kernel-erofs-mounted", "kernel-overlay-mounted"])
def test_killed_mount_process_leaves_nothing_umount_cannot_clean(tmp_path: Path, point: str,
                                                                    _kernel_available: None) -> None:
    """The process that makes a kernel mount (the mount server, `python -m tessera.fuse.mount`) is
    killed with no caller left to clean up: `tessera umount` does."""
    src = tmp_path / "src"
    write_random(src / "r.bin", 2 << 20, 4)
    (src / "t.txt").write_text("text\n")
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("k", src).ref
    mp = tmp_path / "mp"
    mp.mkdir()
    p = subprocess.run([sys.executable, "-m", "tessera.fuse.mount", "--home", str(home), "--ref", ref,
                        "--mountpoint", str(mp), "--path", "kernel"], capture_output=True, text=True,
                       env={**os.environ, "TESSERA_CRASH_AT": point}, stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    listed = [m for m in list_mounts(home) if m.mountpoint == str(mp)]
    assert len(listed) == 1 and listed[0].kind == "kernel"
    if point != "kernel-overlay-mounted":
        assert not listed[0].alive and "mount process gone" in tessera_cli(home, "mounts").stdout
    p = tessera_cli(home, "umount", str(mp))
    assert p.returncode == 0, p.stderr
    assert not is_mounted(str(mp)) and os.listdir(mp) == []
    assert not [m for m in list_mounts(home) if m.mountpoint == str(mp)]
    assert not list((home / "mounts").glob("*.json"))
    staging = home / "kernel" / "staging"
    assert not (staging.is_dir() and list(staging.iterdir()))
    assert not [m for m in open("/proc/self/mountinfo").read().splitlines() if str(home) in m]
    kmount(home, ref, mp)  # and the mountpoint works again
    assert (mp / "t.txt").read_text() == "text\n"
    umount(home, mp)


@pytest.mark.parametrize("point", ["kernel-materialized", "kernel-erofs-mounted", "kernel-overlay-mounted"])
def test_a_killed_mount_server_is_cleaned_up_by_its_caller(tmp_path: Path, point: str,
                                                          _kernel_available: None) -> None:
    src = tmp_path / "src"
    (src / "t.txt").parent.mkdir(parents=True)
    (src / "t.txt").write_text("text\n")
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("k", src).ref
    mp = tmp_path / "mp"
    mp.mkdir()
    p = _cli(home, "mount", "--kernel", ref, str(mp), env={"TESSERA_CRASH_AT": point})
    assert p.returncode == 12 and p.stderr.startswith("error: the mount server failed"), p.stderr
    assert not is_mounted(str(mp)) and not list((home / "mounts").glob("*.json"))
    assert not [m for m in open("/proc/self/mountinfo").read().splitlines() if str(home) in m]
    kmount(home, ref, mp)
    assert (mp / "t.txt").read_text() == "text\n"
    umount(home, mp)


def test_sigkill_while_materializing_then_umount_recovers(tmp_path: Path, tricky_tree: Path,
                                                          _kernel_available: None) -> None:
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("big", tricky_tree).ref
    mp = tmp_path / "mp"
    mp.mkdir()
    proc = subprocess.Popen(["tessera", "mount", "--kernel", ref, str(mp)], stdout=subprocess.DEVNULL,
                            env={**os.environ, "TESSERA_HOME": str(home)}, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    tmpdir = home / "files" / "tmp"
    assert wait_until(lambda: tmpdir.is_dir() and any(tmpdir.iterdir()), 30), "materialization never started"
    proc.send_signal(signal.SIGKILL)  # the caller: its mount server notices (the pipe breaks) and stops
    proc.wait(30)
    assert wait_until(lambda: not list((home / "mounts").glob("*.json")), 60), "the server did not stop and clean up"
    assert not is_mounted(str(mp))
    p = tessera_cli(home, "umount", str(mp))  # nothing left to clean: says so
    assert p.returncode == 12 and "not mounted" in p.stderr, p.stderr
    kmount(home, ref, mp)  # the half-written file is cleaned up and written again
    try:
        assert not list(tmpdir.iterdir())
        assert tree_digest(mp) == tree_digest(tricky_tree)
    finally:
        umount(home, mp)


def test_eviction_never_removes_a_file_an_active_mount_uses(tmp_path: Path, _kernel_available: None) -> None:
    a_src, b_src = tmp_path / "a", tmp_path / "b"
    write_random(a_src / "a1.bin", 3 << 20, 1)
    write_random(a_src / "a2.bin", 3 << 20, 2)
    write_random(b_src / "b1.bin", 4 << 20, 3)
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        a, b = repo.commit("a", a_src).ref, repo.commit("b", b_src).ref
    budget = {"TESSERA_FILE_CACHE_SIZE": str(8 << 20)}
    ma, mb = tmp_path / "ma", tmp_path / "mb"
    mb.mkdir()
    kmount(home, a, ma, env=budget)
    try:
        p = _cli(home, "mount", "--kernel", b, str(mb), env=budget)  # 6 MiB pinned + 4 MiB > 8 MiB
        assert p.returncode == 7 and "budget" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert not is_mounted(str(mb)) and len(_cached(home)) == 2
        assert tree_digest(ma) == tree_digest(a_src)
        p = _cli(home, "mount", b, str(mb), env=budget)  # auto: the kernel path fails, FUSE serves instead
        assert p.returncode == 0 and "pid" in p.stdout, p.stderr
        assert p.stderr.startswith("mounting with FUSE: the kernel mount failed (the file cache cannot hold")
        assert tree_digest(mb) == tree_digest(b_src) and len(_cached(home)) == 2
        umount(home, mb)
        p = _cli(home, "cache", "evict", "--all")
        assert p.returncode == 0 and len(_cached(home)) == 2 and tree_digest(ma) == tree_digest(a_src)
    finally:
        umount(home, ma)
    kmount(home, b, mb, env=budget)  # now a's files may go, and do
    try:
        assert tree_digest(mb) == tree_digest(b_src)
        used = sum(p.stat().st_size for p in _cached(home).values())
        assert used <= 8 << 20 and len(_cached(home)) == 2  # one of a's two files went: just enough room
        assert not any((home / "images").glob(f"{a.rpartition('@')[2]}-*")), "a's image must go with its files"
    finally:
        umount(home, mb)
    kmount(home, a, ma, env=budget)  # and a comes back, re-materialized
    try:
        assert tree_digest(ma) == tree_digest(a_src)
    finally:
        umount(home, ma)


def test_corrupt_cache_file_is_found_by_fsck_and_rewritten(tmp_path: Path, _kernel_available: None) -> None:
    src = tmp_path / "src"
    write_random(src / "victim.bin", 1 << 20, 7)
    (src / "ok.txt").write_text("fine\n")
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        v = repo.commit("c", src)
        sha = v.entry("victim.bin").sha256
    mp = tmp_path / "mp"
    kmount(home, v.ref, mp)
    umount(home, mp)
    victim = _cached(home)[sha]
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    p = tessera_cli(home, "fsck")
    assert p.returncode == 5 and sha in p.stdout and "fails its SHA-256 check" in p.stdout, p.stdout + p.stderr
    assert not victim.exists() and not list((home / "images").iterdir())
    assert tessera_cli(home, "fsck").returncode == 0
    kmount(home, v.ref, mp)
    try:
        assert (mp / "victim.bin").read_bytes() == (src / "victim.bin").read_bytes()
    finally:
        umount(home, mp)


def test_corrupt_small_file_in_an_image_is_found_by_fsck_and_rewritten(tmp_path: Path,
                                                                      _kernel_available: None) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    victim = b"tessera inline victim " * 20  # 440 bytes: held by the image
    (src / "d" / "victim.txt").write_bytes(victim)
    (src / "ok.txt").write_text("fine\n")
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("c", src).ref
    mp = tmp_path / "mp"
    kmount(home, ref, mp)
    umount(home, mp)
    p = tessera_cli(home, "fsck", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["image_files"] == 2, p.stdout + p.stderr
    image = next((home / "images").glob("*.erofs"))
    data = bytearray(image.read_bytes())
    at = data.find(victim)
    assert at > 0 and data.find(victim, at + 1) < 0
    data[at + 100] ^= 0xFF
    os.chmod(image, 0o644)
    image.write_bytes(bytes(data))
    p = tessera_cli(home, "fsck")
    assert p.returncode == 5 and "d/victim.txt fails its SHA-256 check" in p.stdout, p.stdout + p.stderr
    assert not image.exists() and tessera_cli(home, "fsck").returncode == 0
    kmount(home, ref, mp)
    try:
        assert (mp / "d" / "victim.txt").read_bytes() == victim
    finally:
        umount(home, mp)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_while_materializing_leaves_no_mount_and_a_usable_cache(
        small_disk: Path, tmp_path: Path, _kernel_available: None) -> None:
    home = small_disk / "home"
    small, big = tmp_path / "small", tmp_path / "big"
    (small / "d").mkdir(parents=True)
    (small / "d" / "s.txt").write_text("small\n")
    for i in range(3):
        write_random(big / f"r{i}.bin", 4 << 20, 10 + i)
    with tessera.Repo(home) as repo:
        s, b = repo.commit("s", small).ref, repo.commit("b", big).ref  # 12 MiB of packs in 20 MiB
    mp = tmp_path / "mp"
    mp.mkdir()
    p = _cli(home, "mount", "--kernel", b, str(mp))
    assert p.returncode == 7 and "disk full" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr and not is_mounted(str(mp))
    assert not list((home / "mounts").glob("*.json")) and not list((home / "files" / "tmp").iterdir())
    assert not (home / "images").is_dir() or not list((home / "images").iterdir())
    assert tessera_cli(home, "fsck").returncode == 0  # every cached file is whole and right
    kmount(home, s, mp)  # the cache still works
    try:
        assert (mp / "d" / "s.txt").read_text() == "small\n"
    finally:
        umount(home, mp)


def test_run_input_takes_the_kernel_path_by_default_and_cleans_up(tmp_path: Path, _kernel_available: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("input bytes")
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("base", src).ref
    mnt = tmp_path / "mnt"
    probe = tmp_path / "probe.py"  # what the command sees: the bytes, and the kind of mount
    probe.write_text("import sys\nmnt = sys.argv[1]\nprint(open(mnt + '/x.txt').read())\n"
                     "print([l.split(' - ')[1].split()[0] for l in open('/proc/self/mountinfo') "
                     "if l.split()[4] == mnt])\n")
    p = _cli(home, "run", "--input", f"base:{mnt}", "--", sys.executable, str(probe), str(mnt))
    assert p.returncode == 0, p.stderr
    assert "input bytes" in p.stdout and "['overlay']" in p.stdout, p.stdout
    assert not is_mounted(str(mnt)) and not list((home / "mounts").glob("*.json"))
    assert ref.rpartition("@")[2] in "".join(f.name for f in (home / "images").iterdir())


def test_a_kernel_mount_unmounted_by_plain_umount_is_forgotten(tmp_path: Path, _kernel_available: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("x")
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        ref = repo.commit("p", src).ref
    mp = tmp_path / "mp"
    kmount(home, ref, mp)
    assert subprocess.run(["umount", str(mp)]).returncode == 0
    assert str(mp) not in tessera_cli(home, "mounts").stdout
    assert not list((home / "mounts").glob("*.json"))
