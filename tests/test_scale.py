"""Issue 14: a commit's memory does not grow with the number of files.

A 200,000-file tree commits under an address-space cap (RLIMIT_AS) of what a trivial commit needs plus
200 MiB: the code before issue 14 held every file and tree of the walk at once and needed about 420 MiB
more than that for this tree (measured: 235 MiB peak RSS at 100,000 files, 1.9 GiB at 1,000,000). The
capped commit gives the same hash as an uncapped one, and an unchanged re-commit under the cap reads no
file and builds no tree. A commit killed at a checkpoint is crash-safe and resumes: the re-run does not
read again what the first checkpoints recorded.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tessera

sys.path.insert(0, str(Path(__file__).parent / "bench"))
from scale_tree import make_flat_files  # noqa: E402

pytestmark = pytest.mark.slow

N = 200_000
HEADROOM = 200 << 20


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_flat_files(tmp_path_factory.mktemp("scale") / "src", N)


def tessera_capped(home: Path, limit: int | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(["tessera", *args], capture_output=True, text=True, timeout=900, preexec_fn=cap,
                          env={**os.environ, "TESSERA_HOME": str(home), **env}, stdin=subprocess.DEVNULL)


def trivial_commit_vm_peak(tmp_path: Path) -> int:
    """VmPeak of the CLI committing one small file: the interpreter, libraries, threads (no cap)."""
    src = tmp_path / "one"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 100)
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write([l for l in open('/proc/self/status') "
            "if l.startswith('VmPeak')][0]))\n"
            "from tessera.cli import main\nsys.argv[0] = 'tessera'\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code, "commit", "t", str(src)], capture_output=True, text=True,
                          env={**os.environ, "TESSERA_HOME": str(tmp_path / "h0")}, timeout=300, check=True)
    m = re.search(r"VmPeak:\s+(\d+) kB", proc.stderr)
    assert m, proc.stderr
    return int(m.group(1)) * 1024


def stats_of(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The counters `tessera commit --stats` prints."""
    line = next(x for x in proc.stderr.splitlines() if x.startswith("files "))
    found = {key: re.search(pattern, line) for key, pattern in (
        ("files", r"^files (\d+)"), ("read", r"read (\d+)"), ("trees", r"trees built (\d+)"),
        ("checkpoints", r"checkpoints (\d+)"))}
    assert all(found.values()), line
    return {key: int(m.group(1)) for key, m in found.items() if m}


def test_200k_files_commit_under_a_memory_cap(many: Path, tmp_path: Path) -> None:
    limit = trivial_commit_vm_peak(tmp_path) + HEADROOM
    home = tmp_path / "capped"
    first = tessera_capped(home, limit, "commit", "big", str(many), "--memory", "48M", "--stats")
    assert first.returncode == 0, first.stderr[-2000:]
    s = stats_of(first)
    assert s["files"] == N and s["read"] == N and s["checkpoints"] >= 3 and s["trees"] == N // 1000 + 1, s
    capped_ref = first.stdout.strip().splitlines()[-1]
    # the same tree, in this process with a budget that holds it all (one checkpoint): the same version
    with tessera.Repo(tmp_path / "uncapped") as repo:
        res = repo.commit_dir("big", many, memory=2 << 30)
        assert res.stats.checkpoints == 1 and res.stats.files == N
        assert f"big@{res.version.hash}" == capped_ref
    # unchanged: nothing read, no tree built, still under the cap
    again = tessera_capped(home, limit, "commit", "big", str(many), "--memory", "48M", "--stats")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == capped_ref
    s = stats_of(again)
    assert s["read"] == 0 and s["trees"] == 0, s
    fsck = tessera_capped(home, limit, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_commit_killed_at_a_checkpoint_is_sound_and_resumes(tmp_path: Path) -> None:
    src = make_flat_files(tmp_path / "src", 30_000, per_dir=500, size=200)
    home = tmp_path / "home"
    # killed between the file records and the stat-cache rows of the first checkpoint, then right after it
    for point in ("after-files", "after-checkpoint"):
        killed = tessera_capped(home, None, "commit", "ds", str(src), "--memory", "16M", TESSERA_CRASH_AT=point)
        assert killed.returncode == -signal.SIGKILL
        fsck = tessera_capped(home, None, "fsck")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert tessera_capped(home, None, "log", "ds").returncode == 3  # no version
    again = tessera_capped(home, None, "commit", "ds", str(src), "--memory", "16M", "--stats")
    assert again.returncode == 0, again.stderr
    s = stats_of(again)
    assert 0 < s["read"] < 30_000 and s["checkpoints"] >= 2, s  # the first checkpoint's files were not read again
    with tessera.Repo(tmp_path / "plain") as repo:
        assert f"ds@{repo.commit_dir('ds', src).version.hash}" == again.stdout.strip().splitlines()[-1]
    assert tessera_capped(home, None, "fsck").returncode == 0


def test_memory_budget_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    p = tessera_capped(tmp_path / "home", None, "commit", "ds", str(tmp_path / "src"), "--memory", "1M")
    assert p.returncode == 2 and p.stderr.strip() == "error: commit memory budget 1048576 bytes is too small: " \
        "use at least 16M", p.stderr
    p = tessera_capped(tmp_path / "home", None, "commit", "ds", str(tmp_path / "src"), TESSERA_COMMIT_MEMORY="lots")
    assert p.returncode == 2 and "bad size 'lots'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.allow_logs("is still being written")
def test_keep_busy_rules_hold_across_checkpoints(tmp_path: Path) -> None:
    """The daemon's torn-file rules in a commit that checkpoints: a file open for writing is checked at
    the checkpoint after its read, kept out of the version and out of the stat cache."""
    src = make_flat_files(tmp_path / "src", 20_000, per_dir=500, size=100)
    with tessera.Repo(tmp_path / "home") as repo:
        with open(src / "d00000" / "new.bin", "wb") as fn:
            fn.write(b"half")
            fn.flush()
            v1 = repo.commit_dir("k", src, keep_busy=True, memory=16 << 20)
        assert v1.stats.checkpoints >= 3 and v1.stats.busy == ["d00000/new.bin"], v1.stats
        assert "d00000/new.bin" not in {e.path for e in v1.version.walk("d00000")}
        assert v1.version.files == 20_000
        v2 = repo.commit_dir("k", src, keep_busy=True, memory=16 << 20)
        assert v2.stats.busy == [] and v2.stats.files_read == 1
        assert v2.version.read_bytes("d00000/new.bin") == b"half"
        plain = tessera.Repo(tmp_path / "plain").commit_dir("k", src).version.hash
        assert v2.version.hash == plain
