"""Progress bars for the CLI: a tqdm bar on stderr when it is a terminal, nothing otherwise."""
from __future__ import annotations

import sys
from typing import Any

from tessera.progress import NullProgress, Progress


class TqdmProgress:
    """A tqdm bar on stderr (implements `tessera.progress.Progress`)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, desc: str, total: int | None, unit: str = "B") -> None:
        from tqdm import tqdm

        self.finish()
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                         file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def terminal_progress() -> Progress:
    return TqdmProgress() if sys.stderr.isatty() else NullProgress()
