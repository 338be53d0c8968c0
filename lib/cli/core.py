"""Local commands: init, commit, datasets, log, ls, show, diff, cat, tag, export, verify, fsck, gc, stats."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from tessera.cli.app import cli, emit_json, human_size, human_time, open_repo, parse_size, progress_bar


def _json_arg(text: str | None, what: str) -> dict[str, Any] | None:
    from tessera.errors import UsageError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, like '{{\"source\": \"labelbox\"}}'")
    return value


@cli.command()
@click.option("--chunk-min", default="128K", show_default=True, help="FastCDC minimum chunk size.")
@click.option("--chunk-avg", default="256K", show_default=True, help="FastCDC target average chunk size.")
@click.option("--chunk-max", default="2M", show_default=True, help="FastCDC maximum chunk size.")
@click.option("--compression-level", default=3, show_default=True, help="zstd level for chunks that compress.")
@click.pass_context
def init(ctx: click.Context, chunk_min: str, chunk_avg: str, chunk_max: str, compression_level: int) -> None:
    """Create the repository home (catalog + pack store). Store settings are fixed here.

    Other commands create a home with the defaults when none exists, so `init` is only needed to
    choose other chunk or compression settings. Version hashes never depend on these settings.
    """
    from tessera.config import RepoSettings
    from tessera.format.chunker import ChunkParams
    from tessera.repo import Repo

    settings = RepoSettings(ChunkParams(parse_size(chunk_min), parse_size(chunk_avg), parse_size(chunk_max)),
                            compression_level)
    repo = Repo(ctx.find_root().obj.get("home"), settings=settings)
    click.echo(f"tessera home: {repo.home}")
    repo.close()


@cli.command()
@click.argument("name")
@click.argument("directory", type=click.Path())
@click.option("-m", "--message", default="", help="Why this version exists.")
@click.option("--meta", "meta_json", metavar="JSON", help="Version metadata as a JSON object.")
@click.option("--entry-meta", "entry_meta", type=click.Path(), metavar="FILE",
              help="JSON file mapping relative paths to per-file metadata objects (part of the hash).")
@click.option("-t", "--tag", help="Also tag the version (NAME:TAG).")
@click.option("--stats", "show_stats", is_flag=True, help="Print what was read and stored.")
@click.option("--memory", metavar="SIZE", help="Memory budget of the commit (default: $TESSERA_COMMIT_MEMORY, "
              "else the home's commit.memory setting, else 256M); past half of it, read files are recorded.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Spread the commit over a Ray cluster (ADDRESS, else $RAY_ADDRESS, else one started here); "
                   "workers upload packs straight to the remote. Needs `pip install 'tessera[ray]'`.")
@click.option("--tasks", type=int, metavar="N", help="With --ray: how many tasks (default: the cluster's CPUs).")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE",
              help="With --ray: the remote the version lands on (default: the default remote).")
def commit(name: str, directory: str, message: str, meta_json: str | None, entry_meta: str | None,
           tag: str | None, show_stats: bool, memory: str | None, ray_address: str | None, tasks: int | None,
           remote_name: str | None) -> None:
    """Snapshot DIRECTORY as a new version of dataset NAME.

    Prints NAME@<64-hex hash> as the last line. Committing unchanged content creates nothing and
    prints the existing version. Unchanged files are recognised by the stat cache and not re-read.
    Creates the home if it does not exist. The home itself (or anything inside it) is refused as
    DIRECTORY; a DIRECTORY that contains the home is committed without it (a line on stderr says so).
    Memory stays within --memory whatever the number of files.

    With --ray (give it last, or as --ray=ADDRESS), Ray tasks chunk, hash and pack subtrees of
    DIRECTORY balanced by bytes and upload them straight to the remote; DIRECTORY must be at the same
    path on every worker. The version (same hash as a plain commit) is pushed to the remote and
    recorded here with its data on the remote only: it mounts and exports lazily, `tessera pull`
    makes it local.
    """
    from tessera.errors import UsageError
    from tessera.repo import load_entry_meta

    repo = open_repo(create=True)
    meta = _json_arg(meta_json, "--meta")
    budget = parse_size(memory) if memory is not None else None
    if ray_address is None:
        if tasks is not None or remote_name is not None:
            raise UsageError("--tasks and --remote go with --ray")
        meta_for = load_entry_meta(entry_meta) if entry_meta else None
        res = repo.commit_dir(name, directory, message=message, meta=meta, meta_for=meta_for, tag=tag,
                              progress=progress_bar(), memory=budget)
    else:
        if entry_meta:
            raise UsageError("--entry-meta is not supported with --ray")
        from tessera.raycluster import RayExecutor

        repo.transports.remote(remote_name)  # no remote: say so before joining a cluster
        executor = RayExecutor(ray_address or None, tasks)
        try:
            res = repo.commit_distributed(name, directory, executor, remote=remote_name, message=message, meta=meta,
                                          tag=tag, memory=budget, progress=progress_bar())
        finally:
            executor.close()
    s = res.stats
    if show_stats:
        click.echo(f"files {s.files}, read {s.files_read} ({human_size(s.bytes_read)}), stat cache hits "
                   f"{s.stat_cache_hits}, new chunks {s.new_chunks} ({human_size(s.new_bytes_stored)} stored), "
                   f"trees built {s.trees_built}, checkpoints {s.checkpoints}", err=True)
    if s.skipped:
        click.echo(f"skipped {s.skipped} special files (sockets, fifos, devices)", err=True)
    if s.home_skipped:
        click.echo(f"skipped the tessera home {s.home_skipped} (inside {directory}): a home is never committed",
                   err=True)
    if not res.created:
        click.echo("unchanged: no new version", err=True)
    click.echo(res.version.ref)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="List what remote REMOTE holds instead.")
def datasets(as_json: bool, remote_name: str | None) -> None:
    """List the datasets in this home (or on a remote)."""
    repo = open_repo()
    found = repo.remote_datasets(remote_name) if remote_name is not None else repo.datasets()
    rows = [(d.name, d.head, d.versions) for d in found]
    if as_json:
        emit_json([{"name": name, "head": head, "versions": n} for name, head, n in rows])
        return
    for name, head, n in rows:
        click.echo(f"{name}\t{(head or '-')[:12]}\t{n} versions")


@cli.command()
@click.argument("name")
@click.option("-n", "--limit", type=int, help="Show at most N versions.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def log(name: str, limit: int | None, as_json: bool) -> None:
    """History of dataset NAME, newest first: hash, time, files, size, message."""
    repo = open_repo()
    entries = repo.log(name, limit)
    tags = repo.tags(name)
    if as_json:
        emit_json([{"hash": e.hash, "parent": e.parent, "time": e.time, "author": e.author,
                    "message": e.message, "meta": e.meta, "files": e.files, "size": e.size,
                    "tags": tags.get(e.hash, [])} for e in entries])
        return
    for e in entries:
        mark = " [captured]" if e.meta.get("capture") else ""
        tag_s = f" ({', '.join(tags[e.hash])})" if e.hash in tags else ""
        click.echo(f"{e.hash[:12]}  {human_time(e.time)}  {e.files:>7} files  {human_size(e.size):>10}"
                   f"  {e.message}{mark}{tag_s}")


@cli.command()
@click.argument("ref")
@click.argument("path", default="")
@click.option("-r", "--recursive", is_flag=True, help="List everything below PATH.")
@click.option("-l", "--long", "long_", is_flag=True, help="Show mode, size and SHA-256.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls(ref: str, path: str, recursive: bool, long_: bool, as_json: bool) -> None:
    """List the entries of version REF under PATH, without mounting."""
    v = open_repo().get(ref)
    e = v.entry(path)
    entries = list(v.walk(path, dirs=True)) if recursive else (v.listdir(path) if e.is_dir else [e])
    if as_json:
        emit_json([x.to_json() for x in entries])
        return
    for x in entries:
        name = x.path + ("/" if x.is_dir else "") + (f" -> {x.target}" if x.is_symlink else "")
        if long_:
            click.echo(f"{oct(x.mode)[2:]:>4} {x.size:>12} {(x.sha256 or '-')[:16]:16} {name}")
        else:
            click.echo(name)


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(ref: str, as_json: bool) -> None:
    """Details of one version: hash, parent, time, author, message, metadata, lineage."""
    repo = open_repo()
    v = repo.get(ref)
    i = v.info
    tags = repo.tags(v.name).get(v.hash, [])
    if as_json:
        emit_json({"dataset": v.name, "hash": v.hash, "parent": i.parent, "time": i.time, "author": i.author,
                   "message": i.message, "meta": i.meta, "files": i.files, "size": i.size, "tags": tags})
        return
    click.echo(f"version   {v.ref}")
    click.echo(f"parent    {i.parent or '-'}")
    click.echo(f"time      {human_time(i.time)}")
    click.echo(f"author    {i.author}")
    click.echo(f"files     {i.files} ({human_size(i.size)})")
    if tags:
        click.echo(f"tags      {', '.join(tags)}")
    if i.message:
        click.echo(f"message   {i.message}")
    lineage = i.meta.get("capture") if isinstance(i.meta.get("capture"), dict) else None
    if lineage:
        click.echo("lineage")
        click.echo(f"  command   {' '.join(lineage.get('command', []))}")
        click.echo(f"  exit code {lineage.get('exit_code')}")
        if lineage.get("git"):
            click.echo(f"  git       {lineage['git']}")
        for inp in lineage.get("inputs", []):
            click.echo(f"  input     {inp}")
    other = {k: val for k, val in i.meta.items() if k != "capture"}
    if other:
        click.echo("meta      " + json.dumps(other, sort_keys=True))


@cli.command()
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(ref_a: str, ref_b: str, as_json: bool) -> None:
    """Paths added (+), removed (-) and modified (M) from REF_A to REF_B."""
    changes = open_repo().diff(ref_a, ref_b)
    if as_json:
        emit_json([{"status": c.status, "path": c.path} for c in changes])
        return
    mark = {"added": "+", "removed": "-", "modified": "M"}
    for c in changes:
        click.echo(f"{mark[c.status]} {c.path}")


@cli.command()
@click.argument("ref")
@click.argument("path")
def cat(ref: str, path: str) -> None:
    """Write the bytes of file PATH in version REF to stdout."""
    v = open_repo().get(ref)
    out = sys.stdout.buffer
    with v.open(path) as f:
        while block := f.read(1 << 20):
            out.write(block)
    out.flush()


@cli.command()
@click.argument("ref")
@click.argument("tag")
def tag(ref: str, tag: str) -> None:
    """Name version REF as NAME:TAG (moves the tag if it exists)."""
    v = open_repo(create=True).tag(ref, tag)
    click.echo(f"{v.name}:{tag} -> {v.ref}")


@cli.command()
@click.argument("ref")
@click.argument("directory", type=click.Path())
@click.option("--force", is_flag=True, help="Write into a non-empty directory (overwriting same paths).")
def export(ref: str, directory: str, force: bool) -> None:
    """Materialize version REF into DIRECTORY (files, modes, symlinks, empty dirs).

    DIRECTORY may not be the tessera home, lie inside it or contain it (even with --force).
    """
    repo = open_repo()
    v = repo.get(ref)
    n = repo.export(v.ref, directory, force=force, progress=progress_bar())
    click.echo(f"exported {n} files of {v.ref} to {directory}")


@cli.command()
@click.argument("ref")
@click.argument("directory", type=click.Path())
@click.option("--extra-ok", is_flag=True, help="Do not fail on files the version does not have.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(ref: str, directory: str, extra_ok: bool, as_json: bool) -> None:
    """Check every file of DIRECTORY against version REF by SHA-256. Exit 1 on any difference."""
    from tessera.errors import VerifyFailed

    repo = open_repo()
    v = repo.get(ref)
    report = repo.verify(v.ref, directory, extra_ok=extra_ok, progress=progress_bar())
    if as_json:
        emit_json({"ok": report.ok, "checked": report.checked, "modified": report.modified,
                   "missing": report.missing, "extra": report.extra})
    else:
        for label, paths in (("modified", report.modified), ("missing", report.missing), ("extra", report.extra)):
            for p in paths:
                click.echo(f"{label}: {p}")
    if not report.ok:
        n = len(report.modified) + len(report.missing) + len(report.extra)
        raise VerifyFailed(f"{directory} does not match {v.ref}: {n} paths differ")
    if not as_json:
        click.echo(f"ok: {report.checked} files match {v.ref}")


@cli.command()
@click.option("--repair", is_flag=True,
              help="Re-index every local pack from its own blob headers (local bytes win over remote claims) and, "
                   "with --remote, forget remote chunk locations that fail their check.")
@click.option("--remote", "read_remote", is_flag=True,
              help="Also fetch the chunks of packs that are only on a remote and check them.")
@click.option("--local", "require_local", is_flag=True,
              help="A version whose bytes are not all in this home is an error (not only one committed here).")
def fsck(repair: bool, read_remote: bool, require_local: bool) -> None:
    """Check the store: every chunk readable with the right hash, every version complete.

    Also says where each version's bytes are: a version committed here must have them all here (else an
    error); one browsed from a remote may read lazily (a note naming the remote). Exit 5 on any error.

    \b
    tessera fsck                      # local packs, remote indexes, every version
    tessera fsck --remote --repair    # also read remote packs; drop false remote locations
    """
    from tessera.errors import CorruptData

    report = open_repo().fsck(progress=progress_bar(), repair=repair, require_local=require_local,
                              read_remote=read_remote)
    for note in report.notes:
        click.echo(f"note: {note}")
    for err in report.errors:
        click.echo(f"error: {err}")
    for g in report.garbage:
        click.echo(f"garbage: {g} (remove with `tessera gc`)")
    summary = (f"{report.packs} packs, {report.chunks} chunks, {report.remote_packs} remote pack indexes, "
               f"{report.versions} versions, {report.files} files checked")
    if not report.ok:
        raise CorruptData(f"fsck found {len(report.errors)} problems ({summary})")
    click.echo(f"ok: {summary}")


@cli.command()
def gc() -> None:
    """Remove garbage a crash can leave: temporary files and packs no catalog row points to."""
    removed = open_repo().gc()
    for r in removed:
        click.echo(f"removed {r}")
    click.echo(f"{len(removed)} items removed")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(as_json: bool) -> None:
    """Store size: datasets, versions, unique chunks, bytes before and after compression, on disk."""
    s = open_repo().stats()
    if as_json:
        emit_json(s)
        return
    click.echo(f"home          {s['home']}")
    click.echo(f"datasets      {s['datasets']}")
    click.echo(f"versions      {s['versions']}")
    click.echo(f"files         {s['files']} unique")
    click.echo(f"chunks        {s['chunks']} unique, {human_size(s['chunk_bytes'])} raw, "
               f"{human_size(s['stored_bytes'])} stored")
    click.echo(f"packs         {s['packs']}, {human_size(s['pack_bytes'])}")
    click.echo(f"on disk       {human_size(s['disk_bytes'])}")
