"""`tessera.lock`: the datasets a project uses, pinned to versions, in a TOML file next to its code.

    # tessera.lock: datasets this project uses, pinned by `tessera use` / `tessera update`.
    version = 1

    [datasets.coco]
    hash = "3f2a9c41d0e2..."            # the full 64-hex version hash
    remote = "s3://bucket/datasets"     # where it comes from (optional)

Like DVC's ``.dvc`` import files or a package lock: commit it to git, and ``tessera.Repo().get("coco")``,
``tessera mount coco MNT``, ``tessera run --input coco:MNT`` and ``tessera://coco/...`` all read the
pinned version instead of the latest, wherever the code runs. The nearest ``tessera.lock`` is looked
for from the current directory upwards; ``$TESSERA_LOCK`` names one explicitly, or ``off`` ignores
them. Only a bare ``NAME`` is resolved through it: ``NAME@HASH`` and ``NAME:TAG`` mean what they say.

Every resolution through a lock file is logged (INFO) on the ``tessera.lockfile`` logger; the CLI
prints those lines, so a command never silently reads a pinned version.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tessera.errors import ConfigError, NotFound, TesseraError
from tessera.ids import check_dataset_name, parse_ref
from tessera.remotes import remote_or_none, resolve_remote

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from tessera.catalog import Catalog
    from tessera.model import HistoryEntry
    from tessera.remotes import Transports
    from tessera.version import Change, Version

logger = logging.getLogger(__name__)

LOCK_NAME = "tessera.lock"
LOCK_ENV = "TESSERA_LOCK"
LOCK_FORMAT = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_OFF = ("", "off", "none", "0")


@dataclass(frozen=True)
class Pin:
    """One dataset pinned to one version (``remote``: the URL it is fetched from, when known)."""

    name: str
    hash: str
    remote: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.hash}"


@dataclass
class LockFile:
    """A parsed ``tessera.lock``: ``pins`` by dataset name, in file order."""

    path: Path
    pins: dict[str, Pin] = field(default_factory=dict)

    def to_text(self) -> str:
        lines = ["# tessera.lock: the dataset versions this project uses (`tessera use`, `tessera update`).",
                 f"version = {LOCK_FORMAT}", ""]
        for name in sorted(self.pins):
            pin = self.pins[name]
            key = name if _BARE_KEY.match(name) else json.dumps(name)
            lines.append(f"[datasets.{key}]")
            lines.append(f"hash = {json.dumps(pin.hash)}")
            if pin.remote:
                lines.append(f"remote = {json.dumps(pin.remote)}")
            lines.append("")
        return "\n".join(lines)

    def save(self) -> None:
        """Write atomically (a temporary file renamed over the old one)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.to_text())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise TesseraError(f"cannot write {self.path}: {exc.strerror or exc}") from None


# -- finding and reading ------------------------------------------------------------------------------

def find_lock(start: str | Path | None = None) -> Path | None:
    """The lock file in force: ``$TESSERA_LOCK`` (a path; ``off`` for none), else the nearest
    ``tessera.lock`` in ``start`` (default: the current directory) or a parent directory."""
    env = os.environ.get(LOCK_ENV)
    if env is not None:
        if env.strip().lower() in _OFF:
            return None
        return Path(env).expanduser().absolute()
    try:
        here = Path(start if start is not None else os.getcwd()).absolute()
    except OSError:  # the cwd was deleted
        return None
    for d in (here, *here.parents):
        candidate = d / LOCK_NAME
        if candidate.is_file():
            return candidate
    return None


def load(path: str | Path) -> LockFile:
    """Parse a lock file; a malformed one raises `ConfigError` naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise NotFound(f"lock file {p} does not exist (create one with `tessera use NAME`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read lock file {p}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, p)


def parse(text: str, path: Path) -> LockFile:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)$", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    lines = text.splitlines()

    def fail(msg: str, *needles: str) -> ConfigError:
        line = _line_of(lines, needles)
        return ConfigError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")

    fmt = doc.get("version", LOCK_FORMAT)
    if fmt != LOCK_FORMAT:
        raise fail(f"lock file format {fmt!r} is not supported (this tessera reads version {LOCK_FORMAT})",
                   "version")
    unknown = sorted(set(doc) - {"version", "datasets"})
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (expected `version` and [datasets.NAME] tables)", unknown[0])
    tables = doc.get("datasets", {})
    if not isinstance(tables, dict):
        raise fail("`datasets` must be a table of [datasets.NAME] entries", "datasets")
    lock = LockFile(path)
    for name, table in tables.items():
        header = f"datasets.{name}"
        try:
            check_dataset_name(name)
        except TesseraError as exc:
            raise fail(str(exc), header, name) from None
        if not isinstance(table, dict):
            raise fail(f"dataset {name!r} must be a table with a `hash`", header, name)
        extra = sorted(set(table) - {"hash", "remote"})
        if extra:
            raise fail(f"dataset {name!r}: unknown key {extra[0]!r} (expected hash, remote)", header, extra[0])
        hash_ = table.get("hash")
        if not isinstance(hash_, str) or not _HEX64.match(hash_):
            raise fail(f"dataset {name!r}: `hash` must be a full version hash (64 lowercase hex "
                       f"characters), got {hash_!r}", header, "hash")
        remote = table.get("remote")
        if remote is not None and (not isinstance(remote, str) or "://" not in remote):
            raise fail(f"dataset {name!r}: `remote` must be a URL like s3://bucket/prefix, got {remote!r}",
                       header, "remote")
        lock.pins[name] = Pin(name, hash_, remote)
    return lock


def _line_of(lines: list[str], needles: tuple[str, ...]) -> int | None:
    """1-based line of the first needle found (a table header or key), searching after the previous
    needle's line, so a key is found inside its own table."""
    start, found = 0, None
    for needle in needles:
        pat = re.compile(rf"^\s*(\[\s*)?[\"']?{re.escape(needle)}\b")
        for i in range(start, len(lines)):
            if pat.search(lines[i]) or needle in lines[i] and lines[i].lstrip().startswith("["):
                start, found = i, i + 1
                break
    return found


def pins(path: str | Path) -> list[Pin]:
    """The pins of a lock file, in name order (the storage lifecycle treats them as roots)."""
    lock = load(path)
    return [lock.pins[n] for n in sorted(lock.pins)]


def lookup(name: str, start: str | Path | None = None) -> tuple[Pin, Path] | None:
    """The pin of dataset ``name`` in the lock file in force, and that file; None when there is no
    lock file or it does not pin ``name``."""
    path = find_lock(start)
    if path is None:
        return None
    pin = load(path).pins.get(name)
    return (pin, path) if pin is not None else None


# -- resolving ------------------------------------------------------------------------------------------

class Repo(Protocol):
    """What this module needs of a `tessera.Repo` (a Protocol: `repo.py` imports this module, not the
    other way round)."""

    catalog: "Catalog"
    transports: "Transports"

    def get(self, ref: str, *, lock: bool = True) -> "Version": ...

    def resolve(self, ref: str) -> "HistoryEntry": ...

    def resolve_local(self, ref: str) -> "HistoryEntry": ...

    def pull(self, ref: str, remote: str | None = None, *, metadata_only: bool = False) -> "Version": ...


def pinned_ref(repo: "Repo", ref: str) -> str:
    """`Repo.get`'s hook: a bare ``NAME`` pinned by the lock file in force becomes ``NAME@HASH`` (its
    metadata fetched from the pin's remote when this home lacks it); any other ref is returned as is."""
    if "@" in ref or ":" in ref:
        return ref
    found = lookup(ref)
    if found is None:
        return ref
    pin, path = found
    logger.info("%s: using %s@%s pinned by %s", ref, pin.name, pin.hash[:12], path)
    ensure_available(repo, pin, path)
    return pin.ref


def ensure_available(repo: "Repo", pin: Pin, path: Path | None = None) -> str:
    """Make ``pin``'s version known to this home: local already ("local"), or its metadata fetched
    from the pin's remote or the default remote (that remote's name). `NotFound` when neither has it."""
    try:
        repo.resolve_local(pin.ref)
        return "local"
    except NotFound:
        pass
    where = f" (pinned by {path})" if path else ""
    tried: list[str] = []
    if pin.remote:
        try:
            repo.pull(pin.ref, pin.remote, metadata_only=True)
            return pin.remote
        except NotFound:
            tried.append(pin.remote)
    try:
        repo.resolve(pin.ref)  # asks the default remote, if there is one
        return remote_url(repo) or "default remote"
    except NotFound:
        pass
    default = remote_url(repo)
    if default and default not in tried:
        tried.append(default)
    places = "this home" + "".join(f" nor {t}" for t in tried)
    raise NotFound(f"{pin.name}@{pin.hash[:12]}{where} is in neither {places}" if tried
                   else f"{pin.name}@{pin.hash[:12]}{where} is not in this home and no remote is configured")


def remote_url(repo: "Repo", name: str | None = None) -> str | None:
    """The URL of remote ``name`` (a configured name or a URL; `NotFound` when unknown); by default of
    the remote this home reads from (``Repo(remote=...)``, else the default or only one), or None."""
    if name is not None:
        return resolve_remote(repo.catalog, name).url
    found = remote_or_none(repo.catalog, repo.transports.preferred)
    return found.url if found is not None else None


# -- changing -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Update:
    """A pin set or moved: ``old`` is None for a new pin; ``changes`` is None when the old version
    could not be read (so no diff)."""

    name: str
    old: str | None
    new: Pin
    changes: "list[Change] | None"

    @property
    def moved(self) -> bool:
        return self.old != self.new.hash

    def summary(self) -> str:
        if self.old is None:
            return f"{self.name}: pinned {self.new.ref}"
        if not self.moved:
            return f"{self.name}: already at {self.new.hash[:12]}"
        head = f"{self.name}: {self.old[:12]} -> {self.new.hash[:12]}"
        if self.changes is None:
            return f"{head} (old version not available: no diff)"
        counts = {s: sum(1 for c in self.changes if c.status == s) for s in ("added", "removed", "modified")}
        return f"{head}: {counts['added']} added, {counts['removed']} removed, {counts['modified']} modified"


def lock_for_writing(path: str | Path | None = None) -> LockFile:
    """The lock file to change: ``path``, else the one in force, else a new ``./tessera.lock``."""
    p = Path(path) if path is not None else find_lock()
    if p is None:
        p = Path.cwd() / LOCK_NAME
    return load(p) if p.exists() else LockFile(p.absolute())


def use(repo: "Repo", ref: str, *, remote: str | None = None, path: str | Path | None = None) -> Update:
    """Pin ``ref`` (``NAME``: the latest version; ``NAME@PREFIX``, ``NAME:TAG``) in the lock file; with
    ``remote``, the version is looked for there and the remote's URL is recorded."""
    r = parse_ref(ref)
    lock = lock_for_writing(path)
    if remote is not None:
        version = repo.pull(ref, remote, metadata_only=True)
        url = remote_url(repo, remote)
    else:
        version = repo.get(ref, lock=False)
        url = remote_url(repo)
    old = lock.pins.get(r.dataset)
    pin = Pin(version.name, version.hash, url or (old.remote if old else None))
    changes = _diff(repo, old.ref, version) if old is not None and old.hash != pin.hash else []
    lock.pins[pin.name] = pin
    lock.save()
    return Update(pin.name, old.hash if old else None, pin, changes)


def update(repo: "Repo", names: list[str] | None = None, *, path: str | Path | None = None) -> list[Update]:
    """Move pins (all, or ``names``) to the latest version: the newest this home knows after fetching
    the dataset's history from the pin's remote (when it has one). Returns one `Update` per pin."""
    lock = lock_for_writing(path)
    if not lock.path.exists():
        raise NotFound(f"no lock file: {lock.path} does not exist (create one with `tessera use NAME`)")
    wanted = names or sorted(lock.pins)
    missing = [n for n in wanted if n not in lock.pins]
    if missing:
        raise NotFound(f"{lock.path} does not pin {missing[0]!r} (pinned: {', '.join(sorted(lock.pins)) or 'none'})")
    out = []
    for name in wanted:
        pin = lock.pins[name]
        latest = repo.pull(name, pin.remote, metadata_only=True) if pin.remote else repo.get(name, lock=False)
        new = Pin(name, latest.hash, pin.remote)
        changes = _diff(repo, pin.ref, latest) if new.hash != pin.hash else []
        lock.pins[name] = new
        out.append(Update(name, pin.hash, new, changes))
    lock.save()
    return out


def _diff(repo: "Repo", old_ref: str, new: "Version") -> "list[Change] | None":
    from tessera.version import diff_versions

    try:
        return diff_versions(repo.get(old_ref, lock=False), new)
    except NotFound:
        return None


@dataclass(frozen=True)
class CheckResult:
    pin: Pin
    where: str | None  # "local", a remote URL, or None when it resolves nowhere
    error: str | None = None


def check(repo: "Repo", path: str | Path | None = None) -> tuple[Path, list[CheckResult]]:
    """Does every pin resolve, here or on its remote (metadata is fetched for those that are remote)?"""
    p = Path(path) if path is not None else find_lock()
    if p is None:
        raise NotFound(f"no {LOCK_NAME} here or in any parent directory (create one with `tessera use NAME`)")
    lock = load(p)
    results = []
    for name in sorted(lock.pins):
        pin = lock.pins[name]
        try:
            results.append(CheckResult(pin, ensure_available(repo, pin)))
        except TesseraError as exc:
            results.append(CheckResult(pin, None, str(exc)))
    return p, results
