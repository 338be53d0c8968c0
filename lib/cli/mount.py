"""Mount commands: mount, umount, mounts (a thin shell over `tessera.mounting`)."""
from __future__ import annotations

import click

from tessera.cli.app import cli, emit_json, human_time, open_repo, parse_size


@cli.command()
@click.argument("ref")
@click.argument("mountpoint", type=click.Path())
@click.option("-f", "--foreground", is_flag=True, help="Serve from this process until Ctrl-C or umount.")
@click.option("--cache-size", default="128M", show_default=True, metavar="SIZE",
              help="Memory for decompressed chunks (the kernel page cache does the rest).")
@click.option("--threads/--single-thread", default=False, show_default=True,
              help="libfuse's multithreaded loop, or one thread (faster for Python: the GIL serialises anyway).")
@click.option("--no-open/--open", "no_open", default=True, show_default=True,
              help="Answer open() with ENOSYS so the kernel stops asking (libfuse 3 no-open mode).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the mount to answer.")
@click.option("--debug", is_flag=True, help="Log every FUSE request (libfuse debug trace) into the mount log.")
@click.option("--lock", "locked", is_flag=True,
              help="REF is a NAME that the nearest tessera.lock must pin: mount the pinned version.")
def mount(ref: str, mountpoint: str, foreground: bool, cache_size: str, threads: bool, no_open: bool,
          timeout: float, debug: bool, locked: bool) -> None:
    """Mount version REF read-only at MOUNTPOINT (an empty directory).

    Returns once the mount is ready; the FUSE server keeps running in the background until
    `tessera umount MOUNTPOINT` (or SIGTERM to its pid, shown by `tessera mounts`). A bare NAME
    pinned by the nearest tessera.lock mounts the pinned version (and says so); with --lock a pin
    is required.
    """
    from tessera.mounting import MountOptions, check_fuse_device, check_mountpoint, mount_ref

    ref = _pinned(ref, locked)
    opts = MountOptions(parse_size(cache_size), no_open, threads, timeout, debug)
    if not foreground:
        # The server resolves REF and reports bad refs through its pipe: this process never opens
        # the repository, so `tessera mount` costs one interpreter start less.
        rec = mount_ref(_home(), ref, mountpoint, opts)
        click.echo(f"mounted {rec.ref} at {rec.mountpoint} (pid {rec.pid})")
        return
    from tessera.fuse.mount import serve

    repo = open_repo()
    version = repo.get(ref)
    check_fuse_device()
    mp = check_mountpoint(mountpoint)

    def ready(msg: str) -> None:
        if msg.startswith("ok"):
            click.echo(f"mounted {version.ref} at {mp}; Ctrl-C or `tessera umount {mp}` to stop", err=True)

    serve(str(repo.home), version.ref, mp, cache_size=opts.cache_size, no_open=no_open, threads=threads,
          debug=debug, ready=ready)


def _pinned(ref: str, required: bool) -> str:
    """REF as the lock file in force pins it (the repository is opened only when a pin applies)."""
    from tessera.errors import NotFound, UsageError
    from tessera.lockfile import LOCK_NAME, find_lock, lookup, pinned_ref

    bare = "@" not in ref and ":" not in ref
    if required and not bare:
        raise UsageError(f"--lock takes a dataset NAME, not the ref {ref!r}")
    if not bare or lookup(ref) is None:
        if required:
            where = find_lock()
            raise NotFound(f"{where} does not pin {ref!r} (add it with `tessera use {ref}`)" if where
                           else f"--lock: no {LOCK_NAME} here or in any parent directory")
        return ref
    return pinned_ref(open_repo(), ref)


def _home() -> str:
    from tessera.config import default_home

    root = click.get_current_context().find_root()
    home = root.obj.get("home") if root.obj else None
    return str(home or default_home())


@cli.command()
@click.argument("mountpoint", type=click.Path())
def umount(mountpoint: str) -> None:
    """Unmount a tessera mount (also clears a mount whose server died: ENOTCONN)."""
    from tessera.mounting import unmount

    unmount(mountpoint, _home())
    click.echo(f"unmounted {mountpoint}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mounts(as_json: bool) -> None:
    """List active mounts: ref, hash, mountpoint, server pid."""
    from tessera.mounting import list_mounts

    found = list_mounts(_home())
    if as_json:
        emit_json([m.to_json() for m in found])
        return
    if not found:
        click.echo("no tessera mounts")
        return
    for m in found:
        state = "" if m.alive else "  (server gone: run tessera umount)"
        since = f"  since {human_time(m.started)}" if m.started else ""
        pid = str(m.pid) if m.pid else "-"
        click.echo(f"{m.ref}  {m.mountpoint}  pid {pid}{since}{state}")
