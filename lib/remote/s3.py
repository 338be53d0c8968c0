"""S3 transport (``s3://bucket[/prefix]``): the only module that imports boto3 / botocore.

Configuration comes from the standard AWS chain (env keys, ``AWS_PROFILE``, config files, instance
roles). ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` point it at an S3-compatible server;
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default us-east-1) pick the region. botocore's own retries
are off: `tessera.remote.retry.Retrying` retries, with backoff, what this module reports as
`TransientRemoteError`.

Every boto3 / botocore / s3transfer / urllib3 error is translated here, at the boundary, into a
`TesseraError`; ``ClientError`` never escapes this module.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tessera.errors import (
    AccessDenied,
    ConfigError,
    NotFound,
    PreconditionFailed,
    RemoteError,
    TesseraError,
    TransientRemoteError,
    UsageError,
)
from tessera.remote.base import (
    ObjectInfo,
    ObjectReader,
    Progress,
    Transport,
    atomic_output,
    check_key,
    check_range,
)

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_REGION = "us-east-1"

_ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "403",
})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "BadDigest",
    "IncompleteBody", "500", "502", "503", "504",
})


class S3Transport(Transport):
    """One boto3 client (thread-safe, pooled) for one ``bucket[/prefix]``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        timeout: float = 10.0,
        endpoint_url: str | None = None,
        part_size: int = 8 * MiB,
        max_concurrency: int = 8,
        max_pool_connections: int = 32,
        page_size: int = 1000,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.timeout = timeout
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._page_size = page_size
        self._bucket_checked = False
        self._client: Any = self._make_client(timeout, endpoint_url, max_pool_connections)
        self._transfer_config = _transfer_config(part_size, max_concurrency)

    def _make_client(self, timeout: float, endpoint_url: str | None, pool: int) -> Any:
        import boto3.session
        from botocore.config import Config

        endpoint = endpoint_url or _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # Retrying retries, not botocore
            max_pool_connections=pool,
            # whole-object GETs ask for the checksum themselves (ChecksumMode); streams do not
            response_checksum_validation="when_required",
        )
        with self._boundary("open", ""):
            session = boto3.session.Session()
            region = _env("AWS_REGION") or _env("AWS_DEFAULT_REGION") or session.region_name
            try:
                return session.client("s3", region_name=region or DEFAULT_REGION,
                                      endpoint_url=endpoint, config=config)
            except ValueError as err:
                raise UsageError(f"invalid S3 endpoint {endpoint!r}: {err}") from err

    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        with self._boundary("put", key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data), **extra)

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        os.stat(path)  # a missing source is the caller's problem, not the remote's
        with self._boundary("put_file", key):
            self._client.upload_file(path, self.bucket, self._key(key),
                                     Config=self._transfer_config, Callback=progress)

    def put_conditional(self, key: str, data: bytes, *, if_match: str | None = None) -> str:
        extra = {"IfMatch": f'"{if_match}"'} if if_match is not None else {"IfNoneMatch": "*"}
        with self._boundary("put", key):
            response = self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data), **extra)
        return _etag(response.get("ETag")) or ""

    def delete(self, key: str) -> None:
        with self._boundary("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def server_time(self) -> float:
        """The ``Date`` of a HEAD of the bucket: the clock S3 stamps ``LastModified`` with."""
        from email.utils import parsedate_to_datetime

        with self._boundary("head_bucket", ""):
            response = self._client.head_bucket(Bucket=self.bucket)
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            return parsedate_to_datetime(date).timestamp() if date else time.time()
        except (TypeError, ValueError):
            raise RemoteError(f"{self.url}: the server sent an unreadable Date header {date!r}") from None

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        body = self._get_object("get", key, start, end, checksum=True)
        if body is None:
            return b""
        with self._boundary("get", key):
            return bytes(body.read())

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> ObjectReader:
        """No transport checksum here, even over a whole object (it costs a CRC32 pass over every
        byte): a stream is read in pieces by callers that check what they use (lazy reads verify
        every chunk's xxh3-128)."""
        body = self._get_object("open_read", key, start, end)
        return _BodyReader(self, key, body)

    def _get_object(self, what: str, key: str, start: int | None, end: int | None, *,
                    checksum: bool = False) -> Any:
        """The ``StreamingBody`` of a (ranged) GET, or None when the range is empty. ``checksum``:
        have botocore check a whole object against the checksum S3 stored with it."""
        first, last = check_range(start, end)
        if last is not None and last <= first:
            if self.head(key) is None:
                raise NotFound(f"{self.url}/{key} does not exist")
            return None
        extra = {}
        if first or last is not None:
            extra["Range"] = f"bytes={first}-{'' if last is None else last - 1}"
        elif checksum:
            extra["ChecksumMode"] = "ENABLED"
        with self._boundary(what, key):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)
            except Exception as err:
                if _error_code(err) == "InvalidRange":  # start beyond the end of the object
                    return None
                raise
            return response["Body"]

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        full = self._key(key)
        try:
            with atomic_output(path) as tmp, self._boundary("get_file", key):
                self._client.download_file(self.bucket, full, tmp, ExtraArgs={"ChecksumMode": "ENABLED"},
                                           Config=self._transfer_config, Callback=progress)
        except NotFound:
            self._check_bucket()
            raise

    def head(self, key: str) -> ObjectInfo | None:
        full = self._key(key)
        try:
            with self._boundary("head", key):
                response = self._client.head_object(Bucket=self.bucket, Key=full)
        except NotFound:
            self._check_bucket()  # a HEAD 404 cannot tell a missing key from a missing bucket
            return None
        return ObjectInfo(key, int(response["ContentLength"]), _etag(response.get("ETag")),
                          _timestamp(response.get("LastModified")))

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._root + prefix,
                                   "MaxKeys": self._page_size}
        if start_after:
            request["StartAfter"] = self._root + start_after
        while True:
            with self._boundary("list", prefix):
                page = self._client.list_objects_v2(**request)
            for obj in page.get("Contents", ()):
                yield ObjectInfo(obj["Key"][len(self._root):], int(obj["Size"]), _etag(obj.get("ETag")),
                                 _timestamp(obj.get("LastModified")))
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def _check_bucket(self) -> None:
        """Raise `RemoteError` if the bucket is missing (checked once per transport)."""
        if self._bucket_checked:
            return
        try:
            with self._boundary("head_bucket", ""):
                self._client.head_bucket(Bucket=self.bucket)
        except NotFound:
            raise _no_bucket(self.bucket, self.url) from None
        self._bucket_checked = True

    def close(self) -> None:
        self._client.close()

    # -- the error boundary --------------------------------------------------------------------

    @contextmanager
    def _boundary(self, what: str, key: str) -> Iterator[None]:
        """Translate every boto3/botocore/transfer error raised inside into a `TesseraError`."""
        try:
            yield
        except TesseraError:
            raise
        except Exception as err:
            mapped = translate_error(err, bucket=self.bucket, url=self.url, what=what, key=key)
            if mapped is None:
                raise
            raise mapped from err


class _BodyReader(ObjectReader):
    """A GET response body read as it arrives; errors while reading are translated like any other
    (a reset or a read timeout mid-way is a `TransientRemoteError`)."""

    def __init__(self, transport: S3Transport, key: str, body: Any) -> None:
        self._transport = transport
        self._key = key
        self._body = body

    def read(self, n: int = -1) -> bytes:
        body = self._body
        if body is None:
            return b""
        with self._transport._boundary("read", self._key):
            if n < 0:
                return bytes(body.read())
            data: bytes = body.read(n)
            if 0 < len(data) < n:  # urllib3 fills the request except at the end: this is rare
                parts = [data]
                while n > (got := sum(map(len, parts))) and (more := body.read(n - got)):
                    parts.append(more)
                data = b"".join(parts)
            return data

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()  # drops the connection: the rest of the range is not read
            except Exception as err:  # noqa: BLE001 - closing a dead connection must not fail the caller
                logger.debug("closing the body of %s: %s", self._key, err)


def translate_error(err: BaseException, *, bucket: str, url: str, what: str, key: str) -> TesseraError | None:
    """The `TesseraError` for a boto3 error (looking through wrappers), or None if not ours."""
    where = f"{url}/{key}" if key else url
    for cause in _chain(err):
        mapped = _translate_one(cause, bucket, url, what, where)
        if mapped is not None:
            return mapped
    return None


def _translate_one(err: BaseException, bucket: str, url: str, what: str, where: str) -> TesseraError | None:
    import botocore.exceptions as bce
    import s3transfer.exceptions as s3te
    import urllib3.exceptions as u3e

    if isinstance(err, bce.ClientError):
        return _from_client_error(err, bucket, url, what, where)
    if isinstance(err, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
        return AccessDenied(f"access denied to {url}: no usable AWS credentials ({_one_line(err)})")
    if isinstance(err, (bce.ProfileNotFound, bce.ConfigParseError)):
        return ConfigError(f"AWS configuration for {url}: {_one_line(err)}")
    if isinstance(err, bce.SSLError):
        return RemoteError(f"s3 {what} {where}: TLS error: {_one_line(err)}")
    if isinstance(err, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError,
                        bce.ChecksumError, u3e.HTTPError, s3te.RetriesExceededError,
                        ConnectionError, TimeoutError)):
        return TransientRemoteError(f"s3 {what} {where}: {type(err).__name__}: {_one_line(err)}")
    if isinstance(err, bce.BotoCoreError):
        return RemoteError(f"s3 {what} {where}: {_one_line(err)}")
    return None


def _from_client_error(err: Any, bucket: str, url: str, what: str, where: str) -> TesseraError:
    code = _error_code(err)
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    message = err.response.get("Error", {}).get("Message") or ""
    if code == "NoSuchBucket":
        return _no_bucket(bucket, url)
    if code in _NOT_FOUND_CODES:
        return NotFound(f"{where} does not exist")
    if code in _ACCESS_CODES or status == 403:
        return AccessDenied(f"access denied to {where}: {code or status}")
    if code in _PRECONDITION_CODES or status == 412:
        return PreconditionFailed(f"{where} already exists or changed ({code or status})")
    detail = f"{code or status}" + (f": {message}" if message else "")
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientRemoteError(f"s3 {what} {where}: {_one_line(detail)}")
    return RemoteError(f"s3 {what} {where} failed: {_one_line(detail)}")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes (boto3 wraps ClientError in S3UploadFailedError without ``from``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code") or "")


def _no_bucket(bucket: str, url: str) -> RemoteError:
    return RemoteError(f"bucket {bucket} does not exist ({url})")


def _transfer_config(part_size: int, max_concurrency: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def _timestamp(value: Any) -> float | None:
    """A boto3 ``LastModified`` (an aware datetime) as seconds since the epoch."""
    try:
        return float(value.timestamp()) if value is not None else None
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
