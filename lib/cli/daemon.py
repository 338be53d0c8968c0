"""Daemon commands: daemon, watch, unwatch, status, run (thin shells over `tessera.daemon`)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click

from tessera.cli.app import cli, emit_json, human_time, json_option, note, open_repo


def _home() -> Path:
    from tessera.config import default_home

    root = click.get_current_context().find_root()
    home = root.obj.get("home") if root.obj else None
    return Path(home).expanduser() if home else default_home()


def _config_path(config: str | None) -> Path:
    from tessera.daemon.config import default_config_path

    return Path(config).expanduser().absolute() if config else default_config_path(_home())


def _edit_target(config: str | None) -> Path:
    """The config `watch`/`unwatch` edit: --config, else the running daemon's, else the default."""
    from tessera.daemon.service import read_daemon_info

    if config:
        return _config_path(config)
    info = read_daemon_info(_home())
    return Path(info.config) if info else _config_path(None)


def _ago(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{human_time(t)} ({_duration(time.time() - t)} ago)"


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


config_option = click.option("--config", "config", type=click.Path(dir_okay=False), metavar="FILE",
                             help="Daemon config file (default: the running daemon's, else "
                                  "$TESSERA_HOME/daemon.toml).")


@cli.command()
@config_option
def daemon(config: str | None) -> None:
    """Run the daemon: commit watched directories when quiet.

    Runs in the foreground (a systemd unit example is in `tessera help daemon`). Each watch (see `tessera watch`) is debounced: once its directory has been quiet for
    quiet_seconds, or max_wait_seconds after the first change during continuous writes, a version is
    committed if anything changed, and queued for push to the watch's remote. The push queue lives in
    the catalog and survives restarts. Config changes are picked up without restart. SIGTERM or
    Ctrl-C finish the current commit, then stop. One daemon per home.

    \b
    Examples:
      tessera daemon
      tessera daemon --config ./daemon.toml
    """
    from tessera.daemon.service import Daemon

    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s tessera: %(levelname)s: %(message)s"))
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    Daemon(_home(), _config_path(config)).run()


@cli.command()
@click.argument("directory", type=click.Path())
@click.argument("name")
@click.option("--remote", help="Push every new version to this remote (see `tessera remote list`).")
@click.option("--quiet", "quiet", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="Commit once the directory has been quiet this long.")
@click.option("--max-wait", "max_wait", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Commit at the latest this long after the first change, even during continuous writes.")
@click.option("--ignore", multiple=True, metavar="GLOB",
              help="Paths to leave out (repeatable): 'NAME' at any depth or 'dir/*.csv' relative.")
@config_option
@json_option
def watch(directory: str, name: str, remote: str | None, quiet: float, max_wait: float, ignore: tuple[str, ...],
          config: str | None, as_json: bool) -> None:
    """Have the daemon snapshot DIRECTORY into dataset NAME.

    A version is committed whenever DIRECTORY changed and then stayed quiet. Edits the daemon
    config; a running daemon picks the change up within a second. DIRECTORY/.tesseraignore
    (gitignore syntax) is honoured as by `tessera commit`, besides the --ignore globs.

    \b
    Examples:
      tessera watch ./data labels --remote origin
      tessera watch ./ckpt run-42 --quiet 10 --ignore '*.log'
    """
    from tessera.catalog.remote_state import remote_names
    from tessera.daemon.config import WatchConfig, add_watch, check_config_against_home, check_not_home, check_watch_dir
    from tessera.daemon.service import read_daemon_info
    from tessera.errors import NotFound, UsageError
    from tessera.ids import check_dataset_name

    home = _home()
    check_dataset_name(name)
    path = check_watch_dir(directory)
    check_not_home(path, home)
    repo = open_repo(create=True)
    if not quiet > 0:
        raise UsageError(f"--quiet must be a positive number of seconds, got {quiet:g}")
    if max_wait < quiet:
        raise UsageError(f"--max-wait ({max_wait:g}) must be at least --quiet ({quiet:g})")
    if remote is not None:
        known = remote_names(repo.catalog)
        if remote not in known:
            raise NotFound(f"unknown remote {remote!r} (known: {', '.join(known) or 'none; add one with `tessera remote add`'})")
    cfg_path = _edit_target(config)
    add_watch(cfg_path, WatchConfig(path, name, remote, quiet, max_wait, tuple(ignore)),
              check=lambda c: check_config_against_home(c, home))
    running = read_daemon_info(home)
    if as_json:
        emit_json({"path": path, "dataset": name, "remote": remote, "quiet_seconds": quiet,
                   "max_wait_seconds": max_wait, "ignore": list(ignore), "config": str(cfg_path),
                   "daemon_running": running is not None})
        return
    click.echo(f"watching {path} -> {name}" + (f" (pushed to {remote})" if remote else ""))
    if running is None:
        note("the daemon is not running: start it with `tessera daemon`")


@cli.command()
@click.argument("directory", type=click.Path())
@config_option
@json_option
def unwatch(directory: str, config: str | None, as_json: bool) -> None:
    """Stop watching DIRECTORY. Its versions and queued pushes are kept.

    \b
    Examples:
      tessera unwatch ./ckpt
    """
    from tessera.catalog.daemon_state import forget_watch
    from tessera.daemon.config import remove_watch

    removed = remove_watch(_edit_target(config), directory)
    forget_watch(open_repo().catalog, removed.path)
    if as_json:
        emit_json({"path": removed.path, "dataset": removed.dataset})
        return
    click.echo(f"no longer watching {removed.path} (dataset {removed.dataset})")


def _status_data(config: str | None) -> dict[str, Any]:
    from tessera.catalog import daemon_state as ds
    from tessera.daemon.config import load_config
    from tessera.daemon.service import read_daemon_info
    from tessera.errors import ConfigError

    home = _home()
    info = read_daemon_info(home)
    cfg_path = Path(info.config) if info and not config else _config_path(config)
    try:
        watches = load_config(cfg_path).watches
        config_error = info.config_error if info else None
    except ConfigError as exc:
        watches, config_error = [], str(exc)
    catalog = open_repo().catalog
    statuses = ds.watch_statuses(catalog)
    queue = ds.pending_pushes(catalog)
    out_watches = []
    claimed: set[int] = set()
    for w in watches:
        st = statuses.get(w.path)
        mine = [i for i in queue if i.dataset == w.dataset and (w.remote is None or i.remote == w.remote)]
        claimed.update(i.id for i in mine)
        push_errors = [i.last_error for i in mine if i.last_error]
        out_watches.append({
            "path": w.path, "dataset": w.dataset, "remote": w.remote,
            "quiet_seconds": w.quiet_seconds, "max_wait_seconds": w.max_wait_seconds,
            "last_event": st.last_event if st else None,
            "last_version": f"{w.dataset}@{st.last_version}" if st and st.last_version else None,
            "last_commit": st.last_commit if st else None,
            "pending_uploads": len(mine),
            "last_error": (st.last_error if st else None) or (push_errors[-1] if push_errors else None),
        })
    return {
        "home": str(home),
        "config": str(cfg_path),
        "config_error": config_error,
        "daemon": None if info is None else {"pid": info.pid, "started": info.started,
                                             "uptime": time.time() - info.started, "host": info.host},
        "watches": out_watches,
        "other_pending_uploads": [{"ref": i.ref, "remote": i.remote, "attempts": i.attempts,
                                   "last_error": i.last_error} for i in queue if i.id not in claimed],
    }


@cli.command()
@click.argument("directory", required=False, type=click.Path())
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(directory: str | None, config: str | None, as_json: bool) -> None:
    """What changed in DIRECTORY, or what the daemon is doing.

    With DIRECTORY: paths added (+), removed (-), modified (M) or with only their mode changed (m)
    since the version DIRECTORY was committed as, exported or checked out from (instant on an
    unchanged tree: the stat cache). Its .tesseraignore and the commit's --exclude patterns apply.

    Without: the daemon (pid, uptime) and each watch: last event, last version, pending uploads,
    last error.

    \b
    Examples:
      tessera status ./data
      tessera status
      tessera status ./data --json
    """
    if directory is not None:
        from tessera.cli.worktree import show_status

        show_status(directory, as_json)
        return
    data = _status_data(config)
    if as_json:
        emit_json(data)
        return
    d = data["daemon"]
    if d:
        click.echo(f"daemon       running, pid {d['pid']}, up {_duration(d['uptime'])}")
    else:
        click.echo("daemon       not running (start it with `tessera daemon`)")
    click.echo(f"config       {data['config']}")
    if data["config_error"]:
        click.echo(f"config error {data['config_error']}")
    if not data["watches"]:
        click.echo("no watches (add one with `tessera watch DIR NAME`)")
    for w in data["watches"]:
        click.echo("")
        click.echo(f"{w['path']} -> {w['dataset']}" + (f" (remote {w['remote']})" if w["remote"] else ""))
        click.echo(f"  last event    {_ago(w['last_event'])}")
        version = w["last_version"]
        click.echo(f"  last version  {version[:len(w['dataset']) + 13] + '  ' + _ago(w['last_commit']) if version else '-'}")
        click.echo(f"  pending       {w['pending_uploads']} uploads")
        click.echo(f"  last error    {w['last_error'] or '-'}")
    others = data["other_pending_uploads"]
    if others:
        click.echo("")
        click.echo(f"other pending uploads: {len(others)}")
        for o in others[:20]:
            click.echo(f"  {o['ref'][:len(o['ref'].split('@')[0]) + 13]} -> {o['remote']}"
                       + (f"  ({o['last_error']})" if o["last_error"] else ""))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--capture", "captures", multiple=True, metavar="DIR:NAME",
              help="Snapshot DIR into dataset NAME every --every seconds and at exit (repeatable).")
@click.option("--capture-once", "captures_once", multiple=True, metavar="DIR:NAME",
              help="Snapshot DIR into dataset NAME once, when the command exits (repeatable).")
@click.option("--input", "inputs", multiple=True, metavar="REF:MOUNTPOINT",
              help="Mount version REF read-only at MOUNTPOINT while the command runs and record it as an "
                   "input (repeatable); a bare REF is only recorded.")
@click.option("--every", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="How often --capture directories are snapshotted while the command runs.")
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(captures: tuple[str, ...], captures_once: tuple[str, ...], inputs: tuple[str, ...], every: float,
        as_json: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND, capturing its outputs as versions.

    Output directories are captured with their lineage. Each captured version records the command, its exit code, the input versions (full hashes), the
    git commit of the working directory and start/end times (`tessera show` prints them, `tessera log`
    marks them [captured]). Exits with the command's exit code. With --json, a JSON summary
    (exit code, captured versions) follows the command's own output on stdout.

    \b
    Examples:
      tessera run --capture ./ckpt:run-42 --input coco@3f2a9c:/mnt/coco -- python train.py
      tessera run --capture-once ./out:eval-7 --json -- python eval.py
    """
    from tessera.daemon.capture import Run, parse_capture, parse_input

    specs = [parse_capture(c) for c in captures] + [parse_capture(c, once=True) for c in captures_once]
    repo = open_repo(create=bool(captures or captures_once))  # only --capture writes to the home
    job = Run(repo, list(command), specs, [parse_input(i) for i in inputs], every,
              report=lambda msg: click.echo(f"tessera: {msg}", err=True))
    code = job.run()
    if as_json:
        emit_json({"exit_code": code, "versions": job.versions, "run_id": job.run_id})
    if code:
        # not ctx.exit(): with standalone_mode=False click would return the code instead of exiting
        raise SystemExit(code)
