"""Retention that runs itself: keep rules applied after each new version, and a reclaim in the background
once enough bytes are dead.

The daemon applies a watch's keep rules (``keep_last``, ``keep_daily``, ... in daemon.toml) right after
each version it commits, and `tessera run --keep-last N` after each capture; the head, tagged, mounted
and queued versions stay whatever the rules say. Forgetting is a quick catalog change; the bytes are
reclaimed by `tessera gc` once the dead bytes in the packs pass ``gc.auto_dead_bytes`` (`tessera config`):
the daemon runs it in a thread of its own (commits go on; gc waits for a moment between them), `run`
between two captures.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.retention import KeepPolicy

logger = logging.getLogger(__name__)

MIN_INTERVAL = 5.0  # seconds between two measures of the dead bytes
LOCK_WAIT = 60.0  # a background gc waits this long for a moment without commits


def apply_keep(repo: Any, dataset: str, policy: KeepPolicy | None) -> int:
    """Forget the versions of ``dataset`` the rules do not keep; returns how many were forgotten."""
    if policy is None or policy.empty:
        return 0
    report = repo.forget(dataset, policy)
    gone = len(report.forgotten)
    if gone:
        logger.info("%s: forgot %d versions (%s)", dataset, gone, policy.describe())
    return gone


def maybe_reclaim(repo: Any) -> Any:
    """Run gc when the dead bytes pass ``gc.auto_dead_bytes``; returns its report (None: not needed)."""
    settings = repo.lifecycle_settings()
    usage = repo.reclaimable()
    if usage.dead_bytes < settings.auto_dead_bytes or usage.dead_bytes == 0:
        return None
    logger.info("reclaiming: %d dead bytes in packs (gc.auto_dead_bytes %d)", usage.dead_bytes,
                settings.auto_dead_bytes)
    report = repo.gc(lock_wait=LOCK_WAIT)
    logger.info("gc freed %d bytes (%d packs deleted, %d repacked)", report.freed, report.packs_deleted,
                report.repacked)
    return report


class Reclaimer:
    """A thread that, when poked, measures the home's dead bytes and reclaims them past the setting. It
    opens its own `Repo` (its own catalog connection), so the daemon's commits never wait on it except
    for gc's short exclusive moment."""

    def __init__(self, home: str | Path, *, min_interval: float = MIN_INTERVAL) -> None:
        self.home = Path(home)
        self.min_interval = min_interval
        self.runs = 0
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tessera-reclaim", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            pause = last + self.min_interval - time.monotonic()
            if pause > 0 and self._stop.wait(pause):
                return
            self._wake.clear()
            last = time.monotonic()
            try:
                self._once()
            except TesseraError as exc:
                self.last_error = str(exc)
                logger.warning("background reclaim: %s", exc)
            except Exception:  # noqa: BLE001 - a bug here must not stop the daemon
                logger.exception("background reclaim failed")

    def _once(self) -> None:
        from tessera.repo import Repo

        with Repo(self.home) as repo:
            settings = repo.lifecycle_settings()
            usage = repo.reclaimable()
            if usage.dead_bytes < settings.auto_dead_bytes or usage.dead_bytes == 0:
                return
            logger.info("background reclaim: %d dead bytes in packs", usage.dead_bytes)
            report = repo.gc(lock_wait=LOCK_WAIT)
            self.runs += 1
            logger.info("background reclaim freed %d bytes (%d packs deleted, %d repacked)", report.freed,
                        report.packs_deleted, report.repacked)
