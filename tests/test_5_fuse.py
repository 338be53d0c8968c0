"""Layer 5: real FUSE mounts through the `tessera` CLI (and `Version.mount`), forced with ``--fuse``
(the kernel path, EROFS + overlayfs, has the same checks in test_5_kernel_mount.py).

Skipped only when `fuse_probe` proves this machine cannot mount FUSE at all (the reason is printed);
set TESSERA_REQUIRE_FUSE=1 to make that a failure instead. Mounts are made once per module where the
test only reads.
"""
from __future__ import annotations

import errno
import hashlib
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
from typing import Iterator

import pytest

import tessera
from fuse_probe import fuse_unavailable_reason, require_fuse
from tessera.mounting import is_mounted, list_mounts
from trees import tree_digest, write_random, write_text
from conftest import wait_until  # noqa: E402

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module", autouse=True)
def _fuse_available() -> None:
    require_fuse()


def tessera_cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TESSERA_HOME": str(home)}
    return subprocess.run(["tessera", *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def mount(home: Path, ref: str, mp: Path, *extra: str) -> None:
    mp.mkdir(parents=True, exist_ok=True)
    p = tessera_cli(home, "mount", "--fuse", ref, str(mp), *extra)
    assert p.returncode == 0, p.stderr
    assert is_mounted(str(mp))


def umount(home: Path, mp: Path) -> None:
    if is_mounted(str(mp)):
        p = tessera_cli(home, "umount", str(mp))
        assert p.returncode == 0, p.stderr
    assert not is_mounted(str(mp))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def make_extra(root: Path, version: int) -> Path:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    arr = np.arange(200_000, dtype=np.float32).reshape(2000, 100) * version
    np.save(root / "arr.npy", arr)
    (root / "labels.json").write_text(json.dumps({"version": version}))
    write_text(root / "shared.csv", 300_000, 5)
    if version == 2:
        write_random(root / "only-in-v2.bin", 50_000, 9)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tricky_tree: Path) -> Iterator[dict]:
    """One home with the tricky tree ("tricky") and two versions of a small dataset ("extra")."""
    base = tmp_path_factory.mktemp("fuse")
    home = base / "home"
    extra1, extra2 = make_extra(base / "extra1", 1), make_extra(base / "extra2", 2)
    with tessera.Repo(home) as repo:
        tricky = repo.commit("tricky", tricky_tree)
        e1 = repo.commit("extra", extra1)
        e2 = repo.commit("extra", extra2)
        info = {"home": home, "base": base, "src": tricky_tree, "tricky": tricky.ref, "e1": e1.ref, "e2": e2.ref,
                "extra1": extra1, "extra2": extra2, "time": tricky.time,
                "paths": {e.path: e for e in tricky.walk(dirs=True)}}
    mp = base / "mnt"
    mount(home, info["tricky"], mp)
    info["mnt"] = mp
    yield info
    umount(home, mp)
    for m in list_mounts(home):  # nothing of ours may outlive the module (others' mounts are not ours)
        if m.mountpoint.startswith(str(base) + os.sep):
            umount(home, Path(m.mountpoint))


# -- reading ----------------------------------------------------------------------------------------

def test_sha256sum_of_every_file_matches_source(env: dict) -> None:
    src, mnt = env["src"], env["mnt"]
    files = sorted(p for p, e in env["paths"].items() if e.is_file)
    assert "big/big.bin" in files and len(files) > 8

    def sums(root: Path) -> list[str]:
        out = subprocess.run(["sha256sum", "--", *files], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    assert sums(mnt) == sums(src)
    for rel in files:
        assert os.getxattr(mnt / rel, "user.tessera.sha256").decode() == env["paths"][rel].sha256


def test_walk_lists_exactly_the_committed_paths(env: dict) -> None:
    mnt = env["mnt"]
    seen = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            seen[str(p.relative_to(mnt))] = os.lstat(p)
    assert set(seen) == set(env["paths"])
    assert tree_digest(mnt) == tree_digest(env["src"])
    mtime = int(round(env["time"] * 1e9))
    for rel, st in seen.items():
        e = env["paths"][rel]
        assert stat.S_IFMT(st.st_mode) == {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[e.kind]
        assert st.st_mtime_ns == mtime
        if e.is_file:
            assert st.st_size == e.size and st.st_mode & 0o777 == e.mode
        if e.is_symlink:
            assert os.readlink(mnt / rel) == e.target
    assert os.stat(mnt / "run.sh").st_mode & 0o111
    assert len({st.st_ino for st in seen.values()}) == len(seen)


def test_cp_tar_rsync_reproduce_the_tree(env: dict, tmp_path: Path) -> None:
    mnt, want = env["mnt"], tree_digest(env["src"])
    subprocess.run(["cp", "-a", f"{mnt}/.", str(tmp_path / "cp")], check=True)
    assert tree_digest(tmp_path / "cp") == want
    shutil.rmtree(tmp_path / "cp")
    (tmp_path / "tar").mkdir()
    subprocess.run(f"tar -C '{mnt}' -cf - . | tar -C '{tmp_path / 'tar'}' -xf -", shell=True, check=True)
    assert tree_digest(tmp_path / "tar") == want
    assert (tmp_path / "tar" / "empty dir" / "nested empty").is_dir()
    shutil.rmtree(tmp_path / "tar")
    subprocess.run(["rsync", "-a", f"{mnt}/", str(tmp_path / "rsync")], check=True)
    assert tree_digest(tmp_path / "rsync") == want
    assert os.readlink(tmp_path / "rsync" / "link-dangling") == "does/not/exist"


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


def test_numpy_mmap_of_a_mounted_npy(env: dict) -> None:
    import numpy as np

    mp = env["base"] / "mnt-extra"
    mount(env["home"], env["e2"], mp)
    try:
        arr = np.load(mp / "arr.npy", mmap_mode="r")
        want = np.load(env["extra2"] / "arr.npy")
        assert arr.shape == want.shape and np.array_equal(arr, want)
        assert float(arr[1234, 56]) == float(want[1234, 56])
        del arr
    finally:
        umount(env["home"], mp)


def test_two_versions_mounted_at_once(env: dict) -> None:
    home, base = env["home"], env["base"]
    m1, m2 = base / "v1", base / "v2"
    mount(home, env["e1"], m1)
    mount(home, env["e2"], m2)
    try:
        assert tree_digest(m1) == tree_digest(env["extra1"])
        assert tree_digest(m2) == tree_digest(env["extra2"])
        assert json.loads((m1 / "labels.json").read_text()) == {"version": 1}
        assert json.loads((m2 / "labels.json").read_text()) == {"version": 2}
        assert not (m1 / "only-in-v2.bin").exists() and (m2 / "only-in-v2.bin").exists()
        listed = {m.mountpoint: m for m in list_mounts(home)}
        assert listed[str(m1)].ref == env["e1"] and listed[str(m2)].ref == env["e2"]
        out = tessera_cli(home, "mounts").stdout
        assert env["e1"] in out and str(m2) in out and str(listed[str(m1)].pid) in out
    finally:
        umount(home, m1)
        umount(home, m2)


class _PathDataset:  # a plain map-style Dataset that opens files by path, as training code does
    def __init__(self, root: Path, rels: list[str]) -> None:
        self.root, self.rels = root, rels

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> tuple[str, bytes]:
        with open(self.root / self.rels[i], "rb") as f:
            return self.rels[i], f.read()


def test_torch_dataloader_yields_the_source_bytes(env: dict) -> None:
    from torch.utils.data import DataLoader, Dataset

    ds_cls = type("PathDataset", (_PathDataset, Dataset), {})
    rels = sorted(p for p, e in env["paths"].items() if e.is_file and e.size < 50 << 20)
    rels = rels * 20  # enough samples that all four workers read
    seen = 0
    for rel, data in DataLoader(ds_cls(env["mnt"], rels), batch_size=None, num_workers=4, shuffle=True):
        assert data == (env["src"] / rel).read_bytes(), rel
        seen += 1
    assert seen == len(rels)


# -- read-only for real -----------------------------------------------------------------------------

def assert_every_write_fails_with_erofs(mnt: Path) -> None:
    """Every kind of write to a mount of the tricky tree fails with EROFS and changes nothing."""
    f, d = mnt / "a" / "hello.txt", mnt / "a"
    before = tree_digest(mnt / "a")
    attempts = {
        "open for write": lambda: open(f, "r+b"),
        "append": lambda: open(f, "ab"),
        "create": lambda: open(d / "new.txt", "wb"),
        "O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        "mkdir": lambda: os.mkdir(d / "newdir"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(mnt / "empty dir" / "nested empty"),
        "rename": lambda: os.rename(f, d / "moved.txt"),
        "chmod": lambda: os.chmod(f, 0o777),
        "chown": lambda: os.chown(f, 1, 1),
        "truncate": lambda: os.truncate(f, 0),
        "utime": lambda: os.utime(f, (0, 0)),
        "symlink": lambda: os.symlink("x", d / "newlink"),
        "link": lambda: os.link(f, d / "hardlink"),
        "mknod": lambda: os.mkfifo(d / "fifo"),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.tessera.sha256"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, f"{what}: {info.value}"
    assert tree_digest(mnt / "a") == before


def test_every_kind_of_write_fails_with_erofs(env: dict) -> None:
    assert_every_write_fails_with_erofs(env["mnt"])
    assert (env["mnt"] / "a" / "hello.txt").read_bytes() == b"hello tessera\n"


def test_operations_refuse_writes_without_a_mount(env: dict) -> None:
    from tessera.fuse._binding import load_binding
    from tessera.fuse.operations import iter_write_ops, make_operations
    from tessera.vfs import VersionFS

    binding = load_binding()
    with tessera.Repo(env["home"]) as repo:
        ops = make_operations(binding, VersionFS(repo.get(env["tricky"])))
        for name in iter_write_ops():
            with pytest.raises(OSError) as info:
                getattr(ops, name)("/a/hello.txt", 0, 0, 0, 0)
            assert info.value.errno == errno.EROFS, name
        with pytest.raises(OSError) as info:
            ops.getattr("/no/such")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(OSError) as info:
            ops.open("/a/hello.txt", os.O_RDONLY)
        assert info.value.errno == errno.ENOSYS  # no-open mode
        assert ops.getattr("/a/hello.txt")["st_size"] == len("hello tessera\n")


def test_xattr_statfs_and_stable_inodes_across_mounts(env: dict) -> None:
    home, mnt = env["home"], env["mnt"]
    st = os.statvfs(mnt)
    with tessera.Repo(home) as repo:
        v = repo.get(env["tricky"])
        assert st.f_blocks * st.f_frsize >= v.size > (st.f_blocks - 1) * st.f_frsize
        assert st.f_files == v.files
    assert os.getxattr(mnt, "user.tessera.ref").decode() == env["tricky"]
    with pytest.raises(OSError) as info:
        os.getxattr(mnt / "a" / "hello.txt", "user.other")
    assert info.value.errno == errno.ENODATA
    inos = {rel: os.lstat(mnt / rel).st_ino for rel in env["paths"]}
    again = env["base"] / "again"
    mount(home, env["tricky"], again)
    try:
        assert {rel: os.lstat(again / rel).st_ino for rel in env["paths"]} == inos
    finally:
        umount(home, again)


def test_python_api_context_manager(env: dict) -> None:
    mp = env["base"] / "py"
    mp.mkdir()
    with tessera.Repo(env["home"]) as repo:
        with repo.get(env["e1"]).mount(mp, path="fuse") as where:
            assert Path(where) == mp and is_mounted(str(mp))
            assert (mp / "labels.json").read_text() == json.dumps({"version": 1})
    assert not is_mounted(str(mp)) and os.listdir(mp) == []


# -- the server process -----------------------------------------------------------------------------

def _server_pid(home: Path, mp: Path) -> int:
    out = json.loads(tessera_cli(home, "mounts", "--json").stdout)
    return next(m["pid"] for m in out if m["mountpoint"] == str(mp))




def test_sigterm_unmounts_cleanly(env: dict) -> None:
    home, mp = env["home"], env["base"] / "term"
    mount(home, env["e1"], mp)
    pid = _server_pid(home, mp)
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not is_mounted(str(mp)))
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2])
    assert all(m.mountpoint != str(mp) for m in list_mounts(home))
    log = sorted((home / "mounts").glob("*.log"), key=os.path.getmtime)[-1].read_text()
    assert "stopped by a signal" in log and "could not mount" not in log


def test_sigkill_leaves_enotconn_and_umount_recovers(env: dict) -> None:
    home, mp = env["home"], env["base"] / "killed"
    mount(home, env["e1"], mp)
    pid = _server_pid(home, mp)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2])
    # A request racing the kernel's teardown of the connection can get ECONNABORTED; after it, ENOTCONN.
    for _ in range(50):
        with pytest.raises(OSError) as info:
            os.listdir(mp)
        if info.value.errno != errno.ECONNABORTED:
            break
        time.sleep(0.05)
    assert info.value.errno == errno.ENOTCONN
    dead = [m for m in list_mounts(home) if m.mountpoint == str(mp)]
    assert dead and not dead[0].alive
    assert "server gone" in tessera_cli(home, "mounts").stdout
    p = tessera_cli(home, "umount", str(mp))
    assert p.returncode == 0, p.stderr
    assert not is_mounted(str(mp)) and os.listdir(mp) == []
    mount(home, env["e1"], mp)  # the mountpoint is usable again
    umount(home, mp)


def test_corrupt_chunk_gives_eio_and_the_mount_stays_up(env: dict, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "victim.bin", 3 << 20, 11)
    write_random(src / "bystander.bin", 1 << 20, 12)
    home = tmp_path / "home"
    with tessera.Repo(home) as repo:
        v = repo.commit("fragile", src)
        cid = v.file_record("victim.bin").chunks[1][0]
        loc = repo.chunks.location(cid)
        start = v.file_record("victim.bin").chunks[0][1]
        pack = repo.store.pack_path(loc.pack)
    with open(pack, "r+b") as f:  # flip one byte inside the second chunk of victim.bin
        f.seek(loc.offset + 1000)
        b = f.read(1)
        f.seek(loc.offset + 1000)
        f.write(bytes([b[0] ^ 0xFF]))
    mp = tmp_path / "mnt"
    mount(home, v.ref, mp)
    try:
        with pytest.raises(OSError) as info:
            (mp / "victim.bin").read_bytes()
        assert info.value.errno == errno.EIO
        good = start // 4096 * 4096  # pages wholly inside the intact first chunk still read
        with open(mp / "victim.bin", "rb", buffering=0) as f:
            got = b""
            while len(got) < good:
                got += os.pread(f.fileno(), good - len(got), len(got))
            assert got == (src / "victim.bin").read_bytes()[:good]
        assert (mp / "bystander.bin").read_bytes() == (src / "bystander.bin").read_bytes()
        assert is_mounted(str(mp)) and sorted(os.listdir(mp)) == ["bystander.bin", "victim.bin"]
        log = next((home / "mounts").glob("*.log")).read_text()
        assert "fails its hash check" in log and "EIO" in log
    finally:
        umount(home, mp)


# -- bad input: one line, non-zero exit, nothing mounted ---------------------------------------------

def _ours(home: Path) -> set[str]:
    return {m.mountpoint for m in list_mounts(home) if m.home}  # registered in this home (not other sessions')


def _assert_refused(home: Path, mp: Path, args: list[str], code: int, words: str) -> None:
    before = _ours(home)
    p = tessera_cli(home, "mount", *args)
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert _ours(home) == before
    if mp.exists() and mp.is_dir() and not os.path.ismount(mp):
        assert not is_mounted(str(mp))


def test_bad_input_is_one_line_and_mounts_nothing(env: dict, tmp_path: Path) -> None:
    home = env["home"]
    mp = tmp_path / "mp"
    mp.mkdir()
    _assert_refused(home, mp, ["nosuch", str(mp)], 3, "unknown dataset")
    _assert_refused(home, mp, ["extra@" + "0" * 12, str(mp)], 3, "has no version")
    _assert_refused(home, mp, ["bad name!", str(mp)], 2, "bad")
    # a missing mountpoint is created (tests/test_5_mount_cli.py); one whose parent is missing is refused
    _assert_refused(home, mp, [env["e1"], str(tmp_path / "no-parent" / "missing")], 2, "does not exist")
    assert not (tmp_path / "no-parent").exists()
    (tmp_path / "file").write_text("x")
    _assert_refused(home, mp, [env["e1"], str(tmp_path / "file")], 2, "not a directory")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _assert_refused(home, mp, [env["e1"], str(tmp_path / "full")], 2, "not empty")
    _assert_refused(home, mp, [env["e1"], str(env["mnt"])], 12, "already a mount point")


def test_ambiguous_prefix_is_refused(env: dict, tmp_path: Path) -> None:
    from tessera.model import HistoryEntry

    home = tmp_path / "home"
    with tessera.Repo(home) as repo:  # two versions whose hashes share a prefix (rows only: never mounted)
        for h in ("abcdef" + "1" * 58, "abcdef" + "2" * 58):
            repo.catalog.record_version(HistoryEntry("twins", h, None, time.time(), "t", "", {}), [])
    mp = tmp_path / "mp"
    mp.mkdir()
    _assert_refused(home, mp, ["twins@abcdef", str(mp)], 4, "ambiguous")


def test_fuse_unavailable_says_what_to_install(env: dict, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    env_vars = {**os.environ, "TESSERA_HOME": str(env["home"]), "FUSE_LIBRARY_NAME": "no-such-libfuse",
                "FUSE_LIBRARY_PATH": "/no/such/libfuse.so.2"}  # mfusepy and fusepy both fail to load
    p = subprocess.run(["tessera", "mount", "--fuse", env["e1"], str(mp)], capture_output=True, text=True,
                       env=env_vars, timeout=60)
    assert p.returncode == 13, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "apt-get install fuse3" in line, line
    assert "mfusepy" in line and "fusepy" in line
    assert not is_mounted(str(mp))


def test_fusepy_fallback_over_libfuse2(env: dict, tmp_path: Path) -> None:
    import ctypes.util

    if not ctypes.util.find_library("fuse"):
        pytest.skip("libfuse2 is not installed (apt-get install libfuse2): the fusepy fallback cannot load")
    mp = tmp_path / "mp"
    mp.mkdir()
    env_vars = {**os.environ, "TESSERA_HOME": str(env["home"]), "FUSE_LIBRARY_NAME": "no-such-libfuse"}
    p = subprocess.run(["tessera", "mount", "--fuse", env["e2"], str(mp)], capture_output=True, text=True,
                       env=env_vars, timeout=60)
    assert p.returncode == 0, p.stderr
    try:
        assert tree_digest(mp) == tree_digest(env["extra2"])
        assert os.stat(mp / "arr.npy").st_mtime_ns == os.stat(mp).st_mtime_ns > 10**18
        log = next(iter(sorted((env["home"] / "mounts").glob("*.log"), key=os.path.getmtime, reverse=True)))
        assert "fusepy over libfuse 2" in log.read_text()
    finally:
        umount(env["home"], mp)


def test_umount_of_something_not_mounted_is_an_error(env: dict, tmp_path: Path) -> None:
    p = tessera_cli(env["home"], "umount", str(tmp_path))
    assert p.returncode == 12 and p.stderr.startswith("error: ") and "not mounted" in p.stderr
