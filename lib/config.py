"""Where a repository lives and its settings (kept in the catalog so every process agrees)."""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path

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
