"""`tessera daemon`: watch directories, commit each quiet moment as a version, push in the background.

Threads:
- the watchdog observer thread only records "watch K changed at T" in memory;
- the main thread loops: reload the config when its file changes, (re)schedule watches whose directory
  appeared or vanished, commit every watch that is due (quiet for ``quiet_seconds``, or changing for
  ``max_wait_seconds``), flush status to the catalog;
- the push worker uploads queued versions (table ``push_queue``, so the queue survives restarts) with
  exponential backoff per remote.

Crash safety comes from the store: a commit is atomic (packs, then catalog rows, then the version), so a
SIGKILL at any moment leaves garbage at worst. The only daemon-specific window — a version recorded but
its push not yet queued — is closed at start-up by `unqueued_watch_versions`. SIGTERM/SIGINT let the
current commit finish, then stop; a second signal interrupts it (the commit rolls back).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tessera.catalog import daemon_state as ds
from tessera.catalog.remote_state import remote_names
from tessera.daemon.config import (
    DaemonConfig,
    DaemonSettings,
    WatchConfig,
    check_config_against_home,
    load_config,
)
from tessera.openfiles import open_for_writing
from tessera.errors import ConfigError, NotFound, RemoteError, TesseraError, UsageError
from tessera.ignore import DirIgnore
from tessera.faults import crash_point

logger = logging.getLogger(__name__)

LOCK_FILE = "daemon.lock"
TICK_SECONDS = 1.0
WORKER_POLL_SECONDS = 5.0
STATUS_FLUSH_SECONDS = 1.0

PushFn = Callable[[Any, str, str], object]


def default_push(repo: Any, ref: str, remote: str) -> object:
    push = getattr(repo, "push", None)
    if push is None:
        raise RemoteError("this tessera has no push support yet (Repo.push is missing)")
    return push(ref, remote)


# -- the lock file: one daemon per home, and where `tessera status` finds its pid ---------------------

@dataclass(frozen=True)
class DaemonInfo:
    pid: int
    started: float
    config: str
    host: str
    config_error: str | None = None


class DaemonLock:
    """An exclusive `flock` on ``$TESSERA_HOME/daemon.lock`` holding a JSON `DaemonInfo`."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._fd: int | None = None
        self.info: DaemonInfo | None = None

    def acquire(self, config: Path) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for attempt in range(10):  # `tessera status` may hold a shared lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 9:
                    time.sleep(0.05)
        else:
            os.close(fd)
            other = read_daemon_info(self.path.parent)
            pid = f" (pid {other.pid})" if other else ""
            raise UsageError(f"a tessera daemon is already running for {self.path.parent}{pid}")
        self._fd = fd
        self.update(DaemonInfo(os.getpid(), time.time(), str(config), socket.gethostname()))

    def update(self, info: DaemonInfo) -> None:
        assert self._fd is not None
        self.info = info
        data = json.dumps(info.__dict__, sort_keys=True).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_daemon_info(home: Path) -> DaemonInfo | None:
    """The running daemon of ``home``, or None (no lock file, or nobody holds the lock)."""
    path = Path(home) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a daemon is running
        else:
            return None
        for _ in range(5):
            raw = os.pread(fd, 65536, 0)
            try:
                return DaemonInfo(**json.loads(raw))
            except (ValueError, TypeError):
                time.sleep(0.02)  # caught it mid-update
        return None
    finally:
        os.close(fd)


# -- per-watch debounce state -------------------------------------------------------------------------

@dataclass
class _Watch:
    cfg: WatchConfig
    ignored: DirIgnore  # watch globs, temporary files and the directory's .tesseraignore
    active: bool = False
    pending_since: float | None = None  # monotonic time of the first change not yet committed
    last_change: float | None = None
    last_change_wall: float | None = None
    flushed_wall: float | None = None
    events: int = 0
    failures: int = 0
    retry_at: float = 0.0
    error: str | None = None
    written_error: str | None = field(default=None)

    def deadline(self) -> float | None:
        if self.pending_since is None or self.last_change is None:
            return None
        due = min(self.last_change + self.cfg.quiet_seconds, self.pending_since + self.cfg.max_wait_seconds)
        return max(due, self.retry_at)

    def forced(self, now: float) -> bool:
        return self.pending_since is not None and now - self.pending_since >= self.cfg.max_wait_seconds


def backoff(attempts: int, lo: float, hi: float) -> float:
    return min(hi, lo * 2.0 ** min(attempts, 30)) * random.uniform(0.85, 1.0)


# -- push worker ----------------------------------------------------------------------------------------

class PushWorker(threading.Thread):
    """Uploads queued versions, oldest first; a failing remote waits with exponential backoff."""

    def __init__(self, home: Path, settings: DaemonSettings, push: PushFn, stop: threading.Event) -> None:
        super().__init__(name="push-worker", daemon=True)
        self.home = home
        self.settings = settings
        self.push = push
        self.stop_event = stop
        self.wake = threading.Event()

    def run(self) -> None:
        from tessera.repo import Repo

        repo = Repo(self.home)
        try:
            while not self.stop_event.is_set():
                try:
                    worked = self._round(repo)
                except Exception:  # noqa: BLE001 - e.g. a catalog hiccup; never let the worker die
                    logger.exception("push worker round failed")
                    worked = False
                if worked:
                    continue
                nxt = ds.next_push_time(repo.catalog)
                timeout = WORKER_POLL_SECONDS if nxt is None else max(0.05, min(WORKER_POLL_SECONDS, nxt - time.time()))
                self.wake.wait(timeout)
                self.wake.clear()
        finally:
            repo.close()

    def _round(self, repo: Any) -> bool:
        """Try every due item once; True if anything succeeded (more may be due right away)."""
        blocked: set[str] = set()
        succeeded = False
        for item in ds.due_pushes(repo.catalog, time.time()):
            if self.stop_event.is_set():
                break
            if item.remote in blocked:
                continue
            try:
                self.push(repo, item.ref, item.remote)
            except Exception as exc:  # noqa: BLE001 - anything a push raises is recorded and retried
                if not isinstance(exc, TesseraError):
                    logger.exception("push of %s to %s failed unexpectedly", item.ref, item.remote)
                msg = str(exc) if isinstance(exc, TesseraError) else f"{type(exc).__name__}: {exc}"
                delay = backoff(item.attempts, self.settings.push_retry_min_seconds,
                                self.settings.push_retry_max_seconds)
                item_fault = isinstance(exc, (NotFound, UsageError)) and not isinstance(exc, RemoteError)
                if item_fault:
                    delay = self.settings.push_retry_max_seconds  # this item is the problem, not the remote
                else:
                    blocked.add(item.remote)  # the remote is down: its other items wait as long
                ds.push_failed(repo.catalog, item, msg, time.time() + delay, whole_remote=not item_fault)
                logger.warning("push of %s to %s failed (attempt %d): %s; retrying in %.0f s", item.ref,
                               item.remote, item.attempts + 1, msg, delay)
            else:
                ds.push_done(repo.catalog, item.id)
                ds.retry_pushes_now(repo.catalog, item.remote)  # the remote is back: no more waiting
                logger.info("pushed %s to %s", item.ref, item.remote)
                succeeded = True
        return succeeded


# -- the daemon ---------------------------------------------------------------------------------------

class Daemon:
    """Run with `run()` in the main thread (signals) or in a thread (tests: ``install_signals=False``)."""

    def __init__(self, home: str | Path, config_path: str | Path | None = None, *,
                 push: PushFn | None = None, tick: float = TICK_SECONDS) -> None:
        self.home = Path(home)
        self.config_path = Path(config_path) if config_path else self.home / "daemon.toml"
        self.push = push or default_push
        self.tick = tick
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._signals = 0
        self._watches: dict[str, _Watch] = {}
        self._config_stamp: tuple[int, int, int] | None = None
        self._config: DaemonConfig | None = None
        self._last_flush = 0.0
        self.ready = threading.Event()
        self.commits = 0

    # -- public ------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, *, install_signals: bool = True) -> None:
        from tessera.daemon.watcher import Watcher
        from tessera.repo import Repo

        lock = DaemonLock(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        lock.acquire(self.config_path)
        self.lock = lock
        try:
            self.repo = Repo(self.home)
            try:
                config = self._load_checked()
                self._config_stamp = self._stamp()
                if install_signals:
                    self._install_signals()
                self.watcher = Watcher(self._on_change)
                self.watcher.start()
                self._apply(config)
                self._requeue_lost_pushes()
                ds.retry_pushes_now(self.repo.catalog)
                self.worker = PushWorker(self.home, config.settings, self.push, self._stop)
                self.worker.start()
                logger.info("daemon started (pid %d), %d watches from %s", os.getpid(), len(config.watches),
                            self.config_path)
                self.ready.set()
                try:
                    self._loop()
                finally:
                    self._stop.set()
                    self.watcher.stop()
                    self.worker.wake.set()
                    self.worker.join(timeout=10)
                    if self.worker.is_alive():
                        logger.warning("a push was still running at exit; it stays queued and resumes next time")
            finally:
                self.repo.close()
        finally:
            lock.release()
            self.ready.set()
        logger.info("daemon stopped")

    # -- signals -----------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self._signals += 1
            if self._signals > 1:
                raise KeyboardInterrupt  # second signal: abandon the current commit (it rolls back)
            logger.info("%s: stopping after the current step", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, lambda *_: self._wake.set())  # reload is automatic; HUP just wakes

    # -- config ------------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load_checked(self) -> DaemonConfig:
        config = load_config(self.config_path)
        check_config_against_home(config, self.home)
        known = set(remote_names(self.repo.catalog))
        for w in config.watches:
            if w.remote and w.remote not in known:
                raise NotFound(f"{w.where(str(config.path))}: unknown remote {w.remote!r} "
                               f"(known: {', '.join(sorted(known)) or 'none; add one with `tessera remote add`'})")
        return config

    def _maybe_reload(self) -> None:
        stamp = self._stamp()
        if stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            config = self._load_checked()
        except TesseraError as exc:
            logger.error("config not reloaded, keeping the previous one: %s", exc)
            self._set_config_error(str(exc))
            return
        self._set_config_error(None)
        logger.info("config reloaded: %d watches", len(config.watches))
        self._apply(config)

    def _set_config_error(self, error: str | None) -> None:
        info = self.lock.info
        if info is not None and info.config_error != error:
            self.lock.update(DaemonInfo(info.pid, info.started, info.config, info.host, error))

    def _apply(self, config: DaemonConfig) -> None:
        self._config = config
        wanted = {w.path: w for w in config.watches}
        unschedule: list[str] = []
        # never call the watcher under self._lock: watchdog dispatches events (-> _on_change, which
        # takes self._lock) while holding its own lock, which unschedule needs too
        with self._lock:
            for key in [k for k in self._watches if k not in wanted]:
                del self._watches[key]
                unschedule.append(key)
                logger.info("no longer watching %s", key)
            for key, cfg in wanted.items():
                cur = self._watches.get(key)
                if cur is None:
                    self._watches[key] = _Watch(cfg, DirIgnore(key, cfg.ignore))
                elif cur.cfg != cfg:
                    cur.cfg, cur.ignored = cfg, DirIgnore(key, cfg.ignore)
                    if cur.active:  # new ignore globs: reschedule with the new filter
                        unschedule.append(key)
                        cur.active = False
        for key in unschedule:
            self.watcher.remove(key)
        if hasattr(self, "worker"):
            self.worker.settings = config.settings
        self._check_dirs()

    # -- events ------------------------------------------------------------------------------------

    def _on_change(self, key: str) -> None:
        """Called from the observer thread for every relevant event: memory only, no I/O."""
        now = time.monotonic()
        with self._lock:
            w = self._watches.get(key)
            if w is None:
                return
            opened = w.pending_since is None
            if opened:
                w.pending_since = now
            w.last_change = now
            w.last_change_wall = time.time()
            w.events += 1
        if opened:
            self._wake.set()

    def _check_dirs(self) -> None:
        """Schedule watches whose directory exists now; notice directories that vanished."""
        for key, w in list(self._watches.items()):
            exists = os.path.isdir(key)
            if exists and not w.active:
                try:
                    self.watcher.add(key, key, w.ignored)
                except ConfigError as exc:
                    self._set_error(w, str(exc))
                    continue
                w.active = True
                logger.info("watching %s -> dataset %s", key, w.cfg.dataset)
                self._on_change(key)  # commit what is there now (changes made while we were not watching)
                with self._lock:
                    w.last_change = w.pending_since = time.monotonic() - w.cfg.max_wait_seconds
                if w.error and w.error.startswith("directory"):
                    self._set_error(w, None)
            elif not exists and w.active:
                self.watcher.remove(key)
                w.active = False
                self._set_error(w, f"directory {key} vanished; waiting for it to come back")
            elif not exists and w.error is None:
                self._set_error(w, f"directory {key} does not exist; waiting for it")

    def _set_error(self, w: _Watch, error: str | None) -> None:
        w.error = error
        if error:
            logger.warning("%s: %s", w.cfg.path, error)
        if w.written_error != error:
            ds.note_watch_error(self.repo.catalog, w.cfg.path, w.cfg.dataset, error)
            w.written_error = error

    # -- main loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._maybe_reload()
            self._check_dirs()
            for w in list(self._watches.values()):
                if self._stop.is_set():
                    break
                deadline = w.deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    self._maybe_commit(w)
            self._flush_events()
            deadlines = [d for d in (w.deadline() for w in self._watches.values()) if d is not None]
            timeout = self.tick
            if deadlines:
                timeout = max(0.02, min(timeout, min(deadlines) - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()

    def _maybe_commit(self, w: _Watch) -> None:
        now = time.monotonic()
        scan: set[str] | None = None
        if not w.forced(now):
            scan = open_for_writing([w.cfg.path], skip_self=False)
            if scan:
                logger.info("%s: %d files still open for writing; waiting", w.cfg.path, len(scan))
                with self._lock:
                    w.last_change = now  # not quiet yet; max_wait_seconds still bounds the wait
                return
        self._commit(w, scan)

    def _commit(self, w: _Watch, open_at_start: set[str] | None = None) -> None:
        """Commit a watch. Files open for writing (``open_at_start``: a /proc scan just made, else the
        commit makes its own) or changing during the commit keep their previous content."""
        cfg = w.cfg
        with self._lock:
            events, w.events = w.events, 0
            w.pending_since = w.last_change = None  # changes from now on open the next window
        if self._empty_and_new(w):
            return  # nothing to version yet: no empty first version for a directory still to be filled
        try:
            res = self.repo.commit_dir(cfg.dataset, cfg.path, message=f"daemon: {events} file events in {cfg.path}",
                                       meta={"daemon": {"watch": cfg.path, "events": events}},
                                       exclude=w.ignored.excludes, keep_busy=True, open_at_start=open_at_start)
        except Exception as exc:  # noqa: BLE001 - one bad watch must not stop the daemon
            if not isinstance(exc, TesseraError):
                logger.exception("commit of %s failed", cfg.path)
            w.failures += 1
            delay = min(60.0, cfg.max_wait_seconds, max(1.0, min(cfg.quiet_seconds, 5.0)) * 2 ** (w.failures - 1))
            now = time.monotonic()
            with self._lock:
                if w.pending_since is None:
                    w.pending_since = now - cfg.max_wait_seconds  # retry even without new events
                    w.last_change = now
                w.events += events
                w.retry_at = now + delay
            self._set_error(w, f"commit failed: {exc}; retrying in {delay:.0f} s")
            return
        w.failures, w.retry_at = 0, 0.0
        crash_point("daemon-after-commit")
        ds.record_watch_commit(self.repo.catalog, cfg.path, cfg.dataset, res.version.hash, time.time(),
                               cfg.remote, res.created)
        w.error = w.written_error = None
        self.commits += 1
        s = res.stats
        if res.created:
            logger.info("%s: new version %s (%d files, %d read%s)", cfg.path, res.version.ref, s.files, s.files_read,
                        f", {len(s.busy)} still being written kept at their previous content" if s.busy else "")
            if cfg.remote:
                self.worker.wake.set()
        else:
            logger.info("%s: unchanged (%s)", cfg.path, res.version.ref[:len(cfg.dataset) + 13])

    def _empty_and_new(self, w: _Watch) -> bool:
        if self.repo.catalog.dataset_head(w.cfg.dataset)[1] is not None:
            return False
        try:
            with os.scandir(w.cfg.path) as it:
                return not any(not w.ignored(e.name) for e in it)
        except OSError:
            return False

    def _flush_events(self) -> None:
        now = time.monotonic()
        if now - self._last_flush < STATUS_FLUSH_SECONDS:
            return
        self._last_flush = now
        for w in list(self._watches.values()):
            wall = w.last_change_wall
            if wall is not None and wall != w.flushed_wall:
                ds.note_watch_event(self.repo.catalog, w.cfg.path, w.cfg.dataset, wall)
                w.flushed_wall = wall

    def _requeue_lost_pushes(self) -> None:
        assert self._config is not None
        for cfg in self._config.watches:
            if not cfg.remote:
                continue
            for hash_ in ds.unqueued_watch_versions(self.repo.catalog, cfg.path, cfg.dataset, cfg.remote):
                logger.info("queueing %s@%s for %s (its push was not queued before a crash)", cfg.dataset,
                            hash_[:12], cfg.remote)
                ds.enqueue_push(self.repo.catalog, cfg.remote, cfg.dataset, hash_)
