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
