"""FUSE operations: a thin adapter from paths to `tessera.vfs.VersionFS` calls.

It only translates: paths -> vfs calls, vfs attributes -> stat dicts, `TesseraError`s -> errno
(`NotFound` -> ENOENT, `CorruptData`/`RemoteError` -> EIO, logged), and every kind of write -> EROFS.
The mount is also made with ``-o ro``, so the kernel refuses writes before they get here; these
handlers are the second wall.

``open`` is answered with ENOSYS (``no_open=True``, the default): with libfuse 3 the kernel then stops
sending OPEN and RELEASE for every file and keeps its page cache across opens, so re-reading a file
costs no round trip to this process at all.
"""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from typing import Any, Callable, Iterator, TypeVar

from tessera.errors import NotFound, TesseraError
from tessera.fuse._binding import Binding, tune_connection
from tessera.vfs import Attr, IsADirectory, NotADirectory, NotASymlink, VersionFS

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)


def errno_for(exc: TesseraError) -> int:
    if isinstance(exc, NotADirectory):
        return errno.ENOTDIR
    if isinstance(exc, IsADirectory):
        return errno.EISDIR
    if isinstance(exc, NotASymlink):
        return errno.EINVAL
    if isinstance(exc, NotFound):
        return errno.ENOENT
    return errno.EIO


def make_operations(binding: Binding, vfs: VersionFS, *, no_open: bool = True, blksize: int = 1 << 20,
                    on_init: Callable[[], None] | None = None) -> Any:
    """An instance of the binding's ``Operations`` subclass serving ``vfs``."""
    FuseOSError = binding.FuseOSError

    def translated(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any) -> Any:
            try:
                return method(self, *args)
            except TesseraError as exc:
                code = errno_for(exc)
                if code == errno.EIO:  # CorruptData, RemoteError, ...: this read fails, the mount stays up
                    logger.error("%s %s: %s (returning EIO)", method.__name__, args[0] if args else "", exc)
                raise FuseOSError(code) from None
            except OSError as exc:
                if isinstance(exc, FuseOSError):
                    raise
                logger.error("%s %s: %s (returning EIO)", method.__name__, args[0] if args else "", exc)
                raise FuseOSError(errno.EIO) from None
            except Exception:  # a bug: keep the traceback in the log, give the caller EIO, stay up
                logger.exception("%s %s failed (returning EIO)", method.__name__, args[0] if args else "")
                raise FuseOSError(errno.EIO) from None
        return wrapper  # type: ignore[return-value]

    def read_only(self: Any, *args: Any) -> int:
        raise FuseOSError(errno.EROFS)

    uid, gid = os.getuid(), os.getgid()
    write_bufvec = binding.write_bufvec

    def stat_dict(a: Attr) -> dict[str, int]:
        return {"st_ino": a.ino, "st_mode": a.mode, "st_nlink": a.nlink, "st_size": a.size,
                "st_blocks": a.blocks, "st_blksize": blksize, "st_uid": uid, "st_gid": gid,
                "st_atime": a.mtime_ns, "st_mtime": a.mtime_ns, "st_ctime": a.mtime_ns}

    class TesseraOperations(binding.Operations):  # type: ignore[misc,name-defined]
        use_ns = True  # times in ns (and no DeprecationWarning from mfusepy)

        def __init__(self) -> None:
            self.vfs = vfs
            self.no_open = no_open
            self._listings: dict[int, list[tuple[str, dict[str, int]]]] = {}
            self._fhs = itertools.count(1)  # next() is atomic: safe with libfuse's threads

        if binding.libfuse_major == 3 and binding.name == "mfusepy":
            def init_with_config(self, conn: Any, config: Any) -> None:
                tune_connection(conn)
                if on_init is not None:
                    on_init()
        else:
            def init(self, path: str) -> None:
                if on_init is not None:
                    on_init()

        @translated
        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            return stat_dict(vfs.stat(path))

        @translated
        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            return [(name, attrs, 0) for name, attrs in self.readdir_attrs(path, fh)]

        @translated
        def readdir_attrs(self, path: str, fh: int = 0) -> list[tuple[str, dict[str, int]]]:
            """Entries with full attributes, built once per open directory (the kernel asks for a
            large directory in many small batches); the binding uses them for readdirplus."""
            listing = self._listings.get(fh) if fh else None
            if listing is None:
                own = stat_dict(vfs.stat(path))
                listing = [(".", own), ("..", own)]
                listing.extend((name, stat_dict(a)) for name, a in vfs.readdir(path))
                if fh:
                    self._listings[fh] = listing
            return listing

        def opendir(self, path: str) -> int:
            return next(self._fhs)

        def releasedir(self, path: str, fh: int) -> int:
            self._listings.pop(fh, None)
            return 0

        @translated
        def readlink(self, path: str) -> str:
            return vfs.readlink(path)

        @translated
        def open(self, path: str, flags: int) -> int:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
                raise FuseOSError(errno.EROFS)
            if self.no_open:
                raise FuseOSError(errno.ENOSYS)
            vfs.stat(path)
            return 0

        @translated
        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return vfs.read(path, offset, size)

        if write_bufvec is not None:
            @translated
            def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fh: int) -> int:
                """Like `read`, but verified raw chunk ranges go to libfuse as (fd, offset) pairs that
                it reads itself: file data never passes through Python."""
                write_bufvec(bufpp, vfs.read_plan(path, offset, size))
                return 0

        @translated
        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            value = vfs.getxattr(path, name)
            if value is None:
                raise FuseOSError(ENOATTR)
            return value

        @translated
        def listxattr(self, path: str) -> list[str]:
            return vfs.listxattr(path)

        @translated
        def statfs(self, path: str) -> dict[str, int]:
            s = vfs.statfs()
            return {"f_bsize": s.bsize, "f_frsize": s.frsize, "f_blocks": s.blocks, "f_bfree": 0,
                    "f_bavail": 0, "f_files": s.files, "f_ffree": 0, "f_favail": 0, "f_namemax": s.namemax}

        # Every way of changing anything: refused.
        write = create = mkdir = mknod = unlink = rmdir = rename = chmod = chown = truncate = read_only
        utimens = symlink = link = setxattr = removexattr = fallocate = read_only

    return TesseraOperations()


def iter_write_ops() -> Iterator[str]:
    """Names of the operations that must answer EROFS (for tests and docs)."""
    yield from ("write", "create", "mkdir", "mknod", "unlink", "rmdir", "rename", "chmod", "chown", "truncate",
                "utimens", "symlink", "link", "setxattr", "removexattr", "fallocate")
