"""Which paths of a directory are left out: `.tesseraignore`, `commit --exclude`, `watch --ignore`.

One matcher, shared by commit, status, checkout and the daemon (`tessera.daemon` imports it from here;
this module imports nothing from it):

- **gitignore lines** (the ``.tesseraignore`` file at the top of the directory, and each
  ``commit --exclude PATTERN``) follow git's rules exactly (the `pathspec` library): ``*.log`` at any
  depth, ``/top.txt`` only at the top, ``build/`` directories only, ``raw/*.csv`` relative to the top
  (``*`` does not cross ``/``, ``**`` does), ``!pattern`` re-includes, ``#`` comments.
- **watch globs** (``watch --ignore``, the daemon config's ``ignore``) keep their own documented
  rules: a glob without ``/`` matches a name at any depth, one with ``/`` the relative path, and
  ``*`` also crosses ``/``.
- **temporary files** (editor swap files, partial downloads: `TEMP_PATTERNS`), for the daemon and
  `tessera run`, which must never version a file caught mid-save.

Paths are relative to the top of the directory, with ``/`` separators; a directory is passed with a
trailing ``/`` (``"cache/"``), as git does, so that ``build/`` patterns can tell it from a file.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pathspec

from tessera.errors import UsageError

logger = logging.getLogger(__name__)

IGNORE_FILE = ".tesseraignore"

# Editor swap files, partial downloads and the `write tmp + rename` pattern: never worth a version.
TEMP_PATTERNS = ("*.tmp", "*.temp", "*.swp", "*.swo", "*.swx", "*~", ".#*", "#*#", "*.part", "*.partial",
                 "*.crdownload", ".~lock.*#", ".nfs*", ".*.tmp.*")


def read_ignore_file(root: str | Path) -> list[str]:
    """The lines of ``root/.tesseraignore`` ([] when there is none)."""
    path = Path(root) / IGNORE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return []
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; it must be a file of gitignore patterns") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return data.decode("utf-8", "surrogateescape").splitlines()


def _compile_gitignore(lines: Sequence[str], where: str) -> pathspec.GitIgnoreSpec | None:
    useful = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not useful:
        return None
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: bad ignore pattern: {exc}") from None


def _compile_globs(globs: Iterable[str]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    cleaned = [g.strip("/") for g in globs if g.strip("/")]
    names = [g for g in cleaned if "/" not in g]
    paths = [g for g in cleaned if "/" in g]
    name_re = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in names)) if names else None
    path_re = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in paths)) if paths else None
    return name_re, path_re


class IgnoreRules:
    """Compiled exclude rules for one directory tree (see the module docstring for the three kinds).

    ``excludes(rel)`` checks one entry (for walks that never descend into an excluded directory);
    calling the object checks a path *and every directory above it* (for file system events)."""

    def __init__(self, globs: Sequence[str] = (), *, gitignore: Sequence[str] = (), temp_files: bool = False,
                 where: str = "exclude patterns") -> None:
        self.globs = tuple(globs)
        self.gitignore = tuple(gitignore)
        self.temp_files = temp_files
        self._name, self._path = _compile_globs(list(self.globs) + (list(TEMP_PATTERNS) if temp_files else []))
        self._spec = _compile_gitignore(self.gitignore, where)

    @classmethod
    def for_dir(cls, root: str | Path, *, exclude: Sequence[str] = (), globs: Sequence[str] = (),
                temp_files: bool = False, ignore_file: bool = True) -> "IgnoreRules":
        """The rules for directory ``root``: its ``.tesseraignore`` (unless ``ignore_file`` is False),
        then the ``exclude`` lines (gitignore syntax, later lines win), plus watch ``globs``."""
        lines = read_ignore_file(root) if ignore_file else []
        return cls(globs, gitignore=[*lines, *exclude], temp_files=temp_files,
                   where=f"{Path(root) / IGNORE_FILE}" if lines else "--exclude")

    @property
    def empty(self) -> bool:
        return self._name is None and self._path is None and self._spec is None

    def excludes(self, rel: str) -> bool:
        """Is this entry left out? ``rel`` ends with ``/`` for a directory."""
        bare = rel.rstrip("/")
        if self._name is not None and self._name.match(bare.rpartition("/")[2]):
            return True
        if self._path is not None and self._path.match(bare):
            return True
        return self._spec is not None and self._spec.match_file(rel)

    def __call__(self, rel: str) -> bool:
        """``rel`` (a file, or a directory with a trailing ``/``) or any directory above it is left out."""
        parts = rel.rstrip("/").split("/")
        for i in range(len(parts)):
            last = i == len(parts) - 1
            sub = "/".join(parts[:i + 1]) + ("/" if not last or rel.endswith("/") else "")
            if self.excludes(sub):
                return True
        return False


def combined_exclude(root: str | Path, exclude: Callable[[str], bool] | None, lines: Sequence[str] = (), *,
                     ignore_file: bool = True) -> Callable[[str], bool] | None:
    """One exclude callable for a commit of ``root``: its ``.tesseraignore`` and the gitignore
    ``lines``, or-ed with a caller's ``exclude``; None when nothing is excluded."""
    rules = IgnoreRules.for_dir(root, exclude=lines, ignore_file=ignore_file)
    if rules.empty:
        return exclude
    if exclude is None:
        return rules.excludes
    other = exclude
    return lambda rel: rules.excludes(rel) or other(rel)


class DirIgnore:
    """The rules of a watched directory, re-read when its ``.tesseraignore`` changes (the daemon's
    event filter asks many times; the file is stat'ed only when an event names it)."""

    def __init__(self, root: str, globs: Sequence[str] = (), *, temp_files: bool = True) -> None:
        self.root = root
        self.globs = tuple(globs)
        self.temp_files = temp_files
        self._key: tuple[int, int, int] | None = None
        self.rules = IgnoreRules(self.globs, temp_files=temp_files)
        self.refresh()

    def refresh(self) -> None:
        try:
            st = os.stat(os.path.join(self.root, IGNORE_FILE))
            key: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key == self._key:
            return
        self._key = key
        try:
            self.rules = IgnoreRules.for_dir(self.root, globs=self.globs, temp_files=self.temp_files)
        except UsageError as exc:
            logger.warning("%s (keeping the previous rules)", exc)

    def excludes(self, rel: str) -> bool:
        return self.rules.excludes(rel)

    def __call__(self, rel: str) -> bool:
        if rel == IGNORE_FILE:
            self.refresh()
        return self.rules(rel)
