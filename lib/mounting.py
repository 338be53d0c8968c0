"""Mounting a version, from the caller's side: checks, the detached server, readiness, unmount, registry.

This module never imports the FUSE binding, and knows a version only by ``(home, ref)``. ``mount_ref``
validates everything a user can get wrong, then starts ``python -m tessera.fuse.mount`` as its own
process (new session, cwd ``/``) with a pipe. Both halves of that protocol live here: the server's
command line (`server_command` / `parse_server_args`) and its one ready line (`ready_line` /
`parse_ready`): ``ok <name@hash>`` once the kernel has answered a ``stat`` of the mountpoint through
it, or ``error <exit code> <message>`` if it could not mount. On failure or timeout nothing is left
mounted.

Active mounts are recorded in ``$TESSERA_HOME/mounts/<key>.json`` (ref, hash, mountpoint, pid) by the
server itself; `list_mounts` prunes entries whose server died or whose mount is gone.

    with repo.get("coco@3f2a9c").mount("/mnt/data"):
        train(root="/mnt/data")
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import stat as stat_mod
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tessera.errors import FuseUnavailable, Interrupted, MountError, TesseraError, UsageError, error_for
from tessera.home import is_read_only

if TYPE_CHECKING:
    from tessera.progress import Progress

logger = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds the server may stay silent (a kernel mount's progress lines restart it)
FSTYPE = "fuse.tessera"
SERVER_MODULE = "tessera.fuse.mount"
KERNEL = "kernel"  # the record kind of an EROFS + overlayfs mount (`tessera.kernelmount`)
KERNEL_FSTYPE = "overlay"
SOURCE_PREFIX = "tessera:"
KERNEL_DIR = "kernel"
LISTINGS = ("attrs", "names")  # how a FUSE mount lists directories (tessera.fuse.lowlevel)
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


@dataclass(frozen=True)
class MountOptions:
    cache_size: int = 128 * 1024 * 1024
    no_open: bool = True
    threads: bool = False
    timeout: float = READY_TIMEOUT
    debug: bool = False
    path: str = "auto"  # "auto" | "kernel" | "fuse": see tessera.kernelmount
    listing: str = "attrs"  # FUSE listings: "attrs" (READDIRPLUS) | "names" (READDIR): see tessera.fuse.lowlevel
    progress: "Progress | None" = None  # materialization progress (kernel path)
    notify: "Callable[[str], None] | None" = None  # told in one line why auto chose FUSE

    def __post_init__(self) -> None:
        if self.listing not in LISTINGS:
            raise UsageError(f"listing must be one of {', '.join(LISTINGS)}, not {self.listing!r}")


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
    kind: str = "fuse"  # or "kernel" (EROFS + overlayfs, no server: pid 0 once mounted)
    image: str = ""
    staging: str = ""

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
    """``$TESSERA_HOME/mounts``; for a home this process cannot write (read-only file system, no
    permission), a private directory outside it: ``$XDG_RUNTIME_DIR`` (or the temporary directory)
    ``/tessera-<uid>/mounts-<hash of the home's path>``."""
    if not is_read_only(home):
        return Path(home) / "mounts"
    return _fallback_registry(home)


def _fallback_registry(home: str | Path) -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"tessera-{os.getuid()}"
    key = hashlib.sha256(os.fsencode(os.path.realpath(home))).hexdigest()[:16]
    return base / f"mounts-{key}"


def _make_registry(home: str | Path) -> None:
    """Create the registry directory; one outside the home must be this user's alone (not planted)."""
    if not is_read_only(home):
        registry_dir(home).mkdir(parents=True, exist_ok=True)
        return
    path = _fallback_registry(home)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path.parent)
    if st.st_uid != os.getuid() or not stat_mod.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
        raise MountError(f"{path.parent} is not a private directory of this user: refusing to keep mount "
                         "records there")
    path.mkdir(mode=0o700, exist_ok=True)


def _key(mountpoint: str) -> str:
    return hashlib.sha256(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def registry_path(home: str | Path, mountpoint: str) -> Path:
    return registry_dir(home) / f"{_key(mountpoint)}.json"


def log_path(home: str | Path, mountpoint: str) -> Path:
    return registry_dir(home) / f"{_key(mountpoint)}.log"


def write_record(rec: MountRecord) -> None:
    _make_registry(rec.home)
    path = registry_path(rec.home, rec.mountpoint)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec.to_json(), indent=1, ensure_ascii=True))  # \udcXX for non-UTF-8 paths
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
    records = [p for d in {Path(home) / "mounts", _fallback_registry(home)} if d.is_dir() for p in d.glob("*.json")]
    for path in sorted(records):
        rec = read_record(path)
        if rec is None:
            continue
        km = kernel.get(rec.mountpoint)
        if rec.kind == KERNEL:
            seen.add(rec.mountpoint)
            if record_active(rec):
                out.append(rec)
            elif rec.pid == 0:
                path.unlink(missing_ok=True)  # it was mounted, and someone unmounted it
            else:
                out.append(MountRecord(**{**rec.to_json(), "alive": False}))  # a killed mount: umount cleans
            continue
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
        elif is_kernel_mount(km.fstype, km.source) and km.mountpoint not in seen:
            out.append(MountRecord(km.source.removeprefix(SOURCE_PREFIX), "", km.mountpoint, 0, 0.0, "", kind=KERNEL))
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


# -- the mount-server protocol: its command line and its one ready line ------------------------------

@dataclass(frozen=True)
class ServerArgs:
    home: str
    ref: str
    mountpoint: str
    opts: MountOptions
    ready_fd: int | None = None


def server_command(home: str, ref: str, mountpoint: str, opts: MountOptions, ready_fd: int) -> list[str]:
    cmd = [sys.executable, "-m", SERVER_MODULE, "--home", home, "--ref", ref, "--mountpoint", mountpoint,
           "--cache-size", str(opts.cache_size), "--ready-fd", str(ready_fd), "--path", opts.path,
           "--listing", opts.listing]
    if not opts.no_open:
        cmd.append("--open")
    if opts.threads:
        cmd.append("--threads")
    if opts.debug:
        cmd.append("--debug")
    return cmd


def parse_server_args(argv: list[str] | None = None) -> ServerArgs:
    """The server's side of `server_command`."""
    p = argparse.ArgumentParser(prog=f"python -m {SERVER_MODULE}", description="tessera mount server")
    p.add_argument("--home", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--cache-size", type=int, default=MountOptions.cache_size)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--open", action="store_true", help="answer open() (default: ENOSYS, the kernel's no-open mode)")
    p.add_argument("--threads", action="store_true", help="libfuse's multithreaded loop")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--path", choices=("auto", "kernel", "fuse"), default="fuse",
                   help="auto: the kernel path when it suits (tessera.kernelmount), else FUSE")
    p.add_argument("--listing", choices=LISTINGS, default=MountOptions.listing,
                   help="list directories by name (READDIR) or with attributes (READDIRPLUS)")
    a = p.parse_args(argv)
    return ServerArgs(a.home, a.ref, a.mountpoint,
                      MountOptions(a.cache_size, not a.open, a.threads, debug=a.debug, path=a.path, listing=a.listing),
                      a.ready_fd)


def ready_line(error: TesseraError | None = None, *, ref: str = "", code: int | None = None,
               message: str = "", kind: str = "fuse") -> str:
    """What the server writes last: ``ok <name@hash>`` (a FUSE mount it now serves), ``ok <name@hash>
    kernel`` (a kernel mount it made; it exits), or ``error <exit code> <message>``."""
    if error is not None:
        code, message = error.exit_code, str(error)
    if code is None:
        return f"ok {ref}" + (f" {KERNEL}" if kind == KERNEL else "")
    return f"error {code} {message}".replace("\n", " ")


def parse_ready(answer: str, log: Path) -> MountRecord | tuple[int, str]:
    """The ready line as the caller sees it: the mounted ref (and kind), or (exit code, message)."""
    if answer.startswith("ok "):
        full, _, kind = answer[3:].strip().partition(" ")
        return MountRecord(full, full.rpartition("@")[2], "", 0, time.time(), "", kind=kind or "fuse")
    return _parse_failure(answer, log)


class ReadyPipe:
    """The server's half of the ready pipe: progress and notes while it works (a kernel mount caches
    files first), then one final answer, after which the pipe is closed.

    Lines: ``note <text>``, ``progress start <total or -> <unit> <desc>``, ``progress advance <n>``,
    ``progress finish``, and the final `ready_line`."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self.broken = False  # the caller went away (killed): work done for it should stop

    def _send(self, line: str) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
            except OSError:
                self.broken = True

    def _check(self) -> None:
        if self.broken:
            raise Interrupted("the caller of this mount went away: stopped, nothing mounted")

    def note(self, text: str) -> None:
        self._send(f"note {text}")

    def answer(self, line: str) -> None:
        self._send(line)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # tessera.progress.Progress, forwarded to the caller's terminal
    def start(self, desc: str, total: int | None, unit: str = "B") -> None:
        self._send(f"progress start {total if total is not None else '-'} {unit} {desc}")
        self._check()

    def advance(self, n: int) -> None:
        self._send(f"progress advance {n}")
        self._check()

    def finish(self) -> None:
        self._send("progress finish")


def mount_ref(home: str | Path, ref: str, mountpoint: str | Path, opts: MountOptions | None = None) -> MountRecord:
    """Mount ``ref`` of the home at ``home`` read-only at ``mountpoint``; return once the mount answers.
    The server runs detached (its own session) until unmounted or sent SIGTERM/SIGINT. It resolves the
    ref itself (its errors come back through the pipe with their exit codes): the caller need not open
    the repository at all, which keeps ``tessera mount`` fast."""
    opts = opts or MountOptions()
    if opts.path not in ("auto", "kernel", "fuse"):
        raise UsageError(f"unknown mount path {opts.path!r} (auto, kernel or fuse)")
    if opts.path == "fuse":
        check_fuse_device()  # else the server says so, when the kernel path is not taken
    home = str(Path(home).expanduser().resolve())
    _make_registry(home)
    created = make_mountpoint(mountpoint, home)
    mp = check_mountpoint(mountpoint)
    log = log_path(home, mp)
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
        answer = _wait_ready(rfd, proc, opts)
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    found = parse_ready(answer, log)
    if isinstance(found, MountRecord):
        if found.kind == KERNEL:  # the server made a kernel mount, recorded it, and exits
            proc.wait()
            rec = read_record(registry_path(home, mp))
            return rec or MountRecord(found.ref, found.hash, mp, 0, found.started, home, str(log), kind=KERNEL)
        return MountRecord(found.ref, found.hash, mp, proc.pid, found.started, home, str(log))
    _abort_server(proc, mp, home)
    if created:
        remove_made_mountpoint(home, mp)
    raise error_for(*found)


def _wait_ready(rfd: int, proc: subprocess.Popen[bytes], opts: MountOptions) -> str:
    """The server's final answer; its progress and note lines go to ``opts.progress`` / ``opts.notify``
    meanwhile (each line it sends restarts the ``opts.timeout`` of silence allowed)."""
    deadline = time.monotonic() + opts.timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return ready_line(code=MountError.exit_code,
                              message=f"the mount server did not become ready within {opts.timeout:.0f} s")
        ready, _, _ = select.select([rfd], [], [], min(left, 0.5))
        if ready:
            data = os.read(rfd, 65536)
            if not data:  # the server closed the pipe: either it answered, or it died
                return buf.decode("utf-8", "replace").strip() or "error"
            buf += data
            deadline = time.monotonic() + opts.timeout
            *lines, rest = buf.split(b"\n")
            buf = rest
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith(("ok ", "error ")) or line in ("ok", "error"):
                    return line
                _relay(line, opts)
        elif proc.poll() is not None:
            return buf.decode("utf-8", "replace").strip() or "error"


def _relay(line: str, opts: MountOptions) -> None:
    """A note or progress line from the server, to the caller's callbacks."""
    what, _, rest = line.partition(" ")
    if what == "note":
        (opts.notify or logger.info)(rest)
    elif what == "progress" and opts.progress is not None:
        step, _, args = rest.partition(" ")
        if step == "start":
            total, unit, desc = (args.split(" ", 2) + ["", ""])[:3]
            opts.progress.start(desc, None if total == "-" else int(total), unit or "B")
        elif step == "advance" and args.isdigit():
            opts.progress.advance(int(args))
        elif step == "finish":
            opts.progress.finish()


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


def _abort_server(proc: subprocess.Popen[bytes], mountpoint: str, home: str) -> None:
    """Make sure a failed mount leaves nothing behind: no process, no (dead) mount, kernel or FUSE."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    rec = read_record(registry_path(home, mountpoint))
    if rec is not None and rec.kind == KERNEL:
        with contextlib.suppress(TesseraError):
            unmount_kernel(mountpoint, home, lazy_if_busy=True)
    km = find_kernel_mount(mountpoint)
    if km is not None and km.fstype == FSTYPE:
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
    if (rec is not None and rec.kind == KERNEL and (km is None or km.fstype == KERNEL_FSTYPE)) or (
            km is not None and is_kernel_mount(km.fstype, km.source)):
        unmount_kernel(mp, home, lazy_if_busy=lazy_if_busy)
        if home is not None:
            remove_made_mountpoint(home, mp)
        return rec
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


# -- kernel mounts (EROFS + overlayfs): no server, so the registry and the mount table are all there is --

def is_kernel_mount(fstype: str, source: str) -> bool:
    return fstype == KERNEL_FSTYPE and source.startswith(SOURCE_PREFIX)


def umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode("utf-8", "surrogateescape"), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def kernel_staging_dir(home: Path, mountpoint: str) -> Path:
    """Where a kernel mount's EROFS image is mounted while its overlay is made."""
    return home / KERNEL_DIR / "staging" / registry_path(home, mountpoint).stem


def kernel_records(home: str | Path) -> list[MountRecord]:
    rdir = registry_dir(home)
    found = (read_record(p) for p in sorted(rdir.glob("*.json"))) if rdir.is_dir() else iter(())
    return [rec for rec in found if rec is not None and rec.kind == KERNEL]


def record_active(rec: MountRecord) -> bool:
    """The record's overlay is mounted, or its mounting process is still at work."""
    km = find_kernel_mount(rec.mountpoint)
    if km is not None and is_kernel_mount(km.fstype, km.source):
        return True
    return rec.pid > 0 and pid_alive(rec.pid)


def unmount_kernel(mountpoint: str, home: str | Path | None, *, lazy_if_busy: bool = False) -> None:
    """Unmount the overlay at ``mountpoint`` (if there) and whatever a killed mount left: the staging
    EROFS mount and directory, the registry record."""
    km = find_kernel_mount(mountpoint)
    if km is not None and is_kernel_mount(km.fstype, km.source):
        try:
            umount2(mountpoint)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not lazy_if_busy:
                raise MountError(f"cannot unmount {mountpoint}: {exc.strerror} (close files and leave the "
                                 "directory, then retry)") from None
            umount2(mountpoint, MNT_DETACH)
    if home is None:
        return
    rec = read_record(registry_path(home, mountpoint))
    staging = (Path(rec.staging) if rec is not None and rec.staging
               else kernel_staging_dir(Path(home).resolve(), mountpoint))
    clean_staging(staging)
    remove_record(home, mountpoint)


def clean_staging(staging: Path) -> None:
    for _ in range(4):  # stacked leftovers, if a mount was retried after kills
        if find_kernel_mount(str(staging)) is None:
            break
        with contextlib.suppress(OSError):
            umount2(str(staging), MNT_DETACH)
    with contextlib.suppress(OSError):
        staging.rmdir()


@contextlib.contextmanager
def mounted(home: str | Path, ref: str, mountpoint: str | Path, **options: Any) -> Iterator[str]:
    """``with version.mount(path, cache_size=..., threads=...):`` mount for the block, then unmount."""
    opts = MountOptions(**options)
    rec = mount_ref(home, ref, mountpoint, opts)
    try:
        yield rec.mountpoint
    finally:
        with contextlib.suppress(TesseraError):
            unmount(rec.mountpoint, rec.home, lazy_if_busy=True)


__all__ = ["MountOptions", "MountRecord", "mount_ref", "unmount", "mounted", "list_mounts", "is_mounted",
           "check_mountpoint", "kernel_mounts", "write_record", "remove_record", "make_mountpoint",
           "remove_made_mountpoint"]
