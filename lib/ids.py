"""Hashes and refs: how versions, files and chunks are named.

- chunk id: xxh3-128 of the raw chunk bytes (16 bytes; hex for humans)
- file id:  SHA-256 of the file's bytes (what `sha256sum` prints)
- tree id:  SHA-256 of the tree's canonical bytes; the root tree id *is* the version hash
"""
from __future__ import annotations

import hashlib
import mmap
import re
from dataclasses import dataclass
from typing import Union

import xxhash

from tessera.errors import BadRef

HASH_HEX_LEN = 64
MIN_PREFIX = 6
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


def chunk_id(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]


def sha256_hex(data: Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


def check_dataset_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise BadRef(
            f"bad dataset name {name!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return name


def check_tag(tag: str) -> str:
    if not _NAME_RE.match(tag) or _HEX_RE.match(tag) and len(tag) >= MIN_PREFIX:
        raise BadRef(
            f"bad tag {tag!r}: use letters, digits, '.', '_' or '-', and not something that looks like a hash"
        )
    return tag


@dataclass(frozen=True)
class Ref:
    """A parsed reference: `NAME`, `NAME@HEXPREFIX` or `NAME:TAG`."""

    dataset: str
    prefix: str | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.prefix:
            return f"{self.dataset}@{self.prefix}"
        if self.tag:
            return f"{self.dataset}:{self.tag}"
        return self.dataset


def parse_ref(text: str) -> Ref:
    if "@" in text:
        name, _, prefix = text.partition("@")
        prefix = prefix.lower()
        if not _HEX_RE.match(prefix) or not MIN_PREFIX <= len(prefix) <= HASH_HEX_LEN:
            raise BadRef(
                f"bad ref {text!r}: after '@' give {MIN_PREFIX} to {HASH_HEX_LEN} hex characters of a version hash"
            )
        return Ref(check_ref_name(name, text), prefix=prefix)
    if ":" in text:
        name, _, tag = text.partition(":")
        if not tag:
            raise BadRef(f"bad ref {text!r}: empty tag after ':'")
        return Ref(check_ref_name(name, text), tag=check_tag(tag))
    return Ref(check_ref_name(text, text))


def check_ref_name(name: str, text: str) -> str:
    if not _NAME_RE.match(name):
        raise BadRef(f"bad ref {text!r}: expected NAME, NAME@HASHPREFIX or NAME:TAG")
    return name
