"""Datasets as dependencies: use, update, lock check/list (a thin shell over `tessera.lockfile`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from tessera.cli.app import cli, emit_json, json_option, open_repo

if TYPE_CHECKING:
    from tessera.lockfile import Update

_LOCK_FILE = click.option("--lock-file", "lock_file", type=click.Path(dir_okay=False), metavar="PATH",
                          help="The lock file to use (default: the nearest tessera.lock, "
                               "from the current directory upwards; `use` creates ./tessera.lock).")
_SHOWN_CHANGES = 20


def _update_json(u: "Update") -> dict[str, object]:
    counts = None if u.changes is None else {s: sum(1 for c in u.changes if c.status == s)
                                              for s in ("added", "removed", "modified")}
    return {"name": u.name, "old": u.old, "new": u.new.hash, "ref": u.new.ref, "remote": u.new.remote,
            "moved": u.moved, "changes": counts}


def _echo_update(u: "Update") -> None:
    click.echo(u.summary())
    mark = {"added": "+", "removed": "-", "modified": "M"}
    for c in (u.changes or [])[:_SHOWN_CHANGES]:
        click.echo(f"  {mark[c.status]} {c.path}")
    if u.changes and len(u.changes) > _SHOWN_CHANGES:
        click.echo(f"  ... and {len(u.changes) - _SHOWN_CHANGES} more (`tessera diff {u.name}@{u.old} "
                   f"{u.new.ref}`)")


@cli.command()
@click.argument("ref")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE",
              help="Find the version on REMOTE (name or URL) and record its URL in the pin.")
@_LOCK_FILE
@json_option
def use(ref: str, remote_name: str | None, lock_file: str | None, as_json: bool) -> None:
    """Pin dataset REF (NAME, NAME@HASH or NAME:TAG) in tessera.lock.

    NAME pins its latest version.
    The lock file maps the name to the full version hash (and the remote it comes from). Commit it
    with your code: `tessera mount NAME`, `tessera run --input NAME:MNT`, `tessera://NAME/...` and
    `Repo.get("NAME")` then read the pinned version. Moving a pin prints the diff summary.

    \b
    Examples:
      tessera use coco
      tessera use coco:v1 --remote s3://bucket/datasets
    """
    from tessera.lockfile import use as use_pin

    u = use_pin(open_repo(create=True), ref, remote=remote_name, path=lock_file)
    if as_json:
        emit_json(_update_json(u))
        return
    _echo_update(u)


@cli.command()
@click.argument("names", nargs=-1)
@_LOCK_FILE
@json_option
def update(names: tuple[str, ...], lock_file: str | None, as_json: bool) -> None:
    """Move pins (all, or NAMES) to their dataset's latest version.

    Prints what changed.
    A pin with a remote is compared with that remote's history first; others with this home's.

    \b
    Examples:
      tessera update
      tessera update coco --json
    """
    from tessera.lockfile import update as update_pins

    updates = update_pins(open_repo(create=True), list(names) or None, path=lock_file)
    if as_json:
        emit_json([_update_json(u) for u in updates])
        return
    for u in updates:
        _echo_update(u)


@cli.group()
def lock() -> None:
    """Inspect tessera.lock: the dataset versions a project pins.

    Pins are written by `tessera use` and `tessera update`.

    \b
    Examples:
      tessera lock list
      tessera lock check --json
    """


@lock.command("check")
@_LOCK_FILE
@json_option
def lock_check(lock_file: str | None, as_json: bool) -> None:
    """Check that every pin resolves, here or on its remote.

    Metadata of a pin this home lacks is fetched from the pin's remote.
    Exits non-zero when a pin is neither here nor on the remote.

    \b
    Examples:
      tessera lock check
      tessera lock check --lock-file ../project/tessera.lock
    """
    from tessera.errors import NotFound
    from tessera.lockfile import check

    path, results = check(open_repo(create=True), lock_file)
    if as_json:
        emit_json([{"name": r.pin.name, "hash": r.pin.hash, "remote": r.pin.remote, "found": r.where,
                    "error": r.error} for r in results])
    else:
        for r in results:
            click.echo(f"ok  {r.pin.ref}  ({r.where})" if r.where else f"missing  {r.pin.ref}: {r.error}")
    bad = [r for r in results if r.where is None]
    if bad:
        raise NotFound(f"{len(bad)} of {len(results)} pins in {path} do not resolve: "
                       f"{', '.join(r.pin.name for r in bad)}")
    if not as_json:
        click.echo(f"ok: {len(results)} pins in {path} resolve")


@lock.command("list")
@_LOCK_FILE
@json_option
def lock_list(lock_file: str | None, as_json: bool) -> None:
    """List the pins of the lock file in force: name, full hash, remote.

    \b
    Examples:
      tessera lock list
      tessera lock list --json
    """
    from tessera.errors import NotFound
    from tessera.lockfile import LOCK_NAME, find_lock, pins

    path = lock_file or find_lock()
    if path is None:
        raise NotFound(f"no {LOCK_NAME} here or in any parent directory (create one with `tessera use NAME`)")
    found = pins(path)
    if as_json:
        emit_json([{"name": p.name, "hash": p.hash, "remote": p.remote} for p in found])
        return
    for p in found:
        click.echo(f"{p.name}\t{p.hash}\t{p.remote or '-'}")
