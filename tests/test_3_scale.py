"""Issue 14: a commit's memory does not grow with the number of files.

Two trees of 8,000 and 32,000 files commit under a 16 MiB budget with the same peak RSS, give or take
16 MiB (measured: 59 and 60 MiB). The code before issue 14 held every file and tree of the walk at once:
60 and 106 MiB for these trees (235 MiB at 100,000 files, 1.9 GiB at 1,000,000). A commit that
checkpoints gives the hash of one that holds it all, and an unchanged re-commit reads no file and builds
no tree. A commit killed at a checkpoint is crash-safe and resumes: the re-run does not read again what
the first checkpoints recorded. The 200,000-file commit under an address-space cap (RLIMIT_AS) that the
old code exceeds, and the 1,000,000-file growth curve, are in `make bench` (tests/bench/bench_scale.py).

`tessera fsck` and `tessera gc` on homes holding those two trees also have the same peak RSS, give or
take 4 MiB (measured: 1 and 2 MiB apart). Before, fsck kept a result per file and tree (an LRU of
262,144 files) and gc every tree id and, per version, every file id: 20 and 7 MiB more at 32,000 files
than at 8,000.

`tessera push` of those versions and a fresh home's full metadata pull of them: see
`test_push_and_full_metadata_pull_memory_is_flat_in_the_file_count`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tessera

sys.path.insert(0, str(Path(__file__).parent / "bench"))
from scale_tree import make_flat_files  # noqa: E402

pytestmark = pytest.mark.slow

SMALL, LARGE = 8_000, 32_000
PER_DIR = 500
FLAT = 16 << 20  # what the peak RSS may grow by from SMALL to LARGE files (the old code: 46 MiB)
FLAT_CHECK = 4 << 20  # the same for fsck and gc (measured: 1 and 2 MiB; the old code: 20 and 7 MiB)
FLAT_PUSH = 16 << 20  # push (measured: 11 MiB, the metadata pack being built grows to its 16 MiB target; old code: 31)
FLAT_PULL = 8 << 20  # a full metadata pull (measured: 4 MiB; the old code: 14)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(small, large): the small tree is a directory of the large one (fewer files to write)."""
    large = tmp_path_factory.mktemp("scale") / "large"
    small = make_flat_files(large / "a", SMALL, per_dir=PER_DIR)
    make_flat_files(large / "b", LARGE - SMALL, per_dir=PER_DIR, seed=1)
    for marker in large.glob("*.done"):  # make_flat_files's "complete" markers: not part of the trees
        marker.unlink()
    return small, large


@pytest.fixture(scope="module")
def small_hash(trees: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The small tree committed in this process with a budget that holds it all (one checkpoint)."""
    with tessera.Repo(tmp_path_factory.mktemp("uncapped") / "home") as repo:
        res = repo.commit_dir("big", trees[0], memory=2 << 30)
        assert res.stats.checkpoints == 1 and res.stats.files == SMALL
        return res.version.hash


def run_tessera(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tessera", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TESSERA_HOME": str(home), **env}, stdin=subprocess.DEVNULL)


def tessera_peak(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`tessera ARGS` in a child that reports its own peak RSS (VmHWM) as it exits: (process, bytes)."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write([l for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0]))\n"
            "from tessera.cli import main\nsys.argv[0] = 'tessera'\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TESSERA_HOME": str(home)}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"VmHWM:\s+(\d+) kB", proc.stderr)
    assert m, proc.stderr[-2000:]
    return proc, int(m.group(1)) * 1024


def stats_of(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The counters `tessera commit --stats` prints."""
    line = next(x for x in proc.stderr.splitlines() if x.startswith("files "))
    found = {key: re.search(pattern, line) for key, pattern in (
        ("files", r"^files (\d+)"), ("read", r"read (\d+)"), ("trees", r"trees built (\d+)"),
        ("checkpoints", r"checkpoints (\d+)"))}
    assert all(found.values()), line
    return {key: int(m.group(1)) for key, m in found.items() if m}


def last_ref(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip().splitlines()[-1]


def test_commit_memory_is_flat_in_the_file_count(trees: tuple[Path, Path], small_hash: str, tmp_path: Path) -> None:
    small, large = trees
    first, peak_small = tessera_peak(tmp_path / "small", "commit", "big", str(small), "--memory", "16M", "--stats")
    s = stats_of(first)
    assert s["files"] == SMALL and s["read"] == SMALL and s["checkpoints"] >= 2, s
    assert s["trees"] == SMALL // PER_DIR + 1, s
    assert last_ref(first) == f"big@{small_hash}"  # the hash of a commit that held it all
    proc, peak_large = tessera_peak(tmp_path / "large", "commit", "big", str(large), "--memory", "16M", "--stats")
    s = stats_of(proc)
    assert s["files"] == LARGE and s["read"] == LARGE and s["checkpoints"] >= 4, s  # one per ~6,500 files read
    assert peak_large - peak_small < FLAT, (peak_small >> 20, peak_large >> 20)
    # unchanged: nothing read, no tree built
    again = run_tessera(tmp_path / "small", "commit", "big", str(small), "--memory", "16M", "--stats")
    assert again.returncode == 0, again.stderr[-2000:]
    assert last_ref(again) == last_ref(first)
    s = stats_of(again)
    assert s["read"] == 0 and s["trees"] == 0, s
    fsck = run_tessera(tmp_path / "small", "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_commit_killed_at_a_checkpoint_is_sound_and_resumes(trees: tuple[Path, Path], small_hash: str,
                                                              tmp_path: Path) -> None:
    src = trees[0]
    home = tmp_path / "home"
    # killed between the file records and the stat-cache rows of the first checkpoint, then right after it
    for point in ("after-files", "after-checkpoint"):
        killed = run_tessera(home, "commit", "ds", str(src), "--memory", "16M", TESSERA_CRASH_AT=point)
        assert killed.returncode == -signal.SIGKILL
        fsck = run_tessera(home, "fsck")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert run_tessera(home, "log", "ds").returncode == 3  # no version
    again = run_tessera(home, "commit", "ds", str(src), "--memory", "16M", "--stats")
    assert again.returncode == 0, again.stderr
    s = stats_of(again)
    assert 0 < s["read"] < SMALL, s  # the files the killed run's first checkpoint recorded were not read again
    assert last_ref(again) == f"ds@{small_hash}"
    assert run_tessera(home, "fsck").returncode == 0


def test_memory_budget_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    p = run_tessera(tmp_path / "home", "commit", "ds", str(tmp_path / "src"), "--memory", "1M")
    assert p.returncode == 2 and p.stderr.strip() == "error: commit memory budget 1048576 bytes is too small: " \
        "use at least 16M", p.stderr
    p = run_tessera(tmp_path / "home", "commit", "ds", str(tmp_path / "src"), TESSERA_COMMIT_MEMORY="lots")
    assert p.returncode == 2 and "bad size 'lots'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.allow_logs("is still being written")
def test_keep_busy_rules_hold_across_checkpoints(tmp_path: Path) -> None:
    """The daemon's torn-file rules in a commit that checkpoints: a file open for writing is checked at
    the checkpoint after its read, kept out of the version and out of the stat cache."""
    src = make_flat_files(tmp_path / "src", 12_000, per_dir=500, size=100)
    with tessera.Repo(tmp_path / "home") as repo:
        with open(src / "d00000" / "new.bin", "wb") as fn:
            fn.write(b"half")
            fn.flush()
            v1 = repo.commit_dir("k", src, keep_busy=True, memory=16 << 20)
        assert v1.stats.checkpoints >= 3 and v1.stats.busy == ["d00000/new.bin"], v1.stats
        assert "d00000/new.bin" not in {e.path for e in v1.version.walk("d00000")}
        assert v1.version.files == 12_000
        v2 = repo.commit_dir("k", src, keep_busy=True, memory=16 << 20)
        assert v2.stats.busy == [] and v2.stats.files_read == 1
        assert v2.version.read_bytes("d00000/new.bin") == b"half"
        plain = tessera.Repo(tmp_path / "plain").commit_dir("k", src).version.hash
        assert v2.version.hash == plain


@pytest.fixture(scope="module")
def homes(trees: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(small, large): homes holding the small and the large tree, plus an older version of each with
    one directory more (forgotten: gc has something to sweep)."""
    out = []
    for name, src in zip(("small", "large"), trees):
        home = tmp_path_factory.mktemp("check") / name
        extra = src / "zz-extra"
        make_flat_files(extra, 200, per_dir=100, seed=7)
        extra.with_name(extra.name + ".done").unlink()
        with tessera.Repo(home) as repo:
            old = repo.commit_dir("big", src).version.hash
            shutil.rmtree(extra)
            repo.commit_dir("big", src)
            repo.forget("big", version=f"big@{old}")
        out.append(home)
    return out[0], out[1]


def test_fsck_and_gc_memory_is_flat_in_the_file_count(homes: tuple[Path, Path]) -> None:
    small, large = homes
    peaks = {}
    for home, n in ((small, SMALL), (large, LARGE)):
        proc, fsck_peak = tessera_peak(home, "fsck", "--json")
        report = json.loads(proc.stdout)
        assert report["ok"] and report["versions"] == 1 and report["files"] == n, report
        proc, gc_peak = tessera_peak(home, "gc", "--json")
        swept = json.loads(proc.stdout)
        assert swept["live"]["files"] == n and swept["deleted"]["files"] == 200, swept
        assert swept["deleted"]["trees"] == 3 + 1, swept  # the extra directory, its 2 subdirectories, the old root
        peaks[n] = (fsck_peak, gc_peak)
    growth = [large_peak - small_peak for small_peak, large_peak in zip(peaks[SMALL], peaks[LARGE])]
    assert growth[0] < FLAT_CHECK and growth[1] < FLAT_CHECK, [(p >> 20) for pair in peaks.values() for p in pair]


def test_push_and_full_metadata_pull_memory_is_flat_in_the_file_count(homes: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """`tessera push` and a fresh home's `tessera pull --metadata-only` of the 8,000- and 32,000-file
    versions: the peak RSS grows by less than `FLAT_PUSH` and `FLAT_PULL`. The code before (which kept
    every blob sent since the last metadata table in a dict and the table's rows as objects, and decoded
    metadata packs and chunk tables whole) grew by 31 and 14 MiB; at 1,000,000 files it needed 778 and
    604 MiB (tests/bench/bench_fresh_home.py)."""
    peaks = {}
    for home, n in zip(homes, (SMALL, LARGE)):
        url = f"file://{tmp_path / f'remote-{n}'}"
        proc, push_peak = tessera_peak(home, "push", "big", "--remote", url)
        assert "pushed big@" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        fresh = tmp_path / f"fresh-{n}"
        assert run_tessera(fresh, "remote", "add", "origin", url).returncode == 0
        _, pull_peak = tessera_peak(fresh, "pull", "big", "--metadata-only")
        with tessera.Repo(fresh) as repo:  # every tree and file record is here: nothing left to fetch
            v = repo.get("big")
            assert v.files == n and len(list(v.walk())) == n
        peaks[n] = (push_peak, pull_peak)
    growth = [large_peak - small_peak for small_peak, large_peak in zip(peaks[SMALL], peaks[LARGE])]
    assert growth[0] < FLAT_PUSH and growth[1] < FLAT_PULL, [(p >> 20) for pair in peaks.values() for p in pair]
