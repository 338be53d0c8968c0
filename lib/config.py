"""Where a repository lives and its settings (kept in the catalog so every process agrees)."""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path

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
