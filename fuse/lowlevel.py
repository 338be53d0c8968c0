"""The mount server on libfuse 3's low-level API: requests by node id, replies packed in the kernel's format.

The high-level API (`tessera.fuse.operations` over mfusepy) hands every request over as a path that
libfuse built, and mfusepy converts every argument and every reply field through generic Python code.
Here each request arrives as (node id, name) through one small ctypes callback, and replies are packed
straight into the kernel's wire structures:

- **Node ids** encode where an entry sits: ``(slot << 32) | (index + 1)``, where ``slot`` numbers the
  directories this mount has given the kernel (the root directory is slot 1; the root itself is node 1),
  each remembered as (path, tree id). Nothing is kept per file: a node id names its directory and its
  position, and every answer is recomputed from the directory's `Listing` (`VersionFS`'s small LRU over
  the version's tree LRU). The inode number a ``stat`` shows is `VersionFS`'s stable hash of the path.
  So the server's memory is bounded by those caches' settings, whatever the number of entries listed;
  only the slot table grows, by one (path, tree id) per directory the kernel has seen.
- **Listings** are packed per request, from the offset the kernel asks for, as many whole records as fit
  its buffer (recent kernels ask for a whole directory at once). Two ways (``listing``):
  ``attrs``: READDIRPLUS, each entry with its node id and attributes (``fuse_direntplus``), so ``ls -l``,
  ``du`` and opening listed files cost no LOOKUP; but the kernel builds an inode and a dentry for every
  entry listed (about 5-8 us each here, and ~1 KiB of kernel memory), which dominates a ``find``.
  ``names``: plain READDIR (``fuse_dirent``: name, inode number, type); ``find -type f``, ``os.walk``
  and ``os.scandir`` need nothing more, and the kernel instantiates only what is then looked up or
  opened (one LOOKUP each, answered from the listing). ``.`` and ``..`` carry no node id.
- **LOOKUP and GETATTR** bisect the directory's sorted entries and pack one ``fuse_entry_out`` (a GETATTR
  reply is its last 104 bytes: ``fuse_attr_out`` overlaps it exactly, the ``*_valid_nsec`` fields are 0).
- **Reads** go to `VersionFS.read_plan_at` by (directory, index); verified ranges of local packs go to
  libfuse as file descriptors in a ``fuse_bufvec`` (it ``pread``s them in C), other bytes as one buffer.
- **What needs no answer from Python gets none**: FORGET, IOCTL (Python's ``isatty`` on every buffered
  ``open``), FLUSH, RELEASE, ACCESS and the like are left to libfuse's C defaults. OPEN and OPENDIR are
  answered with ENOSYS once (``no_open``): the kernel then stops sending them, keeps file pages cached
  across opens and caches directory listings itself (its defaults for a file system without open).
- **Writes of every kind** answer EROFS (the mount is also ``ro``, so the kernel refuses them first).

Errors: `TesseraError`s become errnos (`tessera.fuse.operations.errno_for`; EIO ones are logged), any
other exception is logged with its traceback and answered EIO: a request is always answered, and the
mount stays up.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable

from tessera.errors import MountError, NotADirectory, NotFound, TesseraError
from tessera.fuse._binding import FUSE_CAP_AUTO_INVAL_DATA, FUSE_CAP_CACHE_SYMLINKS, LowLevel
from tessera.fuse.operations import errno_for
from tessera.store import FileRange
from tessera.vfs import IO_BLOCK, Attr, Listing, VersionFS

logger = logging.getLogger(__name__)

ROOT_NODE = 1
ATTRS, NAMES = "attrs", "names"  # how directories are listed (see the module docstring)
LISTINGS = (ATTRS, NAMES)

# The kernel's wire structures (linux/fuse.h, stable since protocol 7.9). fuse_entry_out: node id,
# generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec, then fuse_attr: ino, size,
# blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize,
# flags. A fuse_direntplus is a fuse_entry_out followed by a fuse_dirent (ino, off, namelen, type, name
# padded to 8 bytes).
_ENTRY_OUT = "QQQQII" + "QQQQQQIIIIIIIIII"
_ENTRY = struct.Struct("<" + _ENTRY_OUT)
_DIRENTPLUS = struct.Struct("<" + _ENTRY_OUT + "QQII")
_DIRENT = struct.Struct("<QQII")
_STATFS = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs
_DT = {"file": 8, "dir": 4, "symlink": 10}  # d_type of each entry kind (DT_REG, DT_DIR, DT_LNK)
_ENTRY_SIZE, _ATTR_AT, _ATTR_SIZE = 128, 24, 104  # fuse_attr_out = bytes 24..128 of a fuse_entry_out
assert _ENTRY.size == _ENTRY_SIZE and _DIRENTPLUS.size == 152 and _STATFS.size == 80

# struct fuse_bufvec / fuse_buf of libfuse 3.0 - 3.16 (the loader refuses other versions)
_VEC = struct.Struct("@QQQ")
_BUF = struct.Struct("@QiQiq")
_FUSE_BUF_IS_FD_SEEK = (1 << 1) | (1 << 2)
# struct fuse_file_info: int flags, then a word of bit fields (keep_cache is bit 2, cache_readdir bit 6)
_FI_BITS_AT = 4
_KEEP_CACHE, _CACHE_READDIR = 1 << 2, 1 << 6
# struct fuse_conn_info: proto_major, proto_minor, max_write, max_read, max_readahead, capable, want
_CONN_CAPABLE_AT, _CONN_WANT_AT = 20, 24
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14

# Callback prototypes (libfuse 3.14 fuse_lowlevel.h); write-like operations are declared with the
# request only: the SysV calling convention lets a callee ignore arguments it does not declare.
_V, _U64 = ctypes.c_void_p, ctypes.c_uint64
_INIT = ctypes.CFUNCTYPE(None, _V, _V)
_REQ = ctypes.CFUNCTYPE(None, _V)
_REQ_INO = ctypes.CFUNCTYPE(None, _V, _U64)
_REQ_INO_FI = ctypes.CFUNCTYPE(None, _V, _U64, _V)
_LOOKUP = ctypes.CFUNCTYPE(None, _V, _U64, ctypes.c_char_p)
_READ = ctypes.CFUNCTYPE(None, _V, _U64, ctypes.c_size_t, ctypes.c_int64, _V)
_GETXATTR = ctypes.CFUNCTYPE(None, _V, _U64, ctypes.c_char_p, ctypes.c_size_t)
_LISTXATTR = ctypes.CFUNCTYPE(None, _V, _U64, ctypes.c_size_t)
# slots of struct fuse_lowlevel_ops
_OPS = {"init": 0, "destroy": 1, "lookup": 2, "forget": 3, "getattr": 4, "setattr": 5, "readlink": 6,
        "mknod": 7, "mkdir": 8, "unlink": 9, "rmdir": 10, "symlink": 11, "rename": 12, "link": 13, "open": 14,
        "read": 15, "write": 16, "flush": 17, "release": 18, "fsync": 19, "opendir": 20, "readdir": 21,
        "releasedir": 22, "fsyncdir": 23, "statfs": 24, "setxattr": 25, "getxattr": 26, "listxattr": 27,
        "removexattr": 28, "access": 29, "create": 30, "getlk": 31, "setlk": 32, "bmap": 33, "ioctl": 34,
        "poll": 35, "write_buf": 36, "retrieve_reply": 37, "forget_multi": 38, "flock": 39, "fallocate": 40,
        "readdirplus": 41, "copy_file_range": 42, "lseek": 43}
WRITE_OPS = ("setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "write", "create",
             "setxattr", "removexattr", "fallocate", "copy_file_range")


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


@dataclass
class ServerStats:
    """Requests answered by Python (logged when the mount ends; what tests count)."""

    lookups: int = 0
    getattrs: int = 0
    listings: int = 0  # READDIR / READDIRPLUS requests

    def __str__(self) -> str:
        return f"{self.lookups} lookups, {self.getattrs} getattrs, {self.listings} listing requests"


class LowLevelServer:
    """Serves a `VersionFS` at a mountpoint through libfuse 3's low-level API."""

    def __init__(self, api: LowLevel, vfs: VersionFS, *, no_open: bool = True, timeout: float = 86400.0,
                 listing: str = ATTRS, on_init: Callable[[], None] | None = None) -> None:
        if listing not in LISTINGS:
            raise ValueError(f"listing must be one of {LISTINGS}, not {listing!r}")
        self.api = api
        self.vfs = vfs
        self.no_open = no_open
        self.listing = listing
        self.on_init = on_init
        self.stats = ServerStats()
        self._valid = int(timeout)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._sec, self._nsec = divmod(vfs.mtime_ns, 1_000_000_000)
        root = vfs.directory("")
        # slot -> (directory path, tree id); slot 0 unused, 1 is the root. One row per directory the
        # kernel was given a node id for: nothing is kept per file.
        self._dirs: list[tuple[str, str]] = [("", ""), ("", root.tree_id)]
        self._slots: dict[int, int] = {ROOT_NODE: 1}  # directory node id -> slot
        self._lock = threading.Lock()  # slot allocation
        self._local = threading.local()
        self._negative = _ENTRY.pack(0, 0, self._valid, 0, *([0] * 18))
        self._root_attr = _ENTRY.pack(ROOT_NODE, 0, self._valid, self._valid, 0, 0,
                                      *self._fuse_attr(vfs.root_attr()))[_ATTR_AT:_ATTR_AT + _ATTR_SIZE]
        s = vfs.statfs()
        self._statfs = _STATFS.pack(s.blocks, 0, 0, s.files, 0, s.bsize, s.namemax, s.frsize, 0)
        self.callbacks: dict[str, Any] = {}
        self._session: int | None = None

    # -- serving ------------------------------------------------------------------------------------

    def serve(self, mountpoint: str, *, fsname: str, threads: bool = False, debug: bool = False) -> int:
        """Mount, serve until unmounted or signalled, unmount. Returns the number of the signal that
        stopped the loop (0: unmounted). `MountError` if libfuse refuses to mount."""
        lib = self.api.lib
        ops = (ctypes.c_void_p * len(_OPS))()
        for name, cb in self._make_callbacks().items():
            ops[_OPS[name]] = ctypes.cast(cb, ctypes.c_void_p).value
        argv = [b"tessera", b"-o", f"ro,default_permissions,fsname={fsname},subtype=tessera".encode()]
        if debug:
            argv.append(b"-d")
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        args = _Args(len(argv), c_argv, 0)
        se = lib.fuse_session_new(ctypes.byref(args), ops, ctypes.sizeof(ops), None)
        if not se:
            raise MountError("libfuse refused the mount options (see the mount log)")
        self._session = se
        old_int = signal.signal(signal.SIGINT, signal.SIG_DFL) if threading.current_thread() is \
            threading.main_thread() else None
        try:
            if lib.fuse_set_signal_handlers(se) != 0:
                raise MountError("libfuse could not install its signal handlers")
            try:
                if lib.fuse_session_mount(se, os.fsencode(mountpoint)) != 0:
                    raise MountError(f"libfuse could not mount {mountpoint} (see the mount log)")
                try:
                    status = int(lib.fuse_session_loop_mt_31(se, 0) if threads else lib.fuse_session_loop(se))
                finally:
                    lib.fuse_session_unmount(se)
            finally:
                lib.fuse_remove_signal_handlers(se)
        finally:
            self._session = None
            lib.fuse_session_destroy(se)
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)
        if status < 0:
            raise MountError(f"the FUSE loop failed ({os.strerror(-status)})")
        return status

    def _make_callbacks(self) -> dict[str, Any]:
        cbs: dict[str, Any] = {
            "init": _INIT(self._init), "lookup": _LOOKUP(self._lookup), "getattr": _REQ_INO_FI(self._getattr),
            "readlink": _REQ_INO(self._readlink), "open": _REQ_INO_FI(self._open),
            "opendir": _REQ_INO_FI(self._opendir), "read": _READ(self._read),
            "statfs": _REQ_INO(self._statfs_cb), "getxattr": _GETXATTR(self._getxattr),
            "listxattr": _LISTXATTR(self._listxattr),
        }
        if self.listing == ATTRS:  # without a readdirplus op, libfuse does not offer READDIRPLUS to the kernel
            cbs["readdirplus"] = _READ(self._readdirplus)
        else:
            cbs["readdir"] = _READ(self._readdir)
        erofs = _REQ(self._erofs)
        cbs.update((name, erofs) for name in WRITE_OPS)
        self.callbacks = cbs  # referenced for as long as the server lives: libfuse calls into them
        return cbs

    # -- node ids and directories -------------------------------------------------------------------

    def _fuse_attr(self, a: Attr) -> tuple[int, ...]:
        sec, nsec = self._sec, self._nsec
        return (a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink, self._uid, self._gid, 0,
                IO_BLOCK, 0)

    def _listing(self, slot: int) -> Listing:
        path, tree_id = self._dirs[slot]
        return self.vfs.listing(path, tree_id)

    def _dir(self, node: int) -> tuple[int, Listing]:
        """(slot, listing) of the directory whose node id is ``node`` (`NotADirectory`, `NotFound`)."""
        slot = self._slots.get(node)
        if slot is not None:
            return slot, self._listing(slot)
        parent, index = self._entry(node)
        listing = self.vfs.subdirectory(parent, index)  # NotADirectory for anything else
        with self._lock:
            slot = self._slots.get(node)
            if slot is None:
                slot = self._slots[node] = len(self._dirs)
                self._dirs.append((listing.path, listing.tree_id))
        return slot, listing

    def _entry(self, node: int) -> tuple[Listing, int]:
        """(parent directory, index) of a node other than the root."""
        slot, index = node >> 32, (node & 0xFFFFFFFF) - 1
        if slot <= 0 or slot >= len(self._dirs) or index < 0:
            raise NotFound(f"unknown node {node}")
        listing = self._listing(slot)
        if index >= len(listing.entries):
            raise NotFound(f"unknown node {node}")
        return listing, index

    def entry_reply(self, slot: int, listing: Listing, i: int) -> bytes:
        """The ``fuse_entry_out`` of entry ``i`` of directory ``slot``."""
        return _ENTRY.pack((slot << 32) | (i + 1), 0, self._valid, self._valid, 0, 0,
                           *self._fuse_attr(self.vfs.attr(listing, i)))

    def listing_batch(self, node: int, off: int, size: int, *, plus: bool) -> bytes:
        """The records of directory ``node`` from record ``off`` on (0 is ".", 1 is "..", 2 + i is entry
        i) that fit in ``size`` bytes: ``fuse_direntplus`` records (``plus``: each entry with its node id
        and attributes, so the kernel need not LOOKUP it) or plain ``fuse_dirent``s. Each record's
        ``off`` is the index of the next one, which is where the kernel asks next; empty past the end.
        Packed per request from the listing: nothing is kept."""
        slot, listing = self._dir(node)
        entries = listing.entries
        n = len(entries)
        if off < 0 or off >= n + 2:
            return b""
        parts: list[bytes] = []
        used = 0
        if off == 0:
            self.vfs.listed(listing)  # a walk lists other directories next: have them parsed meanwhile
        if off < 2:
            own = self._fuse_attr(self.vfs.dir_attr(listing))
            for r, name in ((0, b".\0\0\0\0\0\0\0"), (1, b"..\0\0\0\0\0\0"))[off:]:
                head = _DIRENTPLUS.pack(0, 0, 0, 0, 0, 0, *own, own[0], r + 1, r + 1, 4) if plus else \
                    _DIRENT.pack(own[0], r + 1, r + 1, 4)
                if used + len(head) + 8 > size:
                    return b"".join(parts)
                parts += (head, name)
                used += len(head) + 8
        first = max(off - 2, 0)
        stop = min(n, first + size // (_DIRENTPLUS.size + 8 if plus else _DIRENT.size + 8) + 1)
        if not plus:  # names, inode numbers and types only
            pack = _DIRENT.pack
            for i, ino in enumerate(self.vfs.inos(listing, first, stop), first):
                te = entries[i]
                name = te.name.encode("utf-8", "surrogateescape")
                k = len(name)
                pad = -k & 7
                if used + _DIRENT.size + k + pad > size:
                    break
                parts.append(pack(ino, i + 3, k, _DT[te.kind]))
                parts.append(name + b"\0" * pad if pad else name)
                used += _DIRENT.size + k + pad
            return b"".join(parts)
        base, valid = slot << 32, self._valid
        sec, nsec, uid, gid = self._sec, self._nsec, self._uid, self._gid
        pack = _DIRENTPLUS.pack
        for i, a in enumerate(self.vfs.attrs(listing, first, stop), first):
            name = entries[i].name.encode("utf-8", "surrogateescape")
            k = len(name)
            pad = -k & 7
            if used + _DIRENTPLUS.size + k + pad > size:
                break
            parts.append(pack(base | (i + 1), 0, valid, valid, 0, 0, a.ino, a.size, a.blocks, sec, sec, sec, nsec,
                              nsec, nsec, a.mode, 1, uid, gid, 0, IO_BLOCK, 0, a.ino, i + 3, k, a.mode >> 12))
            parts.append(name + b"\0" * pad if pad else name)
            used += _DIRENTPLUS.size + k + pad
        return b"".join(parts)

    # -- requests -----------------------------------------------------------------------------------

    def _init(self, userdata: int | None, conn: int | None) -> None:
        try:
            if conn:
                cap = ctypes.c_uint.from_address(conn + _CONN_CAPABLE_AT)
                want = ctypes.c_uint.from_address(conn + _CONN_WANT_AT)
                # READDIRPLUS on every listing request, not only the first (READDIRPLUS_AUTO off)
                want.value = want.value & ~(FUSE_CAP_AUTO_INVAL_DATA | FUSE_CAP_READDIRPLUS_AUTO) | \
                    (cap.value & FUSE_CAP_CACHE_SYMLINKS)
            if self.on_init is not None:
                self.on_init()
        except BaseException:  # noqa: BLE001 - nothing may escape into libfuse
            logger.exception("init failed")

    def _lookup(self, req: int, parent: int, name: bytes) -> None:
        try:
            self.stats.lookups += 1
            slot, listing = self._dir(parent)
            i = listing.index(name.decode("utf-8", "surrogateescape"))
            if i is None:
                self.api.lib.fuse_reply_buf(req, self._negative, _ENTRY_SIZE)  # a cached negative entry
            else:
                self.api.lib.fuse_reply_buf(req, self.entry_reply(slot, listing, i), _ENTRY_SIZE)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "lookup", name)

    def _getattr(self, req: int, node: int, fi: int | None) -> None:
        try:
            self.stats.getattrs += 1
            if node == ROOT_NODE:
                self.api.lib.fuse_reply_buf(req, self._root_attr, _ATTR_SIZE)
                return
            listing, i = self._entry(node)
            reply = self.entry_reply(node >> 32, listing, i)[_ATTR_AT:]
            self.api.lib.fuse_reply_buf(req, reply, _ATTR_SIZE)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "getattr", node)

    def _readdirplus(self, req: int, node: int, size: int, off: int, fi: int | None) -> None:
        try:
            self.stats.listings += 1
            data = self.listing_batch(node, off, size, plus=True)
            self.api.lib.fuse_reply_buf(req, data, len(data))
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "readdirplus", node)

    def _readdir(self, req: int, node: int, size: int, off: int, fi: int | None) -> None:
        try:
            self.stats.listings += 1
            data = self.listing_batch(node, off, size, plus=False)
            self.api.lib.fuse_reply_buf(req, data, len(data))
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "readdir", node)

    def _read(self, req: int, node: int, size: int, off: int, fi: int | None) -> None:
        try:
            listing, i = self._entry(node)
            plan = self.vfs.read_plan_at(listing, i, off, size)
            lib = self.api.lib
            if len(plan) == 1 and isinstance(plan[0], bytes):
                lib.fuse_reply_buf(req, plan[0], len(plan[0]))
            elif plan and all(isinstance(seg, FileRange) for seg in plan):
                lib.fuse_reply_data(req, self._bufvec(plan), 0)  # libfuse preads them, in C
            else:
                data = b"".join(seg if isinstance(seg, bytes) else seg.read() for seg in plan)
                lib.fuse_reply_buf(req, data, len(data))
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "read", node)

    def _bufvec(self, ranges: list[Any]) -> Any:
        """A fuse_bufvec of (fd, pos, size) buffers, in a per-thread buffer (libfuse only reads it
        during the reply call)."""
        need = _VEC.size + len(ranges) * _BUF.size
        buf = getattr(self._local, "vec", None)
        if buf is None or len(buf) < need:
            buf = self._local.vec = ctypes.create_string_buffer(max(need, 1024))
        _VEC.pack_into(buf, 0, len(ranges), 0, 0)
        at = _VEC.size
        for seg in ranges:
            _BUF.pack_into(buf, at, seg.size, _FUSE_BUF_IS_FD_SEEK, 0, seg.handle.fd, seg.pos)
            at += _BUF.size
        return buf

    def _readlink(self, req: int, node: int) -> None:
        try:
            listing, i = self._entry(node)
            target = self.vfs.link_target(listing.entries[i], listing.path_of(i))
            data = target.encode("utf-8", "surrogateescape")
            self.api.lib.fuse_reply_buf(req, data, len(data))
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "readlink", node)

    def _open(self, req: int, node: int, fi: int | None) -> None:
        try:
            flags = ctypes.c_int.from_address(fi).value if fi else 0
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
                self.api.lib.fuse_reply_err(req, errno.EROFS)
            elif self.no_open:
                self.api.lib.fuse_reply_err(req, errno.ENOSYS)  # the kernel stops asking: no-open mode
            else:
                self._entry(node)
                self._reply_open(req, fi, _KEEP_CACHE)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "open", node)

    def _opendir(self, req: int, node: int, fi: int | None) -> None:
        try:
            if self.no_open:
                self.api.lib.fuse_reply_err(req, errno.ENOSYS)  # the kernel then caches listings itself
            else:
                self._dir(node)
                self._reply_open(req, fi, _KEEP_CACHE | _CACHE_READDIR)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "opendir", node)

    def _reply_open(self, req: int, fi: int | None, bits: int) -> None:
        if fi:
            word = ctypes.c_uint.from_address(fi + _FI_BITS_AT)
            word.value |= bits
        self.api.lib.fuse_reply_open(req, fi)

    def _statfs_cb(self, req: int, node: int) -> None:
        try:
            self.api.lib.fuse_reply_buf(req, self._statfs, len(self._statfs))
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "statfs", node)

    def _xattr_entry(self, node: int) -> Any:
        if node == ROOT_NODE:
            return None
        listing, i = self._entry(node)
        return listing.entries[i]

    def _getxattr(self, req: int, node: int, name: bytes, size: int) -> None:
        try:
            value = self.vfs.xattr(self._xattr_entry(node), name.decode("utf-8", "surrogateescape"))
            self._reply_xattr(req, value, size, errno.ENODATA)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "getxattr", node)

    def _listxattr(self, req: int, node: int, size: int) -> None:
        try:
            names = self.vfs.xattr_names(self._xattr_entry(node))
            self._reply_xattr(req, b"".join(n.encode() + b"\0" for n in names), size, 0)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "listxattr", node)

    def _reply_xattr(self, req: int, value: bytes | None, size: int, missing: int) -> None:
        lib = self.api.lib
        if value is None:
            lib.fuse_reply_err(req, missing)
        elif size == 0:
            lib.fuse_reply_xattr(req, len(value))  # the caller asks how big a buffer it needs
        elif size < len(value):
            lib.fuse_reply_err(req, errno.ERANGE)
        else:
            lib.fuse_reply_buf(req, value, len(value))

    def _erofs(self, req: int) -> None:
        self.api.lib.fuse_reply_err(req, errno.EROFS)

    def _fail(self, req: int, exc: BaseException, op: str, what: object) -> None:
        """Answer a request whose handler raised: its errno, or EIO (logged) for anything unexpected."""
        if isinstance(exc, TesseraError):
            code = errno_for(exc)
            if code == errno.EIO:  # CorruptData, RemoteError, ...: this request fails, the mount stays up
                logger.error("%s %s: %s (returning EIO)", op, _describe(what), exc)
        elif isinstance(exc, OSError):
            code = errno.EIO
            logger.error("%s %s: %s (returning EIO)", op, _describe(what), exc)
        else:
            code = errno.EIO
            logger.error("%s %s failed (returning EIO)", op, _describe(what), exc_info=exc)
        try:
            self.api.lib.fuse_reply_err(req, code)
        except BaseException:  # noqa: BLE001
            logger.exception("could not answer %s", op)
        if not isinstance(exc, Exception) and self._session:  # KeyboardInterrupt, SystemExit: stop serving
            self.api.lib.fuse_session_exit(self._session)


def _describe(what: object) -> str:
    if isinstance(what, bytes):
        return repr(what.decode("utf-8", "surrogateescape"))
    return f"node {what:#x}" if isinstance(what, int) else str(what)


__all__ = ["ATTRS", "LISTINGS", "NAMES", "LowLevelServer", "NotADirectory", "ServerStats", "WRITE_OPS"]
