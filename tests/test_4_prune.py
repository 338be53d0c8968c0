"""Forgetting and pruning on a shared remote: tombstones, push sessions, prune plans, with the real moto
S3 server (tests/s3_fixtures.py) and faults from tests/fault_proxy.py; margins shrunk to seconds.

The heavy one: two homes on one bucket, home A forgetting and pruning in a loop while home B pushes
versions that share chunks with forgotten ones; afterwards a fresh home exports and verifies every version
in the remote history, and the forgotten versions' own packs are gone (>= 20 rounds with TESSERA_SOAK=1,
as `make bench` runs it; fewer in `make test`).

Commands given extra environment (a failpoint, other credentials) run as real processes; the rest run
`tessera.cli.main` in this process (the same output and exit code, no interpreter start per call).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from inprocess import tessera_main
from trees import tree_digest, write_random

import tessera
from tessera.catalog.lifecycle_state import set_lifecycle_setting
from tessera.config import RepoSettings
from tessera.errors import NotFound, PreconditionFailed, UsageError
from tessera.remote import open_transport
from tessera.remote import memory
from tessera.remote.wire import VersionObject, decode_pack_list, pack_list_key, version_key
from tessera.retention import KeepPolicy

pytestmark = pytest.mark.s3

PACK = 256 * 1024
MARGIN = "2s"
SOAK = os.environ.get("TESSERA_SOAK") == "1"


def env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TESSERA_HOME": str(home), **extra}


def tess(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`tessera ARGS`: with ``extra`` environment, the console script in its own process; else its entry
    point (`tessera.cli.main`) in this one (tests/inprocess.py)."""
    if extra:
        return subprocess.run(["tessera", *args], capture_output=True, text=True, env=env(home, **extra),
                              stdin=subprocess.DEVNULL, timeout=300)
    return tessera_main(home, *args)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("tessera: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def make_home(path: Path, url: str, *, margin: str = MARGIN, expiry: str = "30s") -> Path:
    from tessera.catalog.remote_state import add_remote

    with tessera.Repo(path, settings=RepoSettings(pack_target=PACK)) as r:
        for key, value in (("prune.margin", margin), ("prune.sweep_window", "20s"), ("push.session_expiry", expiry),
                           ("prune.max_clock_skew", "60s")):
            set_lifecycle_setting(r.catalog, key, value)
        add_remote(r.catalog, "origin", url, default=True)
    return path


def commit_and_push(home: Path, src: Path, steps: int, build: Any = None) -> tuple[list[str], dict[str, Any]]:
    """Commit ``steps`` versions of dataset ds (``build(src, step)``, default `pool_tree`) and push them
    all (the library, in this process: setup, not what is under test). Returns (refs, digests by hash)."""
    refs: list[str] = []
    digests: dict[str, Any] = {}
    with tessera.Repo(home) as r:
        for step in range(steps):
            (build or pool_tree)(src, step)
            v = r.commit("ds", src)
            refs.append(v.ref)
            digests[v.hash] = tree_digest(src)
        r.push("ds")
    return refs, digests


def bucket_state(url: str) -> dict[str, tuple[int, str | None]]:
    with open_transport(url) as t:
        return {i.key: (i.size, i.etag) for i in t.list("")}


def pool_tree(root: Path, step: int, pool: int = 12, seed: int = 0) -> None:
    """Step ``step`` of a tree drawn from a fixed pool of files: versions share most chunks with older
    ones (forgotten or not), and each step adds one file of its own."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(seed * 1000 + step)
    for i in sorted(rng.sample(range(pool), 4)):
        write_random(root / f"pool{i:02d}.bin", 300_000 + 7_000 * i, 500 + i)
    write_random(root / f"own{step:03d}.bin", 200_000, 10_000 + seed * 1000 + step)
    (root / "step.txt").write_text(f"{seed} {step}\n")


def remote_versions(url: str, dataset: str) -> list[str]:
    """The version hashes of ``dataset`` in the remote history (tombstones honoured), newest last."""
    with open_transport(url) as t:
        gone = {"history/" + i.key.removeprefix("tombstones/") for i in t.list(f"tombstones/{dataset}/")}
        keys = sorted(i.key for i in t.list(f"history/{dataset}/") if i.key not in gone)
    return list(dict.fromkeys(k.rsplit("-", 1)[1] for k in keys))


def reachable_packs(url: str, hashes: list[str]) -> set[str]:
    with open_transport(url) as t:
        out: set[str] = set()
        for h in hashes:
            v = VersionObject.from_bytes(h, t.get(version_key(h)), h)
            out.update(v.packs)  # format 1
            for shard in v.pack_lists:  # format 2
                out.update(decode_pack_list(shard, t.get(pack_list_key(shard)), shard))
        return out


def pack_keys(url: str) -> set[str]:
    with open_transport(url) as t:
        return {i.key.removeprefix("packs/") for i in t.list("packs/")}


def fresh_home_verifies(tmp: Path, url: str, dataset: str, digests: dict[str, Any]) -> list[str]:
    """A fresh home pulls and verifies every version of the remote history against the recorded trees."""
    home = tmp / f"fresh-{uuid.uuid4().hex[:6]}"
    ok(tess(home, "remote", "add", "origin", url))
    hashes = remote_versions(url, dataset)
    assert hashes
    for h in hashes:
        out = tmp / f"out-{h[:12]}"
        ok(tess(home, "pull", f"{dataset}@{h}"))
        ok(tess(home, "export", f"{dataset}@{h}", str(out)))
        ok(tess(home, "verify", f"{dataset}@{h}", str(out)))
        if h in digests:  # (JSON round trips: recorded digests may have come through a file)
            assert json.loads(json.dumps(tree_digest(out))) == json.loads(json.dumps(digests[h])), h
        shutil.rmtree(out)
    fsck = ok(tess(home, "fsck"))
    assert fsck.startswith("ok:"), fsck
    return hashes


# -- transports: the conditional writes and clocks prune relies on --------------------------------------

@pytest.fixture(params=["memory", "local", "s3"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        name = f"p{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        memory.reset(name)
    elif request.param == "local":
        yield f"file://{tmp_path}/remote"
    else:
        yield request.getfixturevalue("s3_bucket")


def test_conditional_replace_and_modified_times(any_url: str) -> None:
    with open_transport(any_url, retries=1) as t:
        etag = t.put_conditional("sessions/a", b"one")
        with pytest.raises(PreconditionFailed):
            t.put_conditional("sessions/a", b"two")  # If-None-Match
        with pytest.raises(PreconditionFailed):
            t.put_conditional("sessions/a", b"two", if_match="0" * 32)
        etag2 = t.put_conditional("sessions/a", b"two", if_match=etag)
        assert etag2 != etag and t.get("sessions/a") == b"two"
        t.delete("sessions/a")
        with pytest.raises(NotFound):
            t.put_conditional("sessions/a", b"three", if_match=etag2)
        t.put("packs/x", b"x")
        info = t.head("packs/x")
        assert info is not None and info.modified is not None
        assert abs(info.modified - t.server_time()) < 5
        assert [i.modified for i in t.list("packs/")] == [pytest.approx(info.modified, abs=1.0)]


# -- forget --remote and prune ----------------------------------------------------------------------

def test_forget_remote_then_prune_removes_unique_packs_and_keeps_the_rest(tmp_path: Path, s3_bucket: str) -> None:
    home = make_home(tmp_path / "a", s3_bucket)
    src = tmp_path / "src"
    with tessera.Repo(home) as r:
        digests = {}
        for step in range(6):
            pool_tree(src, step)
            digests[r.commit("ds", src).hash] = tree_digest(src)
        r.tag(f"ds@{list(digests)[1]}", "keepme")
        r.push("ds")
    every = list(digests)
    dry = json.loads(ok(tess(home, "forget", "--remote", "origin", "ds", "--keep-last", "2", "--dry-run", "--json")))
    assert dry["forgotten"] == 3 and dry["freed_bytes"] > 0
    out = ok(tess(home, "forget", "--remote", "origin", "ds", "--keep-last", "2"))
    assert "remote head" in out and "tag keepme" in out and "forgot 3 versions on origin" in out
    kept = [every[1], every[4], every[5]]
    assert remote_versions(s3_bucket, "ds") == kept
    assert len(json.loads(ok(tess(home, "log", "ds", "--json")))) == 6  # the local history is untouched
    packs_before = pack_keys(s3_bucket)
    first = json.loads(ok(tess(home, "prune", "--json")))
    assert first["deleted"] == 0 and first["planned"] > 0  # the first mark only plans
    second = json.loads(ok(tess(home, "prune", "--wait", "--json")))
    assert second["deleted"] > 0 and second["deleted_bytes"] > 0
    packs_after = pack_keys(s3_bucket)
    assert packs_after == reachable_packs(s3_bucket, kept) < packs_before
    with open_transport(s3_bucket) as t:
        for h in every:
            assert (t.head(version_key(h)) is not None) == (h in kept)
    fresh_home_verifies(tmp_path, s3_bucket, "ds", digests)
    # another home's push cannot resurrect what was forgotten, even with no record of the remote at all
    ok(tess(home, "remote", "remove", "origin"))
    ok(tess(home, "remote", "add", "origin", s3_bucket))
    pushed = ok(tess(home, "push", "ds"))
    assert remote_versions(s3_bucket, "ds") == kept, pushed


def test_push_killed_midway_keeps_its_objects_until_its_session_expires(tmp_path: Path, s3_bucket: str) -> None:
    a = make_home(tmp_path / "a", s3_bucket, expiry="9s")
    b = make_home(tmp_path / "b", s3_bucket, expiry="9s")
    src_a, src_b = tmp_path / "src-a", tmp_path / "src-b"
    commit_and_push(a, src_a, 1)
    ok(tess(a, "prune"))  # layout 2: from now on pushes open sessions
    write_random(src_b / "big.bin", 2 << 20, 77)  # 8 packs of 256 KiB
    with tessera.Repo(b) as r:
        ref_b = r.commit("other", src_b).ref
    with open_transport(s3_bucket) as t:
        before = {i.key for i in t.list("packs/")}
        killed = tess(b, "push", "other", TESSERA_CRASH_AT="push-after-pack")
        assert killed.returncode == -9, killed.stderr
        (session,) = list(t.list("sessions/"))
        assert session.modified is not None
        expires = session.modified + 9 + 1  # by the remote's clock (to the second)
        landed = {i.key for i in t.list("packs/")} - before
        assert landed  # packs of B's push are on the remote, referenced by nothing yet
        pruned = 0
        while t.server_time() < expires - 5:  # prune cycles (a margin apart) while B's session still lives
            report = json.loads(ok(tess(a, "prune", "--wait", "--json")))
            if t.server_time() < expires:  # (a cycle that ended after the expiry may rightly sweep them)
                assert landed <= {i.key for i in t.list("packs/")}, report
                pruned += 1
        assert pruned >= 1
        while t.server_time() < expires + 1:
            time.sleep(0.5)
        expired = json.loads(ok(tess(a, "prune", "--wait", "--json")))
        assert expired["sessions_removed"] >= 1 or expired["deleted"] > 0
        ok(tess(a, "prune", "--wait"))
        assert not landed & {i.key for i in t.list("packs/")}  # swept once the session expired
    again = ok(tess(b, "push", "other"))  # B's record says those packs are there: the plans say otherwise
    assert "pushed other@" in again
    fresh = tmp_path / "fresh"
    ok(tess(fresh, "remote", "add", "origin", s3_bucket))
    ok(tess(fresh, "pull", ref_b))
    ok(tess(fresh, "export", ref_b, str(tmp_path / "out")))
    assert tree_digest(tmp_path / "out") == tree_digest(src_b)


B_SCRIPT = textwrap.dedent('''
    import json, os, random, shutil, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from trees import tree_digest
    import tessera
    from tessera.errors import TesseraError
    from test_4_prune import pool_tree
    home, src, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    digests = {}
    errors = []
    resent = 0
    step = 100
    with tessera.Repo(home) as repo:
        while not stop.exists():
            pool_tree(src, step, seed=1)
            v = repo.commit("ds", src)
            digests[v.hash] = tree_digest(src)
            try:
                resent += repo.push("ds").resent
            except TesseraError as exc:
                errors.append(str(exc))
            step += 1
            time.sleep(0.3)
    Path(sys.argv[5]).write_text(json.dumps({"digests": digests, "errors": errors, "steps": step - 100,
                                             "resent": resent}))
''')


def test_two_homes_forget_and_prune_while_pushing(tmp_path: Path, s3_bucket: str) -> None:
    """Home A forgets and prunes in a loop (>= 20 rounds with TESSERA_SOAK=1, else 10) while home B
    pushes versions sharing chunks with forgotten ones. Afterwards a fresh home reads and verifies every version of the remote history,
    and the forgotten versions' own packs are gone."""
    a = make_home(tmp_path / "a", s3_bucket, expiry="10s")
    b = make_home(tmp_path / "b", s3_bucket, expiry="10s")
    src_b = tmp_path / "src-b"
    digests: dict[str, Any] = {}
    with tessera.Repo(b) as repo:
        for step in range(4):
            pool_tree(src_b, step, seed=1)
            v = repo.commit("ds", src_b)
            digests[v.hash] = tree_digest(src_b)
        repo.push("ds")
    stop = tmp_path / "stop"
    result = tmp_path / "b.json"
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", B_SCRIPT, str(b), str(src_b), str(stop), tests_dir, str(result)],
                            env=env(b, PYTHONPATH=tests_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    rounds = 0
    swept = 0
    try:
        with tessera.Repo(a) as repo:
            deadline = time.monotonic() + 240
            while rounds < (20 if SOAK else 10) and time.monotonic() < deadline:
                try:
                    repo.forget_remote("ds", KeepPolicy(last=2), remote="origin")
                except NotFound:
                    pass  # B has not pushed anything new yet
                report = repo.prune("origin")
                swept += report.deleted
                rounds += 1
                time.sleep(0.5)
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    b_result = json.loads(result.read_text())
    digests.update(b_result["digests"])
    assert not b_result["errors"], b_result["errors"]
    assert rounds >= (20 if SOAK else 10) and swept > 0 and b_result["steps"] >= 8, (rounds, swept, b_result["steps"])
    with tessera.Repo(a) as repo:  # B has stopped: forget once more and sweep all the way
        repo.forget_remote("ds", KeepPolicy(last=2), remote="origin")
        repo.prune("origin", wait=True)
        repo.prune("origin", wait=True)
    kept = fresh_home_verifies(tmp_path, s3_bucket, "ds", digests)
    assert len(kept) == 2
    assert pack_keys(s3_bucket) == reachable_packs(s3_bucket, kept)  # every other pack is gone
    assert len(digests) > len(kept) + 8
    # B relied on objects of forgotten versions that a sweep had taken, noticed, and sent them again.
    # Whether a sweep takes one in time depends on the interleaving: asserted in the 20-round soak
    # (make bench); the properties above hold whatever the interleaving.
    if SOAK:
        assert b_result["resent"] > 0, b_result["resent"]


def test_lazy_reader_of_a_pruned_version_says_pruned(tmp_path: Path, s3_bucket: str) -> None:
    a = make_home(tmp_path / "a", s3_bucket)

    def own(src: Path, step: int) -> None:  # nothing shared: the first version's packs are its own
        shutil.rmtree(src, ignore_errors=True)
        write_random(src / f"own{step:03d}.bin", 600_000, 40 + step)

    refs, _ = commit_and_push(a, tmp_path / "src", 3, own)
    c = tmp_path / "c"
    ok(tess(c, "remote", "add", "origin", s3_bucket))
    ok(tess(c, "log", "ds"))  # metadata only: reads would be lazy
    ok(tess(a, "forget", "--remote", "origin", refs[0]))
    ok(tess(a, "prune", "--wait"))
    one_line_error(tess(c, "cat", refs[0], "own000.bin"), "pruned")


# -- bad input ------------------------------------------------------------------------------------------

def test_remote_bad_input_is_one_line_and_changes_nothing(tmp_path: Path, s3_bucket: str) -> None:
    a = make_home(tmp_path / "a", s3_bucket)
    refs, _ = commit_and_push(a, tmp_path / "src", 3)
    before = bucket_state(s3_bucket)
    one_line_error(tess(a, "forget", "--remote", "origin", "ds"), "needs a keep rule", "--keep-last 1")
    one_line_error(tess(a, "forget", "--remote", "origin", "nope", "--keep-last", "1"), "has no dataset 'nope'")
    one_line_error(tess(a, "forget", "--remote", "origin", "ds@abcdef12"), "no version ds@abcdef12")
    one_line_error(tess(a, "forget", "--remote", "origin", refs[-1]), "remote head")
    one_line_error(tess(a, "forget", "--remote", "nowhere", "ds", "--keep-last", "1"), "unknown remote 'nowhere'")
    one_line_error(tess(a, "prune", "--remote", "nowhere"), "unknown remote 'nowhere'")
    assert bucket_state(s3_bucket) == before


def test_prune_refuses_a_skewed_clock(tmp_path: Path, s3_bucket: str, fault_proxy: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_home(tmp_path / "a", s3_bucket)
    commit_and_push(a, tmp_path / "src", 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    before = bucket_state(s3_bucket)
    fault_proxy.skew_clock(3600)
    err = one_line_error(tess(a, "prune"), "clock", "s behind", "refusing to prune")
    assert 3590 <= int(err.split("clock is ")[1].split(" s ")[0]) <= 3610, err
    fault_proxy.skew_clock(-90)
    one_line_error(tess(a, "prune"), "clock", "ahead of", "prune.max_clock_skew")
    fault_proxy.skew_clock(20)  # within the allowed 60 s
    ok(tess(a, "prune", "--dry-run"))
    assert bucket_state(s3_bucket) == before


@pytest.fixture
def deny_delete(s3_env: str) -> Any:
    """Credentials for a moto IAM user that may do anything on S3 but delete; moto checks signatures and
    policies from now until the test ends."""
    import boto3

    from s3_fixtures import _set_auth_count

    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=s3_env, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    user = f"nodelete-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="no-delete", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    iam.close()
    _set_auth_count(s3_env, "0")
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        _set_auth_count(s3_env, "inf")


def test_remote_without_delete_permission(tmp_path: Path, s3_bucket: str, request: pytest.FixtureRequest,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_home(tmp_path / "a", s3_bucket)
    refs, _ = commit_and_push(a, tmp_path / "src", 3)
    before = bucket_state(s3_bucket)
    creds = request.getfixturevalue("deny_delete")
    one_line_error(tess(a, "prune", **creds), "permission to delete", "nothing was changed")
    one_line_error(tess(a, "forget", "--remote", "origin", "ds", "--keep-last", "1", **creds),
                   "permission to delete", "nothing was changed")
    assert json.loads(ok(tess(a, "forget", "--remote", "origin", "ds", "--keep-last", "1", "--dry-run", "--json",
                              **creds)))["forgotten"] == 2
    for name, value in creds.items():  # moto now checks keys: list the bucket as the allowed user
        monkeypatch.setenv(name, value)
    assert bucket_state(s3_bucket) == before


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Any:
    """A directory that becomes read-only (a tmpfs remounted ro) when ``make_readonly()`` is called."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.decode().strip()}")

    def make_readonly() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    yield mnt, make_readonly
    subprocess.run(["umount", "-l", str(mnt)])


def test_read_only_file_remote(tmp_path: Path, readonly_dir: Any) -> None:
    mnt, make_readonly = readonly_dir
    url = f"file://{mnt}/remote"
    a = make_home(tmp_path / "a", url)
    commit_and_push(a, tmp_path / "src", 3)
    make_readonly()
    before = bucket_state(url)
    one_line_error(tess(a, "prune"), "permission to delete", "read-only")
    one_line_error(tess(a, "forget", "--remote", "origin", "ds", "--keep-last", "1"), "permission to delete")
    assert bucket_state(url) == before


def test_file_remote_forget_and_prune(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/remote"
    a = make_home(tmp_path / "a", url)
    _, digests = commit_and_push(a, tmp_path / "src", 3)
    ok(tess(a, "forget", "--remote", "origin", "ds", "--keep-last", "1"))
    ok(tess(a, "prune"))
    ok(tess(a, "prune", "--wait"))
    kept = fresh_home_verifies(tmp_path, url, "ds", digests)
    assert pack_keys(url) == reachable_packs(url, kept)
    with pytest.raises(UsageError):
        from tessera.retention import parse_duration

        parse_duration("soon")


def test_partly_dead_remote_packs_are_reported(tmp_path: Path) -> None:
    """A pack a kept version still uses that also holds chunks only a forgotten version used: prune says
    how many bytes a repack would free (and that remote repacking is not done yet)."""
    url = f"file://{tmp_path}/remote"
    home = tmp_path / "a"
    with tessera.Repo(home, settings=RepoSettings(pack_target=32 << 20)) as r:
        src = tmp_path / "src"
        write_random(src / "big.bin", 6 << 20, 1)
        r.commit("ds", src)
        with open(src / "big.bin", "r+b") as f:  # rewrite a stretch in the middle: a few chunks change
            f.seek(3 << 20)
            f.write(os.urandom(300_000))
        r.commit("ds", src)
    ok(tess(home, "remote", "add", "origin", url))
    ok(tess(home, "push", "ds"))
    ok(tess(home, "forget", "--remote", "origin", "ds", "--keep-last", "1"))
    report = json.loads(ok(tess(home, "prune", "--dry-run", "--json")))
    (partial,) = report["partial"]
    assert 300_000 <= partial["dead_bytes"] < partial["size"] / 2, partial
    assert "repacking remote packs is not implemented yet" in ok(tess(home, "prune"))



@pytest.mark.allow_logs("ignoring an unreadable prune plan")
def test_an_unreadable_plan_is_never_swept_and_does_not_block_pushes(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/remote"
    home = make_home(tmp_path / "a", url)
    commit_and_push(home, tmp_path / "src", 2)
    ok(tess(home, "forget", "--remote", "origin", "ds", "--keep-last", "1"))
    bogus = tmp_path / "remote" / "prune" / "plans" / "0000000000000001-00000000deadbeef"
    bogus.parent.mkdir(parents=True)
    bogus.write_text('{"format": 1, "name": "not this one", "candidates": [["history/ds/x", 1, null, null]]}')
    ok(tess(home, "prune"))
    ok(tess(home, "prune", "--wait"))  # the readable plan is swept; the bogus one never
    assert bogus.exists() and not (tmp_path / "remote" / "prune" / "sweeping" / bogus.name).exists()
    pool_tree(tmp_path / "src", 7)
    ok(tess(home, "commit", "ds", str(tmp_path / "src")))
    assert "pushed ds@" in ok(tess(home, "push", "ds"))
    fresh_home_verifies(tmp_path, url, "ds", {})
