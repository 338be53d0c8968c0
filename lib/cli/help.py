"""`tessera help [TOPIC]`: the documentation pages, shipped inside the package (``tessera.docs``)."""
from __future__ import annotations

from pathlib import Path

import click

from tessera.cli.app import cli, emit_json, isatty, json_option


def docs_dir() -> Path:
    """The packaged docs/ (an installed wheel has them as ``tessera/docs``; a source checkout or an
    editable install reads the repository's docs/)."""
    here = Path(__file__).resolve().parent.parent  # the tessera package (this is tessera/cli/help.py)
    for candidate in (here / "docs", here.parent / "docs"):
        if (candidate / "quickstart.md").is_file():
            return candidate
    from tessera.errors import NotFound

    raise NotFound("the documentation is not installed with this tessera (no tessera/docs)")


def topics() -> dict[str, Path]:
    return {p.stem: p for p in sorted(docs_dir().glob("*.md"))}


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def _complete_topic(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        return [t for t in topics() if t.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion must never fail loudly
        return []


@cli.command("help")
@click.argument("topic", required=False, shell_complete=_complete_topic)
@json_option
def help_(topic: str | None, as_json: bool) -> None:
    """Show a documentation topic (no TOPIC: list them).

    The project's documentation pages (quickstart, concepts, cli, python-api, mount, s3, daemon,
    format, benchmarks), installed with tessera, as Markdown. `tessera COMMAND --help` documents
    one command.

    \b
    Examples:
      tessera help
      tessera help s3
      tessera help quickstart | less
    """
    from tessera.errors import NotFound

    found = topics()
    if topic is None:
        if as_json:
            emit_json([{"topic": t, "title": _title(p)} for t, p in found.items()])
            return
        width = max(len(t) for t in found)
        for t, p in found.items():
            click.echo(f"{t:<{width}}  {_title(p)}")
        return
    path = found.get(topic.removesuffix(".md"))
    if path is None:
        raise NotFound(f"no help topic {topic!r} (topics: {', '.join(found)})")
    text = path.read_text(encoding="utf-8")
    if as_json:
        emit_json({"topic": path.stem, "title": _title(path), "text": text})
    elif isatty():
        click.echo_via_pager(text)
    else:
        click.echo(text, nl=False)
