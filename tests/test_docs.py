"""Docs that cannot drift: quickstart code runs, every CLI command and option is documented."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(md: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", md.read_text(), re.S)


def test_quickstart_python_runs() -> None:
    blocks = python_blocks(DOCS / "quickstart.md")
    assert blocks
    for code in blocks:
        exec(compile(code, "quickstart.md", "exec"), {})


def all_commands() -> list[tuple[str, click.Command]]:
    from tessera.cli import cli

    ctx = click.Context(cli)
    out = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            sub = click.Context(cmd)
            out.extend((f"{name} {s}", cmd.get_command(sub, s)) for s in cmd.list_commands(sub))
        else:
            out.append((name, cmd))
    return out


@pytest.mark.parametrize("name,cmd", all_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_has_help_and_is_in_cli_md(name: str, cmd: click.Command) -> None:
    text = (DOCS / "cli.md").read_text()
    assert cmd.help and len(cmd.help.strip()) > 10, f"{name} has no help text"
    assert f"tessera {name}" in text, f"docs/cli.md does not document `tessera {name}`"
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts} has no help"
            assert any(o in text for o in param.opts), f"docs/cli.md lacks {name} {param.opts[0]}"


def test_no_layering_violations() -> None:
    """lib/ never imports the FUSE binding or watchdog; only remote/s3.py imports boto3."""
    import ast

    lib = DOCS.parent / "lib"
    for path in lib.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                assert top not in ("mfusepy", "fuse", "watchdog"), f"{path} imports {n}"
                assert not n.startswith("tessera.fuse") and not n.startswith("tessera.daemon") or \
                    path.parent.name == "cli", f"{path} imports {n}"
                if top in ("boto3", "botocore"):
                    assert path.name == "s3.py", f"{path} imports {n}"
