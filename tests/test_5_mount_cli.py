"""`tessera mount` creates a missing mountpoint and `tessera umount` removes it, only if mount made it
(recorded in the mount registry). Real FUSE mounts; skipped only when this machine cannot mount."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fuse_probe import fuse_unavailable_reason, require_fuse
from tessera.mounting import is_mounted

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _fuse_available() -> None:
    require_fuse()


@pytest.fixture
def ref(home: Path, tmp_path: Path, cli) -> str:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    return cli("commit", "ds", str(src), check=True).stdout.strip().splitlines()[-1]


def test_mount_creates_and_umount_removes_a_missing_mountpoint(home: Path, tmp_path: Path, cli, ref: str) -> None:
    mp = tmp_path / "new-mnt"
    try:
        cli("mount", ref, str(mp), check=True)
        assert is_mounted(str(mp)) and (mp / "hello.txt").read_text() == "hello\n"
    finally:
        cli("umount", str(mp))
    assert not mp.exists() and not is_mounted(str(mp))
    assert not list((home / "mounts").glob("*.created"))


def test_umount_keeps_a_mountpoint_it_did_not_create(home: Path, tmp_path: Path, cli, ref: str) -> None:
    mp = tmp_path / "mine"
    mp.mkdir()
    try:
        cli("mount", ref, str(mp), check=True)
    finally:
        cli("umount", str(mp), check=True)
    assert mp.is_dir()
    # created by one mount, then kept: the next mount of the existing directory does not own it
    new = tmp_path / "once"
    cli("mount", ref, str(new), check=True)
    cli("umount", str(new), check=True)
    new.mkdir()
    cli("mount", ref, str(new), check=True)
    cli("umount", str(new), check=True)
    assert new.is_dir()


def test_failed_mount_leaves_no_directory(home: Path, tmp_path: Path, cli, ref: str) -> None:
    mp = tmp_path / "never"
    proc = cli("mount", "ds@000000", str(mp))
    assert proc.returncode == 3 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not mp.exists()
    proc = cli("mount", ref, str(tmp_path / "no" / "parent"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_version_mount_context_creates_and_removes(home: Path, tmp_path: Path, repo, ref: str) -> None:
    mp = tmp_path / "ctx"
    with repo.get(ref).mount(str(mp)) as where:
        assert Path(where, "hello.txt").read_text() == "hello\n"
    assert not mp.exists()


def test_names_of_255_bytes_through_the_mount(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "long"
    (src / ("d" * 255)).mkdir(parents=True)
    names = {"a" * 255: b"ascii\n", "é" * 127 + "x": b"two-byte\n"}
    for name, data in names.items():
        (src / name).write_bytes(data)
        (src / ("d" * 255) / name).write_bytes(data * 2)
    ref = cli("commit", "long", str(src), check=True).stdout.strip().splitlines()[-1]
    mp = tmp_path / "mnt"
    cli("mount", ref, str(mp), check=True)
    try:
        for name, data in names.items():
            assert (mp / name).read_bytes() == data
            assert (mp / ("d" * 255) / name).read_bytes() == data * 2
        assert cli("verify", ref, str(mp), check=True).returncode == 0
    finally:
        cli("umount", str(mp), check=True)


HUNG_SERVER = r"""
import errno, os, stat, sys, time
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy as F
mnt, flag = sys.argv[1], sys.argv[2]

class Ops(F.Operations):
    use_ns = True
    def getattr(self, path, fh=None):
        if os.path.exists(flag):
            time.sleep(60)  # a server that stopped answering (stuck, stopped, under a debugger)
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        raise F.FuseOSError(errno.ENOENT)

F.FUSE(Ops(), mnt, foreground=True, ro=True, fsname="tessera:hung@000000", subtype="tessera")
"""


def test_a_hung_mount_does_not_hang_mounts_or_umount(home: Path, tmp_path: Path, cli) -> None:
    import subprocess
    import time

    mp, flag = tmp_path / "hung", tmp_path / "hang-now"
    mp.mkdir()
    cli("init", check=True)  # `mounts` lists this home's mounts (and others the kernel knows)
    server = subprocess.Popen([sys.executable, "-c", HUNG_SERVER, str(mp), str(flag)], cwd="/",
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(str(mp)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(str(mp))
        flag.write_text("x")
        t0 = time.monotonic()
        listed = cli("mounts", "--json", check=True, timeout=60)
        assert time.monotonic() - t0 < 30
        found = [m for m in __import__("json").loads(listed.stdout) if m["mountpoint"] == str(mp)]
        assert found and found[0]["alive"] is False
    finally:
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
        server.kill()
        server.wait()
