"""The `tessera` command: a thin click shell over `tessera.Repo`.

Each area registers its commands from its own module (core, mount, remote, daemon). Heavy imports
(sqlite-utils, boto3, the FUSE binding, torch) happen inside commands, so `tessera --help` is fast.
"""
from __future__ import annotations

import logging
import sys

import click

from tessera.cli.app import cli

__all__ = ["cli", "main"]


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def usage_message(exc: click.UsageError) -> str:
    """click's usage errors (a missing argument, an unknown option) in the one-line form of every
    other error, naming the command and where its help is: ``error: tessera ls: missing argument 'REF'
    (see tessera ls --help)``."""
    msg = one_line(exc.format_message()).rstrip(".")
    msg = msg[:1].lower() + msg[1:] if msg[:2] != msg[:2].upper() else msg
    path = exc.ctx.command_path if exc.ctx is not None else "tessera"
    return f"{path}: {msg} (see {path} --help)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: one `except TesseraError` turns expected failures into one line + exit code."""
    from tessera.errors import TesseraError

    logging.basicConfig(level=logging.WARNING, format="tessera: %(levelname)s: %(message)s")
    _raw_names_on_stdout()
    try:
        cli.main(args=argv, prog_name="tessera", standalone_mode=False)
    except TesseraError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "")
        sys.exit(0)
    except click.UsageError as exc:
        click.echo(f"error: {usage_message(exc)}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(141)


def _raw_names_on_stdout() -> None:
    """Names that are not valid UTF-8 reach us as surrogate escapes (like ``os.listdir``): print their
    original bytes, as ``ls`` does, instead of failing on the first such name. (stderr already uses
    ``backslashreplace``.)"""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
