"""Every error a user can cause, with the exit code the CLI returns for it.

`cli.main()` catches `TesseraError` once, prints ``error: <message>`` on one line and exits with
``exit_code``. Anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
from typing import NoReturn


class TesseraError(Exception):
    """Base of all expected errors. ``str(err)`` is a one-line message for the user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(TesseraError):
    """Bad arguments: malformed ref, missing directory, non-empty target, ..."""

    exit_code = 2


class BadRef(UsageError):
    """A ref that does not parse (`NAME`, `NAME@HEXPREFIX`, `NAME:TAG`)."""


class NotFound(TesseraError):
    """Unknown dataset, version, tag, path, remote, ..."""

    exit_code = 3


class NoHome(NotFound):
    """A command that only reads was pointed at a home that does not exist (nothing is created)."""


class AmbiguousRef(TesseraError):
    """A hash prefix matching more than one version."""

    exit_code = 4


class CorruptData(TesseraError):
    """Stored bytes that fail their hash check, or a malformed pack/metadata object."""

    exit_code = 5


class VerifyFailed(TesseraError):
    """`tessera verify` found files that differ from the version."""

    exit_code = 1


class SchemaTooNew(TesseraError):
    """The catalog was written by a newer tessera."""

    exit_code = 6


class DiskFull(TesseraError):
    """ENOSPC while writing: nothing was committed, the store is still usable."""

    exit_code = 7


class SourceError(TesseraError):
    """A file or directory being committed could not be read."""

    exit_code = 8


class RemoteError(TesseraError):
    """The remote failed: unreachable, bucket missing, server error after retries."""

    exit_code = 9


class TransientRemoteError(RemoteError):
    """A fault worth retrying: connection reset, timeout, 500/503, throttling."""


class AccessDenied(RemoteError):
    """The remote refused our credentials."""

    exit_code = 10


class PreconditionFailed(RemoteError):
    """A conditional write lost: the object already exists (or changed)."""

    exit_code = 11


class MountError(TesseraError):
    """The FUSE mount could not be made or undone."""

    exit_code = 12


class FuseUnavailable(MountError):
    """No usable FUSE on this machine (no /dev/fuse, no libfuse, no binding)."""

    exit_code = 13


class ReadOnlyHome(TesseraError):
    """A write was asked of a home on a read-only file system or without write permission."""

    exit_code = 14


class ConfigError(UsageError):
    """A malformed config file or a bad watch."""


class NotADirectory(UsageError):
    """A path used as a directory is a file or symlink (ENOTDIR in a mount)."""


class IsADirectory(UsageError):
    """A directory was read as a file (EISDIR in a mount)."""


class NotASymlink(UsageError):
    """readlink of something that is not a symlink (EINVAL in a mount)."""


class Interrupted(TesseraError):
    """The user (or SIGTERM) stopped the operation; nothing partial was kept."""

    exit_code = 130


# Every class above, most specific first: `error_for` turns an exit code (a mount server's, a child's)
# back into the error class that produced it.
ERROR_CLASSES: tuple[type[TesseraError], ...] = (
    FuseUnavailable, MountError, NotFound, AmbiguousRef, CorruptData, SchemaTooNew, DiskFull, SourceError,
    AccessDenied, PreconditionFailed, RemoteError, UsageError, Interrupted, TesseraError,
)


def error_for(code: int, message: str) -> TesseraError:
    """The `TesseraError` whose class exits with ``code`` (a plain one carrying the code otherwise)."""
    for cls in ERROR_CLASSES:
        if cls.exit_code == code:
            return cls(message)
    exc = TesseraError(message)
    exc.exit_code = code
    return exc


def raise_os_error(exc: OSError, what: str) -> NoReturn:
    """An `OSError` met while ``what`` as a one-line `TesseraError` (ENOSPC: `DiskFull`)."""
    if exc.errno == errno.ENOSPC:
        raise DiskFull(f"disk full while {what}: nothing was committed, the store is intact") from None
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise TesseraError(f"cannot write while {what}: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename else "")) from None
    raise TesseraError(f"error while {what}: {exc.strerror or exc}") from None
