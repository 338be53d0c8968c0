"""The one place that loads a FUSE binding.

Preference: libfuse 3's low-level API through ctypes (`LowLevel`, served by `tessera.fuse.lowlevel`),
then the high-level API through ``mfusepy`` (maintained fusepy fork, libfuse 3), then fusepy's ``fuse``
(libfuse 2), both served by `tessera.fuse.operations`. Every failure is kept and reported together in
one `FuseUnavailable` that says what to install. ``TESSERA_FUSE_API=highlevel`` skips the low-level API;
``FUSE_LIBRARY_PATH`` / ``FUSE_LIBRARY_NAME`` choose the library for every binding alike.

Two traps handled here:

- mfusepy loads libfuse 2 first when both are installed; ``FUSE_LIBRARY_NAME=fuse3`` (set before the
  import unless the user chose otherwise) makes it take libfuse 3 (1 MiB reads, no-open, readdirplus).
- fusepy's module is named ``fuse``, like this repository's ``fuse/`` folder; when the repository root
  is on ``sys.path`` a plain ``import fuse`` finds the folder. The fallback looks the module up on
  ``sys.path`` minus any entry whose ``fuse/`` is ours.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.machinery
import importlib.util
import logging
import os
import struct
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence, Union

from tessera.errors import FuseUnavailable

logger = logging.getLogger(__name__)

INSTALL_HINT = "install libfuse 3 (`apt-get install fuse3`) and the binding (`pip install mfusepy`)"
FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags
# fuse_conn_info.want bits (libfuse 3 fuse_common.h)
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_CACHE_SYMLINKS = 1 << 23


def tune_connection(conn: Any) -> None:
    """Kernel capabilities for an immutable tree (libfuse 3, called from ``init``):

    - readdirplus on every READDIR call, not only the first (``READDIRPLUS_AUTO`` off): otherwise
      entries past the first buffer come without attributes and each costs a LOOKUP;
    - no ``AUTO_INVAL_DATA``: nothing ever changes, so reads need not check attributes first;
    - ``CACHE_SYMLINKS``: readlink answers from the page cache.
    """
    if conn is None:
        return
    conn.want = (conn.want & ~(FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_AUTO_INVAL_DATA)) | \
        (conn.capable & FUSE_CAP_CACHE_SYMLINKS)


@dataclass(frozen=True)
class Binding:
    name: str  # "mfusepy" or "fusepy"
    module: ModuleType
    FUSE: Any
    Operations: Any
    FuseOSError: Any
    libfuse_major: int
    libfuse_minor: int = 0
    # Hands libfuse a read reply without copying file data through Python (None: use plain `read`).
    write_bufvec: Callable[[Any, Sequence[Any]], None] | None = None

    @property
    def description(self) -> str:
        return f"{self.name} over libfuse {self.libfuse_major}"


@dataclass(frozen=True)
class LowLevel:
    """libfuse 3's low-level API (``fuse_lowlevel.h``) through ctypes, with argument types declared."""

    lib: Any  # ctypes.CDLL
    path: str
    version: int  # fuse_version(): 314 for 3.14

    @property
    def description(self) -> str:
        return f"libfuse {self.version // 100}.{self.version % 100} low-level API"


_cached: Binding | None = None
_cached_lowlevel: LowLevel | None = None


def _check_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable("FUSE is not usable here: /dev/fuse does not exist (load the fuse kernel module, "
                              f"or start the container with --device /dev/fuse --cap-add SYS_ADMIN); {INSTALL_HINT}")


def load_fuse() -> Union[LowLevel, Binding]:
    """The binding a mount server uses: libfuse 3's low-level API if it loads (and
    ``TESSERA_FUSE_API`` is not ``highlevel``), else `load_binding`. Raises one `FuseUnavailable`
    listing every failure."""
    _check_device()
    if os.environ.get("TESSERA_FUSE_API", "").lower() == "highlevel":
        return load_binding()
    try:
        return load_lowlevel()
    except FuseUnavailable as exc:
        return load_binding(failures=[f"libfuse3 low-level API: {exc}"])


def load_lowlevel() -> LowLevel:
    """Load libfuse 3 (3.0 - 3.16: the struct layouts `tessera.fuse.lowlevel` writes) for its low-level
    API (once). Raises `FuseUnavailable` saying why not."""
    global _cached_lowlevel
    if _cached_lowlevel is None:
        try:
            _cached_lowlevel = _load_lowlevel()
        except (OSError, AttributeError, ValueError) as exc:
            raise FuseUnavailable(f"{type(exc).__name__}: {exc}") from None
    return _cached_lowlevel


def load_binding(failures: list[str] | None = None) -> Binding:
    """Import the high-level FUSE binding (once). Raises `FuseUnavailable` listing every failure
    (``failures``: those of bindings tried before)."""
    global _cached
    if _cached is not None:
        return _cached
    _check_device()
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    failures = list(failures or [])
    for name, loader in (("mfusepy", _load_mfusepy), ("fusepy", _load_fusepy)):
        try:
            _cached = loader()
            return _cached
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError (no libfuse), AttributeError (ABI)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    raise FuseUnavailable("no FUSE binding could be loaded (" + "; ".join(failures) + f"): {INSTALL_HINT}")


def _load_lowlevel() -> LowLevel:
    path = os.environ.get("FUSE_LIBRARY_PATH") or ""
    if not path:
        name = os.environ.get("FUSE_LIBRARY_NAME") or "fuse3"
        path = ctypes.util.find_library(name) or ""
        if not path:
            raise OSError(f"library {name!r} not found (apt-get install fuse3)")
    lib = ctypes.CDLL(path)
    version = int(lib.fuse_version())
    if not 300 <= version < 317:
        raise ValueError(f"{path} is libfuse {version // 100 if version >= 100 else version // 10}."
                         f"{version % 100 if version >= 100 else version % 10}; the low-level server needs 3.0 - 3.16")
    vp, size_t, cint = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    signatures: dict[str, tuple[list[Any], Any]] = {
        "fuse_session_new": ([vp, vp, size_t, vp], vp),
        "fuse_session_mount": ([vp, ctypes.c_char_p], cint),
        "fuse_session_loop": ([vp], cint),
        "fuse_session_loop_mt_31": ([vp, cint], cint),
        "fuse_session_unmount": ([vp], None),
        "fuse_session_destroy": ([vp], None),
        "fuse_session_exit": ([vp], None),
        "fuse_set_signal_handlers": ([vp], cint),
        "fuse_remove_signal_handlers": ([vp], None),
        "fuse_reply_buf": ([vp, vp, size_t], cint),
        "fuse_reply_data": ([vp, vp, cint], cint),
        "fuse_reply_err": ([vp, cint], cint),
        "fuse_reply_open": ([vp, vp], cint),
        "fuse_reply_xattr": ([vp, size_t], cint),
        "fuse_reply_none": ([vp], None),
    }
    for fname, (argtypes, restype) in signatures.items():
        fn = getattr(lib, fname)  # AttributeError: not this API
        fn.argtypes, fn.restype = argtypes, restype
    return LowLevel(lib, path, version)


def _load_mfusepy() -> Binding:
    import mfusepy

    major = int(getattr(mfusepy, "fuse_version_major", 2))
    minor = int(getattr(mfusepy, "fuse_version_minor", 0))
    # struct fuse_buf / fuse_bufvec as laid out by libfuse 3.0 - 3.16 (3.17 changed structs).
    writer = BufvecWriter() if major == 3 and minor < 17 and sys.platform.startswith("linux") else None
    return Binding("mfusepy", mfusepy, _plus_fuse_class(mfusepy), mfusepy.Operations, mfusepy.FuseOSError,
                   major, minor, writer)


def _load_fusepy() -> Binding:
    ours = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path
            if os.path.abspath(os.path.join(p or ".", "fuse")) != ours]
    spec = importlib.machinery.PathFinder.find_spec("fuse", path)
    if spec is None or spec.loader is None:
        raise ImportError("no module named 'fuse' (pip install fusepy)")
    module = sys.modules.get("fuse")
    if module is None or getattr(module, "__file__", None) != spec.origin:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not hasattr(module, "FUSE"):
        raise ImportError(f"{spec.origin} is not fusepy")
    return Binding("fusepy", module, module.FUSE, module.Operations, module.FuseOSError, 2)


_FUSE_BUF_IS_FD = 1 << 1
_FUSE_BUF_FD_SEEK = 1 << 2
_BUF = struct.Struct("@QiQiq")  # struct fuse_buf {size_t size; flags; void *mem; int fd; off_t pos;}
_VEC = struct.Struct("@QQQ")  # struct fuse_bufvec {size_t count, idx, off; struct fuse_buf buf[];}


class BufvecWriter:
    """Builds the ``struct fuse_bufvec`` a ``read_buf`` callback returns to libfuse.

    Segments are ``bytes`` (copied once into malloc'd memory) or objects with ``fd``, ``pos`` and
    ``size`` (read by libfuse itself with ``pread``, in C, without the GIL). libfuse frees the vector
    and the memory buffers (``fuse_free_buf``), so both come from libc's malloc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._malloc = libc.malloc
        self._malloc.restype = ctypes.c_void_p
        self._malloc.argtypes = [ctypes.c_size_t]
        self._free = libc.free
        self._free.argtypes = [ctypes.c_void_p]

    def __call__(self, bufpp: Any, segments: Sequence[Any]) -> None:
        if not segments:
            segments = [b""]
        n = len(segments)
        raw = bytearray(_VEC.size + n * _BUF.size)
        _VEC.pack_into(raw, 0, n, 0, 0)
        mems: list[int] = []
        try:
            for k, seg in enumerate(segments):
                at = _VEC.size + k * _BUF.size
                if isinstance(seg, bytes):
                    mem = 0
                    if seg:
                        mem = self._malloc(len(seg))
                        if not mem:
                            raise MemoryError
                        mems.append(mem)
                        ctypes.memmove(mem, seg, len(seg))
                    _BUF.pack_into(raw, at, len(seg), 0, mem, -1, 0)
                else:
                    _BUF.pack_into(raw, at, seg.size, _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK, 0, seg.fd, seg.pos)
            vec = self._malloc(len(raw))
            if not vec:
                raise MemoryError
        except BaseException:
            for mem in mems:
                self._free(mem)
            raise
        ctypes.memmove(vec, bytes(raw), len(raw))
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vec


def _plus_fuse_class(mfusepy: ModuleType) -> Any:
    """mfusepy's FUSE with real readdirplus on libfuse 3: entries go to the kernel *with* their
    attributes (FUSE_FILL_DIR_PLUS), so `ls -l`, `os.walk` + `stat` and `find` cost no LOOKUP or
    GETATTR per entry. libfuse's high-level API takes the given stat as is (no extra getattr call)."""
    if getattr(mfusepy, "fuse_version_major", 2) != 3:
        return mfusepy.FUSE

    base: Any = mfusepy.FUSE

    class PlusFUSE(base):  # type: ignore[misc]
        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                           flags: int) -> int:
            if not flags & FUSE_READDIR_PLUS or not hasattr(self.operations, "readdir_attrs"):
                return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
            # Offset mode (each entry carries the offset of the next one): libfuse 3.14 only does the
            # node bookkeeping readdirplus needs in this mode; its list mode sends entries without
            # node ids, so the kernel would LOOKUP every name again.
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            items = self.operations.readdir_attrs(decoded, fip.contents.fh)
            st = mfusepy.c_stat()
            for k in range(offset, len(items)):
                name, attrs = items[k]
                fill_stat(st, attrs)
                if filler(buf, name.encode(self.encoding, self.errors), st, k + 1, FUSE_FILL_DIR_PLUS) != 0:
                    break
            return 0

        def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
            # mfusepy's generic version loops over the dict with getattr/setattr; this is the hot path
            # of every first LOOKUP, so fill the known fields directly.
            attrs = self.operations.getattr(None if path is None else path.decode(self.encoding, self.errors), None)
            fill_stat(buf.contents, attrs)
            return 0

    sizeof_stat = ctypes.sizeof(mfusepy.c_stat)

    def fill_stat(st: Any, a: dict[str, int]) -> None:
        ctypes.memset(ctypes.addressof(st), 0, sizeof_stat)
        st.st_ino = a["st_ino"]
        st.st_mode = a["st_mode"]
        st.st_nlink = a["st_nlink"]
        st.st_size = a["st_size"]
        st.st_blocks = a["st_blocks"]
        st.st_blksize = a["st_blksize"]
        st.st_uid = a["st_uid"]
        st.st_gid = a["st_gid"]
        sec, nsec = divmod(a["st_mtime"], 1_000_000_000)
        for ts in (st.st_atimespec, st.st_mtimespec, st.st_ctimespec):
            ts.tv_sec = sec
            ts.tv_nsec = nsec

    return PlusFUSE
