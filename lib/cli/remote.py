"""Remote commands: remote add/list/remove/default/cache, push, pull (a thin shell over `tessera.Repo`)."""
from __future__ import annotations

import click

import time
from typing import TYPE_CHECKING, Any

from tessera.cli.app import cli, emit_json, human_rate, human_size, json_option, note, open_repo, plural, progress_bar
from tessera.cli.complete import complete_ref

if TYPE_CHECKING:
    from tessera.repo import Repo


@cli.group()
def remote() -> None:
    """Configure remotes (S3 buckets, directories).

    A remote is s3://BUCKET/PREFIX or file:///PATH. Credentials, region and endpoint come from the
    usual AWS settings (environment, AWS_PROFILE, ~/.aws/config, AWS_ENDPOINT_URL for S3-compatible
    servers); `tessera help s3` has the details.

    \b
    Examples:
      tessera remote add origin s3://my-bucket/datasets
      tessera remote list
    """


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--default", "make_default", is_flag=True, help="Use it when no --remote is given.")
@json_option
def remote_add(name: str, url: str, make_default: bool, as_json: bool) -> None:
    """Add remote NAME at URL (s3://... or file:///...).

    URL is s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH. Nothing is contacted yet. The first
    remote added is the default.

    \b
    Examples:
      tessera remote add origin s3://my-bucket/datasets
      tessera remote add backup file:///mnt/nas/tessera --default
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
    if as_json:
        emit_json({"name": name, "url": url, "default": make_default or first})
        return
    click.echo(f"added remote {name} -> {url}" + (" (default)" if make_default or first else ""))


@remote.command("list")
@json_option
def remote_list(as_json: bool) -> None:
    """List remotes; the default one is marked with '*'.

    \b
    Examples:
      tessera remote list
      tessera remote list --json
    """
    from tessera.catalog import remote_state as rs

    found = rs.remotes(open_repo().catalog)
    if as_json:
        emit_json([{"name": r.name, "url": r.url, "default": r.is_default} for r in found])
        return
    if not found:
        note("no remotes (add one with `tessera remote add NAME URL`)")
    for r in found:
        click.echo(f"{'*' if r.is_default else ' '} {r.name}\t{r.url}")


@remote.command("remove")
@click.argument("name")
@json_option
def remote_remove(name: str, as_json: bool) -> None:
    """Forget remote NAME (nothing on the remote is deleted).

    \b
    Examples:
      tessera remote remove backup
    """
    from tessera.catalog import remote_state as rs

    rs.remove_remote(open_repo().catalog, name)
    if as_json:
        emit_json({"removed": name})
        return
    click.echo(f"removed remote {name}")


@remote.command("default")
@click.argument("name")
@json_option
def remote_default(name: str, as_json: bool) -> None:
    """Make NAME the remote used when no --remote is given.

    \b
    Examples:
      tessera remote default origin
    """
    from tessera.catalog import remote_state as rs

    rs.set_default_remote(open_repo().catalog, name)
    if as_json:
        emit_json({"default": name})
        return
    click.echo(f"default remote: {name}")


@remote.command("cache")
@click.option("--size", metavar="SIZE", help="Set the lazy-read cache bound (e.g. 20G) for this home.")
@click.option("--clear", is_flag=True, help="Delete every cached chunk.")
@json_option
def remote_cache(size: str | None, clear: bool, as_json: bool) -> None:
    """Show or set the cache of lazily read chunks.

    The cache is $TESSERA_HOME/cache; $TESSERA_CACHE_SIZE, when set, overrides the size stored here.

    \b
    Examples:
      tessera remote cache
      tessera remote cache --size 20G
      tessera remote cache --clear
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
    if as_json:
        emit_json({"path": str(cache.root), "bytes": used, "chunks": files, "bound": cache.max_bytes})
        return
    click.echo(f"cache {cache.root}: {human_size(used)} in {files} chunks, bound {human_size(cache.max_bytes)}")


def _push_json(res: Any, seconds: float, needed: int | None) -> dict[str, Any]:
    return {"ref": res.ref, "remote": res.remote, "packs": res.packs, "pack_bytes": res.pack_bytes,
            "indexes": res.indexes, "meta_packs": res.meta_packs, "objects": res.objects,
            "packs_already_there": None if needed is None else needed - res.packs, "seconds": round(seconds, 3)}


@cli.command()
@click.argument("ref", required=False, shell_complete=complete_ref)
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="Remote name or URL (default: the default remote).")
@click.option("--all", "all_versions", is_flag=True, help="Every version of every dataset.")
@json_option
def push(ref: str | None, remote_name: str | None, all_versions: bool, as_json: bool) -> None:
    """Upload versions to a remote (only what it lacks).

    REF is NAME (every version of the dataset), NAME@HASH or NAME:TAG (that one). What the remote
    lacks is known from this home's records, without listing the bucket; an interrupted push, run
    again, uploads only what is still missing (the summary says how many packs were there already).

    \b
    Examples:
      tessera push coco
      tessera push coco:v1 --remote backup
      tessera push --all --json
    """
    from tessera.errors import UsageError

    t0 = time.monotonic()
    repo = open_repo()
    if all_versions:
        if ref is not None:
            raise UsageError("give either REF or --all")
        results = repo.push_all(None, remote_name, progress=progress_bar())
        seconds = time.monotonic() - t0
        if as_json:
            emit_json([_push_json(r, seconds, None) for r in results])
            return
        for res in results:
            click.echo(res.summary())
        if not results:
            note("nothing to push (no datasets)")
        total = sum(r.pack_bytes for r in results)
        note(f"{plural(len(results), 'version')} pushed: {plural(sum(r.packs for r in results), 'pack')} "
             f"uploaded, {plural(sum(r.objects for r in results), 'object')}; {human_rate(total, seconds)}")
        return
    if ref is None:
        raise UsageError("give a dataset or version to push (NAME, NAME@HASH, NAME:TAG), or --all")
    res = repo.push(ref, remote_name, progress=progress_bar())
    seconds = time.monotonic() - t0
    needed = res.packs_needed
    if as_json:
        emit_json(_push_json(res, seconds, needed))
        return
    click.echo(res.summary())
    note(f"{plural(res.packs, 'pack')} uploaded ({human_size(res.pack_bytes)}), "
         f"{needed - res.packs} of {needed} already on {res.remote}, {plural(res.objects, 'object')} written; "
         f"{human_rate(res.pack_bytes, seconds)}")


def _local_packs(repo: "Repo") -> tuple[int, int]:
    packs = [p for p in repo.catalog.packs() if p.local]
    return len(packs), sum(p.size for p in packs)


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="Remote name or URL (default: the default remote).")
@click.option("--metadata-only", is_flag=True,
              help="Fetch all of the version's metadata (trees, file records, chunk locations), no file bytes: "
                   "they are then read lazily.")
@json_option
def pull(ref: str, remote_name: str | None, metadata_only: bool, as_json: bool) -> None:
    """Fetch version REF from a remote (all of it, or metadata).

    NAME means the newest version. Without --metadata-only every pack the version needs is
    downloaded and checked, so it works offline. Without pull, using a dataset this home does not
    have (ls, cat, mount, ...) fetches only the metadata it walks from the remote.

    \b
    Examples:
      tessera pull coco@3f2a9c
      tessera pull coco --metadata-only --remote origin
    """
    t0 = time.monotonic()
    repo = open_repo(create=True)
    n0, b0 = _local_packs(repo)
    v = repo.pull(ref, remote_name, metadata_only=metadata_only, progress=progress_bar())
    n1, b1 = _local_packs(repo)
    seconds = time.monotonic() - t0
    if as_json:
        emit_json({"ref": v.ref, "files": v.files, "size": v.size, "metadata_only": metadata_only,
                   "packs": n1 - n0, "bytes": b1 - b0, "seconds": round(seconds, 3)})
        return
    what = "metadata of" if metadata_only else "pulled"
    click.echo(f"{what} {v.ref} ({plural(v.files, 'file')}, {human_size(v.size)})")
    note(f"{plural(n1 - n0, 'pack')} downloaded; {human_rate(b1 - b0, seconds)}")
