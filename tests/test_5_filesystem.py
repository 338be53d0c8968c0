"""`tessera://` (tessera.filesystem): the fsspec API on a local home and on a home that only knows an
S3 remote (moto; requests counted by the fault proxy), fork and pickling, errors, and the docs'
pandas / pyarrow / polars / DuckDB / HF datasets recipes run against both kinds of home."""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from readers_data import big_file, make_home, push, remote_only_home, sha256, write_table_dir
from tessera.filesystem import BadURL, ReadOnlyError, TesseraFileSystem

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(autouse=True)
def _fresh_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    TesseraFileSystem.clear_instance_cache()
    monkeypatch.setenv("TESSERA_LOCK", "off")  # no stray tessera.lock above the test's cwd


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "train" / "cats").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "train" / "cats" / "a.bin").write_bytes(b"cat-a" * 1000)
    (src / "train" / "dog.bin").write_bytes(b"woof")
    (src / "notes.txt").write_text("line one\nline two\nline three\n")
    os.symlink("train/dog.bin", src / "dog-link")
    os.symlink("../outside", src / "escape")
    big_file(src / "big.bin", 3 << 20)
    return src


@pytest.fixture
def local(home: Path, tree: Path) -> tuple[TesseraFileSystem, str]:
    import tessera

    with tessera.Repo(home) as repo:
        v = repo.commit("ds", tree, meta_for=lambda rel: {"label": 1} if rel == "train/dog.bin" else None)
    return fsspec.filesystem("tessera", home=str(home)), v.ref


def test_registered_through_the_entry_point(home: Path) -> None:
    code = ("import fsspec, sys; fs = fsspec.filesystem('tessera'); "
            "print(type(fs).__module__, fs.ls('', detail=False)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["tessera.filesystem []", "False"]


def test_browse(local: tuple[TesseraFileSystem, str], tree: Path) -> None:
    fs, ref = local
    assert fs.ls("", detail=False) == ["ds"]
    assert fs.ls("tessera://ds", detail=False) == ["ds/big.bin", "ds/dog-link", "ds/empty", "ds/escape",
                                                   "ds/notes.txt", "ds/train"]
    by_name = {i["name"]: i for i in fs.ls("ds/train")}
    assert by_name["ds/train/cats"]["type"] == "directory"
    dog = by_name["ds/train/dog.bin"]
    assert (dog["type"], dog["size"], dog["sha256"], dog["meta"]) == ("file", 4, sha256(b"woof"), {"label": 1})
    assert dog["version"] == ref
    assert fs.info("ds/dog-link")["islink"] and fs.info("ds/dog-link")["destination"] == "train/dog.bin"
    assert fs.ls("ds/notes.txt", detail=False) == ["ds/notes.txt"]
    assert fs.isdir("ds/empty") and fs.isfile("ds/notes.txt") and not fs.exists("ds/nope")
    assert fs.info("ds")["type"] == "directory" and fs.info("")["type"] == "directory"
    files = ["ds/big.bin", "ds/dog-link", "ds/escape", "ds/notes.txt", "ds/train/cats/a.bin", "ds/train/dog.bin"]
    assert fs.find("tessera://ds") == files
    assert fs.find("ds/train", maxdepth=1) == ["ds/train/dog.bin"]
    assert "ds/train/cats" in fs.find("ds", withdirs=True)
    assert fs.glob("tessera://ds/**/*.bin") == ["ds/big.bin", "ds/train/cats/a.bin", "ds/train/dog.bin"]
    assert fs.glob("ds/train/*") == ["ds/train/cats", "ds/train/dog.bin"]
    walked = {root: (sorted(dirs), sorted(names)) for root, dirs, names in fs.walk("ds/train")}
    assert walked == {"ds/train": (["cats"], ["dog.bin"]), "ds/train/cats": ([], ["a.bin"])}
    assert fs.du("ds/train") == 5004
    # other spellings of the same version
    short = ref.split("@")[1][:8]
    assert fs.ls(f"ds@{short}/train/cats", detail=False) == [f"ds@{short}/train/cats/a.bin"]


def test_read(local: tuple[TesseraFileSystem, str], tree: Path) -> None:
    fs, _ = local
    big = (tree / "big.bin").read_bytes()
    assert fs.cat("tessera://ds/big.bin") == big
    for start, end in ((0, 10), (1 << 20, (1 << 20) + 5), (-100, None), (None, -3), (5, 5), (len(big) - 1, 10 ** 9)):
        assert fs.cat_file("ds/big.bin", start, end) == big[start:end], (start, end)
    assert fs.cat_file("ds/dog-link") == b"woof"  # symlinks inside the version are followed
    assert fs.ukey("ds/big.bin") == hashlib.sha256(big).hexdigest() == fs.info("ds/big.bin")["sha256"]
    assert fs.checksum("ds/big.bin") == int(hashlib.sha256(big).hexdigest(), 16)
    assert fs.ukey("ds/train") != fs.ukey("ds")
    with fs.open("ds/big.bin") as f:
        assert f.seekable() and f.size == len(big)
        f.seek(2_000_000)
        assert f.read(70_000) == big[2_000_000:2_070_000]
        f.seek(-10, 2)
        assert f.read() == big[-10:]
        f.seek(0)
        assert f.read() == big
    with fsspec.open("tessera://ds/notes.txt", "r", home=fs.home) as f:
        assert f.readlines() == ["line one\n", "line two\n", "line three\n"]
    assert fs.modified("ds/notes.txt").tzinfo is not None


def test_bare_name_is_resolved_once_per_instance(local: tuple[TesseraFileSystem, str], tree: Path,
                                                 home: Path) -> None:
    import tessera

    fs, ref = local
    assert fs.cat("ds/train/dog.bin") == b"woof"
    (tree / "train" / "dog.bin").write_bytes(b"WOOF v2")
    with tessera.Repo(home) as repo:
        v2 = repo.commit("ds", tree)
    assert v2.ref != ref
    assert fs.cat("ds/train/dog.bin") == b"woof"  # same instance: the version it resolved first
    assert fsspec.filesystem("tessera", home=str(home), skip_instance_cache=True).cat("ds/train/dog.bin") == b"WOOF v2"
    fs.invalidate_cache()
    assert fs.cat("ds/train/dog.bin") == b"WOOF v2"
    assert fs.cat(f"{ref}/train/dog.bin") == b"woof"


def test_resolution_travels_with_a_pickled_filesystem(local: tuple[TesseraFileSystem, str], tree: Path,
                                                      home: Path, tmp_path: Path) -> None:
    """A spawned worker given the pickled filesystem reads the version its parent resolved."""
    import tessera

    fs, _ = local
    assert fs.cat("ds/train/dog.bin") == b"woof"
    (tree / "train" / "dog.bin").write_bytes(b"newer")
    with tessera.Repo(home) as repo:
        repo.commit("ds", tree)
    blob = tmp_path / "fs.pickle"
    blob.write_bytes(pickle.dumps(fs))
    code = f"import pickle; fs = pickle.load(open({str(blob)!r}, 'rb')); print(fs.cat('ds/train/dog.bin'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TESSERA_HOME": "/nonexistent-not-used"}).stdout
    assert out.strip() == "b'woof'"


def test_a_pickled_filesystem_names_its_home_and_its_resolutions_win(local: tuple[TesseraFileSystem, str],
                                                                      tree: Path, home: Path) -> None:
    """A worker started apart (Ray, Dask, spawn) has its own $TESSERA_HOME: the pickle names the home. A
    worker's cached instance that resolved the REF otherwise (before a commit) does not win over it."""
    import tessera

    fs, _ = local
    default = fsspec.filesystem("tessera")  # home: $TESSERA_HOME (the `home` fixture)
    assert default.cat("ds/train/dog.bin") == b"woof"
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).cat('ds/train/dog.bin'))"
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(default), capture_output=True, check=True,
                         env={**os.environ, "TESSERA_HOME": "/nonexistent-not-used"}).stdout
    assert out.strip() == b"b'woof'"
    assert fs.cat("ds/train/dog.bin") == b"woof"  # fs (this process's cached instance) resolved ds
    (tree / "train" / "dog.bin").write_bytes(b"WOOF v2")
    with tessera.Repo(home) as repo:
        repo.commit("ds", tree)
    newer = fsspec.filesystem("tessera", home=str(home), skip_instance_cache=True)
    assert newer.cat("ds/train/dog.bin") == b"WOOF v2"
    back = pickle.loads(pickle.dumps(newer))
    assert back is not fs and back.cat("ds/train/dog.bin") == b"WOOF v2"
    again = pickle.loads(pickle.dumps(fs))
    assert again is fs and again.cat("ds/train/dog.bin") == b"woof"  # agreeing resolutions share it


def test_fork_reopens_the_repository(local: tuple[TesseraFileSystem, str], tree: Path) -> None:
    fs, _ = local
    big = (tree / "big.bin").read_bytes()
    f = fs.open("ds/big.bin")
    assert f.read(10) == big[:10]
    parent_repo = fs.repo()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the inherited filesystem and open file must work on their own connection
        ok = False
        try:
            ok = fs.repo() is not parent_repo and f.read(1000) == big[10:1010] \
                and fs.cat_file("ds/big.bin", 3 << 19, (3 << 19) + 100) == big[3 << 19:(3 << 19) + 100]
        finally:
            os.write(wfd, b"1" if ok else b"0")
            os._exit(0)
    os.close(wfd)
    assert os.read(rfd, 1) == b"1"
    os.close(rfd)
    os.waitpid(pid, 0)
    assert fs.repo() is parent_repo and f.read(10) == big[10:20]
    f.close()


def test_bad_input(local: tuple[TesseraFileSystem, str], home: Path) -> None:
    fs, _ = local
    with pytest.raises(FileNotFoundError):
        fs.cat("ds/nope.txt")
    with pytest.raises(FileNotFoundError, match="unknown dataset"):
        fs.ls("nosuch/x")
    with pytest.raises(FileNotFoundError):
        fs.info("ds/notes.txt/below")
    with pytest.raises(FileNotFoundError, match="outside the version"):
        fs.cat("ds/escape")
    with pytest.raises(IsADirectoryError):
        fs.open("ds/train")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("ds/train")
    for bad in ("ds@zz/x", "ds@0123/x", "-bad/x", "ds:/x", "ds/../../etc/passwd"):
        with pytest.raises(ValueError) as info:
            fs.ls(bad)
        assert isinstance(info.value, BadURL), bad
    with pytest.raises(ValueError, match="not a tessera URL"):
        fs.cat("s3://bucket/key")
    with pytest.raises(ValueError, match="[Pp]rotocol not known"):
        fsspec.open("tesera://ds/notes.txt").open()
    for write in (lambda: fs.open("ds/new.txt", "wb"), lambda: fs.pipe("ds/new.txt", b"x"),
                  lambda: fs.mkdir("ds/d"), lambda: fs.makedirs("ds/d"), lambda: fs.rm("ds/notes.txt"),
                  lambda: fs.touch("ds/notes.txt"), lambda: fs.put(str(home / "catalog.db"), "ds/x"),
                  lambda: fs.mv("ds/notes.txt", "ds/n2.txt"), lambda: fs.copy("ds/notes.txt", "ds/n2.txt"),
                  lambda: fsspec.open("tessera://ds/notes.txt", "w", home=fs.home).open()):
        with pytest.raises(ReadOnlyError) as info:
            write()
        assert isinstance(info.value, NotImplementedError) and isinstance(info.value, PermissionError)
        assert info.value.errno == errno.EROFS
    assert fs.cat("ds/notes.txt").startswith(b"line one")  # nothing changed


# -- remote-only homes (moto S3) ------------------------------------------------------------------------

def _slice_sha(path: Path, lo: int = 0, n: int | None = None) -> str:
    """SHA-256 of ``n`` bytes of ``path`` from ``lo`` (to the end when None), read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(lo)
        left = n if n is not None else path.stat().st_size - lo
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


class MotoProcess:
    """A moto server in its own process, for the big-file tests: 100 MiB stored by the in-process server
    (or relayed by the in-process fault proxy) would stay in the pytest process's RSS, which every later
    child's ru_maxrss inherits on Linux, and other tests measure their children's peak RSS. GET requests
    are counted from its request log."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(400):
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.05)

    def gets(self, bucket: str, prefix: str = "") -> int:
        """GETs of keys under ``prefix`` of the bucket (``repo/packs/``: data) so far."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if f"GET /{bucket}/{prefix}" in line)  # 206s are colour-coded: no quote check

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()


@pytest.fixture(scope="module")
def moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoProcess]:
    server = MotoProcess(tmp_path_factory.mktemp("moto") / "requests.log")
    yield server
    server.stop()


@pytest.fixture
def big_bucket(moto_process: MotoProcess, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """(s3 URL of a fresh bucket on the out-of-process moto, a function counting its GETs of data packs so
    far: the metadata a fresh reader fetches as it walks is counted in tests/test_4_remote_formats.py)."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_process.url)
    bucket = f"big-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=moto_process.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/repo", lambda: moto_process.gets(bucket, "repo/packs/")


def _publish_big(tmp_path: Path, size: int, url: str) -> tuple[Path, str]:
    """Commit and push a big random file with the CLI: its memory stays out of this (pytest) process,
    whose size every later child's ru_maxrss inherits (other tests measure that)."""
    src = big_file(tmp_path / "src" / "big.bin", size).parent
    home = make_home(tmp_path / "origin")
    env = {**os.environ, "TESSERA_HOME": str(home)}
    ref = subprocess.run(["tessera", "commit", "big", str(src)], capture_output=True, text=True, env=env,
                         check=True, stdin=subprocess.DEVNULL).stdout.split()[-1]
    subprocess.run(["tessera", "push", ref, "-r", url], capture_output=True, env=env, check=True,
                   stdin=subprocess.DEVNULL)
    return src / "big.bin", ref


def _read_in_child(home: Path, url: str, code: str) -> str:
    """Run fsspec reads in a fresh interpreter (``fs`` is the filesystem); returns what it prints."""
    prelude = (f"import fsspec, hashlib\nfs = fsspec.filesystem('tessera', home={str(home)!r}, remote={url!r})\n"
               "sha = lambda b: hashlib.sha256(b).hexdigest()\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL).stdout.strip()


@pytest.mark.s3
def test_range_of_a_big_remote_file_fetches_a_few_chunks(tmp_path: Path, big_bucket: tuple[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    s3_bucket, count_gets = big_bucket
    path, _ = _publish_big(tmp_path, 100 << 20, s3_bucket)
    reader = tmp_path / "reader"
    info = _read_in_child(reader, s3_bucket, "i = fs.info('big/big.bin'); print(i['size'], i['sha256'])")
    assert info.split() == [str(100 << 20), _slice_sha(path)]  # (fetched the version's metadata)
    gets = count_gets()
    lo = 37 << 20
    out = _read_in_child(reader, s3_bucket, f"print(sha(fs.cat_file('big/big.bin', {lo}, {lo + (1 << 20)})))")
    assert out == _slice_sha(path, lo, 1 << 20)
    range_gets = count_gets() - gets
    assert 1 <= range_gets <= 3, range_gets
    code = "f = fs.open('big/big.bin'); f.seek(71 << 20); print(sha(f.read(1 << 20)))"  # the same through open()
    assert _read_in_child(reader, s3_bucket, code) == _slice_sha(path, 71 << 20, 1 << 20)
    assert count_gets() - gets - range_gets <= 3
    cached = sum(p.stat().st_size for p in reader.rglob("*") if p.is_file() and "cache" in p.parts)
    assert cached < 8 << 20  # only what was read, not the file (over 400 chunks of ~256 KiB)


@pytest.mark.s3
def test_sequential_remote_read_is_streamed(tmp_path: Path, big_bucket: tuple[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    s3_bucket, count_gets = big_bucket
    path, _ = _publish_big(tmp_path, 24 << 20, s3_bucket)
    reader = tmp_path / "reader"
    _read_in_child(reader, s3_bucket, "fs.info('big/big.bin')")
    gets = count_gets()
    code = ("h = hashlib.sha256()\nwith fs.open('big/big.bin', block_size=1 << 20) as f:\n"
            "    for block in iter(lambda: f.read(1 << 20), b''):\n        h.update(block)\nprint(h.hexdigest())")
    assert _read_in_child(reader, s3_bucket, code) == _slice_sha(path)
    reads = count_gets() - gets
    # read-ahead: a ranged GET, then one stream (2 here; a stream its reader left idle for a second on
    # a loaded machine is reopened), never a GET per chunk (~96 chunks of ~256 KiB)
    assert reads <= 6, reads


# -- the docs' recipes, local and remote-only -----------------------------------------------------------

def recipe_blocks() -> list[str]:
    """The recipes' blocks; those of "Reading at scale" (Ray, Dask) run in tests/test_5_recipes.py."""
    text = (DOCS / "fsspec.md").read_text().split("## Reading at scale", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_recipes(cwd: Path, env: dict[str, str]) -> None:
    """Each recipe in a fresh interpreter, the way a user would run it (HF datasets kept offline)."""
    blocks = recipe_blocks()
    assert len(blocks) >= 5
    for i, code in enumerate(blocks):
        # datasets refuses every URL, even tessera://, without streaming while HF_DATASETS_OFFLINE=1
        # (see docs/fsspec.md); the Hub stays off either way (HF_HUB_OFFLINE=1).
        offline = "1" if "load_dataset" not in code or "streaming=True" in code else "0"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                              env={**env, "HF_DATASETS_OFFLINE": offline}, timeout=240, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"docs/fsspec.md block {i + 1} failed:\n{code}\n{proc.stderr[-3000:]}"


def recipe_env(tmp_path: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "TESSERA_HOME": str(home), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TESSERA_LOCK": "off"}


def test_docs_recipes_local(tmp_path: Path, home: Path) -> None:
    import tessera

    with tessera.Repo(home) as repo:
        repo.commit("tab", write_table_dir(tmp_path / "tab"))
    run_recipes(tmp_path, recipe_env(tmp_path, home))


@pytest.mark.s3
def test_docs_recipes_remote_only(tmp_path: Path, s3_bucket: str) -> None:
    import tessera

    origin = make_home(tmp_path / "origin")
    with tessera.Repo(origin) as repo:
        v = repo.commit("tab", write_table_dir(tmp_path / "tab"))
    push(origin, v.ref, s3_bucket)
    reader = remote_only_home(tmp_path / "reader", s3_bucket)
    run_recipes(tmp_path, recipe_env(tmp_path, reader))
    assert not list((reader / "packs").rglob("*.pack"))  # read lazily, nothing pulled
