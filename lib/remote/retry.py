"""Retries as a wrapper around any transport (restic's ``RetryBackend``).

Only `TransientRemoteError` is retried, with exponential backoff and jitter. `NotFound`,
`AccessDenied`, `PreconditionFailed` and every other error pass straight through. When the retries
run out the caller gets a plain `RemoteError` (not transient, so an outer layer does not retry it
again) whose one-line message names the operation and the last cause.

`open_read` retries opening a stream only: a stream that breaks later raises `TransientRemoteError`
from its ``read``, and the caller opens a new one from the offset it got to.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from tessera.errors import PreconditionFailed, RemoteError, TransientRemoteError
from tessera.remote.base import ObjectInfo, ObjectReader, Progress, Transport, md5_hex

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Retrying(Transport):
    """Retry transient faults of ``inner``: ``retries`` retries after the first attempt."""

    def __init__(
        self,
        inner: Transport,
        *,
        retries: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.timeout = inner.timeout
        self.retries = max(0, retries)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    # -- the loop ------------------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (0-based): equal jitter on base * 2**attempt."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _call(self, what: str, fn: Callable[[], T], *, on_retry: Callable[[], None] | None = None) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except TransientRemoteError as err:
                self._wait_or_give_up(what, attempt, err)
                attempt += 1
                if on_retry is not None:
                    on_retry()

    def _wait_or_give_up(self, what: str, attempt: int, err: TransientRemoteError) -> None:
        """Sleep before the next attempt, or raise `RemoteError` if this was the last one."""
        if attempt >= self.retries:
            raise RemoteError(
                f"{self.url}: {what} failed after {attempt + 1} attempts: {_one_line(err)}"
            ) from err
        delay = self.backoff(attempt)
        logger.info("%s: %s failed (%s), retry %d/%d in %.1f s",  # shown with -v: the final error says it all
                       self.url, what, _one_line(err), attempt + 1, self.retries, delay)
        self._sleep(delay)

    # -- operations ----------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        if not if_none_match:
            self._call(f"put {key}", lambda: self.inner.put(key, data))
            return
        had_fault = False

        def attempt() -> None:
            nonlocal had_fault
            try:
                self.inner.put(key, data, if_none_match=True)
            except TransientRemoteError:
                had_fault = True
                raise

        try:
            self._call(f"put {key}", attempt)
        except PreconditionFailed:
            # A faulted attempt may have landed before the fault: then the object is ours.
            if not had_fault or not self._holds(key, data):
                raise
            logger.info("%s: conditional put %s had landed before a transient fault", self.url, key)

    def put_conditional(self, key: str, data: bytes, *, if_match: str | None = None) -> str:
        """Retried like a conditional `put`: a faulted attempt may have landed before the fault, and then
        the condition fails on the next one although the object is ours."""
        had_fault = False

        def attempt() -> str:
            nonlocal had_fault
            try:
                return self.inner.put_conditional(key, data, if_match=if_match)
            except TransientRemoteError:
                had_fault = True
                raise

        try:
            return self._call(f"put {key}", attempt)
        except PreconditionFailed:
            if not had_fault or not self._holds(key, data):
                raise
            logger.info("%s: conditional put %s had landed before a transient fault", self.url, key)
            return md5_hex(data)

    def server_time(self) -> float:
        return self._call("server time", self.inner.server_time)

    def _holds(self, key: str, data: bytes) -> bool:
        info = self.head(key)
        return info is not None and info.size == len(data) and self.get(key) == data

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        meter = _HighWater(progress)
        self._call(f"put_file {key}", lambda: self.inner.put_file(key, path, progress=meter),
                   on_retry=meter.restart)

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get(key, start, end))

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> ObjectReader:
        """Opening is retried; a stream that breaks later raises `TransientRemoteError` from ``read``
        and the caller opens a new one from where it got to (only it knows what it has used)."""
        return self._call(f"open_read {key}", lambda: self.inner.open_read(key, start, end))

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        meter = _HighWater(progress)
        self._call(f"get_file {key}", lambda: self.inner.get_file(key, path, progress=meter),
                   on_retry=meter.restart)

    def head(self, key: str) -> ObjectInfo | None:
        return self._call(f"head {key}", lambda: self.inner.head(key))

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Resume an interrupted listing after the last key seen (listings are sorted)."""
        last, attempt = start_after, 0
        while True:
            try:
                for info in self.inner.list(prefix, start_after=last):
                    last, attempt = info.key, 0
                    yield info
                return
            except TransientRemoteError as err:
                self._wait_or_give_up(f"list {prefix or '/'}", attempt, err)
                attempt += 1

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))

    def close(self) -> None:
        self.inner.close()


class _HighWater:
    """Forward progress only past the most bytes any attempt reached, so totals never double count."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._reported = 0
        self._current = 0

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self._current += nbytes
            ahead = self._current - self._reported
            if ahead <= 0:
                return
            self._reported = self._current
        if self._progress is not None:
            self._progress(ahead)

    def restart(self) -> None:
        with self._lock:
            self._current = 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
