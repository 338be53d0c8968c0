"""Named crash points for crash-safety tests (like failpoints in TiKV or FoundationDB).

Set ``TESSERA_CRASH_AT=<name>`` and the process SIGKILLs itself when it reaches that point. Costs one
dict lookup per call when unset.
"""
from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("TESSERA_CRASH_AT")


def crash_point(name: str) -> None:
    if _TARGET is not None and _TARGET == name:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_once(name: str) -> None:
    """Like `crash_point`, but only the first process to get there dies: ``TESSERA_CRASH_ONCE=<name>:<marker
    file>`` (read at each call; the marker is created atomically on the way down). For testing retries of a
    task killed mid-way (a distributed commit's worker): the retried attempt finds the marker and goes on."""
    spec = os.environ.get("TESSERA_CRASH_ONCE")
    if not spec or spec.partition(":")[0] != name:
        return
    try:
        os.close(os.open(spec.partition(":")[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
