"""pytest fixtures for S3 tests against a moto server on 127.0.0.1 (no mocks of boto3 itself).

``tests/conftest.py`` does ``from s3_fixtures import *``. Fixtures:

- ``moto_server`` (session): starts ``ThreadedMotoServer`` on a free port; yields its endpoint URL.
- ``s3_env``: points the AWS environment at moto (dummy keys, us-east-1, ``AWS_ENDPOINT_URL``) and
  isolates it from ~/.aws; yields the endpoint URL.
- ``s3_client``: a boto3 S3 client on moto, for arranging or inspecting a bucket directly.
- ``s3_url_factory``: ``make(prefix="repo") -> "s3://<fresh bucket>/<prefix>"``; buckets are emptied
  and removed after the test.
- ``s3_bucket``: one fresh ``s3://<bucket>/repo`` URL (environment already set).
- ``moto_auth``: from the moment it is requested until the test ends, moto checks signatures, so wrong
  keys get 403 ``InvalidAccessKeyId`` / ``SignatureDoesNotMatch``; yields a dict with a working
  ``aws_access_key_id`` / ``aws_secret_access_key`` pair (an IAM user with full access).
- ``fault_proxy``: a `FaultProxy` in front of moto; yields it (its ``url`` is the endpoint to use).
"""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fault_proxy import FaultProxy

__all__ = ["moto_server", "s3_env", "s3_client", "s3_url_factory", "s3_bucket", "moto_auth", "fault_proxy"]

TEST_REGION = "us-east-1"
_ISOLATED_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server for the whole session; yields ``http://127.0.0.1:<port>``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Environment for boto3 → moto; nothing from the developer's ~/.aws leaks in."""
    for name in _ISOLATED_VARS:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("aws-config")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_server


def _client(endpoint: str, **kwargs: Any) -> Any:
    import boto3

    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"} | kwargs
    return boto3.client("s3", region_name=TEST_REGION, endpoint_url=endpoint, **credentials)


@pytest.fixture
def s3_client(s3_env: str) -> Iterator[Any]:
    """A plain boto3 S3 client on the moto server (dummy credentials)."""
    client = _client(s3_env)
    yield client
    client.close()


@pytest.fixture
def s3_url_factory(s3_env: str) -> Iterator[Callable[..., str]]:
    """``make(prefix="repo")`` creates a uniquely named bucket and returns ``s3://bucket/prefix``."""
    client = _client(s3_env)
    created: list[str] = []

    def make(prefix: str = "repo") -> str:
        bucket = f"tessera-test-{uuid.uuid4().hex[:16]}"
        client.create_bucket(Bucket=bucket)
        created.append(bucket)
        return f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"

    yield make
    for bucket in created:
        _remove_bucket(client, bucket)
    client.close()


@pytest.fixture
def s3_bucket(s3_url_factory: Callable[..., str]) -> str:
    """A fresh, empty bucket; yields ``s3://<bucket>/repo``."""
    return s3_url_factory()


@pytest.fixture
def moto_auth(s3_env: str) -> Iterator[dict[str, str]]:
    """Make moto verify signatures for the rest of the test (process-wide; restored afterwards).

    moto skips authentication unless ``INITIAL_NO_AUTH_ACTION_COUNT`` is finite. In server mode it is
    changed at run time with ``POST /moto-api/reset-auth`` (the body is the count). Request this
    fixture *after* the buckets it needs exist: from now on dummy keys are refused too.
    """
    import boto3

    iam = boto3.client("iam", region_name=TEST_REGION, endpoint_url=s3_env,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    user = f"tessera-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    # moto does not load AWS managed policies by default: grant S3 with an inline policy
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    iam.close()
    _set_auth_count(s3_env, "0")
    try:
        yield {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
    finally:
        _set_auth_count(s3_env, "inf")


def _set_auth_count(endpoint: str, count: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # not a form: moto reads the raw body
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["status"] == "ok"


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of moto; point ``AWS_ENDPOINT_URL`` at ``proxy.url``."""
    host, port = moto_server.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        yield proxy


def _remove_bucket(client: Any, bucket: str) -> None:
    """Empty and delete a test bucket, freeing moto's memory."""
    from botocore.exceptions import ClientError

    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", ())
        for upload in uploads:
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=bucket)
    except ClientError:
        pass  # already gone (the test deleted it)
