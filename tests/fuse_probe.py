"""Can this machine mount FUSE file systems? Find out by mounting one, in a subprocess, with a timeout.

Checking that /dev/fuse exists is not enough (containers often have the device but may not mount).
The probe is independent of tessera's own mount code on purpose: a bug in tessera must make the FUSE
tests fail, never skip. Usage: ``reason = fuse_unavailable_reason()``; None means FUSE works.

    python tests/fuse_probe.py      # prints "FUSE ok" or why not
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

_SCRIPT = r"""
import errno, os, signal, stat, sys, threading
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
mnt = sys.argv[1]
try:
    import mfusepy as F
except Exception as exc:
    print(f"cannot load mfusepy/libfuse: {type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)

class Ops(F.Operations):
    use_ns = True
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/probe":
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": 2}
        raise F.FuseOSError(errno.ENOENT)
    def read(self, path, size, offset, fh):
        return b"ok"[offset:offset + size]
    def init(self, path):
        threading.Thread(target=check, daemon=True).start()

def check():
    try:
        with open(os.path.join(mnt, "probe"), "rb") as f:
            print("ok" if f.read() == b"ok" else "mounted, but a read returned wrong bytes", flush=True)
    except OSError as exc:
        print(f"mounted, but unusable: {exc}", flush=True)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # libfuse unmounts on SIGTERM

F.FUSE(Ops(), mnt, foreground=True, ro=True, nothreads=True)
"""

_cached: list[str | None] = []


def probe(timeout: float = 20.0) -> str | None:
    """Mount a one-file file system in a child process; None when it worked, else the reason."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no fuse kernel module, or the container has no --device /dev/fuse)"
    mnt = tempfile.mkdtemp(prefix="tessera-fuse-probe-")
    try:
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, mnt], capture_output=True, text=True,
                              timeout=timeout, cwd="/", stdin=subprocess.DEVNULL)
        out = (proc.stdout.strip().splitlines() or [""])[-1]
        if out == "ok":
            return None
        err = (proc.stderr.strip().splitlines() or [""])[-1]
        return out or err or f"probe mount exited with status {proc.returncode} and said nothing"
    except subprocess.TimeoutExpired:
        return f"probe mount did not answer within {timeout:.0f} s"
    finally:
        for tool in ("fusermount3", "fusermount"):
            if shutil.which(tool):
                subprocess.run([tool, "-uz", mnt], capture_output=True)
                break
        try:
            os.rmdir(mnt)
        except OSError:
            pass


def fuse_unavailable_reason() -> str | None:
    """`probe()`, run once per process."""
    if not _cached:
        _cached.append(probe())
    return _cached[0]


if __name__ == "__main__":
    why = probe()
    print("FUSE ok" if why is None else f"FUSE unavailable: {why}")
    sys.exit(0 if why is None else 1)


def require_fuse() -> None:
    """For a test module's autouse fixture: skip it, loudly, where FUSE cannot mount here; with
    TESSERA_REQUIRE_FUSE=1 (CI machines that have /dev/fuse) fail instead."""
    import pytest

    why = fuse_unavailable_reason()
    if why is None:
        return
    sys.stderr.write(f"\n{'!' * 78}\n!! FUSE tests SKIPPED: {why}\n{'!' * 78}\n")
    if os.environ.get("TESSERA_REQUIRE_FUSE") == "1":
        pytest.fail(f"FUSE required (TESSERA_REQUIRE_FUSE=1) but unavailable: {why}")
    pytest.skip(f"FUSE unavailable here: {why}")
