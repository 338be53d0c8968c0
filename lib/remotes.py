"""Which remote to use, and the open transports of one home (pooled, shared by its threads).

A remote is named by a configured name (`tessera remote add`) or used by URL directly. Push, pull and
lazy reads ask here; the transports themselves come from `tessera.remote.open_transport`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from tessera.catalog import Catalog
from tessera.catalog import remote_state as rs
from tessera.errors import CorruptData, NotFound, TesseraError, UsageError
from tessera.remote import SINGLE_PUT_MAX, Transport, open_transport, parse_url
from tessera.remote.wire import pack_key

logger = logging.getLogger(__name__)

LAZY_RETRIES = 2  # a lazy read during an outage fails (EIO) within a second or two


@dataclass(frozen=True)
class Remote:
    """A remote as push and pull see it. ``name`` keys what the catalog records about it: a configured
    remote's name, or the URL itself for a remote used without `tessera remote add`."""

    name: str
    url: str


def resolve_remote(catalog: Catalog, name: str | None = None) -> Remote:
    """The remote called ``name`` (a configured name or a URL); by default the remote marked default,
    or the only one."""
    if name is None:
        found = rs.default_remote(catalog)
        if found is not None:
            return Remote(found.name, found.url)
        names = rs.remote_names(catalog)
        if not names:
            raise NotFound("no remote configured: add one with `tessera remote add origin s3://BUCKET/PREFIX`")
        raise UsageError(f"several remotes ({', '.join(names)}) and none is the default: name one with "
                         "--remote, or make one the default with `tessera remote default NAME`")
    if "://" in name:
        parse_url(name)
        for r in rs.remotes(catalog):
            if r.url == name:
                return Remote(r.name, r.url)
        return Remote(name, name)
    info = rs.get_remote(catalog, name)
    if info is None:
        names = rs.remote_names(catalog)
        hint = f" (configured: {', '.join(names)})" if names else " (none configured: see `tessera remote add`)"
        raise NotFound(f"unknown remote {name!r}{hint}")
    return Remote(info.name, info.url)


def remote_or_none(catalog: Catalog, name: str | None = None) -> Remote | None:
    """`resolve_remote`, or None when that names no single remote."""
    try:
        return resolve_remote(catalog, name)
    except TesseraError:
        return None


class Transports:
    """The open transports of one home, shared by its threads; closed with it. Lazy reads get their own
    transport per URL with fewer retries, so a read during an outage fails fast (EIO) instead of hanging."""

    def __init__(self, catalog: Catalog, preferred: str | None = None) -> None:
        self.catalog = catalog
        self.preferred = preferred  # `Repo(remote=...)`: the remote used when none is named
        self._open: dict[tuple[str, bool], Transport] = {}
        self._lock = threading.Lock()

    def remote(self, name: str | None = None) -> Remote:
        return resolve_remote(self.catalog, name if name is not None else self.preferred)

    def get(self, url: str, *, lazy: bool = False) -> Transport:
        key = (url, lazy)
        with self._lock:
            t = self._open.get(key)
            if t is None:
                t = self._open[key] = open_transport(url, retries=LAZY_RETRIES if lazy else None,
                                                     part_size=SINGLE_PUT_MAX)
            return t

    def for_pack(self, pack: str) -> Transport:
        """The transport lazy reads of ``pack`` go to: a remote known to hold it, preferring the default."""
        holders = rs.remotes_holding(self.catalog, pack_key(pack))
        default = remote_or_none(self.catalog, self.preferred)
        if default is not None and (default.name in holders or not holders):
            return self.get(default.url, lazy=True)
        for name in holders:
            info = rs.get_remote(self.catalog, name)
            if info is not None:
                return self.get(info.url, lazy=True)
            if "://" in name:
                return self.get(name, lazy=True)
        raise CorruptData(f"pack {pack} is not local and no configured remote holds it "
                          "(add the remote it came from with `tessera remote add`)")

    def close(self) -> None:
        with self._lock:
            for t in self._open.values():
                try:
                    t.close()
                except Exception:  # noqa: BLE001 - closing must not mask the real outcome
                    logger.debug("closing %s failed", t, exc_info=True)
            self._open.clear()
