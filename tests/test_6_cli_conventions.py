"""Conventions every command keeps: an example in --help, a short first line, one meaning per short
flag, no pointers to files a pip user lacks, one-line usage errors, --json that parses (every
command that has it, exercised for real: S3 on the moto server, a real FUSE mount), summaries,
empty listings that say so, plurals, completion of datasets and refs."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import click
import pytest

from fuse_probe import fuse_unavailable_reason

NO_JSON = {"cat", "daemon"}  # cat writes file bytes; daemon is a foreground service that only logs


def all_commands() -> list[tuple[str, click.Command]]:
    from tessera.cli import cli

    out: list[tuple[str, click.Command]] = []

    def walk(group: click.Group, prefix: str) -> None:
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert cmd is not None
            full = f"{prefix} {name}".strip()
            out.append((full, cmd))
            if isinstance(cmd, click.Group):
                walk(cmd, full)

    walk(cli, "")
    return out


COMMANDS = all_commands()


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_help_has_an_example(name: str, cmd: click.Command) -> None:
    text = cmd.help or ""
    assert "Examples:" in text, f"`tessera {name} --help` has no Examples: section"
    examples = text.split("Examples:", 1)[1].strip().splitlines()
    assert examples and all(line.strip().startswith("tessera ") for line in examples), examples
    leaf = name.split()[-1]
    assert any(leaf in line for line in examples), f"no example of `tessera {name}`"


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_short_help_is_not_cut(name: str, cmd: click.Command) -> None:
    # an 80-column terminal leaves 80 - 6 - len("checkout") = 66 columns for it
    short = cmd.get_short_help_str(limit=66)
    assert not short.endswith("..."), f"`tessera --help` cuts {name}: {short!r}"


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_names_no_repository_files(name: str, cmd: click.Command) -> None:
    text = (cmd.help or "") + " ".join(p.help or "" for p in cmd.params if isinstance(p, click.Option))
    assert "docs/" not in text and ".md" not in text, f"{name} --help points at a file pip users do not have"


def test_one_meaning_per_short_flag() -> None:
    from tessera.cli import cli

    meaning: dict[str, set[str]] = {}
    for _, cmd in [("", cli), *COMMANDS]:
        for p in cmd.params:
            if isinstance(p, click.Option):
                longs = [o for o in p.opts + p.secondary_opts if o.startswith("--")]
                for o in p.opts + p.secondary_opts:
                    if len(o) == 2 and o.startswith("-"):
                        meaning.setdefault(o, set()).update(longs)
    clashes = {flag: longs for flag, longs in meaning.items() if len(longs) > 1}
    assert not clashes, clashes
    assert meaning["-r"] == {"--remote"} and meaning["-R"] == {"--recursive"}


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "Usage:" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_usage_errors_are_one_line(home: Path, cli) -> None:
    one_line_error(cli("ls"), 2, "tessera ls: missing argument 'REF'", "tessera ls --help")
    one_line_error(cli("commit", "ds", "--bogus"), 2, "no such option", "--bogus")
    one_line_error(cli("nope"), 2, "no such command 'nope'")
    one_line_error(cli("log", "--limit", "many"), 2, "'many' is not a valid integer")
    one_line_error(cli("remote", "add"), 2, "tessera remote add: missing argument")
    one_line_error(cli("help", "nosuchtopic"), 3, "no help topic", "s3")


def test_version_and_bare_command(cli) -> None:
    assert cli("-V", check=True).stdout.startswith("tessera, version ")
    assert cli("--version", check=True).stdout == cli("-V").stdout
    bare = cli(check=True)
    assert "Commands:" in bare.stdout


def test_help_topics_are_installed(cli) -> None:
    listing = cli("help", check=True).stdout
    for topic in ("quickstart", "s3", "cli", "format"):
        assert topic in listing
    assert cli("help", "s3", check=True).stdout.startswith("# Remotes")
    assert "tessera help s3" in " ".join(cli("remote", "--help", check=True).stdout.split())


def test_empty_listings_say_so(home: Path, cli) -> None:
    cli("init", check=True)  # read commands never create a home: make an empty one
    for args, text in ((("datasets",), "no datasets"), (("log",), "no datasets"), (("tags",), "no tags"),
                       (("remote", "list"), "no remotes")):  # (`mounts` lists other homes' mounts too)
        proc = cli(*args, check=True)
        assert proc.stdout == "" and text in proc.stderr, (args, proc.stdout, proc.stderr)


def test_plurals_summaries_and_dropped_message(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "only.txt").write_text("one file\n")
    first = cli("commit", "ds", str(src), "-m", "first", check=True)
    assert "1 file (1 new, 0 changed, 0 unchanged)" in first.stderr and "1 files" not in first.stderr
    assert "B in " in first.stderr  # bytes and time
    assert "\t1 version" in cli("datasets", check=True).stdout
    again = cli("commit", "ds", str(src), "-m", "a message for nothing", check=True)
    assert "unchanged: no new version" in again.stderr and "were not recorded" in again.stderr
    assert json.loads(cli("commit", "ds", str(src), "--meta", '{"a": 1}', "--json", check=True).stdout)[
        "message_dropped"] is True
    (src / "two.txt").write_text("two\n")
    (src / "only.txt").write_text("changed\n")
    second = cli("commit", "ds", str(src), check=True)
    assert "2 files (1 new, 1 changed, 0 unchanged)" in second.stderr
    assert len(cli("log", "ds", check=True).stdout.splitlines()) == 2  # the dropped message made no entry
    assert cli("log", "--oneline", check=True).stdout.splitlines()[1].endswith(" first")


def complete(home: Path, words: str) -> list[str]:
    env = {**os.environ, "TESSERA_HOME": str(home), "_TESSERA_COMPLETE": "bash_complete",
           "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    proc = subprocess.run(["tessera"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return [line.split(",", 1)[1] for line in proc.stdout.splitlines() if line.startswith("plain,")]


def test_completion_of_datasets_refs_and_tags(home: Path, tmp_path: Path, cli) -> None:
    assert complete(tmp_path / "no-home", "tessera ls co") == []
    assert not (tmp_path / "no-home").exists()  # completing never creates a home
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    ref = cli("commit", "coco", str(src), check=True).stdout.strip().splitlines()[-1]
    cli("commit", "other", str(src), check=True)
    cli("tag", ref, "v1", check=True)
    h = ref.split("@")[1]
    assert complete(home, "tessera ls co") == ["coco"]
    assert complete(home, "tessera log ") == ["coco", "other"]
    assert complete(home, f"tessera mount coco@{h[:3]}") == [f"coco@{h[:12]}"]
    assert complete(home, "tessera export coco:") == ["coco:v1"]
    assert "s3" in complete(home, "tessera help s")


# -- every --json parses ----------------------------------------------------------------------------

def json_commands() -> set[str]:
    return {name for name, cmd in COMMANDS
            if any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params)}


def test_json_is_everywhere_it_should_be() -> None:
    lacking = {name for name, cmd in COMMANDS if not isinstance(cmd, click.Group)} - json_commands() - NO_JSON
    assert not lacking, f"commands without --json: {sorted(lacking)}"


@pytest.fixture
def fuse_ok() -> Iterator[bool]:
    yield fuse_unavailable_reason() is None


def test_every_json_output_parses(home: Path, tmp_path: Path, cli, s3_bucket: str, fuse_ok: bool) -> None:
    """Run every command that has --json, for real, and parse what it prints."""
    seen: set[str] = set()

    def j(*args: str, home_dir: Path = home) -> object:
        cut = args.index("--") if "--" in args else len(args)  # options before `run`'s command
        proc = cli(*args[:cut], "--json", *args[cut:], env={"TESSERA_HOME": str(home_dir)})
        assert proc.returncode == 0, (args, proc.stderr)
        words = [a for a in args if not a.startswith("-")]
        name = (" ".join(words[:2]) if words[0] in ("remote", "lock") or (words[0] == "cache" and len(words) > 1)
                else words[0])
        seen.add(name)
        out = proc.stdout
        if words[0] == "run":  # the command's own output comes first
            out = out[out.index("{"):]
        return json.loads(out)

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")
    (src / "sub" / "b.txt").write_text("b\n")
    j("init")
    ref = j("commit", "ds", str(src), "-m", "first")["ref"]  # type: ignore[index]
    j("datasets")
    j("log")
    j("tags")
    j("tag", ref, "v1")
    j("ls", "ds", "-R")
    j("show", "ds:v1")
    (src / "c.txt").write_text("c\n")
    j("diff", ref, str(src))
    j("status", str(src))
    j("status")  # the daemon's
    out = tmp_path / "out"
    j("export", ref, str(out))
    j("checkout", ref, str(out))
    j("restore", ref, str(out), "--delete")
    j("verify", ref, str(out))
    j("fsck")
    scratch = j("commit", "scratch", str(src / "sub"))["ref"]  # type: ignore[index]
    j("du")
    j("du", scratch)
    j("config", "gc.repack_threshold", "30%")
    j("forget", "ds", "--keep-last", "1", "--dry-run")
    j("rm", "scratch", "--yes")
    j("gc")
    j("stats")
    lock = str(tmp_path / "project" / "tessera.lock")
    (tmp_path / "project").mkdir()
    assert j("use", "ds:v1", "--lock-file", lock)["ref"] == ref  # type: ignore[index]
    assert j("update", "--lock-file", lock)[0]["moved"] is False  # type: ignore[index]
    assert j("lock", "list", "--lock-file", lock)[0]["hash"] == ref.split("@")[1]  # type: ignore[index]
    assert j("lock", "check", "--lock-file", lock)[0]["found"] == "local"  # type: ignore[index]
    j("help")
    j("help", "quickstart")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    j("run", "--capture-once", f"{ckpt}:run-1", "--", "sh", "-c", f"echo hi; echo out > {ckpt}/x.txt")
    watched = tmp_path / "watched"
    watched.mkdir()
    j("watch", str(watched), "w")
    j("unwatch", str(watched))
    j("remote", "add", "origin", s3_bucket)
    j("remote", "add", "spare", "file:///" + str(tmp_path / "spare").lstrip("/"))
    j("remote", "default", "origin")
    j("remote", "list")
    j("remote", "remove", "spare")
    j("remote", "cache")
    pushed = j("push", "ds")
    assert pushed["packs"] >= 1 and pushed["packs_already_there"] == 0  # type: ignore[index]
    assert j("push", "ds")["objects"] == 0  # type: ignore[index]
    j("push", "--all")
    j("prune", "-r", "origin", "--dry-run")
    j("datasets", "--remote", "origin")
    other = tmp_path / "home2"
    j("remote", "add", "origin", s3_bucket, home_dir=other)
    pulled = j("pull", "ds", home_dir=other)
    assert pulled["packs"] >= 1  # type: ignore[index]
    assert j("cache", "budget", "1G")["budget"] == 1 << 30  # type: ignore[index]
    assert j("cache")["budget"] == 1 << 30  # type: ignore[index]
    assert j("cache", "evict")["evicted_bytes"] == 0  # type: ignore[index]
    if fuse_ok:
        mp = tmp_path / "mnt"
        rec = j("mount", "ds", str(mp))
        try:
            assert rec["mountpoint"] == str(mp)  # type: ignore[index]
            assert str(mp) in [m["mountpoint"] for m in j("mounts")]  # type: ignore[index,union-attr]
        finally:
            assert j("umount", str(mp))["removed"] is True  # type: ignore[index]
    else:
        seen.update({"mount", "umount", "mounts"})
        pytest.skip(f"FUSE unavailable: {fuse_unavailable_reason()}")
    assert json_commands() - seen == set(), sorted(json_commands() - seen)
