"""Remotes: a narrow transport interface (keys and bytes) and its backends.

    from tessera.remote import open_transport
    with open_transport("s3://bucket/prefix") as remote:
        remote.put("versions/abc", b"...", if_none_match=True)

Backends (`memory`, `local`, `s3`) are imported lazily, so importing this package does not import boto3.
"""
from __future__ import annotations

from tessera.remote.base import ObjectInfo, Progress, RemoteURL, Transport, open_transport, parse_url

__all__ = ["ObjectInfo", "Progress", "RemoteURL", "Transport", "open_transport", "parse_url"]
