"""Crash safety: SIGKILL a commit at every write step (and at random moments), fill the disk.

Afterwards fsck is clean, no partial version is listed, and a new commit works."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trees import make_small_files, tree_digest, write_random

POINTS = ["before-pack-rename", "after-pack-rename", "before-seal", "after-seal", "after-files", "after-checkpoint",
          "before-record", "after-record"]


def tessera_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TESSERA_HOME": str(home), **extra}


def run(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tessera", *args], capture_output=True, text=True, env=tessera_env(home, **extra),
                          stdin=subprocess.DEVNULL, timeout=300)


def assert_sound(home: Path, versions: int) -> None:
    fsck = run(home, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    log = run(home, "log", "ds", "--json")
    import json

    listed = json.loads(log.stdout) if log.returncode == 0 else []
    assert len(listed) == versions, listed


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_small_files(src / "small", 300, 1000, 20000, seed=1)
    write_random(src / "big.bin", 12 << 20, 2)
    return src


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_write_step(point: str, source: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(home, "commit", "ds", str(source)).returncode == 0
    (source / "small" / "d0000" / "f000000.bin").write_bytes(os.urandom(5000))
    write_random(source / "new.bin", 3 << 20, 3)
    crashed = run(home, "commit", "ds", str(source), TESSERA_CRASH_AT=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # after-record: the version was recorded atomically before the kill, so it is listed
    assert_sound(home, 2 if point == "after-record" else 1)
    again = run(home, "commit", "ds", str(source))
    assert again.returncode == 0, again.stderr
    assert_sound(home, 2)
    out = tmp_path / "out"
    ref = again.stdout.strip().splitlines()[-1]
    assert run(home, "export", ref, str(out)).returncode == 0
    assert tree_digest(out) == tree_digest(source)
    gc = run(home, "gc")
    assert gc.returncode == 0
    assert "garbage" not in run(home, "fsck").stdout


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_small_files(src, 2000, 1000, 60000, seed=4)
    home = tmp_path / "home"
    for delay in (0.05, 0.2, 0.5, 0.9):
        proc = subprocess.Popen(["tessera", "commit", "ds", str(src)], env=tessera_env(home),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fsck = run(home, "fsck")
        if not (home / "catalog.db").exists():  # killed before it created the home: nothing to check
            assert fsck.returncode == 3 and "no tessera home" in fsck.stderr, fsck.stderr
            continue
        assert fsck.returncode == 0, fsck.stdout
    ok = run(home, "commit", "ds", str(src))
    assert ok.returncode == 0
    assert_sound(home, 1)


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_leaves_no_version_and_a_usable_store(small_disk: Path, tmp_path: Path) -> None:
    home = small_disk / "home"
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("a")
    assert run(home, "commit", "ds", str(small)).returncode == 0
    big = tmp_path / "big"
    write_random(big / "r.bin", 40 << 20, 5)
    proc = run(home, "commit", "ds", str(big))
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "disk full" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_sound(home, 1)
    assert not list((home / "tmp").iterdir()), "temporary packs must be removed"
    (small / "b.txt").write_text("b")
    assert run(home, "commit", "ds", str(small)).returncode == 0
    assert_sound(home, 2)


def test_gc_refuses_while_a_commit_is_writing(tmp_path: Path) -> None:
    from tessera.store import Store
    import tessera

    repo = tessera.Repo(tmp_path / "home")
    with repo.store.writing():
        proc = run(tmp_path / "home", "gc")
        assert proc.returncode == 1 and "another tessera process is writing" in proc.stderr
    assert run(tmp_path / "home", "gc").returncode == 0
