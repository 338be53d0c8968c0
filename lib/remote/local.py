"""Local-directory transport (``file:///abs/path``): a NAS, a USB disk, or a test's tmp_path.

Each key is a file under the root. Writes go to a temporary file in ``<root>/.tessera-tmp``, are
fsynced and then renamed (or hard-linked, for conditional puts) into place, so readers never see a
partial object and exactly one of several racing conditional writers wins.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from tessera.errors import AccessDenied, DiskFull, NotFound, PreconditionFailed, RemoteError, UsageError
from tessera.remote.base import (
    ObjectInfo,
    ObjectReader,
    Progress,
    Transport,
    atomic_output,
    check_key,
    check_range,
    copy_stream,
    fsync_path,
    md5_hex,
)

logger = logging.getLogger(__name__)

TMP_DIR = ".tessera-tmp"
LOCK_FILE = "conditional.lock"  # in TMP_DIR: serialises conditional replaces and deletes
_NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


class LocalTransport(Transport):
    """Objects stored as files below an absolute root directory (created on first write)."""

    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise UsageError(f"local remote must be an absolute path, got {root!r}")
        self.root = os.path.normpath(root)
        self.url = f"file://{self.root}"

    # -- paths ---------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        check_key(key)
        if key.split("/", 1)[0] == TMP_DIR:
            raise UsageError(f"invalid remote key {key!r}: {TMP_DIR}/ is reserved")
        return os.path.join(self.root, *key.split("/"))

    @contextmanager
    def _tmp_file(self) -> Iterator[tuple[str, BinaryIO]]:
        """A fresh temporary file under the root, removed on exit unless renamed away."""
        tmp_dir = os.path.join(self.root, TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                yield tmp, f
        finally:
            _unlink_quietly(tmp)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """An flock serialising conditional replaces with deletes (tessera processes sharing the directory
        all take it), so a check-then-replace cannot interleave with a delete."""
        tmp_dir = os.path.join(self.root, TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        fd = os.open(os.path.join(tmp_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        self._write(key, lambda f: f.write(data), if_none_match=if_none_match)

    def put_conditional(self, key: str, data: bytes, *, if_match: str | None = None) -> str:
        if if_match is None:
            self._write(key, lambda f: f.write(data), if_none_match=True)
            return md5_hex(data)
        path = self._path(key)
        with _os_errors(self.url, key, writing=True), self._exclusive():
            try:
                with open(path, "rb") as f:
                    current = f.read()
            except FileNotFoundError:
                raise NotFound(f"{self.url}/{key} does not exist") from None
            if md5_hex(current) != if_match:
                raise PreconditionFailed(f"{self.url}/{key} changed")
            self._write(key, lambda f: f.write(data), if_none_match=False)
        return md5_hex(data)

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        with open(path, "rb") as src:  # a missing source is the caller's OSError, not a remote error
            self._write(key, lambda dst: copy_stream(src, dst, progress), if_none_match=False)

    def _write(self, key: str, fill: Callable[[BinaryIO], object], *, if_none_match: bool) -> None:
        dest = self._path(key)
        with _os_errors(self.url, key, writing=True):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with self._tmp_file() as (tmp, f):
                fill(f)
                f.flush()
                os.fsync(f.fileno())
                f.close()
                if if_none_match:
                    self._link_new(tmp, dest, key)
                else:
                    os.replace(tmp, dest)
            fsync_path(os.path.dirname(dest), directory=True)

    def _link_new(self, tmp: str, dest: str, key: str) -> None:
        """Publish ``tmp`` at ``dest`` only if ``dest`` does not exist (atomic: link(2) fails on EEXIST)."""
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise PreconditionFailed(f"{self.url}/{key} already exists") from None
        except OSError as err:
            if err.errno not in _NO_HARDLINKS:
                raise
            self._create_exclusive(tmp, dest, key)

    def _create_exclusive(self, tmp: str, dest: str, key: str) -> None:
        """Fallback for file systems without hard links: O_EXCL create, then copy."""
        logger.debug("%s: no hard links, using O_EXCL for %s", self.url, key)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise PreconditionFailed(f"{self.url}/{key} already exists") from None
        with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        first, last = check_range(start, end)
        path = self._path(key)
        with _os_errors(self.url, key), open(path, "rb") as f:
            f.seek(first)
            return f.read(-1 if last is None else max(0, last - first))

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> ObjectReader:
        first, last = check_range(start, end)
        path = self._path(key)
        with _os_errors(self.url, key):
            f = open(path, "rb")
            try:
                f.seek(first)
            except BaseException:
                f.close()
                raise
        return _FileReader(f, None if last is None else max(0, last - first), self.url, key)

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        source = self._path(key)
        with _os_errors(self.url, key), open(source, "rb") as src:
            with atomic_output(path) as tmp, open(tmp, "wb") as dst:
                copy_stream(src, dst, progress)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            with _os_errors(self.url, key):
                st = os.stat(path)
        except NotFound:
            return None
        return ObjectInfo(key, st.st_size, modified=st.st_mtime) if _is_file(st.st_mode) else None

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        base = prefix.rpartition("/")[0]
        start_dir = os.path.join(self.root, *base.split("/")) if base else self.root
        with _os_errors(self.url, prefix):
            found = [info for info in _walk(start_dir, base) if info.key.startswith(prefix)]
        found.sort(key=lambda info: info.key)
        for info in found:
            if start_after is None or info.key > start_after:
                yield info

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _os_errors(self.url, key, writing=True):
            if not os.path.lexists(path):
                self._check_writable()
                return
            with self._exclusive():
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError):
                    pass

    def _check_writable(self) -> None:
        """Deleting a missing key changes nothing, but must still fail where deleting is not allowed
        (a read-only file system), as S3 refuses a DELETE it does not permit whether or not the key exists."""
        probe = self.root
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise AccessDenied(f"access denied to {self.url}: read-only file system")


class _FileReader(ObjectReader):
    """Up to ``left`` bytes (None: to the end) of an open file, from where it is positioned."""

    def __init__(self, f: BinaryIO, left: int | None, url: str, key: str) -> None:
        self._f: BinaryIO | None = f
        self._left = left
        self._where = (url, key)

    def read(self, n: int = -1) -> bytes:
        if self._f is None:
            return b""
        if self._left is not None:
            n = self._left if n < 0 else min(n, self._left)
        with _os_errors(*self._where):
            data = self._f.read(n)
        if self._left is not None:
            self._left -= len(data)
        return data

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _walk(directory: str, rel: str) -> Iterator[ObjectInfo]:
    """Every regular file below ``directory`` as an ObjectInfo keyed ``rel/…``; skips the tmp dir."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        key = f"{rel}/{entry.name}" if rel else entry.name
        if not rel and entry.name == TMP_DIR:
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, key)
        elif entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            yield ObjectInfo(key, st.st_size, modified=st.st_mtime)


def _is_file(mode: int) -> bool:
    return stat.S_ISREG(mode)


@contextmanager
def _os_errors(url: str, key: str, *, writing: bool = False) -> Iterator[None]:
    """Translate OSError into tessera errors at the boundary."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        if writing:
            raise RemoteError(f"cannot write {url}/{key}: {err.strerror}") from err
        raise NotFound(f"{url}/{key} does not exist") from err
    except PermissionError as err:
        raise AccessDenied(f"access denied to {url}/{key}: {err.strerror}") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFull(f"no space left writing {url}/{key}") from err
        raise RemoteError(f"{url}/{key}: {err.strerror or err}") from err


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
