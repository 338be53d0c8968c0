"""The narrow transport interface every remote implements (restic's ``Backend`` idea).

A transport moves opaque bytes under string keys relative to its root. It knows nothing of packs,
versions or the catalog; retries are a wrapper (`tessera.remote.retry.Retrying`), not a concern of the
backends. Every backend raises only `TesseraError` subclasses:

- `NotFound` for a missing key (`get`, `open_read`, `get_file`); `head` returns ``None`` instead,
- `PreconditionFailed` when a conditional put (``if_none_match=True``) loses,
- `AccessDenied` when credentials are refused,
- `TransientRemoteError` for faults worth retrying (also from `ObjectReader.read` when a stream breaks
  mid-way: reopen from where it got to), `RemoteError` for the rest,
- `UsageError` for a malformed key or URL.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from tessera.errors import UsageError

Progress = Callable[[int], None]
"""Called with the number of bytes moved since the previous call (increments, not totals)."""

COPY_BUFSIZE = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the transport root), size and an opaque etag."""

    key: str
    size: int
    etag: str | None = None
    modified: float | None = field(default=None, compare=False)
    """When the object was last written, by the remote's clock (seconds since the epoch), if known; not
    part of equality (two listings of one object are equal)."""


class ObjectReader(ABC):
    """Bytes ``[start, end)`` of one object, read in order over one request (`Transport.open_read`).

    Not thread-safe: one reader per thread. ``close`` releases (for S3: aborts) the request; it is
    idempotent and a closed reader reads ``b""``. A use as a context manager closes it; iterating
    yields blocks of up to 1 MiB.
    """

    @abstractmethod
    def read(self, n: int = -1) -> bytes:
        """The next ``n`` bytes (all that is left for ``n < 0``), fewer only at the end, ``b""`` there.

        Raises `TransientRemoteError` when the stream breaks mid-way (connection reset, read timeout):
        the bytes returned so far are good, and a new `open_read` can continue after them."""

    @abstractmethod
    def close(self) -> None:
        """Stop reading and release the request (unread bytes are not transferred, as far as possible)."""

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(COPY_BUFSIZE):
            yield block


class Transport(ABC):
    """Keys and bytes. Implementations must be safe to call from several threads at once."""

    url: str
    timeout: float | None = None
    """Seconds one request may wait on the server (connect, or silence while reading); None: no network."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        """Store ``data`` at ``key``; with ``if_none_match`` raise `PreconditionFailed` if it exists."""

    @abstractmethod
    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        """Upload a (large) local file; ``progress`` receives byte increments."""

    @abstractmethod
    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (clipped to its size); `NotFound` if missing."""

    @abstractmethod
    def open_read(self, key: str, start: int = 0, end: int | None = None) -> ObjectReader:
        """A stream of bytes ``[start, end)`` of ``key`` (clipped to its size) over one request, for
        reading far more than fits a buffer. `NotFound` (raised here, not by the first read) if
        missing; ``start`` past the end gives an empty stream."""

    @abstractmethod
    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        """Download ``key`` to ``path`` atomically (temporary file + rename); `NotFound` if missing."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and etag of ``key``, or ``None`` if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), sorted by key.

        ``start_after`` skips keys ``<=`` it, so an interrupted listing can resume.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def put_conditional(self, key: str, data: bytes, *, if_match: str | None = None) -> str:
        """Create ``key`` only if it does not exist (``if_match`` None: ``If-None-Match: *``), or replace
        it only if its etag is still ``if_match`` (``If-Match``). Returns the new object's etag (the MD5 of
        ``data``). Raises `PreconditionFailed` when the condition does not hold, `NotFound` when
        ``if_match`` names an object that is gone. Backends that cannot replace conditionally refuse
        ``if_match`` with `UsageError`."""
        if if_match is not None:
            raise UsageError(f"{self.url} cannot replace objects conditionally")
        self.put(key, data, if_none_match=True)
        return md5_hex(data)

    def server_time(self) -> float:
        """The remote's clock now (seconds since the epoch): the clock its ``modified`` times use."""
        return time.time()

    def close(self) -> None:
        """Release connections. The transport must not be used afterwards."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def md5_hex(data: bytes) -> str:
    """The etag of an object written in one request: the MD5 of its bytes (S3's rule; memory and file
    remotes use it too, so conditional writes compare alike everywhere)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise `UsageError`.

    The rules are the same for every backend so that a key valid on one is valid on all: non-empty
    ``/``-separated segments, no ``.`` or ``..`` segment, no leading or trailing ``/``, no NUL.
    """
    if not isinstance(key, str) or not key:
        raise UsageError(f"invalid remote key {key!r}: must be a non-empty string")
    if "\0" in key or "\\" in key:
        raise UsageError(f"invalid remote key {key!r}: contains NUL or backslash")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise UsageError(f"invalid remote key {key!r}: must be a relative path without '.', '..' or '//'")
    return key


def check_range(start: int | None, end: int | None) -> tuple[int, int | None]:
    """Normalise a byte range: ``start`` defaults to 0, ``end`` (exclusive) to the end of the object."""
    first = 0 if start is None else start
    if first < 0 or (end is not None and end < 0):
        raise UsageError(f"invalid byte range [{start}, {end}): offsets must be >= 0")
    return first, end


def report(progress: Progress | None, nbytes: int) -> None:
    """Call ``progress`` if there is one and something moved."""
    if progress is not None and nbytes:
        progress(nbytes)


def copy_stream(src: BinaryIO, dst: BinaryIO, progress: Progress | None = None) -> int:
    """Copy ``src`` to ``dst`` in 1 MiB pieces, reporting each piece; return the byte count."""
    total = 0
    while piece := src.read(COPY_BUFSIZE):
        dst.write(piece)
        total += len(piece)
        report(progress, len(piece))
    return total


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success fsync and rename it into place.

    On failure the temporary file is removed and ``path`` is left untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
    os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def fsync_path(path: str, *, directory: bool = False) -> None:
    """fsync a file (or a directory, to make a rename inside it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


URL_FORMS = "s3://BUCKET[/PREFIX], file:///ABSOLUTE/PATH or memory://NAME[/PREFIX]"
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


@dataclass(frozen=True)
class RemoteURL:
    """A parsed remote URL: ``scheme`` is ``s3``, ``file`` or ``memory``."""

    scheme: str
    location: str  # bucket, absolute directory or memory name
    prefix: str = ""  # "" or "a/b" (no leading or trailing slash)


def parse_url(url: str) -> RemoteURL:
    """Parse a remote URL or raise `UsageError` naming the accepted forms."""
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    if not sep or "?" in rest or "#" in rest or "\0" in rest:
        raise _bad_url(url)
    if scheme == "file":
        return _parse_file_url(url, rest)
    if scheme in ("s3", "memory"):
        location, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not location or not set(location) <= _BUCKET_CHARS or (prefix and not _valid_prefix(prefix)):
            raise _bad_url(url)
        return RemoteURL(scheme, location, prefix)
    raise _bad_url(url)


def _parse_file_url(url: str, rest: str) -> RemoteURL:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise _bad_url(url)
    path = os.path.normpath("/" + path)
    if path == "/":
        raise _bad_url(url)
    return RemoteURL("file", path)


def _valid_prefix(prefix: str) -> bool:
    try:
        check_key(prefix)
    except UsageError:
        return False
    return True


def _bad_url(url: object) -> UsageError:
    return UsageError(f"unsupported remote URL {url!r}: expected {URL_FORMS}")
