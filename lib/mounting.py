"""Mounting a version, from the caller's side: checks, the detached server, readiness, unmount, registry.

This module never imports the FUSE binding. ``mount_version`` validates everything a user can get
wrong, then starts ``python -m tessera.fuse.mount`` as its own process (new session, cwd ``/``) with a
pipe: the server writes ``ok`` once the kernel has answered a ``stat`` of the mountpoint through it,
or ``error <exit code> <message>`` if it could not mount. On failure or timeout nothing is left mounted.

Active mounts are recorded in ``$TESSERA_HOME/mounts/<key>.json`` (ref, hash, mountpoint, pid) by the
server itself; `list_mounts` prunes entries whose server died or whose mount is gone.

    with repo.get("coco@3f2a9c").mount("/mnt/data"):
        train(root="/mnt/data")
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tessera.errors import FuseUnavailable, MountError, TesseraError, UsageError

if TYPE_CHECKING:
    from tessera.version import Version

logger = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
FSTYPE = "fuse.tessera"
SERVER_MODULE = "tessera.fuse.mount"


@dataclass(frozen=True)
class MountOptions:
    cache_size: int = 128 * 1024 * 1024
    no_open: bool = True
    threads: bool = False
    timeout: float = READY_TIMEOUT
    debug: bool = False


@dataclass(frozen=True)
class MountRecord:
    ref: str
    hash: str
    mountpoint: str
    pid: int
    started: float
    home: str
    log: str = ""
    alive: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- the kernel's view ------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """Mount table fields escape space, tab, newline and backslash as octal (\\040 ...)."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class KernelMount:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", names the mount's bdi in /sys/class/bdi


def kernel_mounts() -> list[KernelMount]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(" "), right.split(" ")
        if len(fields) >= 5 and len(rest) >= 2:
            out.append(KernelMount(_unescape(fields[4]), rest[0], _unescape(rest[1]), fields[2]))
    return out


def find_kernel_mount(mountpoint: str) -> KernelMount | None:
    found = None
    for m in kernel_mounts():
        if m.mountpoint == mountpoint:
            found = m  # the last one is on top
    return found


def is_mounted(mountpoint: str) -> bool:
    return find_kernel_mount(mountpoint) is not None


# -- registry ---------------------------------------------------------------------------------------

def registry_dir(home: str | Path) -> Path:
    return Path(home) / "mounts"


def _key(mountpoint: str) -> str:
    return hashlib.sha256(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def registry_path(home: str | Path, mountpoint: str) -> Path:
    return registry_dir(home) / f"{_key(mountpoint)}.json"


def log_path(home: str | Path, mountpoint: str) -> Path:
    return registry_dir(home) / f"{_key(mountpoint)}.log"


def write_record(rec: MountRecord) -> None:
    path = registry_path(rec.home, rec.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec.to_json(), indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def remove_record(home: str | Path, mountpoint: str, pid: int | None = None) -> None:
    path = registry_path(home, mountpoint)
    if pid is not None:
        rec = read_record(path)
        if rec is not None and rec.pid != pid:
            return  # somebody else's (a newer mount at the same place)
    path.unlink(missing_ok=True)


def read_record(path: Path) -> MountRecord | None:
    try:
        obj = json.loads(path.read_text())
        return MountRecord(**{k: v for k, v in obj.items() if k in MountRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def list_mounts(home: str | Path) -> list[MountRecord]:
    """Mounts of this home, plus tessera mounts the kernel knows that no registry entry explains.

    Entries whose mount is gone are pruned. A mount whose server died is kept with ``alive=False``
    (it answers ENOTCONN until ``tessera umount``)."""
    out: list[MountRecord] = []
    kernel = {m.mountpoint: m for m in kernel_mounts()}
    seen = set()
    rdir = registry_dir(home)
    for path in sorted(rdir.glob("*.json")) if rdir.is_dir() else []:
        rec = read_record(path)
        if rec is None:
            continue
        km = kernel.get(rec.mountpoint)
        if km is None or km.fstype != FSTYPE:
            if not pid_alive(rec.pid):
                path.unlink(missing_ok=True)
            continue
        seen.add(rec.mountpoint)
        out.append(MountRecord(**{**rec.to_json(), "alive": pid_alive(rec.pid)}))
    for km in kernel.values():
        if km.fstype == FSTYPE and km.mountpoint not in seen:
            ref = km.source.removeprefix("tessera:")
            out.append(MountRecord(ref, "", km.mountpoint, 0, 0.0, "", alive=_responds(km.mountpoint)))
    return sorted(out, key=lambda r: r.mountpoint)


def _responds(mountpoint: str, timeout: float = 2.0) -> bool:
    """Does a stat through the mount answer within ``timeout`` seconds? A hung server, ours or another
    home's, must not hang `tessera mounts` or `umount`, so the stat runs in a child process (a thread
    waiting on a FUSE request the server already took cannot even be killed, and would hold up our
    exit); a child that does not answer is killed and left to finish on its own."""
    try:
        proc = subprocess.Popen(["stat", "--", mountpoint], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except OSError:  # no stat(1) here: ask directly
        try:
            os.stat(mountpoint)
            return True
        except OSError:
            return False
    try:
        return proc.wait(timeout) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        _UNANSWERED.append(proc)  # never waited for: it exits when the server answers or goes away
        return False


_UNANSWERED: list[subprocess.Popen[bytes]] = []


# -- mounting ---------------------------------------------------------------------------------------

def check_mountpoint(mountpoint: str | Path) -> str:
    """The absolute mountpoint, or a one-line `UsageError`/`MountError` saying what is wrong."""
    mp = os.path.abspath(os.fspath(mountpoint))
    if is_mounted(mp):
        raise MountError(f"{mp} is already a mount point (unmount it first: tessera umount {mp})")
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mp} does not exist (create it with mkdir first)") from None
    except OSError as exc:
        raise MountError(f"mountpoint {mp} is not usable: {exc.strerror}") from None
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mp} is not a directory")
    try:
        if any(os.scandir(mp)):
            raise UsageError(f"mountpoint {mp} is not empty")
    except PermissionError:
        raise UsageError(f"mountpoint {mp} is not readable") from None
    return mp


def created_marker(home: str | Path, mountpoint: str) -> Path:
    """Registry note that `make_mountpoint` created ``mountpoint`` (so unmount removes it)."""
    return registry_dir(home) / f"{_key(mountpoint)}.created"


def make_mountpoint(mountpoint: str | Path, home: str | Path) -> bool:
    """Create a missing mountpoint directory (not its parents) and note it in the registry; False
    when it already existed (then unmount leaves it)."""
    mp = os.path.abspath(os.fspath(mountpoint))
    marker = created_marker(home, mp)
    if os.path.lexists(mp):
        marker.unlink(missing_ok=True)  # a note left from an earlier mount: this directory is the user's now
        return False
    try:
        os.mkdir(mp, 0o755)
    except FileNotFoundError:
        raise UsageError(f"cannot create mountpoint {mp}: {os.path.dirname(mp)} does not exist") from None
    except OSError as exc:
        raise MountError(f"cannot create mountpoint {mp}: {exc.strerror}") from None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(mp + "\n")
    return True


def remove_made_mountpoint(home: str | Path, mountpoint: str) -> bool:
    """Remove ``mountpoint`` if `make_mountpoint` created it and it is empty and unmounted."""
    marker = created_marker(home, mountpoint)
    if not marker.exists():
        return False
    marker.unlink(missing_ok=True)
    try:
        os.rmdir(mountpoint)
    except OSError:
        return False
    return True


def check_fuse_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable("FUSE is not usable here: /dev/fuse does not exist (load the fuse kernel module, or "
                              "start the container with --device /dev/fuse --cap-add SYS_ADMIN); install fuse3 "
                              "(`apt-get install fuse3`) and mfusepy (`pip install mfusepy`)")


def server_command(home: str, ref: str, mountpoint: str, opts: MountOptions, ready_fd: int) -> list[str]:
    cmd = [sys.executable, "-m", SERVER_MODULE, "--home", home, "--ref", ref, "--mountpoint", mountpoint,
           "--cache-size", str(opts.cache_size), "--ready-fd", str(ready_fd)]
    if not opts.no_open:
        cmd.append("--open")
    if opts.threads:
        cmd.append("--threads")
    if opts.debug:
        cmd.append("--debug")
    return cmd


def mount_version(version: "Version", mountpoint: str | Path, opts: MountOptions | None = None) -> MountRecord:
    """Mount ``version`` read-only at ``mountpoint``; return once the mount answers. The server runs
    detached (its own session) until unmounted or sent SIGTERM/SIGINT."""
    return mount_ref(version.repo.home, version.ref, mountpoint, opts)


def mount_ref(home: str | Path, ref: str, mountpoint: str | Path, opts: MountOptions | None = None) -> MountRecord:
    """Like `mount_version`, for a ref the server resolves itself (its errors come back through the
    pipe with their exit codes): the caller need not open the repository at all, which keeps
    ``tessera mount`` fast."""
    opts = opts or MountOptions()
    check_fuse_device()
    home = str(Path(home).expanduser().resolve())
    created = make_mountpoint(mountpoint, home)
    mp = check_mountpoint(mountpoint)
    log = log_path(home, mp)
    log.parent.mkdir(parents=True, exist_ok=True)
    rfd, wfd = os.pipe()
    try:
        with open(log, "ab") as logf:
            logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mount {ref} at {mp}\n".encode(
                "utf-8", "surrogateescape"))
            logf.flush()
            proc = subprocess.Popen(server_command(home, ref, mp, opts, wfd), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, cwd="/", start_new_session=True,
                                    pass_fds=(wfd,), close_fds=True)
        os.close(wfd)
        wfd = -1
        answer = _wait_ready(rfd, proc, opts.timeout)
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    if answer.startswith("ok "):
        full = answer[3:].strip()
        return MountRecord(full, full.rpartition("@")[2], mp, proc.pid, time.time(), home, str(log))
    _abort_server(proc, mp)
    if created:
        remove_made_mountpoint(home, mp)
    code, msg = _parse_failure(answer, log)
    raise error_for(code, msg)


def error_for(code: int, msg: str) -> TesseraError:
    """The error a server reported (by exit code) as the matching `TesseraError` class."""
    from tessera import errors

    for cls in (errors.FuseUnavailable, errors.MountError, errors.NotFound, errors.AmbiguousRef, errors.UsageError,
                errors.CorruptData, errors.SchemaTooNew, errors.RemoteError):
        if cls.exit_code == code:
            return cls(msg)
    exc = MountError(msg)
    exc.exit_code = code
    return exc


def _wait_ready(rfd: int, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"error {MountError.exit_code} the mount server did not become ready within {timeout:.0f} s"
        ready, _, _ = select.select([rfd], [], [], min(left, 0.5))
        if ready:
            data = os.read(rfd, 4096)
            if not data:  # the server closed the pipe: either it answered, or it died
                return buf.decode("utf-8", "replace").strip() or "error"
            buf += data
            if buf.endswith(b"\n"):
                return buf.decode("utf-8", "replace").strip()
        elif proc.poll() is not None:
            return buf.decode("utf-8", "replace").strip() or "error"


def _parse_failure(answer: str, log: Path) -> tuple[int, str]:
    code, msg = MountError.exit_code, ""
    if answer.startswith("error ") and answer[6:].split(" ", 1)[0].isdigit():
        num, _, msg = answer[6:].partition(" ")
        code, msg = int(num), msg.strip()
    if msg:
        return code, msg
    last = ""
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
    return code, f"the mount server failed: {last or 'no message'} (log: {log})"


def _abort_server(proc: subprocess.Popen[bytes], mountpoint: str) -> None:
    """Make sure a failed mount leaves nothing behind: no process, no (dead) mount."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if is_mounted(mountpoint) and find_kernel_mount(mountpoint).fstype == FSTYPE:  # type: ignore[union-attr]
        _lazy_unmount(mountpoint)


# -- unmounting -------------------------------------------------------------------------------------

def _run(cmd: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return p.returncode, (p.stderr or p.stdout).strip()


def _unmount_commands(lazy: bool) -> list[list[str]]:
    cmds = []
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            cmds.append([tool, "-uz" if lazy else "-u"])
    if os.geteuid() == 0 and shutil.which("umount"):
        cmds.append(["umount", "-l"] if lazy else ["umount"])
    return cmds


def _lazy_unmount(mountpoint: str) -> str:
    err = "no fusermount3, fusermount or umount found"
    for cmd in _unmount_commands(lazy=True):
        rc, err = _run([*cmd, mountpoint])
        if rc == 0 or not is_mounted(mountpoint):
            return ""
    return err


def unmount(mountpoint: str | Path, home: str | Path | None = None, *, wait: float = 10.0,
            lazy_if_busy: bool = False) -> MountRecord | None:
    """Unmount a tessera mount; also clears a dead one (ENOTCONN after the server was killed).
    ``lazy_if_busy`` detaches a busy mount (it goes away when the last open file is closed).

    Returns the registry record it removed, if any."""
    mp = os.path.abspath(os.fspath(mountpoint))
    km = find_kernel_mount(mp)
    rec = read_record(registry_path(home, mp)) if home is not None else None
    if km is None:
        if home is not None:
            remove_record(home, mp)
        raise MountError(f"{mp} is not mounted")
    if km.fstype != FSTYPE:
        raise MountError(f"{mp} is not a tessera mount (it is {km.fstype} from {km.source}); not touching it")
    dead = not _responds(mp) or (rec is not None and not pid_alive(rec.pid))
    err = ""
    if not dead:
        for cmd in _unmount_commands(lazy=False):
            rc, err = _run([*cmd, mp])
            if rc == 0 or not is_mounted(mp):
                break
        else:
            if _responds(mp) and not lazy_if_busy:
                raise MountError(f"cannot unmount {mp}: {err or 'busy'} (close files and leave the directory, "
                                 "then retry)")
            dead = True
    if dead and is_mounted(mp):
        err = _lazy_unmount(mp)
        if is_mounted(mp):
            raise MountError(f"cannot unmount {mp}: {err}")
    if rec is not None:
        _wait_exit(rec.pid, wait)
        remove_record(home, mp)  # type: ignore[arg-type]
    if home is not None:
        remove_made_mountpoint(home, mp)
    return rec


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.02)


@contextlib.contextmanager
def mounted(version: "Version", mountpoint: str | Path, **options: Any) -> Iterator[str]:
    """``with version.mount(path, cache_size=..., threads=...):`` mount for the block, then unmount."""
    opts = MountOptions(**options)
    rec = mount_version(version, mountpoint, opts)
    try:
        yield rec.mountpoint
    finally:
        with contextlib.suppress(TesseraError):
            unmount(rec.mountpoint, rec.home, lazy_if_busy=True)


__all__ = ["MountOptions", "MountRecord", "mount_version", "unmount", "mounted", "list_mounts", "is_mounted",
           "check_mountpoint", "kernel_mounts", "write_record", "remove_record", "make_mountpoint",
           "remove_made_mountpoint"]
