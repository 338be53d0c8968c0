"""`tessera cache`: the kernel mount's whole-file cache (a thin shell over `tessera.filecache`)."""
from __future__ import annotations

import click

from tessera.cli.app import cli, emit_json, human_size, json_option, open_repo, parse_size


@cli.group(invoke_without_command=True)
@json_option
@click.pass_context
def cache(ctx: click.Context, as_json: bool) -> None:
    """Show the kernel mount's whole-file cache.

    Its size, budget, the files active kernel mounts pin, and the rule `tessera mount` uses to pick
    the kernel path by default.

    \b
    Examples:
      tessera cache
      tessera cache --json
      tessera cache budget 200G
      tessera cache evict --all
    """
    if ctx.invoked_subcommand is not None:
        return
    from tessera.config import FileCacheSettings
    from tessera.kernelmount import active_images, open_cache, pinned_files

    repo = open_repo()
    settings = FileCacheSettings.load(repo.catalog.setting)
    fc = open_cache(repo, settings)
    used, files = fc.usage()
    pinned = pinned_files(repo)
    info = {"path": str(fc.root), "files": files, "bytes": used, "budget": settings.max_size,
            "pinned_files": len(pinned), "mounted_images": len(active_images(repo.home)),
            "auto_max_bytes": settings.auto_max_bytes, "auto_max_seconds": settings.auto_max_seconds,
            "rate_bytes_per_s": fc.rates()[0], "seconds_per_file": fc.rates()[1]}
    if as_json:
        emit_json(info)
        return
    click.echo(f"file cache    {fc.root}")
    click.echo(f"holds         {files} files, {human_size(used)} of a {human_size(settings.max_size)} budget")
    click.echo(f"pinned        {len(pinned)} files used by active kernel mounts")
    bps, spf = fc.rates()
    click.echo(f"auto rule     kernel path when <= {human_size(settings.auto_max_bytes)} and <= "
               f"{settings.auto_max_seconds:g} s are missing (at {human_size(bps)}/s + {spf * 1e3:.2f} ms per file)")


@cache.command()
@click.argument("size")
@json_option
def budget(size: str, as_json: bool) -> None:
    """Set the file cache budget.

    Files no active kernel mount uses are evicted beyond it.

    \b
    Examples:
      tessera cache budget 200G
    """
    repo = open_repo()
    n = parse_size(size)
    with repo.catalog.write():
        repo.catalog.set_setting("filecache.max_size", str(n))
    if as_json:
        emit_json({"budget": n})
        return
    click.echo(f"file cache budget: {human_size(n)}")


@cache.command()
@click.option("--all", "everything", is_flag=True, help="Every file no active kernel mount uses.")
@json_option
def evict(everything: bool, as_json: bool) -> None:
    """Evict files no active kernel mount uses.

    Down to the budget, or all of them with --all.

    \b
    Examples:
      tessera cache evict
      tessera cache evict --all
    """
    from tessera.kernelmount import open_cache, pinned_files

    repo = open_repo()
    fc = open_cache(repo)
    with fc.locked():
        used, _ = fc.usage()
        want = -1 if everything else max(0, used - fc.max_size)
        freed = fc.evict(want, pinned_files(repo)) if want else 0
    if as_json:
        emit_json({"evicted_bytes": freed})
        return
    click.echo(f"evicted {human_size(freed)}")
