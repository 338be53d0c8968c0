"""Layer 6: `tessera run` — periodic and final captures, lineage metadata, exit codes, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tessera
from conftest import wait_until  # noqa: E402
from fuse_probe import fuse_unavailable_reason  # noqa: E402

WRITE_CHECKPOINTS = textwrap.dedent("""
    import os, sys, time
    os.makedirs("ckpt", exist_ok=True)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    for step in range(steps):
        with open(f"ckpt/step_{step:03d}.pt", "wb") as f:
            f.write(os.urandom(20_000))
        with open("ckpt/latest", "w") as f:
            f.write(str(step))
        time.sleep(0.5)
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
""")


def run_tessera(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tessera", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    (w / "write_checkpoints.py").write_text(WRITE_CHECKPOINTS)
    return w


def git_init(path: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q", str(path)], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "add", "write_checkpoints.py"], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", "init"], check=True, env=env)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_run_captures_periodically_and_at_exit(home: Path, work: Path, tmp_path: Path, cli) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "labels.csv").write_text("a,b\n1,2\n")
    base_ref = cli("commit", "base", str(base), check=True).stdout.strip()
    head = git_init(work)
    p = run_tessera(["run", "--capture", "ckpt:exp", "--every", "2", "--input", "base",
                     "--", sys.executable, "write_checkpoints.py", "10"], work)
    assert p.returncode == 0, p.stderr
    with tessera.Repo(home) as repo:
        log = list(reversed(repo.log("exp")))
        assert len(log) >= 3, [e.message for e in log]  # at least two periodic ones and the final one
        periodic, final = log[:-1], log[-1]
        for e in periodic:
            cap = e.meta["capture"]
            assert cap["exit_code"] is None and cap["final"] is False and cap["end"] is None
        cap = final.meta["capture"]
        assert cap["command"] == [sys.executable, "write_checkpoints.py", "10"]
        assert cap["exit_code"] == 0 and cap["final"] is True
        assert cap["inputs"] == [base_ref] and len(base_ref.split("@")[1]) == 64
        assert cap["git"] == head and cap["git_dirty"] is False
        assert cap["start"] < cap["end"] and cap["cwd"] == str(work)
        assert len({e.meta["capture"]["run_id"] for e in log}) == 1
        assert final.files == 11  # 10 checkpoints + latest
        assert repo.get("exp").read_text("latest") == "9"
        # periodic versions grow: each is a state the run went through
        assert [e.files for e in log] == sorted(e.files for e in log)
    shown = cli("show", "exp", check=True).stdout
    assert "lineage" in shown and "exit code 0" in shown and base_ref in shown and head in shown
    assert "[captured]" in cli("log", "exp", check=True).stdout
    assert cli("fsck", check=True).returncode == 0


def test_run_exit_code_and_capture_once(home: Path, work: Path) -> None:
    p = run_tessera(["run", "--capture-once", "ckpt:once", "--every", "0.5", "--",
                     sys.executable, "write_checkpoints.py", "3"], work, env={"EXIT_CODE": "3"})
    assert p.returncode == 3, p.stderr
    with tessera.Repo(home) as repo:
        [only] = repo.log("once")
        assert only.meta["capture"]["exit_code"] == 3 and only.files == 4
        assert "exit 3" in only.message
    # killed by a signal: 128 + N, like a shell
    p = run_tessera(["run", "--capture-once", "ckpt:once", "--", "sh", "-c", "kill -TERM $$"], work)
    assert p.returncode == 128 + 15
    with tessera.Repo(home) as repo:
        head = repo.log("once")[0]
        assert head.meta["capture"]["exit_code"] == 143 and head.hash == only.hash  # same content, new lineage


def test_unchanged_final_snapshot_amends_the_last_periodic_one(home: Path, work: Path) -> None:
    script = work / "quick_then_wait.py"
    script.write_text("import os, time\nos.makedirs('out', exist_ok=True)\n"
                      "open('out/model.bin', 'wb').write(b'weights' * 1000)\ntime.sleep(2.5)\n")
    p = run_tessera(["run", "--capture", "out:m", "--every", "1", "--", sys.executable, script.name], work)
    assert p.returncode == 0, p.stderr
    with tessera.Repo(home) as repo:
        log = repo.log("m")
        assert len(log) == 1, [e.message for e in log]  # one content, one history row
        cap = log[0].meta["capture"]
        assert cap["final"] is True and cap["exit_code"] == 0 and cap["end"] is not None


def test_sigterm_to_run_reaches_the_command_and_still_captures(home: Path, work: Path) -> None:
    script = work / "forever.py"
    script.write_text("import os, time\nos.makedirs('out', exist_ok=True)\n"
                      "open('out/a.txt', 'w').write('partial results')\ntime.sleep(60)\n")
    proc = subprocess.Popen(["tessera", "run", "--capture", "out:t", "--", sys.executable, script.name], cwd=work,
                            stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: (work / "out" / "a.txt").exists(), 10)
    time.sleep(0.3)
    proc.terminate()
    assert proc.wait(timeout=20) == 128 + 15
    with tessera.Repo(home) as repo:
        v = repo.get("t")
        assert v.read_text("a.txt") == "partial results" and v.info.meta["capture"]["exit_code"] == 143




def test_run_bad_input_is_one_line(home: Path, work: Path, cli) -> None:
    cases = [
        (["run", "--capture", "nocolon", "--", "true"], "expected DIR:NAME"),
        (["run", "--capture", "ckpt:bad name", "--", "true"], "bad dataset name"),
        (["run", "--capture", f"{home}:x", "--", "true"], "tessera home"),
        (["run", "--capture", "a:x", "--capture", "b:x", "--", "true"], "two captures"),
        (["run", "--capture", "ckpt:x", "--every", "0", "--", "true"], "--every"),
        (["run", "--input", "nosuch", "--", "true"], "unknown dataset 'nosuch'"),
        (["run", "--input", "x@zz:/mnt", "--", "true"], "bad ref"),
        (["run", "--", "no-such-command-xyz"], "command not found"),
    ]
    for args, fragment in cases:
        p = run_tessera(args, work)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and fragment in lines[0], (args, p.stderr)
    (work / "afile").write_text("x")
    p = run_tessera(["run", "--capture", "afile:x", "--", "true"], work)
    assert p.returncode != 0 and "not a directory" in p.stderr




@pytest.mark.fuse
def test_run_mounts_inputs_read_only(home: Path, work: Path, tmp_path: Path, cli) -> None:
    why = fuse_unavailable_reason()
    if why is not None:
        pytest.skip(f"FUSE unavailable here: {why}")
    base = tmp_path / "base"
    base.mkdir()
    (base / "x.txt").write_text("input bytes")
    ref = cli("commit", "base", str(base), check=True).stdout.strip()
    mnt = tmp_path / "mnt"
    script = work / "use_input.py"
    script.write_text(f"import os\nos.makedirs('out', exist_ok=True)\n"
                      f"data = open({str(mnt / 'x.txt')!r}).read()\n"
                      f"open('out/copy.txt', 'w').write(data)\n")
    p = run_tessera(["run", "--input", f"base:{mnt}", "--capture-once", "out:derived", "--",
                     sys.executable, script.name], work)
    assert p.returncode == 0, p.stderr
    with tessera.Repo(home) as repo:
        v = repo.get("derived")
        assert v.read_text("copy.txt") == "input bytes"
        assert v.info.meta["capture"]["inputs"] == [ref]
        assert v.info.meta["capture"]["mounts"] == {ref: str(mnt)}
    assert not os.path.ismount(mnt)
