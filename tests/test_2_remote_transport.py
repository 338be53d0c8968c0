"""Transport conformance: the same tests over memory, a local directory and S3 (moto on 127.0.0.1),
then S3-only failure modes (missing bucket, bad credentials, unreachable endpoint) and retries
through a fault-injecting proxy."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fault_proxy import FaultProxy  # fixtures come from s3_fixtures via tests/conftest.py
from tessera.errors import (
    AccessDenied,
    NotFound,
    PreconditionFailed,
    RemoteError,
    TransientRemoteError,
    UsageError,
)
from tessera.remote import ObjectInfo, Transport, open_transport
from tessera.remote import memory
from tessera.remote.retry import Retrying
from tessera.remote.s3 import S3Transport

MiB = 1024 * 1024
BACKENDS = ["memory", "local", "s3"]


@pytest.fixture(params=BACKENDS)
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty remote of each kind."""
    if request.param == "memory":
        name = f"t{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        memory.reset(name)
    elif request.param == "local":
        yield f"file://{tmp_path}/remote"
    else:
        yield request.getfixturevalue("s3_bucket")


@pytest.fixture
def transport(remote_url: str) -> Iterator[Transport]:
    with open_transport(remote_url, timeout=5, retries=2) as remote:
        yield remote


def _random(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _fill(remote: Transport, keys: list[str], workers: int = 16) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: remote.put(k, k.encode()), keys))


# -- conformance ---------------------------------------------------------------------------------


def test_put_get_overwrite_and_empty(transport: Transport) -> None:
    transport.put("packs/a", b"hello")
    assert transport.get("packs/a") == b"hello"
    transport.put("packs/a", b"bye")
    assert transport.get("packs/a") == b"bye"
    transport.put("empty", b"")
    assert transport.get("empty") == b""
    assert transport.head("empty") == ObjectInfo("empty", 0, transport.head("empty").etag)


def test_ranged_get(transport: Transport) -> None:
    data = _random(1000)
    transport.put("obj", data)
    assert transport.get("obj", 10, 20) == data[10:20]
    assert transport.get("obj", 990) == data[990:]
    assert transport.get("obj", None, 5) == data[:5]
    assert transport.get("obj", 995, 2000) == data[995:]
    assert transport.get("obj", 2000, 3000) == b""
    assert transport.get("obj", 5, 5) == b""
    with pytest.raises(UsageError):
        transport.get("obj", -1, 3)


def test_open_read_ranges(transport: Transport) -> None:
    data = _random(3 * MiB + 123, seed=3)
    transport.put("packs/p", data)
    with transport.open_read("packs/p", 1000, 2 * MiB + 7) as stream:
        assert stream.read(10) == data[1000:1010]
        assert stream.read(MiB) == data[1010:1010 + MiB]
        assert stream.read() == data[1010 + MiB:2 * MiB + 7]
        assert stream.read(5) == b""
    with transport.open_read("packs/p", 2 * MiB) as stream:  # open-ended
        assert b"".join(stream) == data[2 * MiB:]
    with transport.open_read("packs/p") as stream:
        assert stream.read(len(data) + 100) == data  # a short read only at the end
    with transport.open_read("packs/p", len(data) - 3, len(data) + 100) as stream:  # clipped
        assert stream.read() == data[-3:]
    for start, end in [(len(data), None), (len(data) + 5, None), (7, 7)]:
        with transport.open_read("packs/p", start, end) as stream:
            assert stream.read(10) == b"" and stream.read() == b""
    with pytest.raises(UsageError):
        transport.open_read("packs/p", -1)


def test_open_read_closed_early(transport: Transport) -> None:
    data = _random(8 * MiB, seed=4)
    transport.put("big", data)
    stream = transport.open_read("big", 5)
    assert stream.read(100) == data[5:105]
    stream.close()  # most of the range unread: the request is dropped
    stream.close()
    assert stream.read(10) == b""
    transport.put("small", b"abc")  # the transport still works (a fresh connection)
    assert transport.get("small") == b"abc"
    streams = [transport.open_read("big", i * MiB) for i in range(4)]
    assert [s.read(3) for s in streams] == [data[i * MiB:i * MiB + 3] for i in range(4)]
    for s in streams:
        s.close()


def test_open_read_missing_key(transport: Transport) -> None:
    for start, end in [(0, None), (0, 10), (4, 4), (100, None)]:
        with pytest.raises(NotFound):
            transport.open_read("nope", start, end)
    with pytest.raises(UsageError):
        transport.open_read("../x")


def test_head(transport: Transport) -> None:
    transport.put("dir/x", b"12345")
    info = transport.head("dir/x")
    assert info is not None and (info.key, info.size) == ("dir/x", 5)
    assert transport.head("dir/missing") is None
    assert transport.head("dir") is None  # a "directory" is not an object


def test_missing_key(transport: Transport, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        transport.get("nope")
    with pytest.raises(NotFound):
        transport.get("nope", 0, 10)
    with pytest.raises(NotFound):
        transport.get("nope", 4, 4)
    with pytest.raises(NotFound):
        transport.get_file("nope", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []  # no temporary file left behind
    transport.delete("nope")  # missing is fine


def test_delete(transport: Transport) -> None:
    transport.put("a/b", b"x")
    transport.delete("a/b")
    assert transport.head("a/b") is None
    assert list(transport.list()) == []


def test_list_sorted_by_prefix_and_resumable(transport: Transport) -> None:
    keys = ["packs/02", "packs/01", "index/01", "versions/ab", "packsx", "history/coco/2-x"]
    for key in keys:
        transport.put(key, key.encode())
    assert [i.key for i in transport.list()] == sorted(keys)
    assert [i.key for i in transport.list("packs/")] == ["packs/01", "packs/02"]
    assert [i.key for i in transport.list("packs")] == ["packs/01", "packs/02", "packsx"]
    assert [i.key for i in transport.list("history/co")] == ["history/coco/2-x"]
    assert [i.key for i in transport.list("nothing/")] == []
    assert [i.key for i in transport.list("packs", start_after="packs/01")] == ["packs/02", "packsx"]
    sizes = {i.key: i.size for i in transport.list()}
    assert sizes == {k: len(k) for k in keys}


def test_list_more_than_one_page(transport: Transport) -> None:
    keys = [f"meta/{i:05d}" for i in range(1005)]
    _fill(transport, keys)
    transport.put("other", b"x")
    listed = [i.key for i in transport.list("meta/")]
    assert listed == keys
    assert [i.key for i in transport.list("meta/", start_after="meta/00999")] == keys[1000:]


def test_put_file_multipart_with_progress_and_get_file(transport: Transport, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = _random(20 * MiB, seed=1)
    source.write_bytes(data)
    sent: list[int] = []
    transport.put_file("packs/big", str(source), progress=sent.append)
    assert sum(sent) == len(data)
    info = transport.head("packs/big")
    assert info is not None and info.size == len(data)
    if transport.url.startswith("s3://"):
        assert info.etag is not None and info.etag.endswith("-3")  # 3 parts of 8 MiB
    assert transport.get("packs/big", 9 * MiB, 9 * MiB + 10) == data[9 * MiB:9 * MiB + 10]

    target = tmp_path / "down" / "big.out"
    target.parent.mkdir()
    target.write_bytes(b"old contents")
    received: list[int] = []
    transport.get_file("packs/big", str(target), progress=received.append)
    assert target.read_bytes() == data
    assert sum(received) == len(data)
    assert os.listdir(target.parent) == ["big.out"]


def test_put_file_missing_source_is_a_local_error(transport: Transport, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        transport.put_file("k", str(tmp_path / "absent"))
    assert transport.head("k") is None


def test_conditional_put(transport: Transport) -> None:
    transport.put("versions/v1", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        transport.put("versions/v1", b"two", if_none_match=True)
    assert transport.get("versions/v1") == b"one"


def test_conditional_put_race_has_one_winner(transport: Transport) -> None:
    racers = 16
    barrier = threading.Barrier(racers)
    outcomes: list[int | None] = [None] * racers

    def race(i: int) -> None:
        barrier.wait()
        try:
            transport.put("history/coco/1-abc", f"writer {i}".encode(), if_none_match=True)
            outcomes[i] = 1
        except PreconditionFailed:
            outcomes[i] = 0

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [0] * (racers - 1) + [1]
    winner = outcomes.index(1)
    assert transport.get("history/coco/1-abc") == f"writer {winner}".encode()


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../b", "a//b", "a/./b", "trail/", "nul\0"])
def test_bad_keys_rejected(transport: Transport, key: str) -> None:
    with pytest.raises(UsageError):
        transport.put(key, b"x")
    with pytest.raises(UsageError):
        transport.get(key)


# -- URLs and backend specifics ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "http://example.com/x", "file://relative/x",
                                 "file:relative", "/abs/path", "memory://", "s3://b/../x", "s3://b?x=1",
                                 "gs://bucket", ""])
def test_bad_urls(url: str) -> None:
    with pytest.raises(UsageError) as err:
        open_transport(url)
    assert "s3://BUCKET" in str(err.value) and "\n" not in str(err.value)


def test_open_transport_wraps_in_retrying(tmp_path: Path) -> None:
    remote = open_transport(f"file://{tmp_path}", retries=3)
    assert isinstance(remote, Retrying) and remote.retries == 3
    assert remote.url == f"file://{tmp_path}"


def test_memory_buckets_are_shared_by_name() -> None:
    name = f"shared{uuid.uuid4().hex[:8]}"
    first, second = open_transport(f"memory://{name}"), open_transport(f"memory://{name}")
    first.put("k", b"v")
    assert second.get("k") == b"v"
    assert open_transport(f"memory://{name}/sub").head("k") is None
    memory.reset(name)
    assert second.head("k") is None


def test_local_leaves_no_temporaries(tmp_path: Path) -> None:
    remote = open_transport(f"file://{tmp_path}/r")
    remote.put("a/b", b"x")
    remote.put("a/c", b"y", if_none_match=True)
    assert os.listdir(tmp_path / "r" / ".tessera-tmp") == []
    assert [i.key for i in remote.list()] == ["a/b", "a/c"]
    with pytest.raises(UsageError):
        remote.put(".tessera-tmp/x", b"")


def test_import_is_cheap() -> None:
    code = "import sys, tessera.remote; print('boto3' in sys.modules or 'botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- S3 failure modes ----------------------------------------------------------------------------


def test_s3_missing_bucket_names_it(s3_env: str, tmp_path: Path) -> None:
    remote = open_transport("s3://no-such-bucket-here/repo", timeout=5, retries=1)
    calls: list[Callable[[], object]] = [
        lambda: remote.get("k"), lambda: remote.head("k"), lambda: list(remote.list()),
        lambda: remote.put("k", b"x"), lambda: remote.get_file("k", str(tmp_path / "f")),
    ]
    for call in calls:
        with pytest.raises(RemoteError, match="bucket no-such-bucket-here does not exist") as err:
            call()
        assert type(err.value) is RemoteError


def test_s3_wrong_credentials(s3_bucket: str, moto_auth: dict[str, str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_auth["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_auth["aws_secret_access_key"])
    open_transport(s3_bucket).put("k", b"ok")  # the real key works

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    remote = open_transport(s3_bucket)
    with pytest.raises(AccessDenied, match="InvalidAccessKeyId") as err:
        remote.get("k")
    assert str(err.value) == f"access denied to {s3_bucket}/k: InvalidAccessKeyId"
    with pytest.raises(AccessDenied):
        remote.head("k")
    with pytest.raises(AccessDenied):
        list(remote.list())

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_auth["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(AccessDenied, match="SignatureDoesNotMatch"):
        open_transport(s3_bucket).put("k2", b"x")


def test_s3_credentials_from_aws_profile(s3_bucket: str, moto_auth: dict[str, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[good]\naws_access_key_id = {moto_auth['aws_access_key_id']}\n"
        f"aws_secret_access_key = {moto_auth['aws_secret_access_key']}\n"
        "[bad]\naws_access_key_id = AKIANOTAREALKEY00000\naws_secret_access_key = nope\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "good")
    open_transport(s3_bucket).put("k", b"v")
    monkeypatch.setenv("AWS_PROFILE", "bad")
    with pytest.raises(AccessDenied, match="InvalidAccessKeyId"):
        open_transport(s3_bucket).get("k")


def test_s3_no_credentials_at_all(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDenied, match="no usable AWS credentials"):
        open_transport(s3_bucket, timeout=1, retries=0).get("k")


def test_s3_unknown_profile(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(UsageError, match="no-such-profile"):
        open_transport("s3://bucket/x")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_s3_unreachable_endpoint_fails_fast(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    remote = open_transport("s3://bucket/repo", timeout=1, retries=2)
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        remote.get("k")
    assert time.monotonic() - started < 5
    assert type(err.value) is RemoteError
    message = str(err.value)
    assert "\n" not in message and "failed after 3 attempts" in message and "127.0.0.1" in message


def test_s3_endpoint_from_aws_endpoint_url_s3(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # the service-specific one wins
    remote = open_transport(s3_bucket, timeout=2, retries=0)
    remote.put("k", b"v")
    assert remote.get("k") == b"v"


# -- retries through the fault proxy -------------------------------------------------------------


@pytest.fixture
def proxied(s3_bucket: str, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test bucket's URL, with AWS_ENDPOINT_URL pointing at the fault proxy."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    return s3_bucket


def test_retry_through_connection_resets(proxied: str, fault_proxy: FaultProxy,
                                         caplog: pytest.LogCaptureFixture) -> None:
    remote = open_transport(proxied, timeout=5, retries=5)
    fault_proxy.reset_next(3)
    with caplog.at_level(logging.INFO, logger="tessera.remote.retry"):
        remote.put("k", b"value")
    assert fault_proxy.stats.resets == 3
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and all(r.levelno == logging.INFO for r in retries)  # chatter: -v shows it
    fault_proxy.reset_next(3)
    assert remote.get("k") == b"value"
    assert fault_proxy.stats.resets == 6


def test_retry_through_503s(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=5, retries=5)
    remote.put("a", b"1")
    fault_proxy.fail_next(3, 503)
    assert [i.key for i in remote.list()] == ["a"]
    fault_proxy.fail_next(3, 503)
    assert remote.head("a") == ObjectInfo("a", 1, remote.head("a").etag)
    assert fault_proxy.stats.failures == 6


def test_retry_through_slow_response(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=0.5, retries=3)
    remote.put("a", b"1")
    fault_proxy.delay_responses(1.5, count=1)
    assert remote.get("a") == b"1"
    assert fault_proxy.stats.delayed == 1


def test_conditional_put_whose_response_was_lost(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=5, retries=3)
    fault_proxy.drop_responses(1)  # the put lands, but we never hear so
    remote.put("versions/v", b"mine", if_none_match=True)  # the retry sees our own object: success
    assert fault_proxy.stats.dropped == 1
    assert remote.get("versions/v") == b"mine"
    fault_proxy.drop_responses(1)
    with pytest.raises(PreconditionFailed):  # someone else's bytes: still a lost race
        remote.put("versions/v", b"theirs", if_none_match=True)


def test_put_file_retried_mid_upload_counts_progress_once(proxied: str, fault_proxy: FaultProxy,
                                                          tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = _random(20 * MiB, seed=2)
    source.write_bytes(data)
    remote = open_transport(proxied, timeout=5, retries=3)
    fault_proxy.fail_next(1, 503, after=2)  # create-upload and one part go through, then a 503
    sent: list[int] = []
    remote.put_file("packs/big", str(source), progress=sent.append)
    assert fault_proxy.stats.failures == 1
    assert sum(sent) == len(data)
    assert remote.get("packs/big") == data


def test_gives_up_cleanly_while_down_and_recovers(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=1, retries=2)
    remote.put("k", b"v")
    fault_proxy.down()
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        remote.put("k2", b"v2")
    assert time.monotonic() - started < 5
    assert type(err.value) is RemoteError and not isinstance(err.value, TransientRemoteError)
    message = str(err.value)
    assert "\n" not in message and "put k2 failed after 3 attempts" in message
    fault_proxy.up()
    remote.put("k2", b"v2")
    assert remote.get("k2") == b"v2"


def test_hung_server_fails_within_timeouts(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=0.5, retries=1)
    remote.put("k", b"v")
    fault_proxy.delay_responses(5.0)  # accepts and reads, but answers far too late
    started = time.monotonic()
    with pytest.raises(RemoteError, match="ReadTimeoutError"):
        remote.get("k")
    assert time.monotonic() - started < 3  # 2 attempts x 0.5 s + backoff, not 5 s
    fault_proxy.clear()


def test_stream_broken_mid_body_is_transient(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=5, retries=2)
    data = _random(4 * MiB, seed=5)
    remote.put("packs/p", data)
    fault_proxy.cut_responses(2, keep=MiB)  # the first open, and then the reopen, break after 1 MiB
    stream = remote.open_read("packs/p", 10)
    got = stream.read(MiB // 2)
    with pytest.raises(TransientRemoteError, match="s3 read .*packs/p"):
        while piece := stream.read(MiB // 4):
            got += piece
    stream.close()
    assert got == data[10:10 + len(got)] and MiB // 2 <= len(got) <= MiB
    with remote.open_read("packs/p", 10 + len(got)) as again:  # the caller resumes where it got to
        with pytest.raises(TransientRemoteError):
            again.read()
    with remote.open_read("packs/p", 10 + len(got)) as again:
        assert got + again.read() == data[10:]
    assert fault_proxy.stats.cut == 2


def test_stream_stalled_mid_body_times_out(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=0.5, retries=0)
    remote.put("packs/p", _random(MiB, seed=6))
    fault_proxy.cut_responses(1, keep=1000, stall=3.0)
    with remote.open_read("packs/p") as stream:
        assert len(stream.read(1000)) == 1000
        started = time.monotonic()
        with pytest.raises(TransientRemoteError, match="Timeout"):
            stream.read(1000)
        assert time.monotonic() - started < 2


def test_open_read_retried_through_503s(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=5, retries=3)
    remote.put("packs/p", b"0123456789")
    fault_proxy.fail_next(2, 503)
    with remote.open_read("packs/p", 3) as stream:
        assert stream.read() == b"3456789"
    assert fault_proxy.stats.failures == 2


def test_retrying_passes_permanent_errors_through(proxied: str, fault_proxy: FaultProxy) -> None:
    remote = open_transport(proxied, timeout=5, retries=5)
    requests_before = fault_proxy.stats.requests
    with pytest.raises(NotFound):
        remote.get("missing")
    assert fault_proxy.stats.requests == requests_before + 1  # not retried


def test_s3_transport_direct_pagination_small_pages(s3_bucket: str) -> None:
    bucket, _, prefix = s3_bucket.removeprefix("s3://").partition("/")
    remote = S3Transport(bucket, prefix, timeout=5, page_size=3)
    _fill(remote, [f"k{i}" for i in range(10)])
    assert [i.key for i in remote.list()] == sorted(f"k{i}" for i in range(10))
    remote.close()


def test_only_s3_module_imports_boto() -> None:
    import ast

    remote_dir = Path(__file__).parent.parent / "lib" / "remote"
    for path in remote_dir.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom)}
        if path.name != "s3.py":
            assert not names & {"boto3", "botocore", "s3transfer", "urllib3"}, path.name
