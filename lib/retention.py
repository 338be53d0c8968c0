"""Keep rules (restic's `forget` semantics) and durations: which versions of a history stay, and why.

Pure functions over ``(key, time, tags)`` candidates: the local `forget`, the remote `forget --remote`, the
daemon's per-watch rules and `tessera run --keep-last` all decide here, so they agree.

Rules, applied to the versions of one dataset, newest first (a version's time is its newest history entry):

- ``last N``: the N newest versions.
- ``hourly/daily/weekly/monthly/yearly N``: for the N most recent hours (days, ISO weeks, months, years)
  that have a version, the newest version of each. Buckets use local time, like restic.
- ``within D``: every version at most D older than the newest one.
- ``tags``: every version carrying one of these tags.

A version is kept when any rule keeps it; each kept version lists every rule that kept it. Callers add
the roots no rule can forget (head, tagged, mounted, queued for push) as reasons of their own.
"""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tessera.errors import UsageError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0, "y": 365 * 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdwy])")


def parse_duration(text: str, what: str = "duration") -> float:
    """``"30d"``, ``"1h30m"``, ``"2w"``, ``"45s"``, ``"1.5s"`` or a plain number of seconds -> seconds.

    Units: s, m (minutes), h, d, w (7 days), y (365 days). A one-line `UsageError` otherwise."""
    t = text.strip().lower().replace(" ", "")
    try:
        value = float(t)
    except ValueError:
        parts = _DURATION.findall(t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise UsageError(f"bad {what} {text!r}: use a number with a unit, like 90s, 10m, 12h, 30d, 2w "
                             "or 1y (combinations such as 1h30m work too)") from None
        value = sum(float(n) * _UNITS[u] for n, u in parts)
    if value < 0:
        raise UsageError(f"bad {what} {text!r}: must not be negative")
    return value


def format_duration(seconds: float) -> str:
    """A short human form: ``90s`` -> ``1m30s``, ``86400`` -> ``1d``."""
    s = int(round(seconds))
    if seconds < 10 and seconds != s:
        return f"{seconds:.1f}s"
    out: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not out):
            out.append(f"{s // size}{unit}")
            s %= size
    return "".join(out)


@dataclass(frozen=True)
class KeepPolicy:
    """What to keep; all zero / empty keeps nothing by rule (callers refuse such a policy for forget)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: float | None = None  # seconds before the newest version
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise UsageError(f"keep-{name} must be a whole number >= 0, got {n!r}")
        if self.within is not None and self.within < 0:
            raise UsageError("keep-within must not be negative")

    @property
    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly or self.yearly
                    or self.within is not None or self.tags)

    def describe(self) -> str:
        parts = [f"--keep-{n} {getattr(self, n)}" for n in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
                 if getattr(self, n)]
        if self.within is not None:
            parts.append(f"--keep-within {format_duration(self.within)}")
        parts += [f"--keep-tag {t}" for t in self.tags]
        return " ".join(parts) or "(no rule)"


@dataclass(frozen=True)
class Candidate:
    """One version of a dataset as the rules see it."""

    key: str
    time: float
    tags: tuple[str, ...] = ()


@dataclass
class Verdict:
    key: str
    time: float
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def _bucket(kind: str, t: float) -> tuple[int, ...]:
    lt = time.localtime(t)
    if kind == "hourly":
        return (lt.tm_year, lt.tm_mon, lt.tm_mday, lt.tm_hour)
    if kind == "daily":
        return (lt.tm_year, lt.tm_mon, lt.tm_mday)
    if kind == "weekly":
        iso = time.strftime("%G %V", lt).split()
        return (int(iso[0]), int(iso[1]))
    if kind == "monthly":
        return (lt.tm_year, lt.tm_mon)
    return (lt.tm_year,)


def apply_policy(policy: KeepPolicy, candidates: Sequence[Candidate]) -> list[Verdict]:
    """A verdict per candidate, newest first; a kept one names every rule that kept it."""
    ordered = sorted(candidates, key=lambda c: (c.time, c.key), reverse=True)
    verdicts = [Verdict(c.key, c.time) for c in ordered]
    for i, v in enumerate(verdicts[:policy.last]):
        v.reasons.append("last" if policy.last == 1 else f"last {policy.last}")
    for kind in ("hourly", "daily", "weekly", "monthly", "yearly"):
        n = getattr(policy, kind)
        seen: tuple[int, ...] | None = None
        count = 0
        for v in verdicts:
            if count >= n:
                break
            b = _bucket(kind, v.time)
            if b != seen:
                seen = b
                count += 1
                v.reasons.append(kind)
    if policy.within is not None and verdicts:
        newest = verdicts[0].time
        for v in verdicts:
            if v.time >= newest - policy.within:
                v.reasons.append(f"within {format_duration(policy.within)}")
    if policy.tags:
        wanted = set(policy.tags)
        for c, v in zip(ordered, verdicts):
            hit = sorted(wanted & set(c.tags))
            if hit:
                v.reasons.append("tag " + ", ".join(hit))
    return verdicts
