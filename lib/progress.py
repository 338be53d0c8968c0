"""Progress is a callback: library code reports, the CLI renders (`tessera.cli.progress`), the daemon logs."""
from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, desc: str, total: int | None, unit: str = "B") -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, desc: str, total: int | None, unit: str = "B") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass
