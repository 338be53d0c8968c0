"""``tessera://``: versions as an fsspec filesystem, for pandas, pyarrow, polars, DuckDB, HF ``datasets``.

    import fsspec, pandas as pd
    df = pd.read_csv("tessera://tab@3f2a9c/data.csv")
    fs = fsspec.filesystem("tessera", home="/data/tessera", remote="s3://bucket/datasets")
    fs.ls("coco:v1/train", detail=True)

Paths are ``tessera://REF/path`` with REF = ``NAME`` (the version pinned by the nearest
``tessera.lock``, else the latest), ``NAME@HASHPREFIX`` or ``NAME:TAG``; ``tessera://`` alone lists the
datasets. A REF is resolved to a full version hash once per filesystem instance (and the resolution
travels with the instance when it is pickled into a worker, with the home it reads), so a long job
reads one version even if the dataset gets new commits meanwhile; `invalidate_cache` forgets the
resolutions.

Reading goes through the public `Version` API (`Version.open`: the one file reader, with its chunk
cache, read-ahead and lazy remote fetches), so a home that only knows a remote's metadata reads
chunks on demand and a range read fetches only the chunks it covers. The filesystem is read-only:
every write raises `ReadOnlyError`, which is both fsspec's ``NotImplementedError`` and an
``OSError(EROFS)``. A process that forks reopens the repository (SQLite connections and the lazy
fetcher's threads do not survive ``fork``).
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem  # type: ignore[import-untyped]

from tessera.config import default_home
from tessera.errors import BadRef, NotFound
from tessera.ids import parse_ref
from tessera.model import DIR, FILE, SYMLINK, Entry

if TYPE_CHECKING:
    from tessera.repo import Repo
    from tessera.version import Version

logger = logging.getLogger(__name__)

PROTOCOL = "tessera"
PREFIX = f"{PROTOCOL}://"
DEFAULT_BLOCK = 256 << 10  # fsspec read-ahead block: about one chunk (the file reader does the rest)
MAX_LINKS = 40
_TYPES = {FILE: "file", DIR: "directory", SYMLINK: "other"}
# Repositories a forked child inherited: never closed there (that would touch the parent's SQLite
# connection), only dropped from use.
_INHERITED: list[Any] = []


class BadURL(BadRef, ValueError):
    """A ``tessera://`` URL that does not parse (a `ValueError` for fsspec callers)."""


class ReadOnlyError(NotImplementedError, PermissionError):
    """A write through ``tessera://``: versions are immutable (fsspec's read-only convention,
    ``NotImplementedError``, and the OS's, ``EROFS``)."""

    def __init__(self, path: str, what: str = "write") -> None:
        super().__init__(f"tessera:// is read-only: cannot {what} {path}")
        self.errno = errno.EROFS
        self.strerror = f"Read-only file system (tessera:// cannot {what})"
        self.filename = path


def _not_found(path: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, why, PREFIX + path)


class TesseraFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """fsspec filesystem over the versions of one tessera home. Storage options: ``home`` (default
    ``$TESSERA_HOME`` or ``~/.tessera``), ``remote`` (the remote lazy reads and missing versions come
    from; default: the home's default remote)."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, home: str | None = None, remote: str | None = None, **kwargs: Any) -> None:
        super().__init__(home=home, remote=remote, **kwargs)
        self.home = None if home is None else str(home)
        self.remote = remote
        self._lock = threading.RLock()
        self._pid = -1
        self._repo: Repo | None = None
        self._refs: dict[str, str] = {}  # REF as written -> NAME@<64 hex>, once per instance
        self._versions: dict[str, Version] = {}  # on the current process's repository

    # -- paths ------------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        text = os.fspath(path) if not isinstance(path, str) else path
        if text.startswith(PREFIX):
            text = text[len(PREFIX):]
        elif text.startswith(f"{PROTOCOL}::"):
            text = text[len(PROTOCOL) + 2:]
        elif "://" in text:
            raise BadURL(f"not a tessera URL: {text!r} (expected tessera://NAME[@HASH|:TAG]/PATH)")
        return text.strip("/")

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        """``REF/some/path`` -> (REF, "some/path"); REF is checked."""
        root, _, rel = path.partition("/")
        if root:
            try:
                parse_ref(root)
            except BadRef as exc:
                raise BadURL(f"malformed URL {PREFIX}{path}: {exc}") from None
        rel = posixpath.normpath(rel) if rel else ""
        if rel in (".", ""):
            rel = ""
        elif rel == ".." or rel.startswith("../"):
            raise BadURL(f"malformed URL {PREFIX}{path}: the path leaves the version")
        return root, rel

    # -- the repository, per process --------------------------------------------------------------

    def repo(self) -> "Repo":
        """This process's `Repo` (reopened after ``fork``: no SQLite connection crosses it)."""
        with self._lock:
            if self._repo is None or self._pid != os.getpid():
                from tessera.repo import Repo

                if self._repo is not None:
                    _INHERITED.append(self._repo)
                self._repo = Repo(self.home, remote=self.remote)
                self._pid = os.getpid()
                self._versions = {}
            return self._repo

    def version(self, ref: str) -> "Version":
        """The version REF names, resolved once per filesystem instance."""
        repo = self.repo()
        with self._lock:
            found = self._versions.get(ref)
            if found is not None:
                return found
            full = self._refs.get(ref, ref)
        try:
            v = repo.get(full)
        except NotFound as exc:
            raise _not_found(ref, str(exc)) from None
        with self._lock:
            self._refs.setdefault(ref, v.ref)
            self._versions[ref] = v
        return v

    def invalidate_cache(self, path: str | None = None) -> None:
        """Forget REF resolutions: the next access resolves ``NAME`` to its then-latest version."""
        with self._lock:
            self._refs.clear()
            self._versions.clear()
        super().invalidate_cache(path)

    def __reduce__(self) -> Any:
        """Pickle with the REF resolutions and the home this process reads: a worker started apart from
        this process (a Ray or Dask worker, a ``spawn`` child) has its own ``$TESSERA_HOME``, if any."""
        options = dict(self.storage_options)
        if not self.storage_args and options.get("home") is None:
            options["home"] = str(self._repo.home if self._repo is not None else default_home())
        return _restore, (type(self), self.storage_args, options, dict(self._refs))

    # -- entries ----------------------------------------------------------------------------------

    def _lookup(self, path: str) -> tuple[str, "Version", Entry]:
        root, rel = self._split(self._strip_protocol(path))
        if not root:
            raise IsADirectoryError(errno.EISDIR, "the tessera:// root lists datasets", PREFIX)
        v = self.version(root)
        try:
            return root, v, v.entry(rel)
        except NotFound as exc:
            raise _not_found(f"{root}/{rel}", str(exc)) from None

    def _target(self, path: str) -> tuple[str, "Version", Entry]:
        """The entry at ``path`` with symlinks followed (relative targets inside the version only)."""
        root, v, e = self._lookup(path)
        for _ in range(MAX_LINKS):
            if not e.is_symlink:
                return root, v, e
            target = e.target or ""
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(e.path), target))
            if target.startswith("/") or joined == ".." or joined.startswith("../"):
                raise _not_found(f"{root}/{e.path}", f"symlink {e.path} -> {target} points outside the version")
            try:
                e = v.entry("" if joined == "." else joined)
            except NotFound:
                raise _not_found(f"{root}/{e.path}", f"symlink {e.path} -> {target} is dangling") from None
        raise OSError(errno.ELOOP, "too many levels of symbolic links", PREFIX + path)

    def _file(self, path: str) -> tuple[str, "Version", Entry]:
        root, v, e = self._target(path)
        if e.is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory", f"{PREFIX}{root}/{e.path}")
        return root, v, e

    @staticmethod
    def _info(root: str, v: "Version", e: Entry) -> dict[str, Any]:
        out: dict[str, Any] = {"name": f"{root}/{e.path}" if e.path else root, "size": e.size,
                               "type": _TYPES[e.kind], "mode": e.st_mode, "islink": e.is_symlink,
                               "version": v.ref, "mtime": v.time}
        if e.sha256:
            out["sha256"] = out["etag"] = e.sha256
        if e.is_dir:
            out["tree"] = e.tree_id or v.hash
        if e.is_symlink:
            out["destination"] = e.target
        if e.meta:
            out["meta"] = e.meta
        return out

    # -- fsspec reading API -----------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        root, rel = self._split(self._strip_protocol(path))
        if not root:
            infos = [{"name": d.name, "size": 0, "type": "directory", "head": d.head, "versions": d.versions}
                     for d in self.repo().datasets()]
        else:
            _, v, e = self._lookup(path)
            if e.is_dir:
                infos = [self._info(root, v, x) for x in v.listdir(e.path)]
            else:
                infos = [self._info(root, v, e)]
        return infos if detail else [i["name"] for i in infos]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        root, _ = self._split(self._strip_protocol(path))
        if not root:
            return {"name": "", "size": 0, "type": "directory"}
        return self._info(*self._lookup(path))

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:
        root, _ = self._split(self._strip_protocol(path))
        if not root or maxdepth is not None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        try:
            _, v, top = self._lookup(path)
        except FileNotFoundError:
            return {} if detail else []
        out: dict[str, dict[str, Any]] = {}
        if top.is_dir and withdirs:
            out[self._info(root, v, top)["name"]] = self._info(root, v, top)
        for e in v.walk(top.path, dirs=withdirs):
            info = self._info(root, v, e)
            out[info["name"]] = info
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        _, v, e = self._file(path)
        lo, hi = _span(e.size, start, end)
        if lo >= hi:
            return b""
        with v.open(e.path) as f:
            f.seek(lo)
            return _read_exactly(f, hi - lo)

    def ukey(self, path: str) -> str:
        """The file's SHA-256 (a directory's tree id): changes exactly when the content does."""
        _, v, e = self._target(path)
        return e.sha256 or e.tree_id or v.hash

    def checksum(self, path: str) -> int:
        return int(self.ukey(path), 16)

    def modified(self, path: str) -> datetime:
        """When the version was committed (versions are immutable: every path shares that time)."""
        _, v, _ = self._lookup(path)
        return datetime.fromtimestamp(v.time, tz=timezone.utc)

    created = modified

    def _open(self, path: str, mode: str = "rb", block_size: int | str | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> "TesseraFile":
        if mode != "rb":
            raise ReadOnlyError(PREFIX + self._strip_protocol(path), f"open in mode {mode!r}")
        root, v, e = self._file(path)
        return TesseraFile(self, self._strip_protocol(path), v, e,
                           block_size=DEFAULT_BLOCK if block_size in (None, "default") else block_size,
                           cache_type=kwargs.pop("cache_type", "readahead"), cache_options=cache_options)

    # -- writes: refused --------------------------------------------------------------------------

    def _refuse(self, path: Any, what: str = "write") -> NoReturn:
        raise ReadOnlyError(str(path), what)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> NoReturn:
        self._refuse(path, "create directory")

    def makedirs(self, path: str, exist_ok: bool = False) -> NoReturn:
        self._refuse(path, "create directory")

    def rmdir(self, path: str) -> NoReturn:
        self._refuse(path, "remove")

    def rm_file(self, path: str) -> NoReturn:
        self._refuse(path, "remove")

    def _rm(self, path: str) -> NoReturn:
        self._refuse(path, "remove")

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> NoReturn:
        self._refuse(path, "remove")

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> NoReturn:
        self._refuse(path2)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> NoReturn:
        self._refuse(path1, "move")

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> NoReturn:
        self._refuse(path)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> NoReturn:
        self._refuse(path)

    def put_file(self, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite",
                 **kwargs: Any) -> NoReturn:
        self._refuse(rpath)


class TesseraFile(AbstractBufferedFile):  # type: ignore[misc]
    """A seekable read-only file: fsspec's small read-ahead block over `Version.open`."""

    def __init__(self, fs: TesseraFileSystem, path: str, version: "Version", entry: Entry, *,
                 block_size: int | str, cache_type: str, cache_options: dict[str, Any] | None) -> None:
        self._root = path.partition("/")[0]
        self._entry = entry
        self._raw: Any = None
        self._raw_pid = -1
        super().__init__(fs, path, mode="rb", block_size=block_size, cache_type=cache_type,
                         cache_options=cache_options, size=entry.size,
                         details=TesseraFileSystem._info(self._root, version, entry))

    def _handle(self) -> Any:
        if self._raw is None or self._raw_pid != os.getpid():
            self._raw = self.fs.version(self._root).open(self._entry.path)
            self._raw_pid = os.getpid()
        return self._raw

    def _fetch_range(self, start: int, end: int) -> bytes:
        lo, hi = _span(self._entry.size, start, end)
        if lo >= hi:
            return b""
        raw = self._handle()
        raw.seek(lo)
        return _read_exactly(raw, hi - lo)

    def close(self) -> None:
        if self._raw is not None and self._raw_pid == os.getpid():
            self._raw.close()
        self._raw = None
        super().close()


def _span(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """fsspec's (start, end) convention (None = whole, negative = from the end), clipped to the file."""
    lo = 0 if start is None else (max(0, size + start) if start < 0 else start)
    hi = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
    return lo, hi


def _read_exactly(f: Any, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = f.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _restore(cls: type[TesseraFileSystem], args: tuple[Any, ...], kwargs: dict[str, Any],
             refs: dict[str, str]) -> TesseraFileSystem:
    """Unpickle a filesystem with the REF resolutions it had (a worker reads what its parent did). fsspec
    hands back this process's cached instance for the same options; a long-lived worker's instance may
    have resolved a REF otherwise (an earlier job, before a commit): then a fresh instance."""
    fs = cls(*args, **kwargs)
    with fs._lock:
        if all(fs._refs.get(ref, full) == full for ref, full in refs.items()):
            fs._refs.update(refs)
            return fs
    fresh = cls(*args, skip_instance_cache=True, **kwargs)
    fresh._refs.update(refs)
    return fresh
