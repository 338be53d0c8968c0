"""Remotes: a narrow transport interface (keys and bytes), its backends, and the factory that opens one.

    from tessera.remote import open_transport
    with open_transport("s3://bucket/prefix") as remote:
        remote.put("versions/abc", b"...", if_none_match=True)

Backends (`memory`, `local`, `s3`) register here, apart from their interface (`base`), and are imported
only when a URL of theirs is opened, so importing this package does not import boto3. What tessera
writes under a remote's keys is `tessera.remote.wire`.
"""
from __future__ import annotations

import os

from tessera.errors import UsageError
from tessera.remote.base import ObjectInfo, Progress, RemoteURL, Transport, parse_url

__all__ = ["ObjectInfo", "Progress", "RemoteURL", "Transport", "open_transport", "parse_url"]

TIMEOUT_ENV = "TESSERA_REMOTE_TIMEOUT"
RETRIES_ENV = "TESSERA_REMOTE_RETRIES"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 5
SINGLE_PUT_MAX = 64 * 1024 * 1024  # packs (48 MiB) go up in one PUT: ~22 PUTs per GiB; bigger: 64 MiB parts


def open_transport(url: str, *, timeout: float | None = None, retries: int | None = None,
                   part_size: int | None = None) -> Transport:
    """Open the transport for ``url``, wrapped in `Retrying` (``retries`` retries on transient faults).

    ``timeout`` is the connect and read timeout of each network request (S3 only). Both default to
    ``$TESSERA_REMOTE_TIMEOUT`` (10 s) and ``$TESSERA_REMOTE_RETRIES`` (5). ``part_size`` (S3 only): files
    up to this size go up in one PUT, bigger ones in parts of this size (default 8 MiB; tessera's own
    remotes use `SINGLE_PUT_MAX`, so a 48 MiB pack is one request).
    """
    from tessera.remote.retry import Retrying

    timeout = _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT) if timeout is None else timeout
    retries = int(_env_number(RETRIES_ENV, DEFAULT_RETRIES)) if retries is None else retries
    parsed = parse_url(url)
    inner: Transport
    if parsed.scheme == "memory":
        from tessera.remote.memory import MemoryTransport

        inner = MemoryTransport(parsed.location, parsed.prefix)
    elif parsed.scheme == "file":
        from tessera.remote.local import LocalTransport

        inner = LocalTransport(parsed.location)
    else:
        from tessera.remote.s3 import S3Transport

        inner = (S3Transport(parsed.location, parsed.prefix, timeout=timeout, part_size=part_size) if part_size
                 else S3Transport(parsed.location, parsed.prefix, timeout=timeout))
    return Retrying(inner, retries=retries)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"${name} must be a number, not {text!r}") from None
