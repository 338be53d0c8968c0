"""Generate docs/cli.md from the real commands: `python -m tessera.cli.docs > docs/cli.md`.

tests/test_6_docs.py fails when a command or option is missing from docs/cli.md or has no help.
"""
from __future__ import annotations

import inspect

import click

from tessera.cli.app import cli

INTRO = """# tessera command line

Generated from the commands themselves (`python -m tessera.cli.docs > docs/cli.md`); `tessera
COMMAND --help` prints the same text.

Every command accepts the global options before the command name: `--home DIR` (default
`$TESSERA_HOME` or `~/.tessera`) and `-v/--verbose`. Errors print one line, `error: ...`, on stderr and
exit non-zero (see the exit codes in [python-api.md](python-api.md#errors)).

Refs: `NAME` is the latest version, `NAME@3f2a9c` any unique hash prefix of at least 6 hex
characters, `NAME:TAG` a tag.

Conventions: commands that print results take `--json` (one JSON document on stdout); notices
("no datasets"), warnings and the one-line summaries (counts, bytes, time, rate) go to stderr, so
pipes get only results. A short flag means the same everywhere (`-r` is `--remote`, `-R`
`--recursive`, `-n` `--limit`, `-m` `--message`, `-t` `--tag`, `-x` `--exclude`, `-f` `--foreground`).
`tessera -V` prints the version, `tessera help TOPIC` shows these docs (installed with tessera).

## Shell completion

click's completion, which also completes dataset names, `NAME@` hash prefixes, `NAME:` tags and
`tessera help` topics from the current home. Add one line to your shell's start-up file:

```
eval "$(_TESSERA_COMPLETE=bash_source tessera)"     # ~/.bashrc
eval "$(_TESSERA_COMPLETE=zsh_source tessera)"      # ~/.zshrc
_TESSERA_COMPLETE=fish_source tessera | source      # ~/.config/fish/completions/tessera.fish
```
"""


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    ctx = click.Context(group)
    out: list[tuple[str, click.Command]] = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        full = f"{prefix} {name}".strip()
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, full))
        else:
            out.append((full, cmd))
    return out


def render() -> str:
    parts = [INTRO]
    for name, cmd in _commands(cli, ""):
        ctx = click.Context(cmd, info_name=f"tessera {name}")
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        parts.append(f"## tessera {name}\n\n```\ntessera {name} {usage}\n```\n")
        parts.append(inspect.cleandoc(cmd.help or "").replace("\b\n", "") + "\n")
        opts = [p for p in cmd.params if isinstance(p, click.Option)]
        if opts:
            parts.append("| option | meaning |\n|---|---|")
            for p in opts:
                record = p.get_help_record(ctx)
                if record:
                    flags, text = record
                    parts.append(f"| `{flags}` | {text.replace('|', '/')} |")
            parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
