"""Working-directory commands: checkout (and its alias restore), and `status DIR` (called from the
`status` command, which without DIR reports on the daemon)."""
from __future__ import annotations

import click

from tessera.cli.app import cli, emit_json, human_time, json_option, note, open_repo, progress_bar
from tessera.cli.complete import complete_ref
from tessera.cli.core import checkout_summary, comparison_json, comparison_summary

CHECKOUT_HELP = """Make DIRECTORY equal to version REF (writes only changes).

    Files that differ or are missing are written, wrong modes fixed, symlinks and empty
    directories made; files already right (known by the stat cache, else compared by SHA-256) are
    not touched. Paths the version does not have are kept unless --delete is given (what
    DIRECTORY/.tesseraignore matches is kept even then). Local changes to files of the version are
    overwritten, like `git restore .`: see them first with `tessera status DIRECTORY`.

    Stopped by Ctrl-C, a kill or a full disk, the same command resumes: it removes the temporary
    files left behind and writes only what is still missing. DIRECTORY then remembers REF, for
    `tessera status`.

    \\b
    Examples:
      tessera checkout coco:v1 ./data
      tessera checkout coco ./data --delete --json
    """


def _checkout(ref: str, directory: str, delete: bool, as_json: bool) -> None:
    res = open_repo().checkout(ref, directory, delete=delete, progress=progress_bar())
    if as_json:
        emit_json(res.to_json())
        return
    click.echo(checkout_summary(res))


_ref = click.argument("ref", shell_complete=complete_ref)
_dir = click.argument("directory", type=click.Path())
_delete = click.option("--delete", is_flag=True,
                       help="Also delete paths the version does not have (not those .tesseraignore matches).")


@cli.command(help=CHECKOUT_HELP)
@_ref
@_dir
@_delete
@json_option
def checkout(ref: str, directory: str, delete: bool, as_json: bool) -> None:
    _checkout(ref, directory, delete, as_json)


@cli.command(help=CHECKOUT_HELP.replace("Make DIRECTORY equal to version REF (writes only changes).",
                                        "Same as checkout: make DIRECTORY equal to version REF.")
             .replace("tessera checkout coco:v1", "tessera restore coco:v1")
             .replace("tessera checkout coco ./data", "tessera restore coco ./data"))
@_ref
@_dir
@_delete
@json_option
def restore(ref: str, directory: str, delete: bool, as_json: bool) -> None:
    _checkout(ref, directory, delete, as_json)


def show_status(directory: str, as_json: bool) -> None:
    """`tessera status DIR`: the changes since the version DIR came from, and a summary line."""
    cmp = open_repo().status(directory)
    rec = cmp.record
    assert rec is not None
    if as_json:
        emit_json(comparison_json(cmp))
        return
    how = {"commit": "committed as", "export": "exported from", "checkout": "checked out from"}.get(rec.how, rec.how)
    short = f"{rec.dataset}@{rec.hash[:12]}"
    if not rec.complete:
        note(f"warning: the {rec.how} of {short} into {directory} was interrupted; run it again to finish")
    note(f"{directory}: {how} {short} ({human_time(rec.time)})")
    for c in cmp.changes:
        click.echo(f"{c.mark} {c.path}")
    note(comparison_summary(cmp))
