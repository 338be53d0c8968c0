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


# -- the README and quickstart shell commands, run verbatim -------------------------------------------

INSTALL = re.compile(r"^(pip|pip3|make)\s")
MOUNTPOINT = re.compile(r"/mnt/([A-Za-z0-9._-]+)")


def shell_lines(md: Path) -> list[str]:
    """Every line of the ```bash blocks: commands, and the comment lines the walk acts on."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
        lines.extend(ln for ln in block.splitlines() if ln.strip())
    return lines


@pytest.mark.fuse
@pytest.mark.s3
@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_shell_commands_run_verbatim(doc: str, tmp_path: Path, s3_env: str, s3_client, monkeypatch) -> None:
    """Each command line of the document's bash blocks runs as written, in order, in a fresh scratch
    directory and home, and must exit 0. Only `/mnt/NAME` is replaced (by a directory under the
    scratch dir); `pip install`/`make` lines are how the reader got tessera and are skipped; a
    `# on another machine` comment switches to a second, empty home; s3://bucket is the moto server."""
    import os
    import subprocess

    from fuse_probe import fuse_unavailable_reason

    why = fuse_unavailable_reason()
    if why is not None:
        pytest.skip(f"FUSE unavailable here: {why}")
    lines = shell_lines(DOCS.parent / doc)
    assert len(lines) > 10
    work = tmp_path / "work"
    (work / "data" / "train").mkdir(parents=True)
    (work / "data" / "labels.csv").write_text("file,label\n")
    (work / "data" / "train" / "x.jpg").write_bytes(os.urandom(50_000))
    (work / "data" / "train" / "y.jpg").write_bytes(os.urandom(70_000))
    try:
        s3_client.create_bucket(Bucket="bucket")
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    env = {**os.environ, "TESSERA_HOME": str(tmp_path / "home")}
    mounts: set[Path] = set()
    ran = 0
    try:
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                if "another machine" in stripped:
                    env["TESSERA_HOME"] = str(tmp_path / "home-other-machine")
                continue
            if INSTALL.match(stripped):
                continue
            cmd = MOUNTPOINT.sub(lambda m: str(tmp_path / f"mnt-{m.group(1)}"), line)
            mounts.update(tmp_path / f"mnt-{m}" for m in MOUNTPOINT.findall(line))
            proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=120)
            assert proc.returncode == 0, f"{doc}: `{line.strip()}` exited {proc.returncode}:\n{proc.stderr}"
            assert "Traceback" not in proc.stderr, proc.stderr
            ran += 1
    finally:
        for mp in mounts:
            subprocess.run(["tessera", "umount", str(mp)], env=env, capture_output=True, stdin=subprocess.DEVNULL)
        for key in [o["Key"] for o in s3_client.list_objects_v2(Bucket="bucket").get("Contents", [])]:
            s3_client.delete_object(Bucket="bucket", Key=key)
        s3_client.delete_bucket(Bucket="bucket")
    assert ran >= 10
