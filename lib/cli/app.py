"""The root click group and helpers shared by every command module."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from tessera.repo import Repo


class LazyGroup(click.Group):
    """Imports the command modules only when a command is looked up (keeps --help fast)."""

    modules = ("tessera.cli.core", "tessera.cli.worktree", "tessera.cli.mount", "tessera.cli.cache",
               "tessera.cli.remote", "tessera.cli.daemon", "tessera.cli.lock", "tessera.cli.lifecycle",
               "tessera.cli.help")
    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            import importlib

            LazyGroup._loaded = True
            for name in self.modules:
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError as exc:
                    if exc.name != name:
                        raise

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return sorted(super().list_commands(ctx))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", envvar="TESSERA_HOME", type=click.Path(file_okay=False),
              help="Repository home (default: $TESSERA_HOME or ~/.tessera).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(None, "-V", "--version", package_name="tessera", prog_name="tessera")
@click.pass_context
def cli(ctx: click.Context, home: str | None, verbose: int) -> None:
    """tessera: versioned datasets for machine learning.

    Snapshot a directory into an immutable version NAME@HASH, browse, diff, export and verify it,
    mount it read-only for training code, and share it through S3.

    \b
    Refs:  NAME          latest version of a dataset
           NAME@3f2a9c   any unique hash prefix (>= 6 hex characters)
           NAME:TAG      a tag set with `tessera tag`

    \b
    Examples:
      tessera commit coco ./data -m "first cut"
      tessera log
      tessera help quickstart
    """
    if verbose:
        logging.getLogger().setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    show_lock_notes()
    ctx.obj = {"home": home}


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"tessera: {record.getMessage()}", err=True)


def show_lock_notes() -> None:
    """Every name resolved through a tessera.lock is said on stderr (`tessera.lockfile` logs it)."""
    log = logging.getLogger("tessera.lockfile")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler(logging.INFO))
        log.setLevel(logging.INFO)
        log.propagate = False


def open_repo(ctx: click.Context | None = None, *, create: bool = False) -> "Repo":
    """The home's `Repo`. Only commands that write pass ``create=True``: a read command pointed at a
    home that does not exist fails with `NoHome` and creates nothing."""
    from tessera.repo import Repo

    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    cached = root.obj.get("repo") if root.obj else None
    if cached is None:
        cached = Repo(root.obj.get("home") if root.obj else None, create=create)
        cached.notice = lambda msg: click.echo(f"tessera: {msg}", err=True)
        root.obj["repo"] = cached
        root.call_on_close(cached.close)
    return cached


def progress_bar() -> Any:
    from tessera.cli.progress import terminal_progress

    return terminal_progress()


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")


def emit_json(obj: Any) -> None:
    """JSON on stdout, UTF-8. A name that is not valid UTF-8 (held as surrogate escapes) is written as
    ``\\udcXX`` escapes, as in tree objects: the output stays valid UTF-8 and `json.loads` gives the name back."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
    click.echo(_LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON on stdout).")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "file")`` -> "1 file", ``plural(2, "file")`` -> "2 files"."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def human_rate(nbytes: float, seconds: float) -> str:
    """Bytes and time as "12.0 MiB in 0.50 s (24.0 MiB/s)"."""
    rate = f" ({human_size(nbytes / seconds)}/s)" if seconds > 0 and nbytes else ""
    return f"{human_size(nbytes)} in {seconds:.2f} s{rate}"


def note(message: str) -> None:
    """A message for people (stderr): notices like "no datasets", warnings, summaries."""
    click.echo(message, err=True)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_time(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes (`tessera.config.parse_size`)."""
    from tessera.config import parse_size as parse

    return parse(text)


def isatty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
