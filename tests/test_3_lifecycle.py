"""Forgetting versions and reclaiming space in one home: keep rules, `forget`, `tag --delete`, `rm`, `gc`
(mark, sweep, repack), `du` and `stats`, with real files; SIGKILL of gc at named failpoints and at random
moments; gc while commits go on.

Remote forgetting and pruning are in test_4_prune.py; mounts (FUSE and kernel) during gc in
test_5_fuse_lifecycle.py.

Cost: commands whose process boundary matters (SIGKILL, concurrent writers, the daemon, `run`) run as
real processes; the rest run `tessera.cli.main` in this process (`tess`), which prints and exits exactly
as the console script does, without an interpreter start per call. The soak sizes of the acceptance
criteria (>= 30 random kills, 50 daemon changes) run with TESSERA_SOAK=1 (`make bench` does it,
tests/bench/bench_lifecycle.py); `make test` runs the same tests smaller.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inprocess import tessera_main
from trees import make_small_files, tree_digest, write_random

import tessera
from tessera.config import RepoSettings
from tessera.retention import Candidate, KeepPolicy, apply_policy, parse_duration

PACK = 1 << 20  # 1 MiB packs: small trees still span many packs
SOAK = os.environ.get("TESSERA_SOAK") == "1"


def env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TESSERA_HOME": str(home), **extra}


def tess_proc(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The real `tessera` console script, in its own process."""
    return subprocess.run(["tessera", *args], capture_output=True, text=True, env=env(home, **extra),
                          stdin=subprocess.DEVNULL, timeout=300)


def tess(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tessera ARGS` in this process (tests/inprocess.py)."""
    return tessera_main(home, *args)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def make_home(path: Path) -> Path:
    tessera.Repo(path, settings=RepoSettings(pack_target=PACK)).close()
    return path


def snapshot_state(home: Path) -> dict[str, object]:
    """What a user can see of a home: datasets, every log, tags, packs and their bytes."""
    with tessera.Repo(home) as r:
        out: dict[str, object] = {"datasets": [(d.name, d.head) for d in r.datasets()]}
        for d in r.datasets():
            out[f"log {d.name}"] = [(e.hash, e.seq) for e in r.catalog.history(d.name)]
            out[f"tags {d.name}"] = r.tags(d.name)
        out["packs"] = sorted((p.id, p.size) for p in r.catalog.packs())
        out["files"] = sorted(str(p.relative_to(home)) for p in (home / "packs").rglob("*.pack"))
    return out


def changing_tree(src: Path, step: int, *, base: bool = True) -> None:
    """Step ``step`` of a tree that changes: a fixed part, a part rewritten every step, a file added."""
    if base and not (src / "base").exists():
        make_small_files(src / "base", 40, 2000, 30000, seed=99)
        write_random(src / "base" / "big.bin", 1 << 20, 98)
    write_random(src / "changing.bin", 1 << 20, 1000 + step)
    (src / "counter.txt").write_text(f"{step}\n")
    make_small_files(src / f"step{step:02d}", 5, 1000, 20000, seed=step)
    old = src / f"step{step - 3:02d}"
    if old.exists():
        shutil.rmtree(old)


def pack_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "packs").rglob("*.pack"))


def verify_all(home: Path, tmp: Path, refs: list[str]) -> None:
    with tessera.Repo(home) as r:
        for ref in refs:
            out = tmp / f"verify-{ref.replace('@', '-')}-{time.monotonic_ns()}"
            r.export(ref, out)
            report = r.verify(ref, out)
            assert report.ok, (ref, report.modified, report.missing, report.extra)
            shutil.rmtree(out)


def fsck_clean(home: Path) -> None:
    with tessera.Repo(home) as r:
        report = r.fsck()
        assert report.ok, report.errors


# -- keep rules ---------------------------------------------------------------------------------------

def test_keep_rules_follow_restic() -> None:
    hour = 3600.0
    t0 = time.mktime((2026, 3, 10, 12, 0, 0, 0, 0, -1))
    cands = [Candidate(f"v{i}", t0 - i * 7 * hour) for i in range(30)]  # one every 7 hours
    reasons = {v.key: v.reasons for v in apply_policy(KeepPolicy(last=2), cands)}
    assert [k for k, r in reasons.items() if r] == ["v0", "v1"] and reasons["v0"] == ["last 2"]
    daily = [v for v in apply_policy(KeepPolicy(daily=3), cands) if v.keep]
    days = [time.localtime(v.time)[:3] for v in daily]
    assert len(daily) == 3 and len(set(days)) == 3  # the newest of each of the 3 newest days
    for v in daily:  # and it is the newest version of its day
        assert all(c.time <= v.time for c in cands if time.localtime(c.time)[:3] == time.localtime(v.time)[:3])
    within = [v.key for v in apply_policy(KeepPolicy(within=parse_duration("1d")), cands) if v.keep]
    assert within == ["v0", "v1", "v2", "v3"]  # 0, 7, 14, 21 hours before the newest
    tagged = [Candidate("a", t0, ("release",)), Candidate("b", t0 - 1)]
    kept = {v.key: v.reasons for v in apply_policy(KeepPolicy(tags=("release",)), tagged)}
    assert kept == {"a": ["tag release"], "b": []}
    both = apply_policy(KeepPolicy(last=1, weekly=2), cands)[0]
    assert both.reasons == ["last", "weekly"]
    assert parse_duration("1h30m") == 5400 and parse_duration("2w") == 14 * 86400 and parse_duration("1.5") == 1.5


# -- the acceptance run: 10 versions, keep 3 --------------------------------------------------------------

def test_ten_versions_keep_last_three_reclaims_to_a_fresh_home(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    src = tmp_path / "src"
    refs = []
    with tessera.Repo(home) as r:
        for step in range(10):
            changing_tree(src, step)
            refs.append(r.commit("ds", src, message=f"step {step}").ref)
    before = pack_bytes(home)
    dry = json.loads(ok(tess(home, "forget", "ds", "--keep-last", "3", "--dry-run", "--json")))
    assert dry["forgotten"] == 7 and dry["freed_bytes"] > 0
    assert snapshot_state(home)["log ds"] and len(json.loads(ok(tess(home, "log", "ds", "--json")))) == 10
    out = json.loads(ok(tess(home, "forget", "ds", "--keep-last", "3", "--json")))
    assert out["forgotten"] == 7
    kept = [v for v in out["versions"] if v["keep"]]
    assert [v["reasons"] for v in kept] == [["last 3", "head"], ["last 3"], ["last 3"]]
    assert len(json.loads(ok(tess(home, "log", "ds", "--json")))) == 3
    stats = json.loads(ok(tess(home, "stats", "--json")))
    assert stats["reclaimable_bytes"] >= 0.8 * dry["freed_bytes"]
    gc = json.loads(ok(tess(home, "gc", "--json")))
    assert gc["freed_bytes"] > 0 and gc["deleted"]["packs"] > 0
    after = pack_bytes(home)
    assert after < before

    # a fresh home holding only the three kept versions, committed the same way
    fresh = make_home(tmp_path / "fresh")
    for ref in refs[-3:]:
        tree = tmp_path / "kept" / ref[-8:]
        ok(tess(home, "export", ref, str(tree)))
        ok(tess(fresh, "commit", "ds", str(tree)))
    assert after <= 1.10 * pack_bytes(fresh) + PACK, (after, pack_bytes(fresh))

    fsck = ok(tess(home, "fsck"))
    assert fsck.startswith("ok:") and "garbage" not in fsck
    verify_all(home, tmp_path, refs[-3:])
    for ref in refs[:-3]:
        assert "has no version" in tess(home, "export", ref, str(tmp_path / "gone")).stderr
    # the next commit of the current tree works and reuses what it can
    with tessera.Repo(home) as r:
        again = r.commit_dir("ds", src)
        assert not again.created and again.stats.files_read == 0
        changing_tree(src, 10)
        nxt = r.commit_dir("ds", src)
        assert nxt.created and nxt.stats.stat_cache_hits > 30  # base/ is reused, not read again
        assert nxt.stats.new_bytes_stored < 3 << 20
    verify_all(home, tmp_path, [nxt.version.ref])


def test_recommitting_forgotten_content_reads_it_again(tmp_path: Path) -> None:
    """gc drops the stat-cache and directory-cache rows of what it deleted: committing a tree whose files
    were only in a removed dataset reads and stores them again (no version naming missing bytes)."""
    home = make_home(tmp_path / "home")
    other = tmp_path / "other"
    make_small_files(other / "d", 30, 5000, 20000, seed=5)
    ok(tess(home, "commit", "gone", str(other)))
    ok(tess(home, "commit", "keep", str(tmp_path / "other" / "d")))  # shares the file bytes with gone
    ok(tess(home, "rm", "gone", "--yes"))
    ok(tess(home, "rm", "keep", "--yes"))
    ok(tess(home, "gc"))
    with tessera.Repo(home) as r:
        assert r.catalog.query("SELECT count(*) FROM stat_cache")[0][0] == 0
        assert r.catalog.query("SELECT count(*) FROM dir_cache")[0][0] == 0
        assert r.catalog.stats()["chunks"] == 0
        res = r.commit_dir("back", other)
        assert res.stats.files_read == 30
    fsck_clean(home)
    verify_all(home, tmp_path, [res.version.ref])


def test_forget_one_version_tag_delete_and_always_kept(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    src = tmp_path / "src"
    refs = []
    for step in range(4):
        changing_tree(src, step, base=False)
        refs.append(ok(tess(home, "commit", "ds", str(src))).strip().splitlines()[-1])
    ok(tess(home, "tag", refs[0], "v1"))
    out = ok(tess(home, "forget", "ds", "--keep-last", "1"))
    assert f"keep    {refs[0].split('@')[1][:12]}" in out and "tag v1" in out
    assert f"keep    {refs[3].split('@')[1][:12]}" in out and "head" in out
    assert "forgot 2 versions" in out
    one_line_error(tess(home, "forget", refs[0]), "tag v1", "tessera tag --delete ds:v1")
    one_line_error(tess(home, "forget", refs[3]), "head")
    assert ok(tess(home, "tag", "--delete", "ds:v1")).startswith("deleted tag ds:v1")
    assert "forgot 1 versions" in ok(tess(home, "forget", refs[0]))
    assert [e["hash"] for e in json.loads(ok(tess(home, "log", "ds", "--json")))] == [refs[3].split("@")[1]]


def test_queued_pushes_are_kept(tmp_path: Path) -> None:
    from tessera.catalog import daemon_state as ds

    home = make_home(tmp_path / "home")
    src = tmp_path / "src"
    refs = []
    for step in range(3):
        changing_tree(src, step, base=False)
        refs.append(ok(tess(home, "commit", "ds", str(src))).strip().splitlines()[-1])
    with tessera.Repo(home) as r:
        ds.enqueue_push(r.catalog, "origin", "ds", refs[0].split("@")[1])
    out = json.loads(ok(tess(home, "forget", "ds", "--keep-last", "1", "--json")))
    reasons = {v["hash"]: v["reasons"] for v in out["versions"]}
    assert reasons[refs[0].split("@")[1]] == ["queued for push to origin"]
    assert out["forgotten"] == 1


def test_forget_rm_and_gc_drop_the_worktree_records_of_what_they_remove(tmp_path: Path) -> None:
    """`status DIR` of a directory exported from a version that was then forgotten says the directory has
    no record (rather than failing to read a version that is gone); rm drops a dataset's records."""
    from tessera.catalog.worktree_state import worktree

    home = make_home(tmp_path / "home")
    src = tmp_path / "src"
    with tessera.Repo(home) as r:
        changing_tree(src, 0, base=False)
        old = r.commit("ds", src).ref
        changing_tree(src, 1, base=False)
        r.commit("ds", src)
        r.export(old, tmp_path / "out")
        other = r.commit("other", tmp_path / "out").ref  # the same tree: the version is shared
        r.export(old, tmp_path / "out2")
        assert worktree(r.catalog, tmp_path / "out") is not None
    ok(tess(home, "status", str(tmp_path / "out2")))
    ok(tess(home, "forget", old))
    one_line_error(tess(home, "status", str(tmp_path / "out2")), "has no recorded version")
    with tessera.Repo(home) as r:
        rec = worktree(r.catalog, tmp_path / "out")  # recorded as `other` by its commit: still there
        assert rec is not None and rec.ref == other and worktree(r.catalog, src) is not None
    ok(tess(home, "rm", "ds", "--yes"))
    with tessera.Repo(home) as r:
        assert worktree(r.catalog, src) is None and worktree(r.catalog, tmp_path / "out") is not None
        with r.catalog.write() as c:
            c.execute("INSERT INTO worktrees VALUES (?, 'ds', ?, 'export', 0, 1, '[]')",
                      (str(tmp_path / "gone"), "ab" * 32))
            c.execute("INSERT INTO trees VALUES (?, ?)", ("ab" * 32, b'{"entries": []}'))
        report = r.gc()
        assert report.swept.worktree_rows == 1 and worktree(r.catalog, tmp_path / "gone") is None


def test_only_active_mounts_are_roots(tmp_path: Path) -> None:
    """The mount registry keeps a version while its mount is active: a FUSE record while its server
    lives, a kernel record while its overlay is mounted or its mounting process works (pid 0 once
    mounted). Stale records (dead server, a kernel mount unmounted by hand) keep nothing."""
    from tessera.lifecycle import mounted_versions
    from tessera.mounting import MountRecord, write_record

    home = make_home(tmp_path / "home")
    live = MountRecord("ds@" + "1" * 64, "1" * 64, str(tmp_path / "m1"), os.getpid(), time.time(), str(home))
    materializing = MountRecord("ds@" + "2" * 64, "2" * 64, str(tmp_path / "m2"), os.getpid(), time.time(),
                                str(home), kind="kernel")
    unmounted = MountRecord("ds@" + "3" * 64, "3" * 64, str(tmp_path / "m3"), 0, time.time(), str(home),
                            kind="kernel")
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = MountRecord("ds@" + "4" * 64, "4" * 64, str(tmp_path / "m4"), dead.pid, time.time(), str(home))
    for rec in (live, materializing, unmounted, gone):
        write_record(rec)
    assert mounted_versions(home) == {"1" * 64: [live.mountpoint], "2" * 64: [materializing.mountpoint]}


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    src = tmp_path / "src"
    for step in range(3):
        changing_tree(src, step, base=False)
        ok(tess(home, "commit", "ds", str(src)))
    state = snapshot_state(home)
    err = one_line_error(tess(home, "forget", "ds"), "needs a keep rule", "--keep-last 1", "tessera rm ds")
    assert "ds@HASH" in err
    one_line_error(tess(home, "forget", "nope", "--keep-last", "1"), "unknown dataset 'nope'")
    one_line_error(tess(home, "forget", "ds@abcdef123"), "has no version abcdef123")
    one_line_error(tess(home, "forget", "ds@zz"), "bad ref")
    one_line_error(tess(home, "forget", "ds@abcdef123", "--keep-last", "2"), "either keep rules or one version")
    one_line_error(tess(home, "forget", "ds", "--keep-within", "soon"), "bad --keep-within")
    one_line_error(tess(home, "tag", "--delete", "ds:nope"), "has no tag 'nope'")
    one_line_error(tess(home, "tag", "--delete", "nope:v1"), "unknown dataset 'nope'")
    one_line_error(tess(home, "tag", "--delete", "ds"), "NAME:TAG")
    one_line_error(tess(home, "rm", "ds"), "--yes", "not a terminal")
    one_line_error(tess(home, "rm", "nope", "--yes"), "unknown dataset 'nope'")
    one_line_error(tess(home, "gc", "--repack-threshold", "150%"), "between 0% and 100%")
    one_line_error(tess(home, "du", "nope"), "unknown dataset 'nope'")
    one_line_error(tess(home, "config", "gc.nope", "1"), "unknown setting")
    one_line_error(tess(home, "config", "prune.margin", "later"), "bad prune.margin")
    assert snapshot_state(home) == state


def test_rm_then_gc_frees_only_what_no_other_dataset_uses(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    shared = tmp_path / "shared"
    make_small_files(shared, 20, 20000, 60000, seed=1)
    a = tmp_path / "a"
    shutil.copytree(shared, a / "common")
    write_random(a / "only-a.bin", 3 << 20, 2)
    b = tmp_path / "b"
    shutil.copytree(shared, b / "common")
    write_random(b / "only-b.bin", 2 << 20, 3)
    ok(tess(home, "commit", "a", str(a)))
    ref_b = ok(tess(home, "commit", "b", str(b))).strip()
    du = {d["dataset"]: d for d in json.loads(ok(tess(home, "du", "--json")))}
    assert du["a"]["unique"] >= 3 << 20 and du["b"]["unique"] >= 2 << 20
    assert du["a"]["shared"] == du["b"]["shared"] > 0
    versions = json.loads(ok(tess(home, "du", "a", "--json")))
    assert len(versions) == 1 and versions[0]["size"] > versions[0]["unique"] > 0
    before = pack_bytes(home)
    ok(tess(home, "rm", "a", "--yes"))
    gc = json.loads(ok(tess(home, "gc", "--repack-threshold", "0", "--json")))
    freed = before - pack_bytes(home)
    assert gc["freed_bytes"] == freed
    assert du["a"]["unique"] <= freed <= du["a"]["unique"] + 64 * 1024  # plus blob headers
    fsck_clean(home)
    verify_all(home, tmp_path, [ref_b])


def test_config_shows_and_sets_lifecycle_settings(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    shown = json.loads(ok(tess(home, "config", "--json")))
    assert shown["gc.repack_threshold"] == {"value": "20%", "set": False, "meaning": shown["gc.repack_threshold"]["meaning"]}
    ok(tess(home, "config", "prune.margin", "90s"))
    assert json.loads(ok(tess(home, "config", "prune.margin", "--json")))["prune.margin"]["value"] == "1m30s"
    with tessera.Repo(home) as r:
        assert r.lifecycle_settings().prune_margin == 90


# -- crash safety ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def forgotten_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    """A home with 8 versions of which 5 are forgotten (gc has deletes, repacks and unlinks to do);
    returns (home, kept refs, a directory to copy it from for each run)."""
    root = tmp_path_factory.mktemp("crashgc")
    home = make_home(root / "home")
    src = root / "src"
    refs = []
    with tessera.Repo(home) as r:
        for step in range(8):
            changing_tree(src, step)
            (src / "base" / f"mut{step % 2}.bin").write_bytes(os.urandom(200_000))  # base packs go partly dead
            refs.append(r.commit_dir("ds", src).version.ref)
        r.forget("ds", KeepPolicy(last=3))
    return home, refs[-3:], root


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_sound_then_finish(home: Path, tmp: Path, kept: list[str]) -> None:
    fsck_clean(home)
    verify_all(home, tmp, kept)
    proc = tess(home, "gc", "--json")
    report = json.loads(ok(proc))
    assert not report["errors"]
    with tessera.Repo(home) as r:
        final = r.fsck()
        assert final.ok and not final.garbage, (final.errors, final.garbage)
        assert r.reclaimable().dead_packs == 0


GC_POINTS = ["gc-after-mark", "before-pack-rename", "after-pack-rename", "repack-after-seal", "repack-after-move",
             "gc-locked", "gc-after-sweep", "gc-after-unlink"]


@pytest.mark.parametrize("point", GC_POINTS)
def test_sigkill_gc_at_each_failpoint(point: str, forgotten_home: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    pristine, kept, _ = forgotten_home
    home = fresh_copy(pristine, tmp_path / "home")
    proc = tess_proc(home, "gc", "--repack-threshold", "5%", TESSERA_CRASH_AT=point)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert_sound_then_finish(home, tmp_path, kept)


def test_sigkill_gc_at_random_moments(forgotten_home: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    pristine, kept, _ = forgotten_home
    timing = fresh_copy(pristine, tmp_path / "timing")
    t0 = time.monotonic()
    ok(tess(timing, "gc", "--repack-threshold", "5%"))
    span = time.monotonic() - t0
    rng = random.Random(1234)
    killed = 0
    kills = 32 if SOAK else 6  # the acceptance's >= 30 with TESSERA_SOAK=1 (`make bench`)
    for i in range(kills):
        home = fresh_copy(pristine, tmp_path / "home")
        p = subprocess.Popen(["tessera", "gc", "--repack-threshold", "5%"], env=env(home), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, span))
        p.send_signal(signal.SIGKILL)
        killed += p.wait() == -signal.SIGKILL
        fsck_clean(home)
        verify_all(home, tmp_path, kept)
        if i % 4 == 0:  # a re-run finishes the job (checked on every fourth kill to keep the test short)
            assert_sound_then_finish(home, tmp_path, kept)
    assert killed >= kills // 2, killed  # most kills land while gc runs


def test_gc_while_commits_go_on(tmp_path: Path) -> None:
    """A writer commits a changing tree in a loop while forget + gc run again and again in other
    processes: at the end the store is sound and every kept version reads back."""
    home = make_home(tmp_path / "home")
    src = tmp_path / "src"
    changing_tree(src, 0, base=False)
    ok(tess_proc(home, "commit", "ds", str(src)))
    stop = threading.Event()
    errors: list[str] = []
    commits = 0

    def writer() -> None:
        nonlocal commits
        step = 1
        while not stop.is_set():
            changing_tree(src, step, base=False)
            proc = tess_proc(home, "commit", "ds", str(src))
            if proc.returncode != 0:
                errors.append(proc.stderr)
            commits += 1
            step += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        rounds, deadline = 0, time.monotonic() + 120
        while (rounds < (5 if SOAK else 3) or commits < 3) and time.monotonic() < deadline:
            ok(tess(home, "forget", "ds", "--keep-last", "2"))  # (this process, against commit processes)
            proc = tess(home, "gc", "--repack-threshold", "10%")
            assert proc.returncode == 0 or "another tessera process is writing" in proc.stderr, proc.stderr
            rounds += 1
    finally:
        stop.set()
        t.join(120)
    assert not errors, errors
    assert commits >= 3
    ok(tess(home, "gc"))
    fsck_clean(home)
    refs = [f"ds@{e['hash']}" for e in json.loads(ok(tess_proc(home, "log", "ds", "--json")))]
    verify_all(home, tmp_path, refs)


# -- retention that runs itself ---------------------------------------------------------------------------

def test_daemon_keep_last_five_over_fifty_changes(tmp_path: Path) -> None:
    """A watch with keep_last = 5 over 50 changes (12 without TESSERA_SOAK=1): at most 5 versions (+ the
    head) remain, and the background reclaim keeps the store bounded."""
    from conftest import wait_until
    from test_5_daemon import DaemonProc, write_config

    from tessera.catalog import daemon_state as ds

    home = make_home(tmp_path / "home")
    watched = tmp_path / "watched"
    make_small_files(watched / "fixed", 10, 2000, 8000, seed=1)
    ok(tess(home, "config", "gc.auto_dead_bytes", "200K"))
    write_config(home, [{"path": str(watched), "dataset": "w", "quiet_seconds": 0.2, "max_wait_seconds": 2.0,
                         "keep_last": 5}])
    change = 250_000

    def last_version() -> str | None:
        with tessera.Repo(home) as r:
            st = ds.watch_statuses(r.catalog).get(str(watched))
            return st.last_version if st else None

    daemon = DaemonProc(home)
    try:
        seen = wait_until(last_version, 30)
        assert seen
        for i in range(50 if SOAK else 12):
            write_random(watched / "data.bin", change, 1000 + i)
            new = wait_until(lambda: (v := last_version()) != seen and v, 30)
            assert new, f"change {i} was not committed: {daemon.text()[-2000:]}"
            seen = new
        with tessera.Repo(home) as r:
            assert len(r.catalog.dataset_hashes("w")) <= 6
        bound = 8 * change + sum(f.stat().st_size for f in (watched / "fixed").iterdir()) + PACK

        def small_enough() -> bool:
            return pack_bytes(home) <= bound

        assert wait_until(small_enough, 60), (pack_bytes(home), bound, daemon.text()[-3000:])
        assert wait_until(lambda: "background reclaim freed" in daemon.text(), 60), daemon.text()[-3000:]
    finally:
        assert daemon.stop() == 0
    fsck_clean(home)
    with tessera.Repo(home) as r:
        refs = [f"w@{h}" for h in r.catalog.dataset_hashes("w")]
    assert 1 <= len(refs) <= 6
    verify_all(home, tmp_path, refs)


def test_run_capture_keep_last(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    ok(tess(home, "config", "gc.auto_dead_bytes", "100K"))
    work = tmp_path / "work"
    work.mkdir()
    script = work / "train.py"
    script.write_text(
        "import os, time\n"
        "os.makedirs('ckpt', exist_ok=True)\n"
        "for i in range(6):\n"
        "    with open('ckpt/model.tmp', 'wb') as f:\n"
        "        f.write(os.urandom(300_000))\n"
        "    os.replace('ckpt/model.tmp', 'ckpt/model.bin')\n"
        "    time.sleep(0.4)\n")
    proc = subprocess.run(["tessera", "run", "--capture", "ckpt:run-1", "--every", "0.3", "--keep-last", "2", "--",
                           sys.executable, str(script)], cwd=work, capture_output=True, text=True, env=env(home),
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("captured run-1@") >= 3, proc.stderr
    log = json.loads(ok(tess(home, "log", "run-1", "--json")))
    assert 1 <= len(log) <= 2 and log[0]["meta"]["capture"]["final"] is True
    assert pack_bytes(home) <= 4 * 300_000 + PACK  # the forgotten checkpoints were reclaimed
    fsck_clean(home)
    verify_all(home, tmp_path, [f"run-1@{e['hash']}" for e in log])


def test_daemon_config_keep_rules(tmp_path: Path) -> None:
    from tessera.daemon.config import WatchConfig, parse_config, render_watch
    from tessera.errors import ConfigError

    cfg = parse_config('[[watch]]\npath = "/data"\ndataset = "d"\nkeep_last = 5\nkeep_within = "2d"\n'
                       'keep_tags = ["release"]\n', tmp_path / "daemon.toml")
    keep = cfg.watches[0].keep
    assert keep == KeepPolicy(last=5, within=2 * 86400, tags=("release",))
    again = parse_config(render_watch(cfg.watches[0]), tmp_path / "daemon.toml").watches[0]
    assert again.keep == keep
    assert parse_config('[[watch]]\npath = "/data"\ndataset = "d"\n', tmp_path / "x.toml").watches[0].keep is None
    for text, fragment in (("keep_last = -1", "whole number"), ("keep_within = 3", "duration string"),
                           ("keep_within = \"soon\"", "bad keep_within"), ("keep_last = 0", "keep nothing"),
                           ("keep_tags = \"x\"", "list of tag names")):
        with pytest.raises(ConfigError) as exc:
            parse_config(f'[[watch]]\npath = "/data"\ndataset = "d"\n{text}\n', tmp_path / "daemon.toml")
        assert fragment in str(exc.value) and "daemon.toml:4" in str(exc.value)
    assert isinstance(cfg.watches[0], WatchConfig)
