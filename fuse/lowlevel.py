"""The mount server on libfuse 3's low-level API: requests by node id, answered from packed replies.

The high-level API (`tessera.fuse.operations` over mfusepy) hands every request over as a path that
libfuse built, and mfusepy converts every argument and every reply field through generic Python code.
Here each request arrives as (node id, name) through one small ctypes callback, and most replies are
bytes that already sit in memory in the kernel's wire format:

- **Node ids** encode where an entry sits: ``(slot << 32) | (index + 1)``, where ``slot`` numbers the
  directories this mount has resolved (the root directory is slot 1; the root itself is node 1).
  Nothing is kept per file: a node id names its directory and its position. The inode number a
  ``stat`` shows is still `VersionFS`'s stable hash of the path.
- **Each directory is packed once**, when it is first looked up or listed: one buffer holds, per entry,
  a ``fuse_direntplus`` record (``fuse_entry_out`` with the attributes, then the ``fuse_dirent``), with
  ``.`` and ``..`` first. A LOOKUP reply is the first 128 bytes of the entry's record, a GETATTR reply
  104 bytes inside it (``fuse_attr_out`` overlaps it exactly: the ``*_valid_nsec`` fields are 0), and a
  READDIRPLUS reply is a run of whole records: a pointer and a length, found by bisecting the record
  offsets. Packed directories live in an LRU bounded by bytes; a name -> index dict finds lookups.
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

import bisect
import ctypes
import errno
import logging
import os
import signal
import struct
import threading
from array import array
from collections import OrderedDict
from typing import Any, Callable, Sequence

from tessera.errors import MountError, NotADirectory, NotFound, TesseraError
from tessera.fuse._binding import FUSE_CAP_AUTO_INVAL_DATA, FUSE_CAP_CACHE_SYMLINKS, LowLevel
from tessera.fuse.operations import errno_for
from tessera.store import FileRange
from tessera.vfs import IO_BLOCK, Attr, Listing, VersionFS

logger = logging.getLogger(__name__)

ROOT_NODE = 1
PACKED_CACHE_BYTES = 64 << 20  # packed directories kept (about 170 bytes per entry)

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


class _Packed:
    """One directory in the kernel's wire format (see the module docstring)."""

    __slots__ = ("listing", "slot", "blob", "addr", "starts", "names", "plain", "plain_addr", "plain_starts")

    def __init__(self, listing: Listing, slot: int, blob: bytes, starts: array[int], names: dict[bytes, int]):
        self.listing = listing
        self.slot = slot
        self.blob = blob  # kept alive: replies point into it
        self.addr: int = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
        self.starts = starts  # record r spans blob[starts[r]:starts[r + 1]]; records 0, 1 are "." and ".."
        self.names = names  # entry name (bytes) -> index in listing.entries (record index - 2)
        self.plain: bytes | None = None  # the same listing as plain fuse_dirents, made on first READDIR
        self.plain_addr = 0
        self.plain_starts: array[int] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.blob) + 8 * len(self.starts) + 100 * len(self.names) + len(self.plain or b"")


class LowLevelServer:
    """Serves a `VersionFS` at a mountpoint through libfuse 3's low-level API."""

    def __init__(self, api: LowLevel, vfs: VersionFS, *, no_open: bool = True, timeout: float = 86400.0,
                 readdirplus_auto: bool = False, cache_bytes: int = PACKED_CACHE_BYTES,
                 on_init: Callable[[], None] | None = None) -> None:
        self.api = api
        self.vfs = vfs
        self.no_open = no_open
        self.readdirplus_auto = readdirplus_auto
        self.on_init = on_init
        self.cache_bytes = cache_bytes
        self._valid = int(timeout)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._sec, self._nsec = divmod(vfs.mtime_ns, 1_000_000_000)
        self._paths: list[str] = ["", ""]  # slot -> directory path (slot 0 unused, 1 is the root)
        self._slots: dict[int, int] = {ROOT_NODE: 1}  # directory node id -> slot
        self._packed: OrderedDict[int, _Packed] = OrderedDict()  # slot -> packed directory (LRU)
        self._packed_bytes = 0
        self._lock = threading.Lock()  # slot allocation and the LRU's bookkeeping
        self._local = threading.local()
        self._negative = _ENTRY.pack(0, 0, self._valid, 0, *([0] * 18))
        root = vfs.root_attr()
        self._root_attr = _ENTRY.pack(ROOT_NODE, 0, self._valid, self._valid, 0, 0,
                                      *self._fuse_attr(root))[_ATTR_AT:_ATTR_AT + _ATTR_SIZE]
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
            "readdirplus": _READ(self._readdirplus), "statfs": _REQ_INO(self._statfs_cb),
            "getxattr": _GETXATTR(self._getxattr), "listxattr": _LISTXATTR(self._listxattr),
        }
        if self.readdirplus_auto:  # with both, libfuse asks the kernel for READDIRPLUS_AUTO
            cbs["readdir"] = _READ(self._readdir)
        erofs = _REQ(self._erofs)
        cbs.update((name, erofs) for name in WRITE_OPS)
        self.callbacks = cbs  # referenced for as long as the server lives: libfuse calls into them
        return cbs

    # -- node ids and packed directories --------------------------------------------------------------

    def _fuse_attr(self, a: Attr) -> tuple[int, ...]:
        sec, nsec = self._sec, self._nsec
        return (a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink, self._uid, self._gid, 0,
                IO_BLOCK, 0)

    def _dir(self, node: int) -> _Packed:
        """The packed directory whose node id is ``node`` (`NotADirectory`, `NotFound`)."""
        slot = self._slots.get(node)
        if slot is None:
            slot = self._slot_of(node)
        packed = self._packed.get(slot)
        if packed is None:
            return self._pack(slot)
        try:
            self._packed.move_to_end(slot)
        except KeyError:  # evicted by another thread just now: still valid
            pass
        return packed

    def _entry(self, node: int) -> tuple[_Packed, int]:
        """(packed parent directory, index) of a node other than the root."""
        slot, index = node >> 32, (node & 0xFFFFFFFF) - 1
        if slot <= 0 or slot >= len(self._paths) or index < 0:
            raise NotFound(f"unknown node {node}")
        packed = self._packed.get(slot)
        if packed is None:
            packed = self._pack(slot)
        if index >= len(packed.listing.entries):
            raise NotFound(f"unknown node {node}")
        return packed, index

    def _slot_of(self, node: int) -> int:
        """The slot of a directory node seen for the first time (from a lookup or a listing)."""
        parent, index = self._entry(node)
        listing = self.vfs.subdirectory(parent.listing, index)  # NotADirectory for anything else
        with self._lock:
            slot = self._slots.get(node)
            if slot is None:
                slot = self._slots[node] = len(self._paths)
                self._paths.append(listing.path)
        return slot

    def _pack(self, slot: int) -> _Packed:
        """Build the packed form of directory ``slot`` (see the module docstring) and cache it."""
        listing = self.vfs.directory(self._paths[slot])
        own = self._fuse_attr(self.vfs.dir_attr(listing))
        valid, pack = self._valid, _DIRENTPLUS.pack
        parts = [pack(0, 0, 0, 0, 0, 0, *own, own[0], 1, 1, 4) + b".\0\0\0\0\0\0\0",
                 pack(0, 0, 0, 0, 0, 0, *own, own[0], 2, 2, 4) + b"..\0\0\0\0\0\0"]
        starts = array("Q", [0, 160, 320])
        names: dict[bytes, int] = {}
        end, base = 320, slot << 32
        sec, nsec, uid, gid = self._sec, self._nsec, self._uid, self._gid
        for i, (te, a) in enumerate(zip(listing.entries, self.vfs.attrs(listing))):
            name = te.name.encode("utf-8", "surrogateescape")
            names[name] = i
            n = len(name)
            pad = -n & 7
            parts.append(pack(base | (i + 1), 0, valid, valid, 0, 0, a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec,
                              nsec, a.mode, 1, uid, gid, 0, IO_BLOCK, 0, a.ino, i + 3, n, a.mode >> 12))
            parts.append(name + b"\0" * pad if pad else name)
            end += 152 + n + pad
            starts.append(end)
        packed = _Packed(listing, slot, b"".join(parts), starts, names)
        self._remember(slot, packed)
        return packed

    def _remember(self, slot: int, packed: _Packed) -> None:
        size = packed.nbytes
        with self._lock:
            old = self._packed.pop(slot, None)
            if old is not None:
                self._packed_bytes -= old.nbytes
            self._packed[slot] = packed
            self._packed_bytes += size
            while self._packed_bytes > self.cache_bytes and len(self._packed) > 1:
                _, gone = self._packed.popitem(last=False)
                self._packed_bytes -= gone.nbytes

    def _plain(self, packed: _Packed) -> tuple[int, array[int]]:
        """The directory as plain fuse_dirents (READDIR without attributes), made once."""
        if packed.plain is None or packed.plain_starts is None:
            blob, starts = packed.blob, packed.starts
            parts, ends, end = [], array("Q", [0]), 0
            for r in range(len(starts) - 1):
                rec = blob[starts[r] + _ENTRY_SIZE:starts[r + 1]]  # the fuse_dirent after the entry_out
                parts.append(rec)
                end += len(rec)
                ends.append(end)
            packed.plain = b"".join(parts)
            packed.plain_addr = ctypes.cast(ctypes.c_char_p(packed.plain), ctypes.c_void_p).value or 0
            packed.plain_starts = ends
        return packed.plain_addr, packed.plain_starts

    # -- requests -----------------------------------------------------------------------------------

    def _init(self, userdata: int | None, conn: int | None) -> None:
        try:
            if conn:
                cap = ctypes.c_uint.from_address(conn + _CONN_CAPABLE_AT)
                want = ctypes.c_uint.from_address(conn + _CONN_WANT_AT)
                w = want.value & ~FUSE_CAP_AUTO_INVAL_DATA | (cap.value & FUSE_CAP_CACHE_SYMLINKS)
                if not self.readdirplus_auto:
                    w &= ~FUSE_CAP_READDIRPLUS_AUTO
                want.value = w
            if self.on_init is not None:
                self.on_init()
        except BaseException:  # noqa: BLE001 - nothing may escape into libfuse
            logger.exception("init failed")

    def _lookup(self, req: int, parent: int, name: bytes) -> None:
        try:
            packed = self._dir(parent)
            i = packed.names.get(name)
            if i is None:
                self.api.lib.fuse_reply_buf(req, self._negative, _ENTRY_SIZE)  # a cached negative entry
            else:
                self.api.lib.fuse_reply_buf(req, packed.addr + packed.starts[i + 2], _ENTRY_SIZE)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "lookup", name)

    def _getattr(self, req: int, node: int, fi: int | None) -> None:
        try:
            if node == ROOT_NODE:
                self.api.lib.fuse_reply_buf(req, self._root_attr, _ATTR_SIZE)
                return
            packed, i = self._entry(node)
            self.api.lib.fuse_reply_buf(req, packed.addr + packed.starts[i + 2] + _ATTR_AT, _ATTR_SIZE)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "getattr", node)

    def _readdirplus(self, req: int, node: int, size: int, off: int, fi: int | None) -> None:
        try:
            packed = self._dir(node)
            self._reply_records(req, packed.addr, packed.starts, size, off)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "readdirplus", node)

    def _readdir(self, req: int, node: int, size: int, off: int, fi: int | None) -> None:
        try:
            addr, starts = self._plain(self._dir(node))
            self._reply_records(req, addr, starts, size, off)
        except BaseException as exc:  # noqa: BLE001
            self._fail(req, exc, "readdir", node)

    def _reply_records(self, req: int, addr: int, starts: array[int], size: int, off: int) -> None:
        start, stop = record_batch(starts, size, off)
        self.api.lib.fuse_reply_buf(req, addr + start if stop > start else None, stop - start)

    def _read(self, req: int, node: int, size: int, off: int, fi: int | None) -> None:
        try:
            packed, i = self._entry(node)
            plan = self.vfs.read_plan_at(packed.listing, i, off, size)
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
            packed, i = self._entry(node)
            target = self.vfs.link_target(packed.listing.entries[i], packed.listing.path_of(i))
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
        packed, i = self._entry(node)
        return packed.listing.entries[i]

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


def record_batch(starts: Sequence[int], size: int, off: int) -> tuple[int, int]:
    """Byte range of the whole records, from record ``off`` on, that fit in ``size`` bytes (record
    ``r`` spans ``starts[r]:starts[r + 1]``); empty past the last record. The kernel asks again from
    the offset after the last record it got."""
    last = len(starts) - 1
    if off >= last or off < 0:
        return 0, 0
    start = starts[off]
    stop = bisect.bisect_right(starts, start + size, off + 1) - 1
    return start, starts[stop]


def _describe(what: object) -> str:
    if isinstance(what, bytes):
        return repr(what.decode("utf-8", "surrogateescape"))
    return f"node {what:#x}" if isinstance(what, int) else str(what)


__all__ = ["LowLevelServer", "NotADirectory", "WRITE_OPS", "record_batch"]
