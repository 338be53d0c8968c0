"""Lifecycle commands: forget, rm, gc, prune, du, config (thin shells over `tessera.Repo`)."""
from __future__ import annotations

import sys
import time
from typing import Any

import click

from tessera.cli.app import cli, emit_json, human_size, human_time, json_option, note, open_repo, plural, progress_bar
from tessera.cli.complete import complete_dataset, complete_ref


def _policy(last: int, hourly: int, daily: int, weekly: int, monthly: int, yearly: int, within: str | None,
            tags: tuple[str, ...]) -> Any:
    from tessera.retention import KeepPolicy, parse_duration

    return KeepPolicy(last, hourly, daily, weekly, monthly, yearly,
                      parse_duration(within, "--keep-within") if within is not None else None, tuple(tags))


def _fates_json(fates: Any) -> list[dict[str, Any]]:
    return [{"hash": f.hash, "time": f.time, "entries": f.entries, "keep": f.keep, "reasons": f.reasons}
            for f in fates]


def _print_fates(fates: Any) -> None:
    for f in fates:
        why = ", ".join(f.reasons) if f.keep else ""
        click.echo(f"{'keep  ' if f.keep else 'forget'}  {f.hash[:12]}  {human_time(f.time)}  {why}".rstrip())


_count = click.IntRange(min=0)


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.option("--keep-last", "last", type=_count, default=0, metavar="N", help="Keep the N newest versions.")
@click.option("--keep-hourly", "hourly", type=_count, default=0, metavar="N",
              help="Keep the newest version of each of the last N hours that have one.")
@click.option("--keep-daily", "daily", type=_count, default=0, metavar="N",
              help="Keep the newest version of each of the last N days that have one.")
@click.option("--keep-weekly", "weekly", type=_count, default=0, metavar="N",
              help="Keep the newest version of each of the last N ISO weeks that have one.")
@click.option("--keep-monthly", "monthly", type=_count, default=0, metavar="N",
              help="Keep the newest version of each of the last N months that have one.")
@click.option("--keep-yearly", "yearly", type=_count, default=0, metavar="N",
              help="Keep the newest version of each of the last N years that have one.")
@click.option("--keep-within", "within", metavar="DURATION",
              help="Keep every version at most DURATION older than the newest (90m, 12h, 30d, 2w, 1y).")
@click.option("--keep-tag", "tags", multiple=True, metavar="TAG", help="Keep versions with this tag (repeatable).")
@click.option("--dry-run", is_flag=True, help="Show what would be forgotten and the bytes a gc would then free.")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE",
              help="Forget on this remote instead (tombstones every home honours; `tessera prune` deletes the data).")
@json_option
def forget(ref: str, last: int, hourly: int, daily: int, weekly: int, monthly: int, yearly: int, within: str | None,
           tags: tuple[str, ...], dry_run: bool, remote_name: str | None, as_json: bool) -> None:
    """Forget versions of NAME by keep rules, or one version NAME@HASH.

    The keep rules are restic's. A version is kept if any rule keeps it. Always kept, whatever the
    rules: the dataset's head, tagged versions, versions a mount of this home serves (FUSE or kernel
    path) and versions waiting to be pushed (on a remote: its newest version and tagged ones); the
    output says which rule kept each. Forgetting deletes history entries only; `tessera gc` (or
    `tessera prune --remote`) reclaims the bytes.

    \b
    Examples:
      tessera forget coco --keep-last 3 --keep-daily 7     # and `tessera gc` frees the bytes
      tessera forget coco@3f2a9c                           # one version
      tessera forget coco --keep-within 30d --dry-run      # what would go, bytes freed
      tessera forget --remote origin coco --keep-last 10   # on a shared remote (then `tessera prune`)
    """
    from tessera.errors import UsageError
    from tessera.ids import parse_ref

    r = parse_ref(ref)
    if r.tag:
        raise UsageError(f"{ref}: tagged versions are always kept (delete the tag first: tessera tag --delete {ref})")
    policy = _policy(last, hourly, daily, weekly, monthly, yearly, within, tags)
    if r.prefix and not policy.empty:
        raise UsageError("give either keep rules or one version (NAME@HASH), not both")
    repo = open_repo()
    if remote_name is not None:
        rep = repo.forget_remote(r.dataset, None if r.prefix else policy, version=r.prefix, remote=remote_name,
                                 dry_run=dry_run)
        _report_forget(rep.dataset, rep.rule, rep.fates, rep.forgotten, dry_run, rep.freed_bytes, as_json,
                       remote=rep.remote, entries=rep.entries_deleted)
        return
    version = ref if r.prefix else None
    rep2 = repo.forget(r.dataset, None if r.prefix else policy, version=version, dry_run=dry_run)
    _report_forget(rep2.dataset, rep2.rule, rep2.fates, rep2.forgotten, dry_run, rep2.freed_bytes, as_json,
                   entries=rep2.entries_deleted)


def _report_forget(dataset: str, rule: str, fates: Any, forgotten: Any, dry_run: bool, freed: int | None,
                   as_json: bool, *, remote: str | None = None, entries: int = 0) -> None:
    if as_json:
        emit_json({"dataset": dataset, "remote": remote, "rule": rule, "dry_run": dry_run, "versions": _fates_json(fates),
                   "forgotten": len(forgotten), "entries_deleted": entries, "freed_bytes": freed})
        return
    where = f" on {remote}" if remote else ""
    click.echo(f"{dataset}{where}: {rule}")
    _print_fates(fates)
    n = len(forgotten)
    if dry_run:
        freed_s = f"; {human_size(freed)} would be freed" if freed is not None else ""
        after = "`tessera prune --remote " + remote + "`" if remote else "`tessera gc`"
        click.echo(f"would forget {n} of {len(fates)} versions{freed_s} (by {after} afterwards)")
    elif not n:
        click.echo("nothing to forget")
    elif remote:
        click.echo(f"forgot {n} versions{where} ({entries} history entries, tombstoned); "
                   f"`tessera prune --remote {remote}` deletes their data")
    else:
        click.echo(f"forgot {n} versions of {dataset} ({entries} history entries); `tessera gc` reclaims their bytes")


@cli.command()
@click.argument("name", shell_complete=complete_dataset)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
@json_option
def rm(name: str, yes: bool, as_json: bool) -> None:
    """Delete dataset NAME: its history, tags and queued pushes.

    `tessera gc` then frees its bytes. Versions another dataset also records keep their bytes. Refused
    while a version of NAME is mounted.

    \b
    Examples:
      tessera rm scratch            # asks first on a terminal
      tessera rm scratch --yes      # in scripts
    """
    from tessera.errors import NotFound, UsageError
    from tessera.ids import check_dataset_name

    check_dataset_name(name)
    repo = open_repo()
    if not repo.catalog.dataset_head(name)[0]:
        raise NotFound(f"unknown dataset {name!r}")
    count = len(repo.catalog.dataset_hashes(name))
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"tessera rm {name} deletes {count} versions: confirm with --yes (stdin is not a terminal)")
        if not click.confirm(f"delete dataset {name} and its {count} versions?", default=False):
            raise UsageError(f"{name} was not deleted")
    entries, tags, queued = repo.remove_dataset(name)
    if as_json:
        emit_json({"dataset": name, "versions": count, "history_entries": entries, "tags": tags,
                   "queued_pushes": queued})
    else:
        click.echo(f"removed dataset {name}: {plural(entries, 'history entry', 'history entries')}, "
                   f"{plural(tags, 'tag')}, {plural(queued, 'queued push', 'queued pushes')}; "
                   "`tessera gc` reclaims its bytes")
    _warn_if_watched(name)


def _warn_if_watched(name: str) -> None:
    from tessera.daemon.config import default_config_path, load_config
    from tessera.errors import TesseraError

    home = open_repo().home
    try:
        watched = [w for w in load_config(default_config_path(home)).watches if w.dataset == name]
    except TesseraError:
        return
    for w in watched:
        note(f"note: the daemon still watches {w.path} into {name} (tessera unwatch {w.path})")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted and freed.")
@click.option("--repack-threshold", metavar="SHARE",
              help="Repack packs whose dead share passes this (default: the gc.repack_threshold setting, 20%).")
@json_option
def gc(dry_run: bool, repack_threshold: str | None, as_json: bool) -> None:
    """Reclaim the space of forgotten versions and crash leftovers.

    Roots are every version with a history entry, tag or queued push, and every mounted version. Trees,
    file records and chunks nothing reaches are deleted; packs with no live chunk are deleted; packs whose
    dead share passes the threshold are rewritten into new packs (made durable and indexed before the old
    ones go); temporary files and packs no catalog row names (what a crash leaves) are removed; the
    kernel mount's cached files and images of versions no longer kept are removed. Safe to run while
    commits, mounts and reads go on, and to interrupt at any point.

    \b
    Examples:
      tessera gc
      tessera gc --dry-run                  # what would be deleted, repacked and freed
      tessera gc --repack-threshold 5% --json
    """
    from tessera.catalog.lifecycle_state import parse_setting

    t0 = time.monotonic()
    threshold = parse_setting("gc.repack_threshold", repack_threshold) if repack_threshold is not None else None
    r = open_repo().gc(repack_threshold=threshold, dry_run=dry_run, progress=None if as_json else progress_bar())
    seconds = time.monotonic() - t0
    if as_json:
        emit_json({"dry_run": r.dry_run, "roots": r.roots, "live": {"trees": r.live_trees, "files": r.live_files,
                                                                     "chunks": r.live_chunks},
                   "deleted": {"trees": r.swept.trees, "files": r.swept.files, "chunks": r.swept.chunks,
                               "packs": r.packs_deleted, "stat_cache": r.swept.stat_rows,
                               "dir_cache": r.swept.dir_rows, "worktrees": r.swept.worktree_rows,
                               "cached_files": r.cached_files, "cached_bytes": r.cached_bytes, "images": r.images},
                   "repacked": r.repacked, "packs_written": r.packs_written, "repack_written_bytes": r.repack_written,
                   "pack_bytes_before": r.pack_bytes_before, "pack_bytes_after": r.pack_bytes_after,
                   "freed_bytes": r.freed, "dead_bytes_left": r.dead_bytes_left, "removed": r.garbage,
                   "file_cache_busy": r.cache_busy, "errors": r.errors, "seconds": round(seconds, 3)})
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{r.roots} versions kept: {r.live_trees} trees, {r.live_files} files, {r.live_chunks} chunks live")
    click.echo(f"{verb} {r.swept.trees} trees, {r.swept.files} file records, {r.swept.chunks} chunks, "
               f"{r.packs_deleted} packs; {'would repack' if dry_run else 'repacked'} {r.repacked} packs")
    if not dry_run:
        for g in r.garbage:
            if g.startswith("tmp/"):
                click.echo(f"removed {g}")
    if r.cached_files or r.images:
        click.echo(f"{verb} {plural(r.cached_files, 'cached file')} ({human_size(r.cached_bytes)}) and "
                   f"{plural(r.images, 'mount image')} of versions no longer kept (kernel mount cache)")
    if r.cache_busy:
        note("note: the kernel mount cache is in use (a mount at work); its unused files stay until "
             "the next gc")
    for e in r.errors:
        note(f"warning: {e}")
    freed = "would free" if dry_run else "freed"
    click.echo(f"packs {human_size(r.pack_bytes_before)} -> {human_size(r.pack_bytes_after)} ({freed} "
               f"{human_size(r.freed)}) in {seconds:.2f} s; {human_size(r.dead_bytes_left)} dead left in packs "
               "below the repack threshold")


@cli.command()
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="Remote name or URL (default: the default remote).")
@click.option("--dry-run", is_flag=True, help="Mark and report; write and delete nothing.")
@click.option("--wait", is_flag=True, help="After planning, wait out the margin and sweep the new plan too.")
@json_option
def prune(remote_name: str | None, dry_run: bool, wait: bool, as_json: bool) -> None:
    """Delete from a remote what no kept version or push needs.

    What no kept version, tag or in-flight push needs (in this home: `tessera gc`). Safe while other homes push, with no lock: each run sweeps the plans made at least prune.margin ago
    (deleting only what is still unreachable, unchanged since planned and announced by no push session),
    then plans what is unreachable now. So data forgotten with `tessera forget --remote` goes after two
    runs a margin apart (or one with --wait). Refused when the local clock is off by more than
    prune.max_clock_skew or when the remote does not allow deleting. Packs still partly in use are
    reported with their dead bytes (repacking remote packs is not implemented yet).

    \b
    Examples:
      tessera prune --remote origin
      tessera prune --remote origin --dry-run
      tessera prune -r origin --wait --json   # plan, wait out prune.margin, sweep
    """
    r = open_repo().prune(remote_name, dry_run=dry_run, wait=wait, progress=None if as_json else progress_bar())
    if as_json:
        emit_json({"remote": r.remote, "dry_run": r.dry_run, "kept_versions": r.kept_versions, "objects": r.objects,
                   "object_bytes": r.object_bytes, "live_sessions": r.live_sessions,
                   "sweeps": [{"plan": s.plan, "deleted": s.deleted, "deleted_bytes": s.deleted_bytes,
                               "spared": s.spared, "stopped_early": s.stopped_early} for s in r.sweeps],
                   "deleted": r.deleted, "deleted_bytes": r.deleted_bytes, "plan": r.plan, "planned": r.planned,
                   "planned_bytes": r.planned_bytes, "sweep_after": r.sweep_after,
                   "sessions_removed": r.sessions_removed, "clock_skew": r.skew,
                   "partial": [{"pack": p, "size": size, "dead_bytes": dead} for p, size, dead in r.partial],
                   "partial_dead_bytes": r.partial_dead_bytes})
        return
    click.echo(f"{r.remote}: {r.kept_versions} versions kept, {r.objects} objects ({human_size(r.object_bytes)}), "
               f"{r.live_sessions} pushes in flight")
    for s in r.sweeps:
        click.echo(f"swept plan {s.plan}: deleted {s.deleted} objects ({human_size(s.deleted_bytes)}), spared "
                   f"{s.spared} in use again" + (" (stopped at the end of the sweep window)" if s.stopped_early else ""))
    if r.sessions_removed:
        click.echo(f"removed {r.sessions_removed} expired push sessions")
    if r.planned and r.sweep_after is not None:
        verb = "would plan" if dry_run else "planned"
        click.echo(f"{verb} {r.planned} unreachable objects ({human_size(r.planned_bytes)}) for deletion: a prune "
                   f"after {human_time(r.sweep_after)} deletes them (plan {r.plan})")
    elif r.planned:
        click.echo(f"{r.planned} unreachable objects ({human_size(r.planned_bytes)}) would be planned for deletion")
    else:
        click.echo("nothing unreachable")
    if r.partial:
        click.echo(f"{len(r.partial)} packs kept versions still use are partly dead: {human_size(r.partial_dead_bytes)} "
                   "could be reclaimed by repacking them (repacking remote packs is not implemented yet)")


@cli.command()
@click.argument("ref", required=False, shell_complete=complete_ref)
@json_option
def du(ref: str | None, as_json: bool) -> None:
    """Where the bytes are: per dataset, or per version of NAME.

    With NAME@HASH, one version. For each: its size (file bytes), the stored bytes only it holds (what
    forgetting it frees, for a dataset what `tessera rm` frees) and the stored bytes it shares with
    other kept versions.

    \b
    Examples:
      tessera du
      tessera du coco
      tessera du coco@3f2a9c --json
    """
    versions, datasets = open_repo().du(ref)
    if as_json:
        if ref is None:
            emit_json([{"dataset": d.dataset, "versions": d.versions, "stored": d.stored, "unique": d.unique,
                        "shared": d.shared} for d in datasets])
        else:
            emit_json([{"dataset": v.dataset, "hash": v.hash, "time": v.time, "files": v.files, "size": v.size,
                        "stored": v.stored, "unique": v.unique, "shared": v.shared, "tags": list(v.tags)}
                       for v in versions])
        return
    if ref is None:
        if not datasets:
            note("no datasets")
            return
        click.echo(f"{'dataset':20} {'versions':>8} {'stored':>10} {'only it':>10} {'shared':>10}")
        for d in datasets:
            click.echo(f"{d.dataset:20} {d.versions:>8} {human_size(d.stored):>10} {human_size(d.unique):>10} "
                       f"{human_size(d.shared):>10}")
        return
    click.echo(f"{'version':25} {'time':19} {'size':>10} {'only it':>10} {'shared':>10}")
    for v in versions:
        tag = f"  ({', '.join(v.tags)})" if v.tags else ""
        click.echo(f"{v.dataset + '@' + v.hash[:12]:25} {human_time(v.time)} {human_size(v.size):>10} "
                   f"{human_size(v.unique):>10} {human_size(v.shared):>10}{tag}")


@cli.command("config")
@click.argument("key", required=False)
@click.argument("value", required=False)
@json_option
def config_cmd(key: str | None, value: str | None, as_json: bool) -> None:
    """Show or set this home's lifecycle settings.

    KEY alone shows one, KEY VALUE sets it.

    \b
    gc.repack_threshold   20%   repack packs whose dead share passes this
    gc.auto_dead_bytes    256M  the daemon and `run --keep-last` reclaim past this many dead bytes
    prune.margin          1h    time between a prune plan and its sweep
    prune.sweep_window    10m   how long a sweep may delete after it starts
    prune.max_clock_skew  5m    prune refuses when the local clock is further off than this
    push.session_expiry   1h    a push session that stops beating is dead after this

    \b
    Examples:
      tessera config
      tessera config gc.repack_threshold 30%
      tessera config prune.margin --json
    """
    from tessera.catalog.lifecycle_state import SETTING_KEYS, lifecycle_setting_items, set_lifecycle_setting
    from tessera.errors import UsageError

    repo = open_repo()
    if key is not None and key not in SETTING_KEYS:
        raise UsageError(f"unknown setting {key!r} (known: {', '.join(sorted(SETTING_KEYS))})")
    if value is not None:
        assert key is not None
        set_lifecycle_setting(repo.catalog, key, value)
    items = [i for i in lifecycle_setting_items(repo.catalog) if key is None or i[0] == key]
    if as_json:
        emit_json({k: {"value": v, "set": is_set, "meaning": meaning} for k, v, is_set, meaning in items})
        return
    for k, v, is_set, meaning in items:
        click.echo(f"{k:22} {v:8} {'' if is_set else '(default) '}{meaning}")
