"""Remote commands: remote add/list/remove/default/cache, push, pull (a thin shell over `tessera.Repo`)."""
from __future__ import annotations

import click

from tessera.cli.app import cli, emit_json, human_size, open_repo, progress_bar


@cli.group()
def remote() -> None:
    """Configure remotes: S3 buckets (s3://BUCKET/PREFIX), directories (file:///PATH).

    Credentials, region and endpoint come from the usual AWS settings (environment, AWS_PROFILE,
    ~/.aws/config, AWS_ENDPOINT_URL for S3-compatible servers). See docs/s3.md.
    """


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--default", "make_default", is_flag=True, help="Use it when no --remote is given.")
def remote_add(name: str, url: str, make_default: bool) -> None:
    """Add remote NAME at URL (s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH).

    Nothing is contacted yet. The first remote added is the default.
    """
    from tessera.catalog import remote_state as rs
    from tessera.errors import UsageError
    from tessera.ids import check_dataset_name
    from tessera.remote.base import parse_url

    try:
        check_dataset_name(name)
    except UsageError:
        raise UsageError(f"bad remote name {name!r}: use letters, digits, '.', '_' or '-'") from None
    parse_url(url)
    repo = open_repo(create=True)
    first = not rs.remotes(repo.catalog)
    rs.add_remote(repo.catalog, name, url, default=make_default or first)
    click.echo(f"added remote {name} -> {url}" + (" (default)" if make_default or first else ""))


@remote.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_list(as_json: bool) -> None:
    """List remotes; the default one is marked with '*'."""
    from tessera.catalog import remote_state as rs

    found = rs.remotes(open_repo().catalog)
    if as_json:
        emit_json([{"name": r.name, "url": r.url, "default": r.is_default} for r in found])
        return
    for r in found:
        click.echo(f"{'*' if r.is_default else ' '} {r.name}\t{r.url}")


@remote.command("remove")
@click.argument("name")
def remote_remove(name: str) -> None:
    """Forget remote NAME (nothing on the remote is deleted)."""
    from tessera.catalog import remote_state as rs

    rs.remove_remote(open_repo().catalog, name)
    click.echo(f"removed remote {name}")


@remote.command("default")
@click.argument("name")
def remote_default(name: str) -> None:
    """Make NAME the remote used when no --remote is given."""
    from tessera.catalog import remote_state as rs

    rs.set_default_remote(open_repo().catalog, name)
    click.echo(f"default remote: {name}")


@remote.command("cache")
@click.option("--size", metavar="SIZE", help="Set the lazy-read cache bound (e.g. 20G) for this home.")
@click.option("--clear", is_flag=True, help="Delete every cached chunk.")
def remote_cache(size: str | None, clear: bool) -> None:
    """Show or set the on-disk cache of lazily read chunks ($TESSERA_HOME/cache).

    $TESSERA_CACHE_SIZE, when set, overrides the size stored here.
    """
    from tessera.config import parse_size
    from tessera.diskcache import CACHE_SETTING, DiskCache, cache_dir, cache_size

    repo = open_repo()
    if size is not None:
        repo.catalog.set_setting(CACHE_SETTING, str(parse_size(size)))
    cache = DiskCache(cache_dir(repo.home), cache_size(repo.catalog))
    if clear:
        cache.clear()
    used, files = cache.usage()
    click.echo(f"cache {cache.root}: {human_size(used)} in {files} chunks, bound {human_size(cache.max_bytes)}")


@cli.command()
@click.argument("ref", required=False)
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="Remote name or URL (default: the default remote).")
@click.option("--all", "all_versions", is_flag=True, help="Every version of every dataset.")
def push(ref: str | None, remote_name: str | None, all_versions: bool) -> None:
    """Upload REF to a remote: NAME = every version of the dataset, NAME@HASH or NAME:TAG = one.

    Only what the remote lacks is sent (known from this home's records, without listing the bucket).
    An interrupted push, run again, uploads only what is still missing.
    """
    from tessera.errors import UsageError

    repo = open_repo()
    if all_versions:
        if ref is not None:
            raise UsageError("give either REF or --all")
        results = repo.push_all(None, remote_name, progress=progress_bar())
        for res in results:
            click.echo(res.summary())
        if not results:
            click.echo("nothing to push")
        return
    if ref is None:
        raise UsageError("give a dataset or version to push (NAME, NAME@HASH, NAME:TAG), or --all")
    click.echo(repo.push(ref, remote_name, progress=progress_bar()).summary())


@cli.command()
@click.argument("ref")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="Remote name or URL (default: the default remote).")
@click.option("--metadata-only", is_flag=True,
              help="Fetch only what browsing, verify and mount need; file bytes are then read lazily.")
def pull(ref: str, remote_name: str | None, metadata_only: bool) -> None:
    """Fetch version REF from a remote and make it fully local (NAME = the newest version)."""
    repo = open_repo(create=True)
    v = repo.pull(ref, remote_name, metadata_only=metadata_only, progress=progress_bar())
    what = "metadata of" if metadata_only else "pulled"
    click.echo(f"{what} {v.ref} ({v.files} files, {human_size(v.size)})")
