"""`tessera.lock`: the file format, `use` / `update` / `lock check`, and every reader resolving a bare
NAME through it — `Repo.get`, `tessera://NAME/...`, `tessera mount` (real FUSE) and `tessera run
--input NAME:MNT` — with a pin on a moto S3 remote, and the one-line errors."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from readers_data import make_home, push, remote_only_home
from tessera.lockfile import LOCK_NAME, Pin, load, pins

HASH_A = "a" * 64


def tessera_cli(home: Path, cwd: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "TESSERA_LOCK"}
    full.update({"TESSERA_HOME": str(home), **(env or {})})
    return subprocess.run(["tessera", *args], capture_output=True, text=True, cwd=cwd, env=full,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    # informational lines may come first: lock notes, and (after issue 9) "tessera: NAME is not in this home; asking ..."
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(("note: ", "tessera: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory (its tessera.lock lives here), with a subdirectory to run commands from."""
    monkeypatch.delenv("TESSERA_LOCK", raising=False)
    proj = tmp_path / "project"
    (proj / "src" / "deep").mkdir(parents=True)
    monkeypatch.chdir(proj / "src" / "deep")  # the lock file is found walking up
    return proj


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "labels.csv").write_text("a,b\n")
    (d / "keep.txt").write_text("same\n")
    return d


def commit(home: Path, name: str, src: Path) -> str:
    import tessera

    with tessera.Repo(home) as repo:
        return repo.commit(name, src).hash


def test_format_round_trip_and_pins(tmp_path: Path) -> None:
    from tessera.lockfile import LockFile

    lock = LockFile(tmp_path / LOCK_NAME, {"coco": Pin("coco", HASH_A, "s3://b/p"), "my.data": Pin("my.data", "b" * 64)})
    lock.save()
    text = lock.path.read_text()
    assert '[datasets."my.data"]' in text and 'remote = "s3://b/p"' in text
    assert load(lock.path).pins == lock.pins
    assert pins(lock.path) == [lock.pins["coco"], lock.pins["my.data"]]


@pytest.mark.parametrize("text,line,needle", [
    ('version = 1\n[datasets.coco\nhash = "x"\n', 2, "not valid TOML"),
    ('version = 1\n\n[datasets.coco]\nhash = "abc"\n', 4, "full version hash"),
    (f'version = 1\n[datasets.coco]\nhash = "{HASH_A}"\nremote = "nowhere"\n', 4, "must be a URL"),
    (f'version = 1\n[datasets.coco]\nhash = "{HASH_A}"\ncolour = "red"\n', 4, "unknown key 'colour'"),
    (f'version = 1\n[datasets."bad name"]\nhash = "{HASH_A}"\n', 2, "bad dataset name"),
    ('version = 7\n', 1, "format 7"),
    ('flavour = 1\n', 1, "unknown key 'flavour'"),
])
def test_malformed_lock_names_the_line(tmp_path: Path, text: str, line: int, needle: str) -> None:
    from tessera.errors import ConfigError

    path = tmp_path / LOCK_NAME
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and needle in str(info.value), str(info.value)


@pytest.mark.fuse
def test_lock_round_trip(home: Path, project: Path, data: Path, tmp_path: Path) -> None:
    """use -> upstream commits -> update shows the diff -> mount --lock and tessera:// see the new
    bytes; the lock file reverted -> they see the old ones again."""
    import fsspec

    import tessera
    from fuse_probe import fuse_unavailable_reason

    cwd = Path.cwd()
    old = commit(home, "coco", data)
    p = tessera_cli(home, cwd, "use", "coco")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"coco: pinned coco@{old}"
    lock_path = project / LOCK_NAME  # `use` found no lock file above and created one here?
    created = cwd / LOCK_NAME
    assert created.exists() and not lock_path.exists()
    created.rename(lock_path)  # a project keeps it at its root; commands below run in src/deep
    assert load(lock_path).pins["coco"] == Pin("coco", old)
    v1_text = lock_path.read_text()

    (data / "labels.csv").write_text("a,b\nc,d\n")
    (data / "new.txt").write_text("new\n")
    new = commit(home, "coco", data)
    p = tessera_cli(home, cwd, "ls", "coco")
    assert p.stdout.split() == ["keep.txt", "labels.csv"] and "pinned by" in p.stderr  # still the pin
    p = tessera_cli(home, cwd, "update")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"coco: {old[:12]} -> {new[:12]}: 1 added, 0 removed, 1 modified",
                                     "  M labels.csv", "  + new.txt"]
    assert load(lock_path).pins["coco"].hash == new
    assert tessera_cli(home, cwd, "update", "coco").stdout.strip() == f"coco: already at {new[:12]}"

    def seen() -> tuple[bytes, bytes, str]:
        fs = fsspec.filesystem("tessera", home=str(home), skip_instance_cache=True)
        with tessera.Repo(home) as repo:
            via_get = repo.get("coco").read_bytes("labels.csv")
        return fs.cat("tessera://coco/labels.csv"), via_get, _mounted_labels(home, cwd, tmp_path)

    if fuse_unavailable_reason() is not None:
        pytest.skip(f"FUSE unavailable: {fuse_unavailable_reason()}")
    assert seen() == (b"a,b\nc,d\n", b"a,b\nc,d\n", "a,b\nc,d\n")
    lock_path.write_text(v1_text)  # git checkout tessera.lock
    assert seen() == (b"a,b\n", b"a,b\n", "a,b\n")
    with tessera.Repo(home) as repo:
        assert repo.get("coco", lock=False).hash == new
        assert repo.get(f"coco@{new[:8]}").hash == new  # explicit refs ignore the lock


def _mounted_labels(home: Path, cwd: Path, tmp_path: Path) -> str:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    p = tessera_cli(home, cwd, "mount", "--lock", "coco", str(mnt))
    assert p.returncode == 0, p.stderr
    try:
        assert "pinned by" in p.stderr and "coco@" in p.stdout
        return (mnt / "labels.csv").read_text()
    finally:
        assert tessera_cli(home, cwd, "umount", str(mnt)).returncode == 0


@pytest.mark.fuse
def test_run_input_resolves_through_the_lock(home: Path, project: Path, data: Path, tmp_path: Path) -> None:
    from fuse_probe import fuse_unavailable_reason

    if fuse_unavailable_reason() is not None:
        pytest.skip(f"FUSE unavailable: {fuse_unavailable_reason()}")
    cwd = Path.cwd()
    old = commit(home, "coco", data)
    assert tessera_cli(home, cwd, "use", "coco", "--lock-file", str(project / LOCK_NAME)).returncode == 0
    (data / "labels.csv").write_text("changed\n")
    commit(home, "coco", data)
    mnt = tmp_path / "in"
    out = tmp_path / "seen.txt"
    p = tessera_cli(home, cwd, "run", "--input", f"coco:{mnt}", "--", "sh", "-c", f"cat {mnt}/labels.csv > {out}")
    assert p.returncode == 0, p.stderr
    assert out.read_text() == "a,b\n"
    assert f"coco: using coco@{old[:12]} pinned by {project / LOCK_NAME}" in p.stderr


@pytest.mark.s3
def test_pins_on_a_remote(home: Path, project: Path, data: Path, tmp_path: Path, s3_bucket: str) -> None:
    """A pin records its remote; on a fresh machine (home with no remote configured) `lock check`,
    `Repo.get` and `tessera://` fetch it from there; a pin nobody has fails in one line."""
    import fsspec

    import tessera

    cwd = Path.cwd()
    v = commit(home, "coco", data)
    push(home, f"coco@{v}", s3_bucket)
    p = tessera_cli(home, cwd, "use", "coco", "--remote", s3_bucket, "--lock-file", str(project / LOCK_NAME))
    assert p.returncode == 0, p.stderr
    assert load(project / LOCK_NAME).pins["coco"] == Pin("coco", v, s3_bucket)

    fresh = tmp_path / "fresh"  # no remote configured: the lock file says where
    p = tessera_cli(fresh, cwd, "lock", "check")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"ok  coco@{v}  ({s3_bucket})"
    with tessera.Repo(tmp_path / "fresh2") as repo:
        assert repo.get("coco").read_bytes("labels.csv") == b"a,b\n"
    fs = fsspec.filesystem("tessera", home=str(tmp_path / "fresh3"), skip_instance_cache=True)
    assert fs.cat("tessera://coco/keep.txt") == b"same\n"

    (data / "keep.txt").write_text("upstream changed it\n")  # upstream commits and pushes a new version
    v2 = commit(home, "coco", data)
    push(home, f"coco@{v2}", s3_bucket)
    p = tessera_cli(fresh, cwd, "update")  # the fresh home learns it from the pin's remote
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"coco: {v[:12]} -> {v2[:12]}: 0 added, 0 removed, 1 modified", "  M keep.txt"]
    assert load(project / LOCK_NAME).pins["coco"] == Pin("coco", v2, s3_bucket)

    lock = load(project / LOCK_NAME)
    lock.pins["ghost"] = Pin("ghost", HASH_A, s3_bucket)
    lock.save()
    p = tessera_cli(fresh, cwd, "lock", "check")
    assert f"missing  ghost@{HASH_A}" in p.stdout
    one_line_error(p, 3, "1 of 2 pins", "ghost")
    p = tessera_cli(fresh, cwd, "cat", "ghost", "x")
    one_line_error(p, 3, f"ghost@{HASH_A[:12]}", "pinned by", "neither", s3_bucket)
    with pytest.raises(FileNotFoundError, match="neither"):
        fsspec.filesystem("tessera", home=str(fresh), skip_instance_cache=True).cat("tessera://ghost/x")


def test_bad_input_is_one_line(home: Path, project: Path, data: Path) -> None:
    cwd = Path.cwd()
    commit(home, "coco", data)
    one_line_error(tessera_cli(home, cwd, "lock", "check"), 3, "no tessera.lock")
    one_line_error(tessera_cli(home, cwd, "update"), 3, "no lock file")
    one_line_error(tessera_cli(home, cwd, "mount", "--lock", "coco", str(project / "m")), 3, "no tessera.lock")
    one_line_error(tessera_cli(home, cwd, "use", "nosuch"), 3, "unknown dataset 'nosuch'")
    one_line_error(tessera_cli(home, cwd, "use", "coco@zz"), 2, "bad ref")
    assert not (cwd / LOCK_NAME).exists()  # nothing partial
    (project / LOCK_NAME).write_text('version = 1\n[datasets.coco]\nhash = "nothex"\n')
    for args in (("ls", "coco"), ("lock", "check"), ("update",), ("use", "coco")):
        one_line_error(tessera_cli(home, cwd, *args), 2, f"{project / LOCK_NAME}:3:", "full version hash")
    assert "nothex" in (project / LOCK_NAME).read_text()  # a failed `use` did not rewrite it
    (project / LOCK_NAME).write_text(f'version = 1\n[datasets.coco]\nhash = "{HASH_A}"\n')
    one_line_error(tessera_cli(home, cwd, "ls", "coco"), 3, f"coco@{HASH_A[:12]}", "no remote is configured")
    one_line_error(tessera_cli(home, cwd, "update", "other"), 3, "does not pin 'other'")
    one_line_error(tessera_cli(home, cwd, "mount", "--lock", "coco@abcdef", str(project / "m")), 2, "--lock takes")
    one_line_error(tessera_cli(home, cwd, "mount", "--lock", "other", str(project / "m")), 3, "does not pin 'other'")
    assert tessera_cli(home, cwd, "ls", "coco", env={"TESSERA_LOCK": "off"}).returncode == 0
    one_line_error(tessera_cli(home, cwd, "ls", "coco", env={"TESSERA_LOCK": str(project / "missing.lock")}),
                   3, "does not exist")


def test_forget_keeps_the_version_the_lock_file_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin is a root: `forget` keeps it and says why; forgetting it by hash is refused with the way out."""
    import tessera
    from tessera.errors import UsageError
    from tessera.lockfile import use
    from tessera.retention import KeepPolicy

    data = tmp_path / "data"
    data.mkdir()
    lock = tmp_path / "proj" / "tessera.lock"
    lock.parent.mkdir()
    monkeypatch.setenv("TESSERA_LOCK", str(lock))
    with tessera.Repo(tmp_path / "home") as repo:
        refs = []
        for i in range(3):
            (data / "x.txt").write_text(f"round {i}\n")
            refs.append(repo.commit("ds", data).ref)
        use(repo, refs[0])
        with pytest.raises(UsageError, match="pinned by .*tessera.lock.*tessera update ds"):
            repo.forget("ds", version=refs[0])
        report = repo.forget("ds", KeepPolicy(last=1))
        kept = {f.hash: f.reasons for f in report.kept}
        assert set(kept) == {refs[0].split("@")[1], refs[2].split("@")[1]}
        assert f"pinned by {lock}" in kept[refs[0].split("@")[1]]
        assert [f.hash for f in report.forgotten] == [refs[1].split("@")[1]]
        assert repo.get(refs[0]).read_text("x.txt") == "round 0\n"
