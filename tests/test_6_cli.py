"""The real `tessera` command: outputs, exit codes, and one-line errors (never a traceback)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from trees import write_random


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def committed(home: Path, tmp_path: Path, cli):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.txt").write_text("beta\n")
    proc = cli("commit", "ds", str(src), "-m", "first", check=True)
    ref = proc.stdout.strip().splitlines()[-1]
    return src, ref


def test_commit_prints_full_ref_last(committed) -> None:
    _, ref = committed
    name, _, h = ref.partition("@")
    assert name == "ds" and len(h) == 64 and all(c in "0123456789abcdef" for c in h)


def test_log_ls_show_cat_diff_tag_json(committed, cli, tmp_path: Path) -> None:
    src, ref = committed
    h = ref.split("@")[1]
    log = json.loads(cli("log", "ds", "--json", check=True).stdout)
    assert log[0]["hash"] == h and log[0]["message"] == "first" and log[0]["files"] == 2
    assert cli("ls", f"ds@{h[:8]}", check=True).stdout.split() == ["a.txt", "sub/"]
    assert cli("ls", "ds", "-R", check=True).stdout.split() == ["a.txt", "sub/", "sub/b.txt"]
    listing = json.loads(cli("ls", "ds", "sub", "--json", check=True).stdout)
    assert listing[0]["path"] == "sub/b.txt" and len(listing[0]["sha256"]) == 64
    assert cli("cat", "ds", "sub/b.txt", check=True).stdout == "beta\n"
    assert "first" in cli("show", ref, check=True).stdout
    (src / "a.txt").write_text("changed\n")
    (src / "c.txt").write_text("new\n")
    ref2 = cli("commit", "ds", str(src), check=True).stdout.strip().splitlines()[-1]
    assert cli("diff", ref, ref2, check=True).stdout.splitlines() == ["M a.txt", "+ c.txt"]
    assert "ds:v1" in cli("tag", ref, "v1", check=True).stdout
    assert json.loads(cli("show", "ds:v1", "--json", check=True).stdout)["hash"] == h
    assert [d["name"] for d in json.loads(cli("datasets", "--json", check=True).stdout)] == ["ds"]


def test_unchanged_commit_reports_existing(committed, cli) -> None:
    src, ref = committed
    proc = cli("commit", "ds", str(src), check=True)
    assert proc.stdout.strip().splitlines()[-1] == ref
    assert "unchanged" in proc.stderr


def test_export_verify_cycle(committed, cli, tmp_path: Path) -> None:
    src, ref = committed
    out = tmp_path / "out"
    cli("export", ref, str(out), check=True)
    ok = cli("verify", ref, str(out))
    assert ok.returncode == 0 and "ok: 2 files" in ok.stdout
    (out / "sub" / "b.txt").write_text("tampered\n")
    bad = cli("verify", ref, str(out))
    assert "modified: sub/b.txt" in bad.stdout
    one_line_error(bad, 1, "1 path differs")
    one_line_error(cli("export", ref, str(out)), 2, "not empty", "--force")
    assert cli("export", ref, str(out), "--force").returncode == 0
    assert cli("verify", ref, str(out)).returncode == 0


def test_error_unknown_dataset(home: Path, cli) -> None:
    cli("init", check=True)  # read commands never create a home (tests/test_3_trust_local.py)
    one_line_error(cli("log", "nope"), 3, "unknown dataset 'nope'")
    one_line_error(cli("ls", "nope@abcdef"), 3, "unknown dataset")


def test_error_unknown_and_ambiguous_prefix(committed, cli, tmp_path: Path) -> None:
    src, ref = committed
    h = ref.split("@")[1]
    missing = "0123456789" if not h.startswith("0123456789") else "fedcba9876"
    one_line_error(cli("ls", f"ds@{missing}"), 3, "has no version")
    # make versions until two share a 6-hex prefix is impractical; share a 1-char prefix via the catalog
    hashes = {h}
    i = 0
    while True:
        (src / "n.txt").write_text(str(i))
        i += 1
        out = cli("commit", "ds", str(src), check=True).stdout.strip().splitlines()[-1].split("@")[1]
        if any(o[:1] == out[:1] for o in hashes):
            break
        hashes.add(out)
    # find_versions matches any prefix; the CLI demands >= 6 chars, so check via the library API
    import tessera
    from tessera.errors import AmbiguousRef
    from tessera.ids import Ref

    with pytest.raises(AmbiguousRef, match="is ambiguous: it matches"):
        tessera.Repo(os.environ["TESSERA_HOME"]).resolve(Ref("ds", prefix=out[:1]))


def test_error_bad_ref_syntax(home: Path, cli) -> None:
    cli("init", check=True)
    one_line_error(cli("ls", "ds@xyz123"), 2, "bad ref")
    one_line_error(cli("ls", "ds@abc"), 2, "6 to 64 hex")
    one_line_error(cli("ls", "bad/name"), 2, "bad ref")
    one_line_error(cli("commit", "bad name", "."), 2, "bad dataset name")


def test_error_missing_or_non_directory(home: Path, cli, tmp_path: Path) -> None:
    one_line_error(cli("commit", "ds", str(tmp_path / "missing")), 2, "no such directory")
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_line_error(cli("commit", "ds", str(f)), 2, "not a directory")


def test_error_bad_meta_json(home: Path, cli, tmp_path: Path) -> None:
    one_line_error(cli("commit", "ds", str(tmp_path), "--meta", "{oops"), 2, "--meta is not valid JSON")
    one_line_error(cli("commit", "ds", str(tmp_path), "--meta", "[1]"), 2, "JSON object")


def as_unprivileged(*args: str) -> list[str]:
    """The command, run without the capabilities that let root read any file (when we are root)."""
    if os.geteuid() != 0:
        return list(args)
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *args]


def test_error_unreadable_file_leaves_no_version(home: Path, cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("ok")
    (src / "secret.txt").write_text("no")
    (src / "secret.txt").chmod(0)
    run = lambda *a: subprocess.run(as_unprivileged("tessera", *a), capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL)
    one_line_error(run("commit", "ds", str(src)), 8, "secret.txt", "Permission denied")
    one_line_error(cli("log", "ds"), 3, "unknown dataset")
    assert cli("fsck").returncode == 0
    (src / "secret.txt").chmod(0o644)
    assert cli("commit", "ds", str(src)).returncode == 0
    assert cli("fsck").returncode == 0


def test_error_unreadable_directory(home: Path, cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "x").write_text("x")
    (src / "locked").chmod(0)
    try:
        proc = subprocess.run(as_unprivileged("tessera", "commit", "ds", str(src)), capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        one_line_error(proc, 8, "cannot read directory", "locked")
    finally:
        (src / "locked").chmod(0o755)


def test_error_catalog_newer_than_code(home: Path, cli, committed) -> None:
    db = sqlite3.connect(home / "catalog.db")
    db.execute("UPDATE settings SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    one_line_error(cli("log", "ds"), 6, "schema version 999", "upgrade tessera")


def test_error_corrupt_pack_names_the_chunk(home: Path, cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "r.bin", 300_000, 1)
    ref = cli("commit", "ds", str(src), check=True).stdout.strip().splitlines()[-1]
    pack = next((home / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    proc = cli("cat", ref, "r.bin")
    one_line_error(proc, 5, "chunk", "fails its hash check")
    fsck = cli("fsck")
    assert fsck.returncode == 5 and "fails its hash check" in fsck.stdout
    one_line_error(cli("export", ref, str(tmp_path / "x")), 5, "fails its hash check")


def test_help_is_fast_and_lists_commands(cli) -> None:
    proc = cli("--help", check=True)
    for cmd in ("commit", "log", "ls", "show", "diff", "cat", "tag", "export", "verify", "fsck"):
        assert cmd in proc.stdout
    # fast = imports nothing heavy (the counter); `make bench` reports the wall time
    out = subprocess.run(["python", "-X", "importtime", "-c", "import tessera.cli"], capture_output=True, text=True)
    for heavy in ("boto3", "torch", "mfusepy", "sqlite_utils", "watchdog"):
        assert f" {heavy}\n" not in out.stderr and f"| {heavy}" not in out.stderr.replace("  ", " "), heavy


def test_a_command_on_a_home_imports_no_dataframe_library(home: Path) -> None:
    """sqlite-utils would import pandas and numpy when installed (half a second of every command);
    tessera hides them from it, and they still import normally afterwards."""
    import tessera

    tessera.Repo(home).close()  # the command opens a real catalog
    code = ("import sys; from tessera.cli import main; sys.argv = ['tessera', 'datasets']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('pandas', 'numpy', 'torch', 'boto3') if m in sys.modules))\n"
            "import sqlite_utils.db, pandas; print(sqlite_utils.db.pd is None, pandas.__name__)")
    out = subprocess.run(["python", "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TESSERA_HOME": str(home)})
    assert out.stdout.splitlines()[-2:] == ["[]", "True pandas"], out.stdout
