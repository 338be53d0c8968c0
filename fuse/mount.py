"""The mount server: serves one version at one mountpoint until unmounted or signalled — or, when the
kernel path is chosen (``--path auto|kernel``, `tessera.kernelmount`), makes an EROFS + overlayfs mount,
reports it, and exits (no server is needed in the read path).

Started by `tessera.mounting.mount_ref` as ``python -m tessera.fuse.mount --home H --ref R
--mountpoint M --ready-fd FD`` (detached), or run in-process by ``tessera mount --foreground``.

FUSE is served through libfuse 3's low-level API (`tessera.fuse.lowlevel`), or through mfusepy / fusepy
(`tessera.fuse.operations`, the high-level fallback) when that cannot be loaded. Either way, chosen
because a version never changes (measured on libfuse 3.14, see docs/mount.md): ``ro``; entry,
attribute and negative timeouts of a day, so each name and attribute is asked once; the page cache
kept across opens (``kernel_cache``, or no-open mode); stable inode numbers (``use_ino``);
``default_permissions`` so the kernel checks modes itself. After the kernel has answered INIT, the
mount's ``read_ahead_kb`` is raised to 1024 so sequential reads arrive as 1 MiB requests (libfuse 3.14
refuses ``-o max_read=``; the INIT reply can only lower read-ahead).

SIGTERM, SIGINT and SIGHUP are handled by libfuse: the loop stops and the mount is removed cleanly.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from tessera.errors import MountError, TesseraError
from tessera.mounting import (
    KERNEL,
    MountOptions,
    MountRecord,
    ReadyPipe,
    find_kernel_mount,
    parse_server_args,
    ready_line,
    remove_record,
    write_record,
)
from tessera.progress import Progress

logger = logging.getLogger(__name__)

CACHE_TIMEOUT = 86400.0
READ_AHEAD_KB = 1024


def mount_options(fsname: str, *, threads: bool, debug: bool = False) -> dict[str, object]:
    return {"foreground": True, "nothreads": not threads, "debug": debug, "ro": True, "default_permissions": True,
            "fsname": fsname, "subtype": "tessera", "use_ino": True, "kernel_cache": True,
            "entry_timeout": CACHE_TIMEOUT, "attr_timeout": CACHE_TIMEOUT, "negative_timeout": CACHE_TIMEOUT}


def raise_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    """Set the mount's bdi read-ahead (root only); True when done."""
    km = find_kernel_mount(mountpoint)
    if km is None:
        return False
    path = f"/sys/class/bdi/{km.device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        return True
    except OSError as exc:
        logger.info("could not raise read-ahead (%s: %s); reads stay at 128 KiB", path, exc.strerror)
        return False


def tune_process() -> None:
    """Server-process settings that matter for throughput:

    - glibc malloc keeps freed memory (trim threshold 64 MiB) and serves blocks below 32 MiB from
      the heap, instead of returning and re-faulting ~100 KiB-1 MiB buffers on every read (page
      faults are expensive on VMs: this halves the cost of a 100 KiB read reply);
    - the open-files limit is raised to the hard limit (pack files are kept open).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ValueError, OSError):
        pass


def serve(home: str, ref: str, mountpoint: str, *, cache_size: int, no_open: bool = True, threads: bool = False,
          debug: bool = False, ready: Callable[[str], None] | None = None, path: str = "fuse",
          notify: Callable[[str], None] | None = None, progress: Progress | None = None,
          listing: str = MountOptions.listing) -> None:
    """Mount ``ref`` at ``mountpoint`` and serve until unmounted. ``ready("ok <name@hash>")`` is called
    once the mount answers; ``ready("error <code> <message>")`` if it could not be made. With ``path``
    ``auto`` or ``kernel`` the kernel path is tried first: when it mounts, ``ready("ok <name@hash>
    kernel")`` and return (``notify`` hears why it was not taken; ``progress`` sees files being cached).
    Otherwise FUSE: the low-level server (`tessera.fuse.lowlevel`), or the high-level fallback
    (`tessera.fuse.operations`) when libfuse 3's low-level API cannot be loaded or
    ``TESSERA_FUSE_API=highlevel``. ``listing``: ``names`` or ``attrs``, how the low-level server lists
    directories (`tessera.fuse.lowlevel`; the high-level fallback always sends attributes)."""
    from tessera.fuse._binding import LowLevel, load_fuse
    from tessera.repo import Repo
    from tessera.vfs import VersionFS

    answer = _Once(ready)
    tune_process()
    # From resolving the ref until the registry names the mount (a FUSE mount's record, or the record a
    # kernel mount writes before it caches any file), hold the store's shared write lock: a gc
    # (exclusive) either ran before and the ref no longer resolves, or sees the mount as a root.
    registering = contextlib.ExitStack()
    try:
        repo = Repo(home, create=False, chunk_cache_bytes=cache_size)

        def hold() -> None:
            if not repo.read_only:  # a read-only home is never collected
                registering.enter_context(repo.store.writing())

        hold()
        version = repo.get(ref)
        if path != "fuse":
            from tessera.kernelmount import kernel_or_none

            krec = kernel_or_none(repo, version, mountpoint, path, notify=notify or logger.info, progress=progress,
                                  on_recorded=registering.close)
            if krec is not None:
                registering.close()
                repo.close()
                answer(ready_line(ref=version.ref, kind=KERNEL))
                return
            registering.close()
            hold()  # the kernel path was not taken (or failed after recording itself): resolve again
            version = repo.get(version.ref)
        binding = load_fuse()
    except TesseraError as exc:
        registering.close()
        answer(ready_line(exc))
        raise
    vfs = VersionFS(version)
    record = MountRecord(version.ref, version.hash, mountpoint, os.getpid(), time.time(), str(repo.home),
                         str(_log_of_stderr()))

    def after_init() -> None:
        try:
            os.stat(mountpoint)  # returns once the kernel has our INIT reply: the mount is usable
        except OSError as exc:
            answer(ready_line(code=MountError.exit_code,
                              message=f"the new mount at {mountpoint} does not answer: {exc.strerror}"))
            return
        raise_read_ahead(mountpoint)
        gc.freeze()  # startup objects never need scanning again; collect rarely (the hot paths make no cycles)
        gc.set_threshold(50_000, 20, 20)
        write_record(record)
        registering.close()
        logger.info("mounted %s at %s (%s, %s)", version.ref, mountpoint, binding.description,
                    "threads" if threads else "single-threaded")
        answer(ready_line(ref=version.ref))

    def on_init() -> None:
        threading.Thread(target=after_init, daemon=True).start()

    fsname = f"tessera:{version.name}@{version.hash[:12]}"
    try:
        if isinstance(binding, LowLevel):
            from tessera.fuse.lowlevel import LowLevelServer

            server = LowLevelServer(binding, vfs, no_open=no_open, timeout=CACHE_TIMEOUT, listing=listing,
                                    on_init=on_init)
            try:
                stopped_by = server.serve(mountpoint, fsname=fsname, threads=threads, debug=debug)
            except MountError:
                answer(ready_line(code=MountError.exit_code))  # the reason is libfuse's last line in the log
                raise
            if stopped_by:
                logger.info("stopped by a signal (%s)", signal.strsignal(stopped_by) or stopped_by)
            logger.info("served %s (listing %s); directory cache %d entries", server.stats, listing,
                        vfs.cached_entries)
        else:
            from tessera.fuse.operations import make_operations

            ops = make_operations(binding, vfs, no_open=no_open, on_init=on_init)
            try:
                binding.FUSE(ops, mountpoint, **mount_options(fsname, threads=threads, debug=debug))
            except RuntimeError as exc:
                if answer.ok:  # libfuse 3 returns 8 when a signal (SIGTERM, SIGINT, SIGHUP) ended the loop
                    logger.info("stopped by a signal (libfuse status %s)", exc)
                else:
                    answer(ready_line(code=MountError.exit_code))  # the reason is libfuse's last line in the log
                    raise MountError(f"libfuse could not mount {mountpoint} (status {exc})") from None
    finally:
        registering.close()
        remove_record(repo.home, mountpoint, pid=os.getpid())
        vfs.close()
        repo.close()
        answer(ready_line(code=MountError.exit_code, message="the mount server stopped before the mount was ready"))
    logger.info("unmounted %s (%d reads, %d chunk errors)", mountpoint, vfs.reads, repo.chunks.errors)


class _Once:
    """Deliver one readiness answer; later ones are dropped."""

    def __init__(self, sink: Callable[[str], None] | None) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self.sent = False
        self.ok = False  # the mount was reported ready

    def __call__(self, msg: str) -> None:
        with self._lock:
            if self.sent:
                return
            sink, self._sink, self.sent, self.ok = self._sink, None, True, msg.startswith("ok")
        if sink is not None:
            sink(msg)


def _log_of_stderr() -> str:
    try:
        return os.readlink("/proc/self/fd/2")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    # numpy (imported by sqlite-utils when installed) would start OpenBLAS threads that spin next to the
    # server on every core; the server never does linear algebra.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    args = parse_server_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.opts.debug else logging.INFO,
                        format="%(asctime)s tessera-mount[%(process)d] %(levelname)s: %(message)s")
    pipe = ReadyPipe(args.ready_fd)
    try:
        serve(args.home, args.ref, args.mountpoint, cache_size=args.opts.cache_size, no_open=args.opts.no_open,
              threads=args.opts.threads, debug=args.opts.debug, ready=pipe.answer, path=args.opts.path,
              notify=pipe.note, progress=pipe, listing=args.opts.listing)
    except TesseraError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
