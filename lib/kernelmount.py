"""The kernel mount: a version served by EROFS + overlayfs, with no server process in the read path.

    $TESSERA_HOME/files/ab/<sha256>             whole files (`tessera.filecache`), the data-only layer
    $TESSERA_HOME/images/<hash>-<key>.erofs     metadata-only EROFS image of a version (`tessera.erofs`)
    $TESSERA_HOME/kernel/probe.json             whether this machine can do it (probed once per boot)
    $TESSERA_HOME/kernel/staging/<key>/         where the image is mounted while the overlay is made

Mounting (`mount_kernel`), under the file cache lock:

1. a registry record (kind ``kernel``, the mounting process's pid) is written first, so a process
   killed at any later step leaves something `tessera umount` finds and cleans;
2. the version's files larger than ``INLINE_MAX`` the cache lacks are materialized
   (`FileCache.materialize`);
3. its image is built unless cached: every such file's inode carries ``trusted.overlay.metacopy`` and
   ``trusted.overlay.redirect=/ab/<sha256>``, a smaller file holds its bytes in the image itself (read
   from the packs and checked against its SHA-256 while the image is written), every file carries
   ``user.tessera.sha256``, every inode shows the version's commit time; written to a temp name,
   fsynced, renamed. The image is written in two streaming passes over the version's trees
   (`tessera.erofs`): memory is bounded by the largest directory, not by the file count;
4. the image is mounted read-only (file-backed EROFS) at the staging directory, then overlayfs at the
   mountpoint: ``lowerdir=<staging>::<files>,redirect_dir=on,metacopy=on`` (``::`` makes ``files``
   a data-only layer: never listed, only reached by redirects), source ``tessera:<name>@<hash12>``;
5. the staging mount is detached (overlayfs holds its own reference), so one mount remains: the
   overlay. The record's pid becomes 0 (no process serves the mount).

An image exists only while all of its version's cached (larger) files are in the cache: it is written
after they are, and eviction removes every image of an unmounted version before it removes a file. So
an image on disk means "this version mounts now, without reading anything".
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Callable

from tessera.config import FileCacheSettings
from tessera.erofs import IMAGE_FORMAT, Node, fits_inline, write_image
from tessera.errors import CorruptData, DiskFull, MountError, TesseraError, UsageError
from tessera.faults import crash_point
from tessera.home import is_read_only
from tessera.filecache import IMAGES_DIR, FileCache, Missing
from tessera.ids import sha256_hex
from tessera.model import DIR, FILE, SYMLINK, Entry, TreeEntry
from tessera.mounting import (
    KERNEL,
    KERNEL_DIR,
    KERNEL_FSTYPE,
    MNT_DETACH,
    SOURCE_PREFIX,
    MountRecord,
    check_mountpoint,
    clean_staging,
    kernel_records,
    kernel_staging_dir,
    record_active,
    remove_record,
    umount2,
    write_record,
)
from tessera.progress import Progress

if TYPE_CHECKING:
    from tessera.repo import Repo
    from tessera.version import Version

logger = logging.getLogger(__name__)

KIND = KERNEL
FSTYPE = KERNEL_FSTYPE
XATTR_SHA256 = "user.tessera.sha256"
XATTR_META = "user.tessera.meta"
XATTR_REF = "user.tessera.ref"
MS_RDONLY = 1
PROBE_VERSION = 1
INLINE_MAX = 2048  # files up to this size live in the image itself: nothing to cache, one inode read
# (an inode of 32 bytes + the sha256 xattr's 96 + 2048 bytes of data always fits in a 4 KiB block)
BATCH = 4096  # files whose records and chunk locations are looked up at once
IMAGE_SECONDS_PER_FILE = 80e-6  # a first kernel mount per file, image included (100,000 tiny files: 8 s here)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


# -- syscalls ---------------------------------------------------------------------------------------

def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags),
                   _enc(data) if data is not None else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


_umount = umount2


LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY, LO_FLAGS_AUTOCLEAR = 1, 4
_LOOP_CONFIG = struct.Struct("<II QQQQQ IIII 64s64s32s QQ 64x")  # struct loop_config (loop_info64 inside)


def mount_image(image: str, target: str, backing: str) -> None:
    """Mount an EROFS image read-only: straight from the file (``backing="file"``, Linux >= 6.12 on a
    file system with a page cache of its own), or through a loop device that frees itself when the
    mount goes (``"loop"``: LOOP_CONFIGURE with autoclear)."""
    if backing == "file":
        _mount(image, target, "erofs", MS_RDONLY, None)
        return
    img_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free device between the two calls
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            dev = f"/dev/loop{n}"
            dev_fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                cfg = _LOOP_CONFIG.pack(img_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                                        os.path.basename(image).encode()[:63], b"", b"", 0, 0)
                try:
                    fcntl.ioctl(dev_fd, LOOP_CONFIGURE, cfg)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue
                    raise
                _mount(dev, target, "erofs", MS_RDONLY, None)  # holds the device; autoclear frees it after
                return
            finally:
                os.close(dev_fd)
        raise OSError(errno.EBUSY, "no free loop device", image)
    finally:
        os.close(img_fd)


def _escape_layer(path: str) -> str:
    """overlayfs splits ``lowerdir`` at ``:`` and options at ``,``; a backslash escapes either."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(meta_dir: str, data_dir: str) -> str:
    return f"lowerdir={_escape_layer(meta_dir)}::{_escape_layer(data_dir)},redirect_dir=on,metacopy=on"


# -- the image --------------------------------------------------------------------------------------

def mtime_ns_of(version: "Version") -> int:
    return int(round(version.time * 1e9))  # what the FUSE mount shows (tessera.vfs)


def image_path(home: Path, version: "Version") -> Path:
    key = hashlib.sha256(f"{IMAGE_FORMAT}\0{version.ref}\0{mtime_ns_of(version)}".encode()).hexdigest()[:16]
    return home / IMAGES_DIR / f"{version.hash}-{key}.erofs"


def _file_xattrs(sha: str, meta: dict[str, object], cache: FileCache | None) -> list[tuple[str, bytes]]:
    """A file's xattrs: redirected into ``cache`` (a file the cache holds), or not (``None``: inline or empty)."""
    xattrs: list[tuple[str, bytes]] = []
    if cache is not None:
        xattrs += [("trusted.overlay.metacopy", b""), ("trusted.overlay.redirect", cache.redirect(sha).encode())]
    xattrs.append((XATTR_SHA256, sha.encode()))
    if meta:
        xattrs.append((XATTR_META, json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()))
    return xattrs


def is_inline(e: Entry | TreeEntry) -> bool:
    """Whether the image holds this file's bytes (a file of at most ``INLINE_MAX`` bytes whose inode,
    xattrs and bytes fit in one block); otherwise the file cache does."""
    sha = e.sha256 if isinstance(e, Entry) else e.id
    if e.kind != FILE or sha is None or not 0 < e.size <= INLINE_MAX:
        return False
    return not e.meta or fits_inline(e.size, _file_xattrs(sha, e.meta, None))  # without metadata it always fits


def cached_files(entries: "Iterable[Entry]") -> "Iterator[Entry]":
    """The files of ``entries`` the kernel path needs in the file cache (content, not inline)."""
    return (e for e in entries if e.is_file and e.sha256 and e.size > 0 and not is_inline(e))


class _ImageSource:
    """The version's trees as the image writer lists them (`tessera.erofs.DirSource`); inline files'
    bytes are read from its chunks, checked against their SHA-256. ``local_only``: refuse (MountError)
    to read a chunk that is not in a local pack instead of fetching it."""

    def __init__(self, version: "Version", cache: FileCache, *, local_only: bool) -> None:
        self.version = version
        self.cache = cache
        self.local_only = local_only

    def root(self) -> Node:
        return Node(b"", "dir", 0o755, xattrs=[(XATTR_REF, self.version.ref.encode())], ref=self.version.hash)

    def children(self, directory: Node) -> list[Node]:
        out = []
        for te in self.version.tree(str(directory.ref)).entries:
            name = te.name.encode("utf-8", "surrogateescape")
            if te.kind == FILE:
                inline = is_inline(te)
                xattrs = (_file_xattrs(te.id, te.meta, None if inline or not te.size else self.cache) if te.id else
                          [(XATTR_META, json.dumps(te.meta, sort_keys=True, ensure_ascii=False).encode())] if te.meta else [])
                out.append(Node(name, FILE, te.mode, te.size, xattrs=xattrs, inline=inline, ref=te.id))
            elif te.kind == DIR:
                meta = [(XATTR_META, json.dumps(te.meta, sort_keys=True, ensure_ascii=False).encode())] if te.meta else []
                out.append(Node(name, DIR, te.mode, xattrs=meta, ref=te.id))
            else:  # the kernel allows user.* xattrs on files and directories only
                out.append(Node(name, te.kind, te.mode, target=(te.target or "").encode("utf-8", "surrogateescape")))
        return out

    def fill(self, files: list[Node]) -> None:
        for i in range(0, len(files), BATCH):
            self._fill(files[i:i + BATCH])

    def _fill(self, files: list[Node]) -> None:
        v = self.version
        records = v.trees.file_records(sorted({str(f.ref) for f in files}))
        ids = sorted({cid for r in records.values() for cid, _ in r.chunks})
        locs = v.chunks.locations(ids)
        if self.local_only and not all(cid in locs and v.chunks.is_local(locs[cid].pack) for cid in ids):
            raise MountError(f"{v.name}@{v.hash[:12]}: its files are not all local (lazy remote version); "
                             "`tessera pull` it first, or mount with --kernel to fetch them")
        data = {cid: v.chunks.read_chunk(locs[cid])
                for cid in sorted(ids, key=lambda c: (locs[c].pack, locs[c].offset) if c in locs else ("", 0))
                if cid in locs}
        for f in files:
            sha = str(f.ref)
            rec = records.get(sha)
            if rec is None or any(cid not in data for cid, _ in rec.chunks):
                raise CorruptData(f"{v.name}@{v.hash[:12]}: the file record or a chunk of {f.name!r} is missing")
            body = b"".join(data[cid] for cid, _ in rec.chunks)
            if len(body) != f.size or sha256_hex(body) != sha:
                raise CorruptData(f"{v.name}@{v.hash[:12]}:{f.name!r}: the bytes read do not match its SHA-256 "
                                  f"{sha[:16]}...; no image written")
            f.data = body


def build_image(version: "Version", cache: FileCache, path: Path, *, local_only: bool = False) -> Path:
    """Write the version's image to ``path`` (temp name, fsync, rename); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            source = _ImageSource(version, cache, local_only=local_only)
            st = write_image(f, source.root(), mtime_ns=mtime_ns_of(version), uuid=bytes.fromhex(version.hash[:32]),
                             source=source)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.rename(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"disk full while writing the mount image {path} (nothing was mounted)") from None
        raise
    logger.info("image of %s: %d inodes, %d bytes in %.2f s", version.ref, st.inodes, st.bytes,
                time.perf_counter() - t0)
    return path


# -- can this machine do it? ------------------------------------------------------------------------

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def probe(home: str | Path) -> str | None:
    """None when kernel mounts work here, else why not. Tried once per boot (and user), by mounting a
    one-file image; the answer is kept in ``kernel/probe.json``. ``TESSERA_KERNEL_MOUNT=0`` disables
    the kernel path."""
    if os.environ.get("TESSERA_KERNEL_MOUNT", "").strip() in ("0", "off", "no"):
        return "disabled by TESSERA_KERNEL_MOUNT=0"
    if os.geteuid() != 0:
        return "it needs root (mounting EROFS and overlayfs)"
    if is_read_only(home):
        return "the home is read-only (the kernel path caches files in it)"
    cache_file = Path(home) / KERNEL_DIR / "probe.json"
    key = f"{PROBE_VERSION}:{_boot_id()}:{os.uname().release}"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache_file.read_text())
        if cached["key"] == key:
            return str(cached["why"]) if cached["why"] else None
    why, backing = _probe_now(Path(home) / KERNEL_DIR)
    with contextlib.suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"probe.json.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "why": why, "backing": backing}))
        os.replace(tmp, cache_file)
    return why


def image_backing(home: str | Path) -> str:
    """How images are mounted here (``file`` or ``loop``), as `probe` found out."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((Path(home) / KERNEL_DIR / "probe.json").read_text())["backing"]) or "file"
    return "file"


def _probe_now(kdir: Path) -> tuple[str | None, str]:
    """(why not, or None; "file" or "loop": how EROFS images can be mounted from this home)."""
    try:
        fstypes = Path("/proc/filesystems").read_text().split()
    except OSError:
        fstypes = []
    for fs, pkg in (("erofs", "CONFIG_EROFS_FS"), ("overlay", "CONFIG_OVERLAY_FS")):
        if fs not in fstypes:
            with contextlib.suppress(OSError):
                os.system(f"modprobe {fs} >/dev/null 2>&1")  # noqa: S605 - constant command
            if fs not in Path("/proc/filesystems").read_text().split():
                return f"this kernel has no {fs} file system ({pkg})", ""
    kdir.mkdir(parents=True, exist_ok=True)
    work = Path(os.path.realpath(kdir)) / f"probe-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    data, meta, top = work / "data", work / "meta", work / "top"
    for d in (data / "ab", meta, top):
        d.mkdir(parents=True)
    payload = b"tessera kernel mount probe\n"
    sha = hashlib.sha256(payload).hexdigest()
    (data / "ab" / sha).write_bytes(payload)
    root = Node(b"", "dir", 0o755, children=[Node(b"f", "file", 0o644, len(payload), xattrs=[
        ("trusted.overlay.metacopy", b""), ("trusted.overlay.redirect", f"/ab/{sha}".encode())])])
    with open(work / "probe.erofs", "wb") as f:
        write_image(f, root, mtime_ns=0)
    mounted: list[str] = []
    backing = "file"
    try:
        try:
            mount_image(str(work / "probe.erofs"), str(meta), "file")
        except OSError as exc:
            if exc.errno not in (errno.ENOTBLK, errno.EINVAL, errno.EOPNOTSUPP):
                return f"mounting an EROFS image failed: {exc.strerror}", ""
            backing = "loop"  # no file-backed EROFS (Linux < 6.12, or a home on tmpfs): a loop device
            try:
                mount_image(str(work / "probe.erofs"), str(meta), "loop")
            except OSError as exc2:
                return (f"cannot mount an EROFS image from a file ({exc.strerror}) nor through a loop device "
                        f"({exc2.strerror})"), ""
        mounted.append(str(meta))
        try:
            _mount("tessera:probe", str(top), FSTYPE, MS_RDONLY, overlay_options(str(meta), str(data)))
            mounted.append(str(top))
        except OSError as exc:
            return f"overlayfs with a data-only layer failed ({exc.strerror}; needs Linux >= 6.5)", ""
        try:
            got = (top / "f").read_bytes()
        except OSError as exc:
            return f"reading through the overlay failed: {exc.strerror}", ""
        if got != payload:
            return "the overlay served wrong bytes (metacopy/redirect not honoured)", ""
        return None, backing
    finally:
        for m in reversed(mounted):
            with contextlib.suppress(OSError):
                _umount(m, MNT_DETACH)
        shutil.rmtree(work, ignore_errors=True)


# -- which path -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    kernel: bool
    why: str = ""  # when not: one line for the user
    needs: "Needs | None" = None  # what the version needs, when it was counted


@dataclass(frozen=True)
class Needs:
    """What a kernel mount of a version needs: the files it keeps in the file cache (``files``: their
    SHA-256) and those of them the cache lacks (``missing``); ``local``: whether every byte it would
    read (those files and the inline ones) is in a local pack (when it was checked)."""

    missing: Missing
    files: frozenset[str]
    local: bool = True


def _human(n: float) -> str:
    from tessera.filecache import _human as h

    return h(n)


def choose(repo: "Repo", version: "Version", settings: FileCacheSettings, cache: FileCache) -> Choice:
    """The default (auto) rule: the kernel path when the version's image exists (all its files are
    cached), or the files it lacks are local, at most ``auto_max_bytes``, estimated at most
    ``auto_max_seconds`` at the measured rates (per byte and per file), and fit in the budget;
    otherwise FUSE, saying why. Writing the image counts too: a version too big to write it in time
    takes FUSE without being walked. One streaming walk of the version (memory: the missing files)."""
    if image_path(repo.home, version).exists():
        return Choice(True)
    image_seconds = version.files * IMAGE_SECONDS_PER_FILE
    if image_seconds > settings.auto_max_seconds:
        return Choice(False, f"its image is not written yet; --kernel would first write it ({version.files} files, "
                             f"~{image_seconds:.0f} s), then later mounts take the kernel path at once")
    need = needs(version, cache, check_local=True)
    missing = need.missing
    if not need.local:
        return Choice(False, "its files are not all local (lazy remote version); the kernel path would "
                             f"download and cache {_human(missing.bytes)} first (`tessera pull`, then --kernel)",
                      need)
    if not missing.entries:
        return Choice(True, needs=need)
    seconds = cache.estimate(missing.files, missing.bytes) + image_seconds
    cost = f"--kernel would first cache {_human(missing.bytes)} in {missing.files} files (~{seconds:.0f} s)"
    if missing.bytes > settings.max_size:
        return Choice(False, f"the version needs {_human(missing.bytes)}, more than the file cache budget "
                             f"{_human(settings.max_size)}", need)
    if missing.bytes > settings.auto_max_bytes or seconds > settings.auto_max_seconds:
        return Choice(False, f"{_human(missing.bytes)} of it is not in the file cache yet; {cost}", need)
    return Choice(True, needs=need)


def needs(version: "Version", cache: FileCache, *, check_local: bool = False) -> Needs:
    """What a kernel mount of ``version`` needs (`Needs`; ``local`` only checked with ``check_local``)."""
    inline: list[str] = []
    local = True
    cached: list[Entry] = []
    for e in version.walk():
        if not (e.is_file and e.sha256 and e.size > 0):
            continue
        if not is_inline(e):
            cached.append(e)
        elif check_local and local:
            inline.append(e.sha256)
            if len(inline) >= BATCH:
                local, inline = _local(version, inline), []
    missing = cache.missing(cached)
    files = frozenset(e.sha256 for e in cached if e.sha256)
    del cached
    if check_local and local:
        local = _local(version, inline + [e.sha256 for e in missing.entries if e.sha256])
    return Needs(missing, files, local)


def _local(version: "Version", shas: list[str]) -> bool:
    """Whether every chunk of these files is in a local pack (else they would be fetched lazily)."""
    for i in range(0, len(shas), BATCH):
        records = version.trees.file_records(shas[i:i + BATCH])
        ids = [cid for r in records.values() for cid, _ in r.chunks]
        locs = version.chunks.locations(ids)
        if len(records) < len(set(shas[i:i + BATCH])) or len(locs) < len(set(ids)):
            return False
        if not all(version.chunks.is_local(p) for p in {loc.pack for loc in locs.values()}):
            return False
    return True


# -- registry and pins ------------------------------------------------------------------------------

def _source_of(version: "Version") -> str:
    return f"{SOURCE_PREFIX}{version.name}@{version.hash[:12]}"


def staging_dir(home: Path, mountpoint: str) -> Path:
    return kernel_staging_dir(home, mountpoint)


def pinned_files(repo: "Repo", *, except_mountpoint: str | None = None) -> set[str]:
    """SHA-256 of every file an active kernel mount of this home uses (eviction must keep them)."""
    out: set[str] = set()
    for rec in kernel_records(repo.home):
        if rec.mountpoint == except_mountpoint or not record_active(rec):
            continue
        try:
            v = repo.get(rec.ref)
        except TesseraError:
            continue
        out.update(e.sha256 for e in cached_files(v.walk()) if e.sha256)
    return out


def active_images(home: Path) -> set[str]:
    return {Path(rec.image).name for rec in kernel_records(home) if rec.image and record_active(rec)}


def drop_images(home: Path) -> int:
    """Delete every image no active kernel mount uses; returns how many."""
    keep = active_images(home)
    n = 0
    idir = home / IMAGES_DIR
    for f in sorted(idir.glob("*")) if idir.is_dir() else []:
        if f.name not in keep:
            with contextlib.suppress(OSError):
                f.unlink()
                n += 1
    return n


def open_cache(repo: "Repo", settings: FileCacheSettings | None = None) -> FileCache:
    settings = settings or FileCacheSettings.load(repo.catalog.setting)
    home = repo.home
    return FileCache(home, settings.max_size, on_evict=lambda: drop_images(home))


# -- mount / unmount --------------------------------------------------------------------------------

def mount_kernel(repo: "Repo", version: "Version", mountpoint: str, *, progress: Progress | None = None,
                 settings: FileCacheSettings | None = None, choice: Choice | None = None,
                 on_recorded: Callable[[], object] | None = None) -> "MountRecord":
    """Materialize, build the image, mount; on any failure nothing stays mounted and the record goes.
    ``on_recorded`` runs once the registry names the version (from then on `tessera gc` and `forget`
    keep it: the mount server holds the store's write lock until then)."""

    why = probe(repo.home)
    if why is not None:
        raise MountError(f"the kernel mount is not available here: {why} (use --fuse)")
    mp = check_mountpoint(mountpoint)
    version = repo.complete(version, progress)  # the image holds every file: fetch all metadata at once
    home = Path(repo.home).resolve()
    cache = open_cache(repo, settings)
    image = image_path(home, version)
    staging = staging_dir(home, mp)
    rec = MountRecord(version.ref, version.hash, mp, os.getpid(), time.time(), str(home), "", True,
                      kind=KIND, image=str(image), staging=str(staging))
    with cache.locked():
        write_record(rec)
        if on_recorded is not None:
            on_recorded()
        mounted: list[str] = []
        try:
            if not image.exists():
                need = choice.needs if choice is not None else None
                if need is None:
                    need = needs(version, cache)
                cache.materialize(version, need.missing.entries, progress=progress, missing=need.missing,
                                  pinned=pinned_files(repo, except_mountpoint=mp) | need.files)
                crash_point("kernel-materialized")
                build_image(version, cache, image, local_only=choice is not None)
            clean_staging(staging)  # what a mount killed at this mountpoint may have left
            staging.mkdir(parents=True, exist_ok=True)
            mount_image(str(image), str(staging), image_backing(home))
            mounted.append(str(staging))
            crash_point("kernel-erofs-mounted")
            _mount(_source_of(version), mp, FSTYPE, MS_RDONLY, overlay_options(str(staging), str(cache.root)))
            mounted.append(mp)
            crash_point("kernel-overlay-mounted")
            _umount(str(staging), MNT_DETACH)
            mounted.remove(str(staging))
            with contextlib.suppress(OSError):
                staging.rmdir()
            rec = MountRecord(**{**rec.to_json(), "pid": 0})
            write_record(rec)
        except BaseException as exc:
            for m in reversed(mounted):
                with contextlib.suppress(OSError):
                    _umount(m, MNT_DETACH)
            with contextlib.suppress(OSError):
                staging.rmdir()
            remove_record(home, mp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full while preparing the kernel mount of {version.ref} (nothing was "
                               "mounted; the files cached so far stay valid)") from None
            if isinstance(exc, OSError):
                raise MountError(f"kernel mount of {version.ref} at {mp} failed: {exc.strerror}") from None
            raise
    logger.info("kernel-mounted %s at %s", version.ref, mp)
    return rec


def kernel_or_none(repo: "Repo", version: "Version", mountpoint: str, path: str, *,
                   notify: Callable[[str], None], progress: Progress | None = None,
                   on_recorded: Callable[[], object] | None = None) -> MountRecord | None:
    """What the mount server asks first (`tessera.fuse.mount.serve`): mount ``version`` with the kernel
    path when ``path`` is ``kernel``, or ``auto`` and `choose` says so; None means "use FUSE" (after
    telling ``notify`` why, in one line, when the machine could have done it)."""
    if path not in ("auto", "kernel"):
        raise UsageError(f"unknown mount path {path!r} (auto, kernel or fuse)")
    why = probe(repo.home)
    if why is not None:
        if path == "kernel":
            raise MountError(f"the kernel mount is not available here: {why} (use --fuse)")
        logger.info("kernel mount unavailable (%s): mounting with FUSE", why)
        return None
    settings = FileCacheSettings.load(repo.catalog.setting)
    choice = None
    if path == "auto":
        check_mountpoint(mountpoint)  # bad input is reported before any work
        choice = choose(repo, version, settings, open_cache(repo, settings))
        if not choice.kernel:
            notify(f"mounting with FUSE: {choice.why}")
            return None
    try:
        return mount_kernel(repo, version, mountpoint, progress=progress, settings=settings, choice=choice,
                            on_recorded=on_recorded)
    except (MountError, DiskFull) as exc:
        if path == "kernel":
            raise
        notify(f"mounting with FUSE: the kernel mount failed ({exc})")  # auto: the FUSE path still works
        return None


__all__ = ["probe", "choose", "needs", "Needs", "active_images", "Choice", "mount_kernel", "kernel_or_none", "image_path",
           "build_image", "is_inline", "cached_files", "pinned_files", "drop_images", "open_cache", "KIND",
           "INLINE_MAX"]
