"""Can this machine make tessera's kernel mounts (file-backed EROFS + overlayfs data-only layers)?

Found out by doing it with other tools than tessera's: ``mkfs.erofs`` (erofs-utils) builds a one-file
metadata image from a shadow tree, ctypes mount(2) mounts it from the file, overlayfs stacks it over a
data directory, and the file is read back. Like fuse_probe.py, independent of tessera on purpose: a
bug in tessera's kernel path must make its tests fail, never skip.

    python tests/kernel_probe.py      # prints "kernel mounts ok" or why not
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

_cached: list[str | None] = []


def _mount(libc: ctypes.CDLL, src: str, target: str, fstype: str, data: str | None) -> int:
    rc = libc.mount(src.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(1),
                    data.encode() if data else None)
    return 0 if rc == 0 else ctypes.get_errno()


def probe() -> str | None:
    if os.geteuid() != 0:
        return "not root (mounting EROFS and overlayfs needs CAP_SYS_ADMIN)"
    if shutil.which("mkfs.erofs") is None:
        return "mkfs.erofs is not installed (apt-get install erofs-utils; .ci/sysdeps does it)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    work = tempfile.mkdtemp(prefix="tessera-kernel-probe-")
    mounted: list[str] = []
    try:
        payload = b"probe\n"
        sha = hashlib.sha256(payload).hexdigest()
        shadow, data, meta, top = (os.path.join(work, d) for d in ("shadow", "data", "meta", "top"))
        for d in (shadow, os.path.join(data, sha[:2]), meta, top):
            os.makedirs(d)
        with open(os.path.join(data, sha[:2], sha), "wb") as f:
            f.write(payload)
        fd = os.open(os.path.join(shadow, "f"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(fd, len(payload))
        try:
            os.setxattr(fd, "trusted.overlay.metacopy", b"")
            os.setxattr(fd, "trusted.overlay.redirect", f"/{sha[:2]}/{sha}".encode())
        except OSError as exc:
            return f"cannot set trusted.* xattrs in {work}: {exc.strerror}"
        finally:
            os.close(fd)
        image = os.path.join(work, "img.erofs")
        p = subprocess.run(["mkfs.erofs", "--quiet", "--chunksize=4096", image, shadow], capture_output=True,
                           text=True, timeout=60)
        if p.returncode != 0:
            return f"mkfs.erofs failed: {p.stderr.strip()[-200:]}"
        err = _mount(libc, image, meta, "erofs", None)
        if err:
            if err == errno.ENOTBLK:
                return "the kernel cannot mount EROFS from a file (needs >= 6.12, CONFIG_EROFS_FS_BACKED_BY_FILE)"
            return f"mounting EROFS failed: {os.strerror(err)}"
        mounted.append(meta)
        err = _mount(libc, "probe", top, "overlay", f"lowerdir={meta}::{data},redirect_dir=on,metacopy=on")
        if err:
            return f"overlayfs with a data-only layer failed: {os.strerror(err)} (needs >= 6.5)"
        mounted.append(top)
        with open(os.path.join(top, "f"), "rb") as f:
            return None if f.read() == payload else "overlay redirect served wrong bytes"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probe failed: {exc}"
    finally:
        for m in reversed(mounted):
            libc.umount2(m.encode(), 2)
        shutil.rmtree(work, ignore_errors=True)


def kernel_unavailable_reason() -> str | None:
    """`probe()`, run once per process."""
    if not _cached:
        _cached.append(probe())
    return _cached[0]


if __name__ == "__main__":
    why = probe()
    print("kernel mounts ok" if why is None else f"kernel mounts unavailable: {why}")
    sys.exit(0 if why is None else 1)
