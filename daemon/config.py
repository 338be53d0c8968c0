"""The daemon's TOML config (default ``$TESSERA_HOME/daemon.toml``): what to watch and how.

    [daemon]                      # optional
    push_retry_min_seconds = 1
    push_retry_max_seconds = 300

    [[watch]]
    path = "/data/labels"         # absolute, or relative to this file
    dataset = "labels"
    remote = "origin"             # optional: push every new version there
    quiet_seconds = 5             # commit once nothing changed for this long ...
    max_wait_seconds = 60         # ... or this long after the first change, even if writes go on
    ignore = ["*.log", "cache"]   # globs: a bare name matches at any depth, "a/b/*" the relative path

Errors name the file and line. `tessera watch` / `unwatch` edit the file textually (comments survive),
atomically (temporary file + rename) and under a lock file, so a running daemon only ever sees a
complete file.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from tessera.errors import BadRef, ConfigError
from tessera.homeguard import relation_to_home
from tessera.ids import check_dataset_name
from tessera.ignore import IgnoreRules

logger = logging.getLogger(__name__)

CONFIG_FILE = "daemon.toml"
DEFAULT_QUIET = 5.0
DEFAULT_MAX_WAIT = 60.0

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")
_TOML_POS = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")
_WATCH_KEYS = {"path", "dataset", "remote", "quiet_seconds", "max_wait_seconds", "ignore"}


@dataclass(frozen=True)
class WatchConfig:
    """One watched directory. ``path`` is absolute and normalised."""

    path: str
    dataset: str
    remote: str | None = None
    quiet_seconds: float = DEFAULT_QUIET
    max_wait_seconds: float = DEFAULT_MAX_WAIT
    ignore: tuple[str, ...] = ()
    line: int | None = field(default=None, compare=False)

    def where(self, source: str) -> str:
        return f"{source}:{self.line}" if self.line else source


@dataclass(frozen=True)
class DaemonSettings:
    push_retry_min_seconds: float = 1.0
    push_retry_max_seconds: float = 300.0


@dataclass
class DaemonConfig:
    path: Path
    watches: list[WatchConfig] = field(default_factory=list)
    settings: DaemonSettings = DaemonSettings()

    def find(self, directory: str) -> WatchConfig | None:
        key = normalize_dir(directory)
        return next((w for w in self.watches if w.path == key), None)


def default_config_path(home: str | Path) -> Path:
    return Path(home) / CONFIG_FILE


def normalize_dir(path: str | Path, base: str | Path | None = None) -> str:
    """Absolute, symlink-free path (as far as it exists) used as the key of a watch."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    return os.path.realpath(p)


# -- loading ----------------------------------------------------------------------------------------

def load_config(path: str | Path) -> DaemonConfig:
    """Parse ``path``; a missing file is an empty config. Raises `ConfigError` naming file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DaemonConfig(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> DaemonConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS.match(msg)
        if m:
            raise ConfigError(f"{path}:{m.group(2)}: malformed TOML: {m.group(1)} (column {m.group(3)})") from None
        if msg.endswith(" (at end of document)"):
            last = max(1, len(text.splitlines()))
            raise ConfigError(f"{path}:{last}: malformed TOML: {msg.removesuffix(' (at end of document)')}"
                              " (at the end of the file)") from None
        raise ConfigError(f"{path}: malformed TOML: {msg}") from None
    lines = _locate(text)
    unknown = sorted(set(data) - {"watch", "daemon"})
    if unknown:
        raise ConfigError(f"{path}:{lines.top.get(unknown[0], '?')}: unknown setting {unknown[0]!r}"
                          " (expected [daemon] and [[watch]] tables)")
    settings = _parse_settings(data.get("daemon", {}), path, lines)
    raw = data.get("watch", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}:{lines.top.get('watch', '?')}: 'watch' must be an array of tables ([[watch]])")
    watches: list[WatchConfig] = []
    for i, item in enumerate(raw):
        block = lines.watches[i] if i < len(lines.watches) else _Block(lines.top.get("watch"), {})
        w = _parse_watch(item, path, block)
        for other in watches:
            if other.path == w.path:
                raise ConfigError(f"{path}:{block.line}: {w.path} is watched twice (also at line {other.line})")
            if other.dataset == w.dataset:
                raise ConfigError(f"{path}:{block.line}: dataset {w.dataset!r} is fed by two watches"
                                  f" ({other.path} and {w.path})")
        watches.append(w)
    return DaemonConfig(path, watches, settings)


@dataclass
class _Block:
    line: int | None
    keys: dict[str, int]


@dataclass
class _Lines:
    top: dict[str, int]
    daemon: _Block
    watches: list[_Block]


def _locate(text: str) -> _Lines:
    """Line numbers of tables and keys, for error messages (tomllib does not report them)."""
    top: dict[str, int] = {}
    daemon = _Block(None, {})
    watches: list[_Block] = []
    current: dict[str, int] = top
    for n, line in enumerate(text.splitlines(), 1):
        h = _HEADER.match(line)
        if h and line.lstrip().startswith("["):
            name = h.group(1).strip().strip('"')
            if name == "watch":
                watches.append(_Block(n, {}))
                current = watches[-1].keys
                top.setdefault("watch", n)
            elif name == "daemon":
                daemon = _Block(n, {})
                current = daemon.keys
                top.setdefault("daemon", n)
            else:
                top.setdefault(name.split(".")[0], n)
                current = {}
            continue
        k = _KEY.match(line)
        if k:
            current.setdefault(k.group(1), n)
    return _Lines(top, daemon, watches)


def _number(value: Any, what: str, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {what} must be a number of seconds, got {value!r}")
    if value <= minimum:
        raise ConfigError(f"{where}: {what} must be greater than {minimum:g}, got {value!r}")
    return float(value)


def _parse_settings(raw: Any, path: Path, lines: _Lines) -> DaemonSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:{lines.top.get('daemon', '?')}: 'daemon' must be a table ([daemon])")
    d = DaemonSettings()
    known = {"push_retry_min_seconds", "push_retry_max_seconds"}

    def at(key: str) -> str:
        return f"{path}:{lines.daemon.keys.get(key, lines.daemon.line or '?')}"

    for key in raw:
        if key not in known:
            raise ConfigError(f"{at(key)}: unknown [daemon] setting {key!r} (known: {', '.join(sorted(known))})")
    lo = _number(raw.get("push_retry_min_seconds", d.push_retry_min_seconds), "push_retry_min_seconds",
                 at("push_retry_min_seconds"))
    hi = _number(raw.get("push_retry_max_seconds", d.push_retry_max_seconds), "push_retry_max_seconds",
                 at("push_retry_max_seconds"))
    if hi < lo:
        raise ConfigError(f"{at('push_retry_max_seconds')}: push_retry_max_seconds must be >= push_retry_min_seconds")
    return DaemonSettings(lo, hi)


def _parse_watch(item: Any, path: Path, block: _Block) -> WatchConfig:
    def at(key: str | None = None) -> str:
        return f"{path}:{block.keys.get(key, block.line) if key else block.line}"

    if not isinstance(item, dict):
        raise ConfigError(f"{at()}: each watch must be a table ([[watch]])")
    for key in item:
        if key not in _WATCH_KEYS:
            raise ConfigError(f"{at(key)}: unknown watch setting {key!r} (known: {', '.join(sorted(_WATCH_KEYS))})")
    for key in ("path", "dataset"):
        if key not in item:
            raise ConfigError(f"{at()}: watch is missing {key!r}")
        if not isinstance(item[key], str) or not item[key]:
            raise ConfigError(f"{at(key)}: {key} must be a non-empty string")
    try:
        check_dataset_name(item["dataset"])
    except BadRef as exc:
        raise ConfigError(f"{at('dataset')}: {exc}") from None
    remote = item.get("remote")
    if remote is not None and (not isinstance(remote, str) or not remote):
        raise ConfigError(f"{at('remote')}: remote must be the name of a remote (see `tessera remote list`)")
    quiet = _number(item.get("quiet_seconds", DEFAULT_QUIET), "quiet_seconds", at("quiet_seconds"))
    max_wait = _number(item.get("max_wait_seconds", DEFAULT_MAX_WAIT), "max_wait_seconds", at("max_wait_seconds"))
    if max_wait < quiet:
        raise ConfigError(f"{at('max_wait_seconds')}: max_wait_seconds ({max_wait:g}) must be >= quiet_seconds"
                          f" ({quiet:g})")
    ignore = item.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(g, str) and g for g in ignore):
        raise ConfigError(f"{at('ignore')}: ignore must be a list of glob strings")
    return WatchConfig(normalize_dir(item["path"], path.parent), item["dataset"], remote, quiet, max_wait,
                       tuple(ignore), block.line)


# -- checks shared by `tessera watch` and the daemon ------------------------------------------------

def check_not_home(directory: str, home: str | Path, where: str | None = None) -> None:
    """Refuse the tessera home, a directory inside it, or one containing it (`tessera.homeguard`, with
    the daemon's wording: a watch containing the home would see its own writes)."""
    rel = relation_to_home(directory, home)
    h = os.path.realpath(home)
    prefix = f"{where}: " if where else ""
    if rel == "is":
        raise ConfigError(f"{prefix}{directory} is the tessera home itself: watch a data directory instead")
    if rel == "inside":
        raise ConfigError(f"{prefix}{directory} is inside the tessera home {h}")
    if rel == "contains":
        raise ConfigError(f"{prefix}{directory} contains the tessera home {h}: the daemon would watch its own"
                          " writes (move the home with TESSERA_HOME or watch a subdirectory)")


def check_config_against_home(config: DaemonConfig, home: str | Path) -> None:
    for w in config.watches:
        check_not_home(w.path, home, w.where(str(config.path)))


def check_watch_dir(directory: str) -> str:
    """The normalised path of an existing directory, or a one-line `ConfigError`."""
    p = Path(directory).expanduser()
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"{directory}: no such directory")
    if not p.is_dir():
        raise ConfigError(f"{directory}: not a directory (watch the directory that holds it)")
    path = normalize_dir(p)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{path!r} is not valid UTF-8, so the config file (TOML) cannot name it: rename it "
                          "or watch a directory above it (names inside a watch may be anything)") from None
    return path


# -- ignore globs (the matcher lives in tessera.ignore, shared with commit and status) -----------------

def ignore_matcher(patterns: tuple[str, ...] | list[str], *, temp_files: bool = True) -> IgnoreRules:
    """Watch globs (plus the temporary-file patterns) as a matcher; `tessera.ignore.IgnoreRules`."""
    return IgnoreRules(tuple(patterns), temp_files=temp_files)


# -- editing ----------------------------------------------------------------------------------------

@contextmanager
def _edit_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _toml_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def render_watch(w: WatchConfig) -> str:
    out = ["[[watch]]", f"path = {_toml_str(w.path)}", f"dataset = {_toml_str(w.dataset)}"]
    if w.remote:
        out.append(f"remote = {_toml_str(w.remote)}")
    out.append(f"quiet_seconds = {_toml_num(w.quiet_seconds)}")
    out.append(f"max_wait_seconds = {_toml_num(w.max_wait_seconds)}")
    if w.ignore:
        out.append(f"ignore = [{', '.join(_toml_str(g) for g in w.ignore)}]")
    return "\n".join(out) + "\n"


def render_config(config: DaemonConfig) -> str:
    parts = ["# tessera daemon configuration (edited by `tessera watch` / `tessera unwatch`)\n"]
    s = config.settings
    if s != DaemonSettings():
        parts.append(f"[daemon]\npush_retry_min_seconds = {_toml_num(s.push_retry_min_seconds)}\n"
                     f"push_retry_max_seconds = {_toml_num(s.push_retry_max_seconds)}\n")
    parts.extend(render_watch(w) for w in config.watches)
    return "\n".join(parts)


def add_watch(path: str | Path, watch: WatchConfig, check: Callable[[DaemonConfig], None] | None = None) -> None:
    """Append ``watch`` to the config file (created if missing). ``check`` sees the resulting config
    before anything is written and may raise."""
    path = Path(path)
    with _edit_lock(path):
        config = load_config(path)
        existing = config.find(watch.path)
        if existing is not None:
            raise ConfigError(f"{watch.path} is already watched (dataset {existing.dataset!r}); "
                              "`tessera unwatch` it first")
        for w in config.watches:
            if w.dataset == watch.dataset:
                raise ConfigError(f"dataset {watch.dataset!r} is already fed by the watch on {w.path}")
        text = path.read_text(encoding="utf-8") if path.exists() else render_config(DaemonConfig(path))
        if text and not text.endswith("\n"):
            text += "\n"
        new_text = text + "\n" + render_watch(watch)
        result = parse_config(new_text, path)
        if check is not None:
            check(result)
        _write_atomic(path, new_text)


def remove_watch(path: str | Path, directory: str) -> WatchConfig:
    """Remove the watch of ``directory``; `ConfigError` if it is not watched."""
    path = Path(path)
    with _edit_lock(path):
        config = load_config(path)
        key = normalize_dir(directory)
        target = config.find(key)
        if target is None:
            known = ", ".join(w.path for w in config.watches) or "none"
            raise ConfigError(f"{directory} is not watched (watched: {known})")
        index = config.watches.index(target)
        text = path.read_text(encoding="utf-8")
        new_text = _cut_watch_block(text, index)
        wanted = [w for w in config.watches if w != target]
        try:
            ok = new_text is not None and parse_config(new_text, path).watches == wanted
        except ConfigError:
            ok = False
        if not ok:  # an unusual layout (inline tables, ...): rewrite the whole file
            new_text = render_config(replace(config, watches=wanted))
        assert new_text is not None
        _write_atomic(path, new_text)
        return target


def _cut_watch_block(text: str, index: int) -> str | None:
    lines = text.splitlines(keepends=True)
    starts = _locate(text).watches
    if index >= len(starts) or starts[index].line is None:
        return None
    begin = starts[index].line - 1  # type: ignore[operator]
    end = len(lines)
    for n in range(begin + 1, len(lines)):
        if lines[n].lstrip().startswith("[") and _HEADER.match(lines[n].rstrip("\n")):
            end = n
            break
    # keep comments that introduce the next table with it; drop trailing blank lines of this block
    while end > begin + 1 and lines[end - 1].strip().startswith("#"):
        end -= 1
    return "".join(lines[:begin] + lines[end:])
