"""Mount commands: mount, umount, mounts (a thin shell over `tessera.mounting`)."""
from __future__ import annotations

import click

from tessera.cli.app import cli, emit_json, human_time, json_option, note, open_repo, parse_size, progress_bar
from tessera.cli.complete import complete_ref


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.argument("mountpoint", type=click.Path())
@click.option("-f", "--foreground", is_flag=True, help="Serve from this process until Ctrl-C or umount.")
@click.option("--cache-size", default="128M", show_default=True, metavar="SIZE",
              help="Memory for decompressed chunks (the kernel page cache does the rest).")
@click.option("--threads/--single-thread", default=False, show_default=True,
              help="libfuse's multithreaded loop, or one thread (faster for Python: the GIL serialises anyway).")
@click.option("--no-open/--open", "no_open", default=True, show_default=True,
              help="Answer open() with ENOSYS so the kernel stops asking (libfuse 3 no-open mode).")
@click.option("--listing", type=click.Choice(["attrs", "names"]), default="attrs", show_default=True,
              help="FUSE: list directories with every entry's attributes (ls -l, du and opening listed files "
                   "need no lookup; the kernel builds an inode per entry listed), or by name only (find, "
                   "os.walk, ls: several times faster on big trees; each stat or open then costs one lookup).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the mount to answer.")
@click.option("--debug", is_flag=True, help="Log every FUSE request (libfuse debug trace) into the mount log.")
@click.option("--kernel", "path", flag_value="kernel",
              help="Kernel path: cache the version's whole files, then EROFS + overlayfs (root; no server).")
@click.option("--fuse", "path", flag_value="fuse", help="FUSE path: a tessera server process answers every read.")
@click.option("--lock", "locked", is_flag=True,
              help="REF is a NAME that the nearest tessera.lock must pin: mount the pinned version.")
@json_option
def mount(ref: str, mountpoint: str, foreground: bool, cache_size: str, threads: bool, no_open: bool,
          listing: str, timeout: float, debug: bool, path: str | None, locked: bool, as_json: bool) -> None:
    """Mount version REF read-only at MOUNTPOINT.

    MOUNTPOINT must be an empty directory, or not exist yet: then it is created, and removed again
    by `tessera umount`. By default the kernel path is taken when this machine can (root, EROFS,
    overlayfs data-only layers) and the version's files are in the file cache or the rest is small
    (see `tessera help mount`); otherwise FUSE, with one line saying why and what --kernel would cost.
    Returns once the mount is ready; a FUSE server keeps running in the background until `tessera
    umount MOUNTPOINT` (or SIGTERM to its pid, shown by `tessera mounts`). A bare NAME pinned by
    the nearest tessera.lock mounts the pinned version (and says so); with --lock a pin is required.

    \b
    Examples:
      tessera mount coco:v1 /mnt/coco
      tessera mount coco@3f2a9c ./view --cache-size 1G
      tessera mount --kernel coco:v1 /mnt/coco
      tessera mount --lock coco /mnt/coco
    """
    from tessera.mounting import (MountOptions, check_fuse_device, check_mountpoint, make_mountpoint, mount_ref,
                                  remove_made_mountpoint)

    from tessera.home import require_home

    if foreground and path == "kernel":
        from tessera.errors import UsageError

        raise UsageError("--foreground serves a FUSE mount; a kernel mount has no server (drop --foreground)")
    require_home(_home())
    ref = _pinned(ref, locked)
    opts = MountOptions(parse_size(cache_size), no_open, threads, timeout, debug,
                        path="fuse" if foreground else (path or "auto"), listing=listing, progress=progress_bar(),
                        notify=lambda msg: click.echo(msg, err=True))
    if not foreground:
        # The server resolves REF and reports bad refs through its pipe: this process never opens
        # the repository, so `tessera mount` costs one interpreter start less.
        rec = mount_ref(_home(), ref, mountpoint, opts)
        if as_json:
            emit_json(rec.to_json())
            return
        how = f"pid {rec.pid}" if rec.kind == "fuse" else "kernel: EROFS + overlayfs"
        click.echo(f"mounted {rec.ref} at {rec.mountpoint} ({how})")
        return
    from tessera.fuse.mount import serve

    repo = open_repo()
    version = repo.get(ref)
    check_fuse_device()
    created = make_mountpoint(mountpoint, repo.home)
    mp = check_mountpoint(mountpoint)

    def ready(msg: str) -> None:
        if msg.startswith("ok"):
            click.echo(f"mounted {version.ref} at {mp}; Ctrl-C or `tessera umount {mp}` to stop", err=True)

    try:
        serve(str(repo.home), version.ref, mp, cache_size=opts.cache_size, no_open=no_open, threads=threads,
              debug=debug, ready=ready, listing=listing)
    finally:
        if created:
            remove_made_mountpoint(repo.home, mp)


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
@json_option
def umount(mountpoint: str, as_json: bool) -> None:
    """Unmount a tessera mount (also one whose server died).

    A mount whose server died answers ENOTCONN; it is detached all the same. A mountpoint that
    `tessera mount` created is removed.

    \b
    Examples:
      tessera umount /mnt/coco
    """
    import os

    from tessera.mounting import unmount

    unmount(mountpoint, _home())
    if as_json:
        emit_json({"unmounted": os.path.abspath(mountpoint), "removed": not os.path.lexists(mountpoint)})
        return
    click.echo(f"unmounted {mountpoint}")


@cli.command()
@json_option
def mounts(as_json: bool) -> None:
    """List active mounts: ref, hash, mountpoint, server pid or kernel.

    \b
    Examples:
      tessera mounts
      tessera mounts --json
    """
    from tessera.home import require_home
    from tessera.mounting import list_mounts

    require_home(_home())
    found = list_mounts(_home())
    if as_json:
        emit_json([m.to_json() for m in found])
        return
    if not found:
        note("no tessera mounts")
        return
    for m in found:
        gone = "server gone" if m.kind == "fuse" else "mount process gone"
        state = "" if m.alive else f"  ({gone}: run tessera umount)"
        since = f"  since {human_time(m.started)}" if m.started else ""
        pid = ("pid " + (str(m.pid) if m.pid else "-")) if m.kind == "fuse" else "kernel"
        click.echo(f"{m.ref}  {m.mountpoint}  {pid}{since}{state}")
