"""Distributed commit on a local Ray cluster (issue 14): one cluster for the module (`ray.init(num_cpus=2)`),
a moto bucket per test. 1, 2 and 4 tasks give the hash of a plain commit; a fresh home mounts and verifies
the version; a task killed mid-way is retried by Ray and the result still verifies; the CLI's --ray joins a
cluster by address."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tessera
from fuse_probe import fuse_unavailable_reason
from tessera.distributed import LocalExecutor, plan_units
from tessera.mounting import is_mounted
from tessera.raycluster import RayExecutor
from trees import make_small_files, tree_digest, write_random, write_text

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Subtrees of unequal bytes (so 4 tasks split it below the top), files at every level, a symlink,
    an empty directory, a name that is not UTF-8 and duplicate content across subtrees."""
    src = tmp_path_factory.mktemp("ray") / "src"
    make_small_files(src / "many", 400, 200, 6000, seed=1, per_dir=100)
    write_random(src / "big" / "one.bin", 3 << 20, 2)
    write_text(src / "big" / "deep" / "two.csv", 2 << 20, 3)
    write_random(src / "big" / "deep" / "er" / "three.bin", 1 << 20, 4)
    write_random(src / "copy" / "one.bin", 3 << 20, 2)  # the same bytes as big/one.bin
    (src / "top.txt").write_text("at the top\n")
    (src / "empty").mkdir()
    os.symlink("big/one.bin", src / "link")
    (src / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name\n")
    return src


@pytest.fixture(scope="module")
def plain_hash(source: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    with tessera.Repo(tmp_path_factory.mktemp("plain") / "home") as repo:
        return repo.commit_dir("ds", source).version.hash


def test_plan_splits_by_bytes_and_covers_every_file(source: Path) -> None:
    plan = plan_units(source, 4)
    assert plan.split, "4 tasks split the tree below its top"
    files = sum(u.files for u in plan.units)
    assert files == plan.files == sum(1 for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    bins = plan.bins(4)
    assert len(bins) == 4 and sorted(u.rel + str(u.recursive) for b in bins for u in b) == \
        sorted(u.rel + str(u.recursive) for u in plan.units)
    loads = sorted(sum(u.bytes for u in b) for b in bins)
    assert loads[-1] <= plan.bytes // 2, loads  # no task does most of the work
    assert plan_units(source, 1).units == [plan_units(source, 1).units[0]] and not plan_units(source, 1).split


@pytest.mark.parametrize("tasks", [1, 2, 4])
def test_ray_commit_gives_the_plain_hash(ray_cluster: str, source: Path, plain_hash: str, tasks: int,
                                        tmp_path: Path, s3_bucket: str, s3_client) -> None:
    with tessera.Repo(tmp_path / "home") as repo:
        res = repo.commit_distributed("ds", source, RayExecutor(tasks=tasks), remote=s3_bucket, message="ray")
        assert res.version.hash == plain_hash and res.created
        assert res.stats.files == sum(1 for p in source.rglob("*") if p.is_file() and not p.is_symlink())
        # the data lives on the remote only; the driver home reads it lazily
        assert all(not p.local for p in repo.catalog.packs())
        assert res.version.read_bytes("top.txt") == b"at the top\n"
    bucket = s3_bucket.split("/")[2]
    keys = {o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}
    assert f"repo/versions/{plain_hash}" in keys
    assert any(k.startswith("repo/history/ds/") for k in keys)
    assert any(k.startswith("repo/packs/") for k in keys) and any(k.startswith("repo/chunkidx/") for k in keys)


def test_local_executor_matches_too(source: Path, plain_hash: str, tmp_path: Path) -> None:
    remote = f"file://{tmp_path / 'remote'}"
    with tessera.Repo(tmp_path / "home") as repo:
        assert repo.commit_distributed("ds", source, LocalExecutor(3), remote=remote).version.hash == plain_hash
        assert repo.commit("ds", source, executor=LocalExecutor(2), remote=remote).hash == plain_hash


def test_distributed_commit_follows_the_exclude_rules(tmp_path: Path) -> None:
    """`.tesseraignore` and `excludes` lines (a `dir/` pattern: directories are asked with a trailing "/")
    leave out the same paths as in a plain commit, split or not; `status` then finds the directory clean."""
    src = tmp_path / "src"
    write_random(src / "big" / "one.bin", 1 << 20, 1)
    write_random(src / "big" / "cache" / "skip.bin", 1 << 20, 2)
    write_random(src / "mid" / "two.bin", 1 << 19, 3)
    (src / "mid" / "run.log").write_text("noise\n")
    (src / "mid" / "cache").write_text("a file named cache stays: `cache/` matches directories only\n")
    (src / "top.txt").write_text("top\n")
    (src / ".tesseraignore").write_text("*.log\n")
    remote = f"file://{tmp_path / 'remote'}"
    with tessera.Repo(tmp_path / "plain") as repo:
        plain = repo.commit_dir("ds", src, excludes=["cache/"])
        assert {e.path for e in plain.version.walk() if e.is_file} == {
            ".tesseraignore", "big/one.bin", "mid/two.bin", "mid/cache", "top.txt"}
    assert plan_units(src, 4).split, "4 tasks split the tree: the rules are applied on split units too"
    for tasks in (1, 4):
        with tessera.Repo(tmp_path / f"home{tasks}") as repo:
            res = repo.commit_distributed("ds", src, LocalExecutor(tasks), remote=remote, excludes=["cache/"])
            assert res.version.hash == plain.version.hash, tasks
            assert res.stats.excluded == plain.stats.excluded == 2, (tasks, res.stats)
            assert res.stats.dirs == plain.stats.dirs and res.stats.files == plain.stats.files
            assert repo.status(src).changes == []


def _tessera(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tessera", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TESSERA_HOME": str(home)}, stdin=subprocess.DEVNULL)


def test_a_fresh_home_mounts_and_verifies_a_ray_commit(ray_cluster: str, source: Path, plain_hash: str,
                                                      tmp_path: Path, s3_bucket: str) -> None:
    with tessera.Repo(tmp_path / "driver") as repo:
        repo.commit_distributed("ds", source, RayExecutor(tasks=2), remote=s3_bucket)
    fresh = tmp_path / "fresh"
    assert _tessera(fresh, "remote", "add", "origin", s3_bucket).returncode == 0
    verify = _tessera(fresh, "verify", f"ds@{plain_hash}", str(source))
    assert verify.returncode == 0 and "ok:" in verify.stdout, verify.stderr
    why = fuse_unavailable_reason()
    if why is not None:
        pytest.skip(f"FUSE unavailable here: {why}")
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = _tessera(fresh, "mount", f"ds@{plain_hash}", str(mp))
    assert p.returncode == 0, p.stderr
    try:
        assert tree_digest(mp) == tree_digest(source)
    finally:
        assert _tessera(fresh, "umount", str(mp)).returncode == 0
    assert not is_mounted(str(mp))
    fsck = _tessera(fresh, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_task_killed_midway_is_retried(ray_cluster: str, source: Path, plain_hash: str, tmp_path: Path,
                                         s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "killed-once"
    # the first task to upload a pack SIGKILLs its worker process right after; Ray starts it again
    monkeypatch.setenv("TESSERA_CRASH_ONCE", f"ray-unit-uploaded:{marker}")
    with tessera.Repo(tmp_path / "driver") as repo:
        res = repo.commit_distributed("ds", source, RayExecutor(tasks=2), remote=s3_bucket)
        assert res.version.hash == plain_hash
    assert marker.exists(), "no task was killed: the test proved nothing"
    monkeypatch.delenv("TESSERA_CRASH_ONCE")
    fresh = tmp_path / "fresh"
    assert _tessera(fresh, "remote", "add", "origin", s3_bucket).returncode == 0
    out = tmp_path / "out"
    p = _tessera(fresh, "export", f"ds@{plain_hash}", str(out))
    assert p.returncode == 0, p.stderr
    assert tree_digest(out) == tree_digest(source)
    assert _tessera(fresh, "fsck").returncode == 0


def test_cli_ray_joins_a_cluster_by_address(ray_cluster: str, source: Path, plain_hash: str, tmp_path: Path,
                                            s3_bucket: str) -> None:
    home = tmp_path / "home"
    assert _tessera(home, "remote", "add", "origin", s3_bucket).returncode == 0
    p = _tessera(home, "commit", "ds", str(source), "--tasks", "2", "--stats", "--ray", ray_cluster)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"ds@{plain_hash}"
    log = json.loads(_tessera(home, "log", "ds", "--json").stdout)
    assert [e["hash"] for e in log] == [plain_hash]
    # what it needs from the remote is already there: a push sends nothing
    assert "already has" in _tessera(home, "push", "ds").stdout


def test_ray_commit_errors_are_one_line(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    p = _tessera(home, "commit", "ds", str(source), "--ray=127.0.0.1:1")  # no remote: said before joining Ray
    assert p.returncode == 3 and p.stderr.startswith("error: no remote configured") and \
        len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = _tessera(home, "commit", "ds", str(source), "--tasks", "2")
    assert p.returncode == 2 and "--tasks and --remote go with --ray" in p.stderr
    assert _tessera(home, "remote", "add", "origin", f"file://{tmp_path / 'remote'}").returncode == 0
    p = _tessera(home, "commit", "ds", str(tmp_path / "nope"), "--ray=127.0.0.1:1")  # said before joining Ray
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path / 'nope'}: no such directory", p.stderr


def test_nothing_imports_ray_unless_asked() -> None:
    code = ("import sys, tessera, tessera.repo, tessera.cli, tessera.cli.core, tessera.distributed, "
            "tessera.raycluster; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
