"""Where a repository lives and its settings (kept in the catalog so every process agrees)."""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from tessera.errors import UsageError
from tessera.format.chunker import ChunkParams

DEFAULT_HOME = "~/.tessera"
DEFAULT_PACK_TARGET = 48 * 1024 * 1024  # data packs: ~22 per GiB, each one PUT to a remote


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1048576' -> bytes; a one-line `UsageError` otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix") from None
    if value < 0:
        raise UsageError(f"bad size {text!r}: must not be negative")
    return value


def default_home() -> Path:
    return Path(os.environ.get("TESSERA_HOME") or DEFAULT_HOME).expanduser()


def default_author() -> str:
    if os.environ.get("TESSERA_AUTHOR"):
        return os.environ["TESSERA_AUTHOR"]
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class RepoSettings:
    """Store format settings, fixed when the repository is created (`tessera init`)."""

    chunk: ChunkParams = ChunkParams()
    compression_level: int = 3
    pack_target: int = DEFAULT_PACK_TARGET

    def to_items(self) -> dict[str, str]:
        return {
            "chunk.min_size": str(self.chunk.min_size),
            "chunk.avg_size": str(self.chunk.avg_size),
            "chunk.max_size": str(self.chunk.max_size),
            "chunk.normalization": str(self.chunk.normalization),
            "compression.level": str(self.compression_level),
            "pack.target_size": str(self.pack_target),
        }

    @classmethod
    def from_items(cls, items: dict[str, str]) -> "RepoSettings":
        d = cls()

        def get(key: str, default: int) -> int:
            return int(items.get(key) or default)

        chunk = ChunkParams(get("chunk.min_size", d.chunk.min_size), get("chunk.avg_size", d.chunk.avg_size),
                            get("chunk.max_size", d.chunk.max_size),
                            get("chunk.normalization", d.chunk.normalization))
        return cls(chunk, get("compression.level", d.compression_level), get("pack.target_size", d.pack_target))


@dataclass(frozen=True)
class FileCacheSettings:
    """Local settings of the whole-file cache and of the kernel mount's automatic choice: catalog keys
    ``filecache.*`` (`tessera cache budget` sets the first), each overridden by an environment
    variable. Sizes take K/M/G/T suffixes.

    ``tessera mount`` without ``--kernel``/``--fuse`` takes the kernel path only when what the version
    still lacks in the cache is at most ``auto_max_bytes`` and is estimated (from the rates measured
    by earlier materializations) to take at most ``auto_max_seconds``; otherwise it mounts with FUSE.
    """

    max_size: int = 64 << 30  # bytes of whole files kept (images come on top)
    auto_max_bytes: int = 512 << 20
    auto_max_seconds: float = 5.0

    KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "max_size": ("filecache.max_size", "TESSERA_FILE_CACHE_SIZE"),
        "auto_max_bytes": ("filecache.auto_max_bytes", "TESSERA_KERNEL_AUTO_BYTES"),
        "auto_max_seconds": ("filecache.auto_max_seconds", "TESSERA_KERNEL_AUTO_SECONDS"),
    }

    @classmethod
    def load(cls, setting: Callable[[str], str | None]) -> "FileCacheSettings":
        """From catalog settings (``setting(key)``), overridden by the environment; a malformed value
        keeps the default."""
        d = cls()
        values: dict[str, float] = {}
        for name, (key, env) in cls.KEYS.items():
            raw = os.environ.get(env) or setting(key)
            values[name] = _number(raw, float(getattr(d, name)))
        return cls(int(values["max_size"]), int(values["auto_max_bytes"]), float(values["auto_max_seconds"]))


def _number(text: str | None, default: float) -> float:
    """'64G', '512M', '1048576', '2.5' -> a number (K/M/G/T are powers of 1024)."""
    if text is None or not text.strip():
        return default
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        return default
