"""Local commands: init, commit, datasets, log, tags, ls, show, diff, cat, tag, export, verify, fsck, stats."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import click

from tessera.cli.app import (
    cli,
    emit_json,
    human_rate,
    human_size,
    human_time,
    json_option,
    note,
    open_repo,
    parse_size,
    plural,
    progress_bar,
)
from tessera.cli.complete import complete_dataset, complete_ref, complete_ref_or_dir

if TYPE_CHECKING:
    from tessera.model import HistoryEntry
    from tessera.repo import CommitResult, Repo
    from tessera.worktree import Comparison, PathChange


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
@json_option
@click.pass_context
def init(ctx: click.Context, chunk_min: str, chunk_avg: str, chunk_max: str, compression_level: int,
         as_json: bool) -> None:
    """Create the repository home (catalog + pack store).

    Other commands create a home with the defaults when none exists, so `init` is only needed to
    choose other chunk or compression settings, which are fixed from then on. Version hashes never
    depend on these settings.

    \b
    Examples:
      tessera init
      tessera --home /data/tessera init --chunk-avg 512K
    """
    from tessera.config import RepoSettings
    from tessera.format.chunker import ChunkParams
    from tessera.repo import Repo

    settings = RepoSettings(ChunkParams(parse_size(chunk_min), parse_size(chunk_avg), parse_size(chunk_max)),
                            compression_level)
    repo = Repo(ctx.find_root().obj.get("home"), settings=settings)
    if as_json:
        emit_json({"home": str(repo.home), "chunk_params": settings.chunk.to_dict(),
                   "compression_level": compression_level})
    else:
        click.echo(f"tessera home: {repo.home}")
    repo.close()


def _commit_counts(repo: "Repo", res: "CommitResult") -> dict[str, int]:
    """Files new, changed, unchanged and removed compared with the dataset's previous head."""
    files = res.version.files
    if not res.created:
        return {"new": 0, "changed": 0, "unchanged": files, "removed": 0}
    parent = res.version.info.parent
    if not parent:
        return {"new": files, "changed": 0, "unchanged": 0, "removed": 0}
    from tessera.version import diff_versions

    old = repo.get(f"{res.version.name}@{parent}")
    counts = {"added": 0, "modified": 0, "removed": 0}
    for c in diff_versions(old, res.version):
        kind = (c.new or c.old)
        if kind is not None and kind.is_file:
            counts[c.status] += 1
    return {"new": counts["added"], "changed": counts["modified"],
            "unchanged": files - counts["added"] - counts["modified"], "removed": counts["removed"]}


@cli.command()
@click.argument("name", shell_complete=complete_dataset)
@click.argument("directory", type=click.Path())
@click.option("-m", "--message", default="", help="Why this version exists.")
@click.option("--meta", "meta_json", metavar="JSON", help="Version metadata as a JSON object.")
@click.option("--entry-meta", "entry_meta", type=click.Path(), metavar="FILE",
              help="JSON file mapping relative paths to per-file metadata objects (part of the hash).")
@click.option("-t", "--tag", help="Also tag the version (NAME:TAG).")
@click.option("-x", "--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="Leave out paths matching PATTERN (gitignore syntax, repeatable; added to DIRECTORY/.tesseraignore).")
@click.option("--stats", "show_stats", is_flag=True,
              help="Also print the stat-cache hits, new chunks, trees built and checkpoints.")
@click.option("--memory", metavar="SIZE", help="Memory budget of the commit (default: $TESSERA_COMMIT_MEMORY, "
              "else the home's commit.memory setting, else 256M); past half of it, read files are recorded.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Spread the commit over a Ray cluster (ADDRESS, else $RAY_ADDRESS, else one started here); "
                   "workers upload packs straight to the remote. Needs `pip install 'tessera[ray]'`.")
@click.option("--tasks", type=int, metavar="N", help="With --ray: how many tasks (default: the cluster's CPUs).")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE",
              help="With --ray: the remote the version lands on (default: the default remote).")
@json_option
def commit(name: str, directory: str, message: str, meta_json: str | None, entry_meta: str | None,
           tag: str | None, excludes: tuple[str, ...], show_stats: bool, memory: str | None,
           ray_address: str | None, tasks: int | None, remote_name: str | None, as_json: bool) -> None:
    """Snapshot DIRECTORY as a new version of dataset NAME.

    Prints NAME@<64-hex hash> as the last line, after a summary on stderr (files new, changed,
    unchanged; bytes read and stored). Unchanged files are recognised by the stat cache and not
    re-read. Paths matched by DIRECTORY/.tesseraignore (gitignore syntax) or an --exclude pattern
    are left out. Creates the home if it does not exist. The home itself (or anything inside it) is
    refused as DIRECTORY; a DIRECTORY that contains the home is committed without it (a line says so).
    Memory stays within --memory whatever the number of files.

    Committing unchanged content creates nothing and prints the existing version; a --message or
    --meta given then is not recorded anywhere, and a warning says so (tag the version instead, or
    change something).

    With --ray (give it last, or as --ray=ADDRESS), Ray tasks chunk, hash and pack subtrees of
    DIRECTORY balanced by bytes and upload them straight to the remote; DIRECTORY must be at the same
    path on every worker. The version (same hash as a plain commit) is pushed to the remote and
    recorded here with its data on the remote only: it mounts and exports lazily, `tessera pull`
    makes it local.

    \b
    Examples:
      tessera commit coco ./data -m "fix labels"
      tessera commit coco ./data --exclude '*.log' --exclude 'cache/' -t v2
      tessera commit coco ./data --meta '{"source": "labelbox"}' --json
      tessera commit big /shared/big --memory 1G --stats
      tessera commit big /shared/big -r s3 --tasks 16 --ray
    """
    from tessera.errors import UsageError
    from tessera.repo import load_entry_meta

    t0 = time.monotonic()
    repo = open_repo(create=True)
    meta = _json_arg(meta_json, "--meta")
    budget = parse_size(memory) if memory is not None else None
    if ray_address is None:
        if tasks is not None or remote_name is not None:
            raise UsageError("--tasks and --remote go with --ray")
        meta_for = load_entry_meta(entry_meta) if entry_meta else None
        res = repo.commit_dir(name, directory, message=message, meta=meta, meta_for=meta_for, tag=tag,
                              excludes=excludes, progress=progress_bar(), memory=budget)
    else:
        if entry_meta:
            raise UsageError("--entry-meta is not supported with --ray")
        from tessera.raycluster import RayExecutor

        repo.transports.remote(remote_name)  # no remote, no directory: say so before joining a cluster
        if not Path(directory).is_dir():
            raise UsageError(f"{directory}: {'not a directory' if Path(directory).exists() else 'no such directory'}")
        executor = RayExecutor(ray_address or None, tasks)
        try:
            res = repo.commit_distributed(name, directory, executor, remote=remote_name, message=message, meta=meta,
                                          tag=tag, excludes=excludes, memory=budget, progress=progress_bar())
        finally:
            executor.close()
    seconds = time.monotonic() - t0
    s = res.stats
    counts = _commit_counts(repo, res)
    if as_json:
        emit_json({"ref": res.version.ref, "dataset": name, "hash": res.version.hash, "created": res.created,
                   "files": res.version.files, "size": res.version.size, **counts, "excluded": s.excluded,
                   "skipped": s.skipped, "busy": s.busy, "files_read": s.files_read, "bytes_read": s.bytes_read,
                   "stat_cache_hits": s.stat_cache_hits, "new_chunks": s.new_chunks,
                   "bytes_stored": s.new_bytes_stored, "tag": tag, "seconds": round(seconds, 3),
                   "message_dropped": not res.created and bool(message or meta)})
        return
    if show_stats:
        note(f"files {s.files}, read {s.files_read} ({human_size(s.bytes_read)}), stat cache hits "
             f"{s.stat_cache_hits}, new chunks {s.new_chunks} ({human_size(s.new_bytes_stored)} stored), "
             f"trees built {s.trees_built}, checkpoints {s.checkpoints}")
    if s.skipped:
        note(f"skipped {plural(s.skipped, 'special file')} (sockets, fifos, devices)")
    if s.home_skipped:
        note(f"skipped the tessera home {s.home_skipped} (inside {directory}): a home is never committed")
    if not res.created and (message or meta):
        note("warning: content unchanged, so no new version: the --message/--meta given were not recorded "
             "(tag the existing version instead)")
    short = f"{name}@{res.version.hash[:12]}"
    extra = f", {s.excluded} excluded" if s.excluded else ""
    removed = f", {counts['removed']} removed" if counts["removed"] else ""
    head = (f"committed {short}: {plural(res.version.files, 'file')} ({counts['new']} new, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged{removed}{extra})") if res.created else \
        f"unchanged: no new version, {short} has the same content ({plural(res.version.files, 'file')}{extra})"
    note(f"{head}; read {plural(s.files_read, 'file')}, stored {human_size(s.new_bytes_stored)}; "
         f"{human_rate(s.bytes_read, seconds)}")
    click.echo(res.version.ref)


@cli.command()
@json_option
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="List what remote REMOTE holds instead.")
def datasets(as_json: bool, remote_name: str | None) -> None:
    """List the datasets in this home (or on a remote).

    \b
    Examples:
      tessera datasets
      tessera datasets --remote origin --json
    """
    repo = open_repo()
    rows: Sequence[Any] = repo.remote_datasets(remote_name) if remote_name is not None else repo.datasets()
    if as_json:
        emit_json([{"name": d.name, "head": d.head, "versions": d.versions} for d in rows])
        return
    if not rows:
        note("no datasets" + (f" on remote {remote_name}" if remote_name else
                              " (make one with `tessera commit NAME DIR`)"))
    for d in rows:
        click.echo(f"{d.name}\t{(d.head or '-')[:12]}\t{plural(d.versions, 'version')}")


@cli.command()
@click.argument("name", required=False, shell_complete=complete_dataset)
@click.option("-n", "--limit", type=int, help="Show at most N versions.")
@click.option("--oneline", is_flag=True, help="One short line per version: hash (with NAME@ for all datasets) and message.")
@json_option
def log(name: str | None, limit: int | None, oneline: bool, as_json: bool) -> None:
    """Version history, newest first (of NAME, or of every dataset).

    Each version shows its hash, time, file count, size, message and tags.

    \b
    Examples:
      tessera log coco
      tessera log --oneline -n 10
      tessera log coco --json
    """
    repo = open_repo()
    names = [name] if name else [d.name for d in repo.datasets()]
    rows: list[tuple[HistoryEntry, list[str]]] = []
    for n in names:
        tags = repo.tags(n)
        rows.extend((e, tags.get(e.hash, [])) for e in repo.log(n, limit))
    rows.sort(key=lambda r: (r[0].time, r[0].seq), reverse=True)
    if limit:
        rows = rows[:limit]
    if as_json:
        emit_json([{"dataset": e.dataset, "hash": e.hash, "parent": e.parent, "time": e.time, "author": e.author,
                    "message": e.message, "meta": e.meta, "files": e.files, "size": e.size, "tags": t}
                   for e, t in rows])
        return
    if not rows:
        note("no datasets (make one with `tessera commit NAME DIR`)" if not names else "no versions")
    for e, t in rows:
        ident = e.hash[:12] if name else f"{e.dataset}@{e.hash[:12]}"
        mark = " [captured]" if e.meta.get("capture") else ""
        tag_s = f" ({', '.join(t)})" if t else ""
        if oneline:
            click.echo(f"{ident} {e.message}{mark}{tag_s}".rstrip())
        else:
            click.echo(f"{ident}  {human_time(e.time)}  {plural(e.files, 'file'):>11}  {human_size(e.size):>10}"
                       f"  {e.message}{mark}{tag_s}")


@cli.command()
@click.argument("name", required=False, shell_complete=complete_dataset)
@json_option
def tags(name: str | None, as_json: bool) -> None:
    """List tags (of dataset NAME, or of every dataset).

    \b
    Examples:
      tessera tags
      tessera tags coco --json
    """
    from tessera.errors import NotFound
    from tessera.ids import check_dataset_name

    repo = open_repo()
    if name is not None:
        check_dataset_name(name)
        if not repo.catalog.dataset_head(name)[0]:
            raise NotFound(f"unknown dataset {name!r}")
    names = [name] if name else [d.name for d in repo.datasets()]
    rows = sorted((n, t, h) for n in names for h, ts in repo.tags(n).items() for t in ts)
    if as_json:
        emit_json([{"dataset": n, "tag": t, "hash": h} for n, t, h in rows])
        return
    if not rows:
        note("no tags" + (f" in {name}" if name else "") + " (set one with `tessera tag REF TAG`)")
    for n, t, h in rows:
        click.echo(f"{n}:{t}\t{h[:12]}")


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.argument("path", default="")
@click.option("-R", "--recursive", is_flag=True, help="List everything below PATH.")
@click.option("-l", "--long", "long_", is_flag=True, help="Show mode, size and SHA-256.")
@json_option
def ls(ref: str, path: str, recursive: bool, long_: bool, as_json: bool) -> None:
    """List a version's entries under PATH (no mount needed).

    With --json each entry is an object: path, kind (file, dir, symlink), mode (an integer, e.g.
    420 = 0o644), size, sha256 (files), target (symlinks), meta (when it has metadata).

    \b
    Examples:
      tessera ls coco
      tessera ls coco@3f2a9c train/ -R -l
    """
    v = open_repo().get(ref)
    e = v.entry(path)
    entries = list(v.walk(path, dirs=True)) if recursive else (v.listdir(path) if e.is_dir else [e])
    if as_json:
        emit_json([x.to_json() for x in entries])
        return
    if not entries:
        note(f"{v.name}@{v.hash[:12]}: {'/' + path.strip('/') if path.strip('/') else 'the version'} is empty")
    for x in entries:
        name = x.path + ("/" if x.is_dir else "") + (f" -> {x.target}" if x.is_symlink else "")
        if long_:
            click.echo(f"{oct(x.mode)[2:]:>4} {x.size:>12} {(x.sha256 or '-')[:16]:16} {name}")
        else:
            click.echo(name)


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@json_option
def show(ref: str, as_json: bool) -> None:
    """Details of one version: hash, parent, message, lineage.

    Also its time, author, size, tags and version metadata.

    \b
    Examples:
      tessera show coco
      tessera show coco:v1 --json
    """
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


def is_directory_arg(repo: "Repo", arg: str) -> bool:
    """Is ``arg`` a directory rather than a ref? Anything with a '/' (``./data``, ``/x``), ``.`` and
    ``..`` are directories; a bare name that is an existing directory and not a dataset of this
    home is one too; a name that is both is refused as ambiguous."""
    from tessera.errors import UsageError

    if "/" in arg or arg in (".", "..") or arg.startswith("~"):
        return True
    if not Path(arg).is_dir():
        return False
    name = arg.split("@")[0].split(":")[0]
    if repo.catalog.dataset_head(name)[0]:
        raise UsageError(f"{arg!r} is both a directory here and a dataset: write ./{arg} for the directory")
    return True


def print_changes(changes: "list[PathChange]", as_json: bool, cmp: "Comparison | None" = None) -> None:
    if as_json:
        if cmp is None:
            emit_json([c.to_json() for c in changes])
        else:
            emit_json(comparison_json(cmp))
        return
    for c in changes:
        click.echo(f"{c.mark} {c.path}")


def comparison_json(cmp: "Comparison") -> dict[str, Any]:
    rec = cmp.record
    return {"directory": cmp.root, "ref": cmp.ref, "how": rec.how if rec else None,
            "complete": rec.complete if rec else None, "changes": [c.to_json() for c in cmp.changes],
            "counts": cmp.counts(), "files": cmp.files, "bytes": cmp.bytes, "stat_cache_hits": cmp.stat_hits,
            "hashed": cmp.hashed, "hashed_bytes": cmp.hashed_bytes, "excluded": cmp.excluded,
            "seconds": round(cmp.seconds, 3)}


def comparison_summary(cmp: "Comparison") -> str:
    counts = cmp.counts()
    what = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no changes"
    return (f"{what}; {plural(cmp.files, 'file')} ({human_size(cmp.bytes)}) checked, "
            f"{cmp.stat_hits} by the stat cache, {cmp.hashed} read ({human_rate(cmp.hashed_bytes, cmp.seconds)})")


def version_changes(repo: "Repo", a: str, b: str) -> "list[PathChange]":
    """`Repo.diff` as `PathChange`s: a change of the executable bit alone is ``mode``."""
    from tessera.worktree import PathChange

    out = []
    for c in repo.diff(a, b):
        status = c.status
        if (status == "modified" and c.old is not None and c.new is not None and c.old.is_file
                and c.new.is_file and c.old.sha256 == c.new.sha256 and c.old.mode != c.new.mode):
            status = "mode"
        out.append(PathChange(status, c.path))
    return out


@cli.command()
@click.argument("a", metavar="REF_OR_DIR", shell_complete=complete_ref_or_dir)
@click.argument("b", metavar="REF_OR_DIR", shell_complete=complete_ref_or_dir)
@json_option
def diff(a: str, b: str, as_json: bool) -> None:
    """What changed between two versions, or a version and a directory.

    Paths added (+), removed (-), modified (M) and with only their mode changed (m), going from
    the first argument to the second. A directory argument (anything with a '/', like ./data) is
    compared by the stat cache and, where that cannot tell, by SHA-256; its .tesseraignore applies.

    \b
    Examples:
      tessera diff coco@3f2a9c coco
      tessera diff coco:v1 ./data
      tessera diff ./data coco --json
    """
    from tessera.errors import UsageError

    repo = open_repo()
    a_dir, b_dir = is_directory_arg(repo, a), is_directory_arg(repo, b)
    if a_dir and b_dir:
        raise UsageError("diff compares a version with a version or a directory, not two directories")
    if not a_dir and not b_dir:
        changes = version_changes(repo, a, b)
        print_changes(changes, as_json)
        if not changes and not as_json:
            note("no differences")
        return
    cmp = repo.diff_dir(a if b_dir else b, b if b_dir else a, dir_is_new=b_dir)
    print_changes(cmp.changes, as_json, cmp)
    if not as_json:
        note(comparison_summary(cmp))


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.argument("path")
def cat(ref: str, path: str) -> None:
    """Write the bytes of file PATH in version REF to stdout.

    \b
    Examples:
      tessera cat coco labels.csv | head
      tessera cat coco@3f2a9c train/x.jpg > x.jpg
    """
    v = open_repo().get(ref)
    out = sys.stdout.buffer
    with v.open(path) as f:
        while block := f.read(1 << 20):
            out.write(block)
    out.flush()


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.argument("tag", required=False)
@click.option("--delete", "delete", is_flag=True, help="Delete tag NAME:TAG, given as REF (its version stays).")
@click.option("--from-remote", "from_remote", is_flag=True,
              help="Set tag NAME:TAG, given as REF, to the version the remote's tag names.")
@click.option("-r", "--remote", "remote_name", metavar="REMOTE", help="With --from-remote: the remote (default: the default).")
@json_option
def tag(ref: str, tag: str | None, delete: bool, from_remote: bool, remote_name: str | None, as_json: bool) -> None:
    """Name version REF as NAME:TAG, or delete a tag.

    Setting a tag that exists moves it. `tag --delete NAME:TAG` deletes one (the version stays; a
    tagged version is never forgotten, an untagged one may be). A pull keeps a local tag that names
    another version than the remote's, and says so: `tag --from-remote NAME:TAG` takes theirs.

    \b
    Examples:
      tessera tag coco@3f2a9c v1
      tessera tag coco best --json
      tessera tag --delete coco:v1
      tessera tag --from-remote coco:v1 -r origin
    """
    from tessera.errors import UsageError
    from tessera.ids import parse_ref

    if delete and from_remote:
        raise UsageError("--delete and --from-remote do not go together")
    if remote_name is not None and not from_remote:
        raise UsageError("--remote goes with --from-remote")
    if from_remote:
        r = parse_ref(ref)
        if tag is not None or not r.tag:
            raise UsageError("give the tag to take as NAME:TAG, like `tessera tag --from-remote coco:v1`")
        repo = open_repo(create=True)
        before = repo.tags(r.dataset)
        old = next((h for h, ts in before.items() if r.tag in ts), None)
        v = repo.take_remote_tag(r.dataset, r.tag, remote_name)
        if as_json:
            emit_json({"dataset": v.name, "tag": r.tag, "hash": v.hash, "ref": v.ref, "was": old})
            return
        was = f" (was {old[:12]})" if old and old != v.hash else (" (unchanged)" if old == v.hash else "")
        click.echo(f"{v.name}:{r.tag} -> {v.ref}{was}")
        return
    if delete:
        r = parse_ref(ref)
        if tag is not None or not r.tag:
            raise UsageError("give the tag to delete as NAME:TAG, like `tessera tag --delete coco:v1`")
        hash_ = open_repo().delete_tag(r.dataset, r.tag)
        if as_json:
            emit_json({"dataset": r.dataset, "tag": r.tag, "hash": hash_, "deleted": True})
            return
        click.echo(f"deleted tag {r.dataset}:{r.tag} (it named {r.dataset}@{hash_[:12]})")
        return
    if tag is None:
        raise UsageError("give a tag: tessera tag REF TAG (or --delete NAME:TAG)")
    v = open_repo(create=True).tag(ref, tag)
    if as_json:
        emit_json({"dataset": v.name, "tag": tag, "hash": v.hash, "ref": v.ref})
        return
    click.echo(f"{v.name}:{tag} -> {v.ref}")


def checkout_summary(res: Any) -> str:
    parts = [f"{res.written} written ({human_size(res.bytes_written)})", f"{res.unchanged} unchanged"]
    if res.hashed:
        parts.append(f"{res.hashed} compared by SHA-256")
    for n, what in ((res.modes, "modes fixed"), (res.symlinks, "symlinks made"), (res.replaced, "replaced"),
                    (res.deleted, "extras deleted"), (res.leftovers, "stale temporary files removed")):
        if n:
            parts.append(f"{n} {what}")
    if res.extra:
        parts.append(f"{res.extra} extra kept (--delete removes them)" if res.how == "checkout"
                     else f"{res.extra} extra kept")
    verb = "exported" if res.how == "export" else "checked out"
    resumed = " (resumed)" if res.resumed else ""
    return (f"{verb} {res.ref.split('@')[0]}@{res.ref.split('@')[1][:12]} to {res.target}{resumed}: "
            f"{plural(res.files, 'file')}: {', '.join(parts)}; {human_rate(res.bytes_written, res.seconds)}")


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.argument("directory", type=click.Path())
@click.option("--force", is_flag=True, help="Write into a non-empty directory (only what differs; extras are kept).")
@json_option
def export(ref: str, directory: str, force: bool, as_json: bool) -> None:
    """Write version REF into DIRECTORY (a new or empty one).

    Files, modes, symlinks and empty directories; sparse files stay sparse. An interrupted export
    (Ctrl-C, kill, full disk) is finished by running the same command again: only what is missing
    is written. To update a directory that holds another version, use `tessera checkout`.
    DIRECTORY may not be the tessera home, lie inside it or contain it (even with --force).

    \b
    Examples:
      tessera export coco:v1 ./copy
      tessera export coco ./copy --force --json
    """
    repo = open_repo()
    res = repo.export(ref, directory, force=force, progress=progress_bar())
    if as_json:
        emit_json(res.to_json())
        return
    click.echo(checkout_summary(res))


@cli.command()
@click.argument("ref", shell_complete=complete_ref)
@click.argument("directory", type=click.Path())
@click.option("--extra-ok", is_flag=True, help="Do not fail on files the version does not have.")
@json_option
def verify(ref: str, directory: str, extra_ok: bool, as_json: bool) -> None:
    """Check DIRECTORY against version REF, file by file (SHA-256).

    Exits 1 on any difference: modified, missing or (unless --extra-ok) extra paths.

    \b
    Examples:
      tessera verify coco:v1 ./copy
      tessera verify coco /mnt/coco --json
    """
    from tessera.errors import VerifyFailed

    repo = open_repo()
    v = repo.get(ref)
    report = repo.verify(v.ref, directory, extra_ok=extra_ok, progress=progress_bar())
    if as_json:
        emit_json({"ok": report.ok, "ref": v.ref, "checked": report.checked, "bytes": report.bytes,
                   "seconds": round(report.seconds, 3), "modified": report.modified, "missing": report.missing,
                   "extra": report.extra})
    else:
        for label, paths in (("modified", report.modified), ("missing", report.missing), ("extra", report.extra)):
            for p in paths:
                click.echo(f"{label}: {p}")
    if not report.ok:
        n = len(report.modified) + len(report.missing) + len(report.extra)
        raise VerifyFailed(f"{directory} does not match {v.ref}: {n} {'path differs' if n == 1 else 'paths differ'}")
    if not as_json:
        click.echo(f"ok: {plural(report.checked, 'file')} match {v.ref}; {human_rate(report.bytes, report.seconds)}")


@cli.command()
@click.option("--repair", is_flag=True,
              help="Re-index every local pack from its own blob headers (local bytes win over remote claims) and, "
                   "with --remote, forget remote chunk locations that fail their check.")
@click.option("--remote", "read_remote", is_flag=True,
              help="Also fetch the chunks of packs that are only on a remote and check them.")
@click.option("--local", "require_local", is_flag=True,
              help="A version whose bytes are not all in this home is an error (not only one committed here).")
@json_option
def fsck(repair: bool, read_remote: bool, require_local: bool, as_json: bool) -> None:
    """Check every chunk and version, and where their bytes are.

    Reads every local pack (each chunk must decode to its hash), checks what was recorded of remote
    packs' indexes, and walks every version (trees, file records and chunk locations all present). A
    version committed here must have all its bytes here (else an error); one browsed from a remote may
    read lazily (a note naming the remote). Garbage a crash left is listed, not an error. Exit 5 on
    any error.

    \b
    Examples:
      tessera fsck
      tessera fsck --remote --repair   # also read remote packs; drop false remote locations
      tessera fsck --json
    """
    from tessera.errors import CorruptData

    t0 = time.monotonic()
    repo = open_repo()
    report = repo.fsck(progress=progress_bar(), repair=repair, require_local=require_local, read_remote=read_remote)
    seconds = time.monotonic() - t0
    nbytes = sum(p.size for p in repo.catalog.packs() if p.local)
    if as_json:
        emit_json({"ok": report.ok, "packs": report.packs, "bytes": nbytes, "chunks": report.chunks,
                   "remote_packs": report.remote_packs, "versions": report.versions, "files": report.files,
                   "errors": report.errors, "notes": report.notes, "garbage": report.garbage,
                   "cached_files": report.cached_files, "image_files": report.image_files, "repaired": report.repaired,
                   "seconds": round(seconds, 3)})
    else:
        for line in report.notes:
            click.echo(f"note: {line}")
        for err in report.errors:
            click.echo(f"error: {err}")
        for g in report.garbage:
            click.echo(f"garbage: {g} (remove with `tessera gc`)")
    summary = (f"{plural(report.packs, 'pack')}, {plural(report.chunks, 'chunk')}, "
               f"{plural(report.remote_packs, 'remote pack index', 'remote pack indexes')}, "
               f"{plural(report.versions, 'version')}, {plural(report.files, 'file')} checked; "
               f"{human_rate(nbytes, seconds)}")
    if not report.ok:
        raise CorruptData(f"fsck found {plural(len(report.errors), 'problem')} ({summary})")
    if not as_json:
        click.echo(f"ok: {summary}")


@cli.command()
@json_option
def stats(as_json: bool) -> None:
    """Store size: versions, chunks, bytes raw, stored and on disk.

    Also the bytes of the packs no kept version uses (what `tessera gc` reclaims).

    \b
    Examples:
      tessera stats
      tessera stats --json
    """
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
    if s["reclaimable_bytes"] is None:
        click.echo("reclaimable   not measured (a read-only home)")
    else:
        click.echo(f"reclaimable   {human_size(s['reclaimable_bytes'])} in packs no kept version uses (`tessera gc`)")
