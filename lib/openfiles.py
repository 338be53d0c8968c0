"""Which files below some directories are open for writing right now (Linux ``/proc``).

A quiet directory whose checkpoint writer merely paused between two `write()` calls is not finished:
the daemon and `tessera run` ask this before committing and wait (up to their max wait) while a file
is still open for writing, and a ``keep_busy`` commit (`tessera.snapshot`) asks it when it starts and
when it ends, keeping such files at their previous content. Processes we may not inspect are skipped;
elsewhere this finds nothing.
"""
from __future__ import annotations

import os

_O_ACCMODE = 0o3


def open_for_writing(roots: list[str], pids: list[int] | None = None, *, skip_self: bool = True) -> set[str]:
    """Paths below any of ``roots`` that some process (of ``pids``, default all; this one only when not
    ``skip_self``) holds open for writing."""
    prefixes = tuple(r.rstrip("/") + "/" for r in roots)
    found: set[str] = set()
    if pids is None:
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return found
    me = os.getpid() if skip_self else -1
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith(prefixes):
                continue
            if _writable(pid, fd):
                found.add(target)
    return found


def _writable(pid: int, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & _O_ACCMODE != os.O_RDONLY
    except (OSError, ValueError, IndexError):
        pass
    return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return [pid]
    for p in entries:
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children.get(cur, ()))
    return out
