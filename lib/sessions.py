"""A push's side of pruning a shared remote: the session it announces itself with, and the prune plans
it must respect (remote layout 2; the argument is in docs/format.md, "Forgetting and pruning a remote").

- **`PushSession`**: ``sessions/<id>`` lists every object the push relies on (the packs, indexes and
  metadata packs of the versions it sends, whether it uploads them or finds them there already, and the
  version objects). Written before the push relies on any of them, rewritten with ``If-Match`` as a
  heartbeat every quarter of its expiry, deleted at the end. A sweep spares every object a live session
  lists. A heartbeat whose ``If-Match`` fails means a prune found the session expired and deleted it:
  the push stops rather than write a version whose objects may be gone.
- **`Plans`**: the plans a prune published. Read *after* the session announced the objects: a sweep
  that starts later reads the session and spares them; a sweep already running (``prune/sweeping/``)
  may not have seen it, so the push waits for it to finish, then checks with HEAD every object it relies
  on that a plan names (missing ones are uploaded again). Whatever a finished plan names is dropped from
  this home's record of what the remote holds (``remote_objects``, ``remote_meta``): push trusts that
  record for nothing a plan touched.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.catalog.lifecycle_state import set_settings_json, settings_json
from tessera.errors import CorruptData, NotFound, PreconditionFailed, RemoteError, TesseraError
from tessera.lru import LRUCache
from tessera.remote.base import Transport
from tessera.remote.wire import (
    DONE,
    LAYOUT,
    LAYOUT_KEY,
    PLAN_MAX,
    PLANS,
    SMALL_OBJECT_MAX,
    SWEEPING,
    PlanObject,
    SessionObject,
    decode_layout,
    encode_layout,
    get_object,
    plan_key,
    session_key,
)
from tessera.remotes import Remote

logger = logging.getLogger(__name__)

SWEEP_GRACE = 2.0  # seconds past a sweep's window before a waiting push calls it abandoned
POLL = 0.5
_plan_cache: LRUCache[PlanObject] = LRUCache(256, sizeof=lambda _: 1)  # plans never change: keyed by (url, name)


def boot_clock() -> float:
    """Seconds on a clock that also runs while the machine sleeps (a suspended push must notice)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


# -- the remote's layout ----------------------------------------------------------------------------

def remote_layout(catalog: Catalog, t: Transport, remote: Remote) -> int:
    """1 for a remote nobody ever forgot or pruned on (no ``layout`` object), else its layout number
    (remembered once it is 2: a layout never goes back)."""
    setting = f"remote.layout.{remote.name}"
    if catalog.setting(setting) == str(LAYOUT):
        return LAYOUT
    try:
        n = decode_layout(get_object(t, LAYOUT_KEY, SMALL_OBJECT_MAX), f"{t.url}/{LAYOUT_KEY}")
    except NotFound:
        return 1
    _check_layout(t, n)
    if n == LAYOUT:
        catalog.set_setting(setting, str(n))
    return n


def ensure_layout(catalog: Catalog, t: Transport, remote: Remote) -> None:
    """Make the remote layout 2 (first forget or prune on it); refuse a layout this tessera does not know."""
    try:
        t.put_conditional(LAYOUT_KEY, encode_layout())
    except PreconditionFailed:
        _check_layout(t, decode_layout(get_object(t, LAYOUT_KEY, SMALL_OBJECT_MAX), f"{t.url}/{LAYOUT_KEY}"))
    catalog.set_setting(f"remote.layout.{remote.name}", str(LAYOUT))


def _check_layout(t: Transport, n: int) -> None:
    if n > LAYOUT:
        raise RemoteError(f"{t.url} uses remote layout {n}; this tessera knows up to layout {LAYOUT}: upgrade tessera")


# -- sessions ---------------------------------------------------------------------------------------

class PushSession:
    """``sessions/<id>`` of one push (or prune): announce objects, beat, end."""

    def __init__(self, t: Transport, expiry: float, *, kind: str = "push") -> None:
        self.t = t
        self.expiry = expiry
        self.kind = kind
        self.id = uuid.uuid4().hex
        self.key = session_key(self.id)
        self.keys: set[str] = set()
        self._etag: str | None = None
        self._lock = threading.Lock()
        self._beat = boot_clock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    def announce(self, keys: Iterable[str]) -> None:
        """Add ``keys`` to what the session relies on; returns once the session object says so."""
        with self._lock:
            new = set(keys) - self.keys
            if not new and self._etag is not None:
                return
            self.keys |= new
            self._write()
        if self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, name="tessera-session", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        obj = SessionObject(self.id, self.kind, socket.gethostname(), self._started, self.expiry,
                            tuple(sorted(self.keys)))
        if self._lost is not None:
            raise RemoteError(self._lost)
        try:
            self._etag = self.t.put_conditional(self.key, obj.to_bytes(), if_match=self._etag)
        except (NotFound, PreconditionFailed):
            self._lost = (f"{self.t.url}: this push's session expired and a prune removed it (the push was "
                          "paused too long); run the push again")
            raise RemoteError(self._lost) from None
        self._beat = boot_clock()

    def _heartbeat(self) -> None:
        interval = max(0.2, self.expiry / 4)
        while not self._stop.wait(interval):
            with self._lock:
                if self._lost is not None:
                    return
                try:
                    self._write()
                except RemoteError:
                    if self._lost is not None:
                        return
                    logger.info("session heartbeat to %s failed; retrying", self.t.url)
                except TesseraError as exc:
                    logger.info("session heartbeat to %s failed (%s); retrying", self.t.url, exc)

    def check_alive(self) -> None:
        """Raise `RemoteError` unless a prune is still bound to spare what this session announced: its last
        heartbeat landed less than half an expiry ago, and none was refused."""
        if self._lost is not None:
            raise RemoteError(self._lost)
        silent = boot_clock() - self._beat
        if silent > self.expiry / 2:
            raise RemoteError(f"{self.t.url}: this push's session could not beat for {silent:.0f} s (half its "
                              f"{self.expiry:.0f} s expiry); run the push again")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._etag is not None and self._lost is None:
            try:
                self.t.delete(self.key)
            except TesseraError as exc:  # it expires on its own
                logger.info("could not remove session %s: %s", self.key, exc)
            self._etag = None


# -- plans ------------------------------------------------------------------------------------------

@dataclass
class PlanState:
    name: str
    plan: PlanObject
    modified: float  # the plan object's LastModified (its time on the remote's clock)
    sweeping: float | None  # LastModified of its sweeping marker, if a sweep started
    done: bool

    def abandoned(self, now: float) -> bool:
        """A sweep that started more than its window (and a grace) ago is over, finished or not."""
        return self.sweeping is not None and now > self.sweeping + self.plan.window + SWEEP_GRACE

    def finished(self, now: float) -> bool:
        return self.done or self.abandoned(now)


class Plans:
    """The prune plans on a remote that this home has not yet taken into account."""

    def __init__(self, catalog: Catalog, t: Transport, remote: Remote, states: list[PlanState]) -> None:
        self.catalog = catalog
        self.t = t
        self.remote = remote
        self.states = states
        self._keys: dict[str, list[PlanState]] = {}
        for s in states:
            for c in s.plan.candidates:
                self._keys.setdefault(c.key, []).append(s)

    @classmethod
    def load(cls, catalog: Catalog, t: Transport, remote: Remote) -> Plans:
        plans: dict[str, float] = {}
        sweeping: dict[str, float] = {}
        done: set[str] = set()
        for info in t.list("prune/"):
            name = info.key.rsplit("/", 1)[-1]
            if info.key.startswith(PLANS):
                plans[name] = info.modified or 0.0
            elif info.key.startswith(SWEEPING):
                sweeping[name] = info.modified or 0.0
            elif info.key.startswith(DONE):
                done.add(name)
        seen = set(settings_json(catalog, _seen_key(remote)) or [])
        states = []
        for name in sorted(set(plans) - seen):
            plan = _plan_cache.get((t.url, name))
            if plan is None:
                try:
                    plan = PlanObject.from_bytes(name, get_object(t, plan_key(name), PLAN_MAX), f"{t.url}/{plan_key(name)}")
                except NotFound:
                    continue
                except CorruptData as exc:  # no prune sweeps a plan it cannot read either
                    logger.warning("ignoring an unreadable prune plan: %s", exc)
                    continue
                _plan_cache.put((t.url, name), plan)
            states.append(PlanState(name, plan, plans[name], sweeping.get(name), name in done))
        return cls(catalog, t, remote, states)

    def named(self, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` that some plan not yet taken into account names."""
        return {k for k in keys if k in self._keys}

    def settle(self, keys: Iterable[str], *, clock: Callable[[], float] | None = None) -> set[str]:
        """Wait until no sweep is running of a plan naming one of ``keys`` (a sweep that started before
        our session was written may not spare them); return the keys plans name (to check with HEAD)."""
        named = self.named(keys)
        running = {s.name: s for k in named for s in self._keys[k] if s.sweeping is not None and not s.done}
        now = clock or self.t.server_time
        while running:
            current = now()
            running = {n: s for n, s in running.items() if not s.finished(current)}
            if not running:
                break
            logger.info("%s: waiting for a prune sweep to finish (%s)", self.t.url, ", ".join(sorted(running)))
            time.sleep(POLL)
            finished = {info.key.rsplit("/", 1)[-1] for info in self.t.list(DONE)}
            for n in list(running):
                if n in finished:
                    running[n].done = True
        return named

    def finish(self, keep: Iterable[str] = (), *, now: float | None = None) -> int:
        """Take finished plans into account: drop every key they name from this home's record of the
        remote (except ``keep``: keys checked present after those plans finished), and remember them as
        seen. Plans still pending stay: the next push checks their keys again. Returns plans finished."""
        current = now if now is not None else (self.t.server_time() if any(s.sweeping for s in self.states) else 0.0)
        keep = set(keep)
        finished = [s for s in self.states if s.finished(current)]
        if not finished:
            return 0
        drop = {c.key for s in finished for c in s.plan.candidates} - keep
        rs.forget_keys(self.catalog, self.remote.name, sorted(drop))
        seen = set(settings_json(self.catalog, _seen_key(self.remote)) or [])
        set_settings_json(self.catalog, _seen_key(self.remote), sorted(seen | {s.name for s in finished}))
        return len(finished)


def _seen_key(remote: Remote) -> str:
    return f"remote.plans_seen.{remote.name}"
