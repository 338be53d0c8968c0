"""tessera: versioned datasets for machine learning.

    import tessera
    repo = tessera.Repo()
    v = repo.commit("coco", "./data", message="first cut")
    v = repo.get("coco@3f2a9c")
    data = v.read_bytes("train/x.jpg")
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Repo", "Version", "Entry", "TesseraError", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from tessera.errors import TesseraError
    from tessera.model import Entry
    from tessera.repo import Repo
    from tessera.version import Version


def __getattr__(name: str) -> Any:
    # Lazy: `import tessera` stays cheap so `tessera --help` starts fast.
    if name == "Repo":
        from tessera.repo import Repo
        return Repo
    if name == "Version":
        from tessera.version import Version
        return Version
    if name == "Entry":
        from tessera.model import Entry
        return Entry
    if name == "TesseraError":
        from tessera.errors import TesseraError
        return TesseraError
    raise AttributeError(name)
