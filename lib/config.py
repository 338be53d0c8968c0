"""Where a repository lives and its settings (kept in the catalog so every process agrees)."""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from tessera.format.chunker import ChunkParams

DEFAULT_HOME = "~/.tessera"


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
    pack_target: int = 48 * 1024 * 1024

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
        get = lambda k, default: int(items.get(k, default))  # noqa: E731
        chunk = ChunkParams(get("chunk.min_size", d.chunk.min_size), get("chunk.avg_size", d.chunk.avg_size),
                            get("chunk.max_size", d.chunk.max_size),
                            get("chunk.normalization", d.chunk.normalization))
        return cls(chunk, get("compression.level", d.compression_level), get("pack.target_size", d.pack_target))


@dataclass(frozen=True)
class FileCacheSettings:
    """Local settings of the whole-file cache and of the kernel mount's automatic choice (catalog keys
    ``filecache.*``; the environment variable named in each field's comment overrides the catalog).

    ``tessera mount`` without ``--kernel``/``--fuse`` takes the kernel path only when what the version
    still lacks in the cache is at most ``auto_max_bytes`` and is estimated (at the last measured
    materialization rate) to take at most ``auto_max_seconds``; otherwise it mounts with FUSE at once.
    """

    max_size: int = 64 << 30  # TESSERA_FILE_CACHE_SIZE: bytes of whole files kept (images come on top)
    auto_max_bytes: int = 512 << 20  # TESSERA_KERNEL_AUTO_BYTES
    auto_max_seconds: float = 5.0  # TESSERA_KERNEL_AUTO_SECONDS

    KEYS: ClassVar[dict[str, tuple[str, str]]] = {"max_size": ("filecache.max_size", "TESSERA_FILE_CACHE_SIZE"),
            "auto_max_bytes": ("filecache.auto_max_bytes", "TESSERA_KERNEL_AUTO_BYTES"),
            "auto_max_seconds": ("filecache.auto_max_seconds", "TESSERA_KERNEL_AUTO_SECONDS")}

    @classmethod
    def load(cls, setting: Callable[[str], str | None]) -> "FileCacheSettings":
        """From catalog settings (``setting(key)``), overridden by the environment."""
        d = cls()
        values: dict[str, float] = {}
        for name, (key, env) in cls.KEYS.items():
            raw = os.environ.get(env) or setting(key)
            default = getattr(d, name)
            try:
                values[name] = type(default)(float(raw)) if raw not in (None, "") else default
            except ValueError:
                values[name] = default
        return cls(int(values["max_size"]), int(values["auto_max_bytes"]), float(values["auto_max_seconds"]))
