"""File system events from watchdog (the only module that imports it), reduced to "something changed".

The service does not care which file changed — a commit walks the whole directory and the stat cache
makes unchanged files free — only *when* something last changed. So the handler filters out noise
(directory mtime updates, ignored and temporary files) and calls ``on_change(key)``.

Only write-side inotify events are requested: the daemon's own reads (open, access, close-nowrite)
must never look like changes, or every commit would trigger the next one.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Callable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from tessera.errors import ConfigError

logger = logging.getLogger(__name__)

WRITE_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
                DirCreatedEvent, DirDeletedEvent, DirMovedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, key: str, root: str, ignored: Callable[[str], bool], on_change: Callable[[str], None]):
        self.key = key
        self.root = root.rstrip("/")
        self.ignored = ignored
        self.on_change = on_change

    def _relevant(self, path: str | bytes) -> bool:
        p = os.fsdecode(path)
        if not p:
            return False
        if p == self.root:
            return True
        if not p.startswith(self.root + "/"):
            return False  # moved out of / into the tree from elsewhere: the other side counts
        return not self.ignored(p[len(self.root) + 1:])

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirModifiedEvent):
            return  # a directory's mtime: the file event that caused it is what matters
        if self._relevant(event.src_path) or self._relevant(getattr(event, "dest_path", "") or ""):
            try:
                self.on_change(self.key)
            except Exception:  # noqa: BLE001 - never kill the observer thread
                logger.exception("change handler failed")


class Watcher:
    """Recursive inotify watches on several directories, one observer thread for all of them."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._observer = Observer()
        self._watches: dict[str, ObservedWatch] = {}

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout=5)

    def add(self, key: str, path: str, ignored: Callable[[str], bool]) -> None:
        """Watch ``path`` recursively; events call ``on_change(key)``. Raises `ConfigError` when the
        kernel's inotify limits are reached."""
        self.remove(key)
        handler = _Handler(key, path, ignored, self._on_change)
        try:
            self._watches[key] = self._observer.schedule(handler, path, recursive=True, event_filter=WRITE_EVENTS)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
                raise ConfigError(f"cannot watch {path}: {exc.strerror or exc} (raise "
                                  "fs.inotify.max_user_watches / max_user_instances with sysctl)") from None
            raise ConfigError(f"cannot watch {path}: {exc.strerror or exc}") from None

    def remove(self, key: str) -> None:
        watch = self._watches.pop(key, None)
        if watch is not None:
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError):
                pass  # the directory is already gone, and its watch with it

    def watching(self, key: str) -> bool:
        return key in self._watches
