"""Push, pull and lazy reads against a real S3 server (moto on 127.0.0.1), faults injected by the proxy.

Every request counted here is a real HTTP request seen by `FaultProxy`; nothing is mocked.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from trees import tree_digest, write_random, write_text

pytestmark = pytest.mark.s3

PACK_TARGET = 1 << 20


# -- helpers ------------------------------------------------------------------------------------------

def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str, retried: bool = False) -> str:
    """Exactly one ``error:`` line, last, and no traceback. Before it only the CLI's one-line notices
    (``tessera: ... asking origin``) may come; with ``retried``, also logged retry lines (-v only)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    notices = [ln for ln in lines[:-1] if ln.startswith("tessera: ") and "WARNING" not in ln]
    retries = [ln for ln in lines[:-1] if retried and "WARNING" in ln and "retry" in ln]
    assert len(notices) + len(retries) == len(lines) - 1, proc.stderr
    lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def make_home(path: Path) -> Path:
    """A home with 1 MiB packs, so small test trees still span several packs."""
    from tessera.config import RepoSettings
    from tessera.repo import Repo

    Repo(path, settings=RepoSettings(pack_target=PACK_TARGET)).close()
    return path


def make_source(root: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty dir").mkdir()
    (root / "zero.bin").write_bytes(b"")
    (root / "a" / "hello.txt").write_text("hello tessera\n")
    (root / "naïve café.txt").write_text("unicode\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    os.symlink("a/hello.txt", root / "link")
    for i in range(60):
        (root / "small" / f"f{i:03d}.bin").parent.mkdir(exist_ok=True)
        (root / "small" / f"f{i:03d}.bin").write_bytes(rng.randbytes(rng.randint(1000, 40000)))
    write_random(root / "a" / "b" / "big.bin", 3 * 1024 * 1024 + 12345, seed + 1)
    write_text(root / "table.csv", 1024 * 1024, seed + 2)
    return root


def env(home: Path, **extra: str) -> dict[str, str]:
    return {"TESSERA_HOME": str(home), **extra}


def commit(cli, home: Path, name: str, src: Path, *args: str) -> str:
    return cli("commit", name, str(src), *args, env=env(home), check=True).stdout.strip().splitlines()[-1]


def bucket_keys(s3_client, url: str, prefix: str = "") -> list[str]:
    bucket, _, root = url.removeprefix("s3://").partition("/")
    keys = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{root}/{prefix}"):
        keys += [o["Key"][len(root) + 1:] for o in page.get("Contents", ())]
    return sorted(keys)


def put_object(s3_client, url: str, key: str, data: bytes) -> None:
    bucket, _, root = url.removeprefix("s3://").partition("/")
    s3_client.put_object(Bucket=bucket, Key=f"{root}/{key}", Body=data)


def get_object(s3_client, url: str, key: str) -> bytes:
    bucket, _, root = url.removeprefix("s3://").partition("/")
    return s3_client.get_object(Bucket=bucket, Key=f"{root}/{key}")["Body"].read()


def puts(proxy) -> int:
    return proxy.stats.methods.count("PUT")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("sync") / "src")


@pytest.fixture
def pushed(tmp_path: Path, s3_bucket: str, source: Path, cli):
    """Home A committed ``source`` as ds and pushed it to s3_bucket; returns (url, ref, home A)."""
    home_a = make_home(tmp_path / "a")
    ref = commit(cli, home_a, "ds", source, "-m", "first")
    cli("remote", "add", "origin", s3_bucket, env=env(home_a), check=True)
    out = cli("push", "ds", env=env(home_a), check=True).stdout
    assert "pushed ds@" in out
    return s3_bucket, ref, home_a


def fresh_home(tmp_path: Path, cli, url: str, name: str = "b") -> Path:
    home = tmp_path / name
    cli("remote", "add", "origin", url, env=env(home), check=True)
    return home


# -- the round trip -----------------------------------------------------------------------------------

def test_fresh_home_lists_logs_browses_exports_and_verifies(pushed, tmp_path: Path, source: Path, cli) -> None:
    url, ref, _ = pushed
    home = fresh_home(tmp_path, cli, url)
    e = env(home)
    remote_ds = json.loads(cli("datasets", "--remote", "origin", "--json", env=e, check=True).stdout)
    assert [(d["name"], d["head"], d["versions"]) for d in remote_ds] == [("ds", ref.split("@")[1], 1)]
    log = json.loads(cli("log", "ds", "--json", env=e, check=True).stdout)
    assert [x["hash"] for x in log] == [ref.split("@")[1]] and log[0]["message"] == "first"
    listing = cli("ls", "ds", "-R", env=e, check=True).stdout.split("\n")
    assert "a/b/big.bin" in listing and "link -> a/hello.txt" in listing and "empty dir/" in listing
    assert "first" in cli("show", ref[:12], env=e, check=True).stdout
    assert cli("cat", "ds", "a/hello.txt", env=e, check=True).stdout == "hello tessera\n"
    out = tmp_path / "out"
    cli("export", "ds", str(out), env=e, check=True)  # every chunk read lazily from S3
    assert tree_digest(out) == tree_digest(source)
    assert "ok:" in cli("verify", ref, str(source), env=e, check=True).stdout
    assert "ok:" in cli("fsck", env=e, check=True).stdout  # packs not local: versions still complete
    assert any((home / "cache" / "chunks").rglob("*-*"))
    # a full pull makes the version local; fsck then reads every chunk
    cli("pull", "ds", env=e, check=True)
    fsck = cli("fsck", env=e, check=True).stdout
    assert fsck.startswith("ok:") and " 0 packs" not in fsck


def test_python_api_pull_metadata_only_then_full(pushed, tmp_path: Path, source: Path) -> None:
    from tessera.repo import Repo

    url, ref, _ = pushed
    with Repo(tmp_path / "b", remote=url) as repo:
        v = repo.pull("ds", metadata_only=True)
        assert v.ref == ref
        assert not any(p.local for p in repo.catalog.packs())
        assert v.read_bytes("a/b/big.bin") == (source / "a" / "b" / "big.bin").read_bytes()
        v = repo.pull(ref)
        assert all(p.local for p in repo.catalog.packs()) and repo.fsck().ok


def test_push_v2_uploads_only_new_packs_and_again_nothing(tmp_path: Path, s3_bucket: str, fault_proxy,
                                                          monkeypatch: pytest.MonkeyPatch, source: Path,
                                                          s3_client) -> None:
    from tessera.repo import Repo

    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    src = tmp_path / "src"
    import shutil

    shutil.copytree(source, src, symlinks=True)
    repo = Repo(make_home(tmp_path / "a"), remote=s3_bucket)
    v1 = repo.commit("ds", src)
    before = puts(fault_proxy)
    r1 = repo.push("ds")
    packs1 = len(bucket_keys(s3_client, s3_bucket, "packs/"))
    assert r1.packs == packs1 > 2
    # packs + one chunk table for all of them + 1 meta pack + its metadata table + 1 pack list + version +
    # history, each one PUT (packs are below the single-PUT limit; remote format 2)
    assert puts(fault_proxy) - before == packs1 + 6 == r1.objects
    assert len(bucket_keys(s3_client, s3_bucket, "index/")) == 0 and r1.indexes == 1
    (src / "small" / "f007.bin").write_bytes(b"changed " * 1000)
    v2 = repo.commit("ds", src)
    before = puts(fault_proxy)
    r2 = repo.push(v2.ref)
    assert (r2.packs, r2.indexes, r2.meta_packs) == (1, 1, 1)
    # new pack, a chunk table for it, meta pack and its table, the pack list (one shard), version, history
    assert puts(fault_proxy) - before == 7
    assert len(bucket_keys(s3_client, s3_bucket, "packs/")) == packs1 + 1
    requests = fault_proxy.stats.requests
    for ref in ("ds", v1.ref):
        assert not repo.push(ref).uploaded
    assert fault_proxy.stats.requests == requests  # pushing again asks the remote nothing at all
    repo.close()


def test_push_name_sends_the_whole_history_and_tags(tmp_path: Path) -> None:
    import uuid

    from tessera.repo import Repo

    url = f"memory://hist-{uuid.uuid4().hex[:8]}/r"
    src = tmp_path / "src"
    src.mkdir()
    with Repo(tmp_path / "a") as a:
        refs = []
        for i in range(3):
            (src / "n.txt").write_text(f"version {i}\n")
            refs.append(a.commit("ds", src, message=f"v{i}").ref)
        a.tag(refs[0], "first")
        res = a.push("ds", url)
        assert res.ref == refs[-1] and res.objects > 0
        assert not a.push(refs[1], url).uploaded
    with Repo(tmp_path / "b", remote=url) as b:
        assert [e.message for e in b.log("ds")] == ["v2", "v1", "v0"]
        assert b.get("ds:first").ref == refs[0]
        assert b.get("ds").read_text("n.txt") == "version 2\n"
        assert b.get(refs[0]).read_text("n.txt") == "version 0\n"


def test_two_homes_push_the_same_dataset_concurrently(tmp_path: Path, s3_bucket: str, cli) -> None:
    homes = []
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        write_random(src / "data.bin", 300_000, seed=10 + i)
        (src / "who.txt").write_text(f"home {i}\n")
        home = make_home(tmp_path / f"h{i}")
        commit(cli, home, "shared", src, "-m", f"from {i}")
        cli("remote", "add", "origin", s3_bucket, env=env(home), check=True)
        homes.append(home)
    procs = [subprocess.Popen(["tessera", "push", "shared"], env={**os.environ, **env(h)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for h in homes]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    reader = fresh_home(tmp_path, cli, s3_bucket, "reader")
    log = json.loads(cli("log", "shared", "--json", env=env(reader), check=True).stdout)
    assert sorted(x["message"] for x in log) == ["from 0", "from 1"]
    for x in log:
        who = cli("cat", f"shared@{x['hash'][:12]}", "who.txt", env=env(reader), check=True).stdout
        assert who == f"home {x['message'][-1]}\n"
    # each home learns the other's version on its next use of the dataset's history
    assert "2 versions" in cli("datasets", "--remote", "origin", env=env(homes[0]), check=True).stdout


def test_push_killed_midway_resumes_and_a_fresh_clone_is_clean(tmp_path: Path, s3_bucket: str, fault_proxy,
                                                                monkeypatch: pytest.MonkeyPatch, source: Path,
                                                                s3_client, cli) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    home = make_home(tmp_path / "a")
    ref = commit(cli, home, "ds", source)
    cli("remote", "add", "origin", s3_bucket, env=env(home), check=True)
    killed = cli("push", "ds", env=env(home, TESSERA_CRASH_AT="push-after-pack"))
    assert killed.returncode == -9
    uploaded = bucket_keys(s3_client, s3_bucket)
    assert {k.split("/")[0] for k in uploaded} == {"packs"}  # nothing else yet: no reader sees a version
    from tessera.repo import Repo

    with Repo(home) as repo:
        total = len(repo.catalog.packs())
    assert len(uploaded) < total
    before = puts(fault_proxy)
    assert cli("datasets", "--remote", "origin", env=env(home), check=True).stdout == ""
    with Repo(home) as repo:  # packs whose upload was recorded before the kill (4 upload in parallel)
        recorded = len([k for (k,) in repo.catalog.query("SELECT key FROM remote_objects") if k.startswith("packs/")])
    assert recorded >= 1
    killed = cli("push", "ds", env=env(home, TESSERA_CRASH_AT="push-before-history"))
    assert killed.returncode == -9
    # packs not yet recorded, a chunk table, a metadata pack and its table, the pack list, the version
    assert puts(fault_proxy) - before == (total - recorded) + 5
    assert cli("datasets", "--remote", "origin", env=env(home), check=True).stdout == ""
    before = puts(fault_proxy)
    assert "pushed" in cli("push", "ds", env=env(home), check=True).stdout
    assert puts(fault_proxy) - before == 1  # only the history entry was still missing
    clone = fresh_home(tmp_path, cli, s3_bucket, "clone")
    cli("pull", ref, env=env(clone), check=True)
    assert cli("fsck", env=env(clone), check=True).stdout.startswith("ok:")
    out = tmp_path / "out"
    cli("export", ref, str(out), env=env(clone), check=True)
    assert tree_digest(out) == tree_digest(source)


def test_push_sigkilled_from_outside_at_a_random_moment(tmp_path: Path, s3_bucket: str, fault_proxy,
                                                        monkeypatch: pytest.MonkeyPatch, source: Path, cli) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    home = make_home(tmp_path / "a")
    ref = commit(cli, home, "ds", source)
    cli("remote", "add", "origin", s3_bucket, env=env(home), check=True)
    fault_proxy.delay_responses(0.2)  # every response: the push takes a few seconds
    proc = subprocess.Popen(["tessera", "push", "ds"], env={**os.environ, **env(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while fault_proxy.stats.methods.count("PUT") < 4 + random.Random().randrange(4) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    assert proc.wait(30) == -9
    fault_proxy.delay_responses(0.0)
    assert "pushed" in cli("push", "ds", env=env(home), check=True).stdout
    clone = fresh_home(tmp_path, cli, s3_bucket, "clone")
    cli("pull", ref, env=env(clone), check=True)
    assert cli("fsck", env=env(clone), check=True).stdout.startswith("ok:")


# -- faults -------------------------------------------------------------------------------------------

def test_push_survives_resets_503s_and_slow_responses(tmp_path: Path, s3_bucket: str, fault_proxy,
                                                      monkeypatch: pytest.MonkeyPatch, source: Path, cli) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    home = make_home(tmp_path / "a")
    ref = commit(cli, home, "ds", source)
    cli("remote", "add", "origin", s3_bucket, env=env(home), check=True)
    fault_proxy.reset_next(2)
    fault_proxy.fail_next(2, 503, after=3)
    fault_proxy.drop_responses(1, after=6)
    fault_proxy.delay_responses(2.5, count=1)
    proc = cli("-v", "push", "ds", env=env(home, TESSERA_REMOTE_TIMEOUT="1"), check=True)
    assert "pushed" in proc.stdout and "retry" in proc.stderr
    assert fault_proxy.stats.resets == 2 and fault_proxy.stats.failures == 2
    more = tmp_path / "more"  # `source` is shared by the module's tests: change a copy
    shutil.copytree(source, more, symlinks=True)
    (more / "extra.txt").write_text("one more version\n")
    commit(cli, home, "ds", more)
    fault_proxy.fail_next(2, 503)
    proc = cli("push", "ds", env=env(home, TESSERA_REMOTE_TIMEOUT="1"), check=True)
    assert fault_proxy.stats.failures == 4 and "retry" not in proc.stderr  # retries are chatter: -v only
    clone = fresh_home(tmp_path, cli, s3_bucket, "clone")
    cli("pull", ref, env=env(clone), check=True)
    cli("pull", "ds", env=env(clone), check=True)
    assert cli("fsck", env=env(clone), check=True).stdout.startswith("ok:")


def test_push_during_outage_fails_in_one_line_then_rerun_completes(tmp_path: Path, s3_bucket: str, fault_proxy,
                                                                   monkeypatch: pytest.MonkeyPatch, source: Path,
                                                                   cli) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    home = make_home(tmp_path / "a")
    commit(cli, home, "ds", source)
    cli("remote", "add", "origin", s3_bucket, env=env(home), check=True)
    fault_proxy.fail_next(1000, 503, after=4)  # a few packs land, then the server fails for good
    proc = cli("push", "ds", env=env(home, TESSERA_REMOTE_RETRIES="2"))
    one_line_error(proc, 9, "failed after 3 attempts", retried=True)
    fault_proxy.clear()
    before = puts(fault_proxy)
    res = cli("push", "ds", env=env(home), check=True).stdout
    assert "pushed" in res
    assert puts(fault_proxy) - before < int(res.split(", ")[-1].split()[0]) + 4  # not everything again


# -- bad input ----------------------------------------------------------------------------------------

def test_malformed_url(home: Path, cli) -> None:
    for url in ("http://example.com/x", "s3://", "file://relative/path"):
        one_line_error(cli("remote", "add", "x", url), 2, "unsupported remote URL")
    cli("init", check=True)  # read commands (push) never create a home
    one_line_error(cli("push", "ds", "--remote", "nope"), 3, "unknown remote 'nope'")


def test_bucket_missing(tmp_path: Path, s3_env: str, source: Path, cli) -> None:
    home = make_home(tmp_path / "a")
    commit(cli, home, "ds", source)
    cli("remote", "add", "origin", "s3://no-such-bucket-tessera/p", env=env(home), check=True)
    one_line_error(cli("push", "ds", env=env(home)), 9, "bucket no-such-bucket-tessera does not exist")
    one_line_error(cli("datasets", "--remote", "origin", env=env(home)), 9, "does not exist")
    fresh = fresh_home(tmp_path, cli, "s3://no-such-bucket-tessera/p", "fresh")
    one_line_error(cli("log", "ds", env=env(fresh)), 9, "does not exist")


def test_wrong_credentials(pushed, tmp_path: Path, moto_auth: dict[str, str], cli) -> None:
    url, ref, home_a = pushed
    bad = {"AWS_ACCESS_KEY_ID": moto_auth["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": "wrong"}
    fresh = fresh_home(tmp_path, cli, url)
    one_line_error(cli("log", "ds", env=env(fresh, **bad)), 10, "access denied")
    one_line_error(cli("datasets", "--remote", "origin", env=env(home_a, **bad)), 10, "access denied")
    one_line_error(cli("pull", ref, env=env(fresh, **bad)), 10, "access denied")
    # (moto's signature check refuses ListObjectsV2 even with the right secret, so no "good key" listing here)


def test_unreachable_and_hung_endpoints_fail_within_the_timeout(tmp_path: Path, s3_env: str, cli) -> None:
    home = fresh_home(tmp_path, cli, "s3://bucket/p")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    proc = cli("log", "ds", env=env(home, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", TESSERA_REMOTE_RETRIES="1"))
    one_line_error(proc, 9, "failed after 2 attempts", retried=True)
    assert time.monotonic() - start < 10
    with socket.socket() as hung:  # accepts connections, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        start = time.monotonic()
        proc = cli("log", "ds", env=env(home, AWS_ENDPOINT_URL=f"http://127.0.0.1:{hung.getsockname()[1]}",
                                        TESSERA_REMOTE_RETRIES="1", TESSERA_REMOTE_TIMEOUT="1"))
        one_line_error(proc, 9, "failed after 2 attempts", retried=True)
        assert time.monotonic() - start < 10


def test_remote_has_the_dataset_but_not_the_version(pushed, tmp_path: Path, cli) -> None:
    url, ref, _ = pushed
    fresh = fresh_home(tmp_path, cli, url)
    one_line_error(cli("pull", "ds@deadbeef00", env=env(fresh)), 3, "no version deadbeef00", "origin")
    # the dataset is known here now: a bad prefix is a local answer, with a hint
    one_line_error(cli("ls", "ds@deadbeef00", env=env(fresh)), 3, "no version deadbeef00", "tessera pull")
    one_line_error(cli("pull", "other", env=env(fresh)), 3, "not in this home, nor on origin")
    one_line_error(cli("ls", "other", env=env(fresh)), 3, "unknown dataset 'other'")


def test_known_datasets_resolve_locally_without_asking_the_remote(pushed, tmp_path: Path, cli) -> None:
    """Local typos stay local and fast: with the remote unreachable (a dead endpoint), refs of a dataset
    this home has resolve (or fail) here; only an unknown dataset is looked for there, saying so."""
    url, ref, _ = pushed
    home = fresh_home(tmp_path, cli, url)
    cli("pull", "ds", "--metadata-only", env=env(home), check=True)
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
    e = env(home, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", TESSERA_REMOTE_RETRIES="0")
    # asking the dead endpoint would end in a remote error (exit 9): these answer locally
    for args in (("ls", "ds@000000"), ("diff", "ds@000000", "ds"), ("tag", "ds:nope", "v1"), ("show", "ds:nope")):
        one_line_error(cli(*args, env=e), 3, "ds")
    assert ref.split("@")[1][:12] in cli("log", "ds", env=e, check=True).stdout  # the local history
    assert cli("ls", ref, env=e).returncode == 0
    err = one_line_error(cli("ls", "unknown", env=e), 9)  # an unknown dataset is asked for, saying so
    assert "127.0.0.1" in err or "connect" in err.lower()
    assert "unknown is not in this home; asking origin" in cli("ls", "unknown", env=e).stderr


def test_remote_bytes_that_fail_their_hash(pushed, tmp_path: Path, s3_client, cli) -> None:
    url, ref, _ = pushed
    packs = bucket_keys(s3_client, url, "packs/")
    for key in packs:  # flip one byte in the middle of every pack
        data = bytearray(get_object(s3_client, url, key))
        data[len(data) // 2] ^= 0xFF
        put_object(s3_client, url, key, bytes(data))
    fresh = fresh_home(tmp_path, cli, url)
    assert cli("ls", "ds", env=env(fresh), check=True).returncode == 0  # metadata is intact
    one_line_error(cli("cat", "ds", "a/b/big.bin", env=env(fresh)), 5, "fails its hash check")
    one_line_error(cli("pull", "ds", env=env(fresh)), 5, "fails its hash check")
    assert not any(p.local for p in __import__("tessera").Repo(fresh).catalog.packs())
    meta = bucket_keys(s3_client, url, "meta/")[0]
    data = bytearray(get_object(s3_client, url, meta))
    data[-1] ^= 1
    put_object(s3_client, url, meta, bytes(data))
    other = fresh_home(tmp_path, cli, url, "other")
    assert cli("log", "ds", env=env(other), check=True).returncode == 0  # reads only the version object
    # the root tree is the metadata pack's last blob: walking the version fetches it, and it fails
    one_line_error(cli("ls", "ds", env=env(other)), 5, "/meta/")  # "fails its hash check" or "does not decode"


def _forge_version(s3_client, url: str, entries: list[dict]) -> str:
    """Write a version whose root tree has ``entries`` (hashes all consistent) under dataset ``evil``."""
    from tessera.format.pack import KIND_FILE, KIND_TREE
    from tessera.model import HistoryEntry
    from tessera.remote.wire import MetaPackBuilder, VersionObject, encode_history, history_key

    tree = json.dumps({"format": 1, "entries": entries}, sort_keys=True, separators=(",", ":")).encode()
    root = hashlib.sha256(tree).hexdigest()
    b = MetaPackBuilder()
    b.add(KIND_FILE, hashlib.sha256(b"").hexdigest(), b"")
    b.add(KIND_TREE, root, tree)
    meta, data = b.finish()
    put_object(s3_client, url, f"meta/{meta}", data)
    put_object(s3_client, url, f"versions/{root}", VersionObject(root, 1, 0, (meta,), ()).to_bytes())
    e = HistoryEntry("evil", root, None, time.time(), "mallory", "", {}, 1, 0)
    put_object(s3_client, url, history_key(e), encode_history(e))
    return root


@pytest.mark.parametrize("name", ["..", "/etc/passwd", "a\0b", "."])
def test_metadata_naming_unsafe_paths_is_rejected(tmp_path: Path, s3_bucket: str, s3_client, cli, name: str) -> None:
    _forge_version(s3_client, s3_bucket, [{"name": name, "kind": "file", "mode": 420, "size": 0,
                                           "id": hashlib.sha256(b"").hexdigest()}])
    fresh = fresh_home(tmp_path, cli, s3_bucket)
    one_line_error(cli("export", "evil", str(tmp_path / "out"), env=env(fresh)), 5, "unsafe name")
    assert not (tmp_path / "out").exists() and not (tmp_path / "passwd").exists()


def test_malformed_metadata_is_rejected(tmp_path: Path, s3_bucket: str, s3_client, cli) -> None:
    # a setuid file: a valid tree, but nothing a commit ever makes
    _forge_version(s3_client, s3_bucket, [{"name": "x", "kind": "file", "mode": 0o4755, "size": 0,
                                           "id": hashlib.sha256(b"").hexdigest()}])
    fresh = fresh_home(tmp_path, cli, s3_bucket)
    one_line_error(cli("ls", "evil", env=env(fresh)), 5, "bad file entry")
    put_object(s3_client, s3_bucket, "history/junk/0000000000000001-" + "ab" * 32, b"{not json")
    one_line_error(cli("log", "junk", env=env(fresh)), 5, "malformed")
    put_object(s3_client, s3_bucket, "history/junk2/0000000000000001-" + "ab" * 32,
               json.dumps({"format": 1, "dataset": "junk2", "hash": "ab" * 32, "parent": None, "time": 1.0,
                           "author": "a", "message": "", "meta": {}, "files": 0, "size": 0}).encode())
    one_line_error(cli("log", "junk2", env=env(fresh)), 5, "versions/abab")


# -- lazy mount -----------------------------------------------------------------------------------------

def _mount_or_skip(cli, home: Path, ref: str, mnt: Path) -> None:
    from fuse_probe import fuse_unavailable_reason

    why = fuse_unavailable_reason()
    if why is not None:
        pytest.skip(f"FUSE unavailable here: {why}")
    proc = cli("mount", ref, str(mnt), env=env(home), timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.fuse
def test_lazy_mount_reads_from_s3_and_survives_an_outage(pushed, tmp_path: Path, source: Path, fault_proxy,
                                                         monkeypatch: pytest.MonkeyPatch, cli) -> None:
    url, ref, _ = pushed
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    home = fresh_home(tmp_path, cli, url)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount_or_skip(cli, home, "ds", mnt)  # a fresh home: metadata fetched on first use
    try:
        assert tree_digest(mnt) == tree_digest(source)
        assert "ok:" in cli("verify", ref, str(mnt), env=env(home), check=True).stdout
    finally:
        cli("umount", str(mnt), env=env(home), check=True)
    cli("remote", "cache", "--clear", env=env(home), check=True)
    _mount_or_skip(cli, home, ref, mnt)
    try:
        fault_proxy.down()
        with pytest.raises(OSError) as err:
            (mnt / "a" / "b" / "big.bin").read_bytes()
        assert err.value.errno == errno.EIO
        assert sorted(os.listdir(mnt))[:2] == ["a", "empty dir"]  # still mounted and answering
        fault_proxy.up()
        assert (mnt / "a" / "b" / "big.bin").read_bytes() == (source / "a" / "b" / "big.bin").read_bytes()
    finally:
        fault_proxy.up()
        cli("umount", str(mnt), env=env(home), check=True)


def test_diverged_tag_is_kept_said_and_taken_with_from_remote(tmp_path: Path, source: Path, cli) -> None:
    """A pull keeps a local tag that names another version than the remote's tag, warns naming both,
    and `tag --from-remote` takes theirs; refusals are one line and change nothing."""
    url = "file://" + str(tmp_path / "remote")
    home_a = make_home(tmp_path / "a")
    v0 = commit(cli, home_a, "ds", source, "-m", "first")
    cli("tag", v0, "best", env=env(home_a), check=True)
    cli("push", "ds", "--remote", url, env=env(home_a), check=True)
    home_b = fresh_home(tmp_path, cli, url)
    cli("pull", "ds", env=env(home_b), check=True)
    work = tmp_path / "work"
    shutil.copytree(source, work)
    (work / "extra.txt").write_text("only in b\n")
    v1 = commit(cli, home_b, "ds", work, "-m", "mine")
    cli("tag", v1, "best", env=env(home_b), check=True)

    pulled = cli("pull", "ds", env=env(home_b), check=True)
    h0, h1 = v0.split("@")[1], v1.split("@")[1]
    assert f"tag ds:best is {h1[:12]} here but {h0[:12]} on origin" in pulled.stderr, pulled.stderr
    assert "tessera tag --from-remote ds:best" in pulled.stderr

    def best() -> str:
        tags = json.loads(cli("tags", "ds", "--json", env=env(home_b), check=True).stdout)
        return next(t["hash"] for t in tags if t["tag"] == "best")

    assert best() == h1  # ours kept
    for args, code, words in ((("tag", "--from-remote", "ds:nope"), 3, "has no tag ds:nope"),
                              (("tag", "--from-remote", "ds", "best"), 2, "NAME:TAG"),
                              (("tag", "--from-remote", "ds:best", "-r", "nosuch"), 3, "unknown remote"),
                              (("tag", "--delete", "--from-remote", "ds:best"), 2, "do not go together"),
                              (("tag", v1, "x", "-r", "origin"), 2, "--from-remote")):
        one_line_error(cli(*args, env=env(home_b)), code, words)
    assert best() == h1
    out = cli("tag", "--from-remote", "ds:best", env=env(home_b), check=True).stdout
    assert out.strip() == f"ds:best -> {v0} (was {h1[:12]})", out
    assert best() == h0
    assert cli("pull", "ds", env=env(home_b), check=True).stderr.count("warning") == 0
