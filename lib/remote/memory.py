"""In-memory transport: the memory twin of the S3 bucket, for tests and docs.

``memory://NAME`` names a process-global bucket, so two repos in one process opened on the same URL
share its objects. `reset()` empties one or all buckets.
"""
from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator

from tessera.errors import NotFound, PreconditionFailed
from tessera.remote.base import (
    ObjectInfo,
    ObjectReader,
    Progress,
    Transport,
    atomic_output,
    check_key,
    check_range,
    md5_hex,
    report,
)

logger = logging.getLogger(__name__)


class _Bucket:
    """A dict of key → bytes behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, bytes] = {}
        self.modified: dict[str, float] = {}


_buckets: dict[str, _Bucket] = {}
_buckets_lock = threading.Lock()


def _bucket(name: str) -> _Bucket:
    with _buckets_lock:
        return _buckets.setdefault(name, _Bucket())


def reset(name: str | None = None) -> None:
    """Empty the bucket ``name``, or every bucket when ``name`` is None."""
    with _buckets_lock:
        targets = list(_buckets.values()) if name is None else [_buckets.get(name, _Bucket())]
    for bucket in targets:
        with bucket.lock:
            bucket.objects.clear()
            bucket.modified.clear()


class MemoryTransport(Transport):
    """Objects kept in a process-global dict; thread-safe; conditional puts honoured."""

    def __init__(self, name: str, prefix: str = "") -> None:
        self.url = f"memory://{name}" + (f"/{prefix}" if prefix else "")
        self._bucket = _bucket(name)
        self._prefix = f"{prefix}/" if prefix else ""

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def put(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        full = self._full(key)
        data = bytes(data)
        with self._bucket.lock:
            if if_none_match and full in self._bucket.objects:
                raise PreconditionFailed(f"{self.url}/{key} already exists")
            self._bucket.objects[full] = data
            self._bucket.modified[full] = time.time()

    def put_conditional(self, key: str, data: bytes, *, if_match: str | None = None) -> str:
        full = self._full(key)
        data = bytes(data)
        with self._bucket.lock:
            current = self._bucket.objects.get(full)
            if if_match is None and current is not None:
                raise PreconditionFailed(f"{self.url}/{key} already exists")
            if if_match is not None:
                if current is None:
                    raise NotFound(f"{self.url}/{key} does not exist")
                if md5_hex(current) != if_match:
                    raise PreconditionFailed(f"{self.url}/{key} changed")
            self._bucket.objects[full] = data
            self._bucket.modified[full] = time.time()
        return md5_hex(data)

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        with open(path, "rb") as f:
            data = f.read()
        self.put(key, data)
        report(progress, len(data))

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        first, last = check_range(start, end)
        return self._read(key)[first:last]

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> ObjectReader:
        first, last = check_range(start, end)
        return BytesReader(self._read(key), first, last)

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        data = self._read(key)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
        report(progress, len(data))

    def _read(self, key: str) -> bytes:
        full = self._full(key)
        with self._bucket.lock:
            data = self._bucket.objects.get(full)
        if data is None:
            raise NotFound(f"{self.url}/{key} does not exist")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        with self._bucket.lock:
            data = self._bucket.objects.get(full)
            when = self._bucket.modified.get(full)
        return None if data is None else _info(key, data, when)

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        with self._bucket.lock:
            items = [(k[len(self._prefix):], v, self._bucket.modified.get(k)) for k, v in self._bucket.objects.items()
                     if k.startswith(self._prefix + prefix)]
        items.sort(key=lambda item: item[0])
        begin = bisect_right([k for k, _, _ in items], start_after) if start_after else 0
        for key, data, when in items[begin:]:
            yield _info(key, data, when)

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._bucket.lock:
            self._bucket.objects.pop(full, None)
            self._bucket.modified.pop(full, None)


class BytesReader(ObjectReader):
    """A reader over ``data[start:end]`` (no copy until read)."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._view: memoryview | None = memoryview(data)[start:end]
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if self._view is None:
            return b""
        stop = len(self._view) if n < 0 else self._pos + n
        piece = self._view[self._pos:stop]
        self._pos += len(piece)
        return bytes(piece)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None


def _info(key: str, data: bytes, modified: float | None = None) -> ObjectInfo:
    return ObjectInfo(key, len(data), md5_hex(data), modified)
