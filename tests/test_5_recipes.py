"""Reading at scale (docs/fsspec.md, "Reading at scale"): the Ray Data and Dask recipes run verbatim, on a
local Ray cluster (one per module, `ray.init(num_cpus=2)`) and Dask's default schedulers, against a local
home and against a fresh home that only knows an S3 remote (moto). What they read is compared with the
committed files. Ray workers read the version the driver resolved, from the home the driver reads (the
cluster's own ``$TESSERA_HOME`` is unusable on purpose), across a commit and in reused workers."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from readers_data import make_home, push, remote_only_home, write_table_dir
from tessera.filesystem import TesseraFileSystem

# Ray Data's DataContext warns about its own deprecated fields when it is pickled into the tasks
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

DOCS = Path(__file__).resolve().parent.parent / "docs"
SECTION = "## Reading at scale"


@pytest.fixture(autouse=True)
def _fresh_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    TesseraFileSystem.clear_instance_cache()
    monkeypatch.setenv("TESSERA_LOCK", "off")  # no stray tessera.lock above the test's cwd


@pytest.fixture(scope="module")
def ray_cluster(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local cluster for the module. Its workers reach moto the way a cluster's nodes have their own
    S3 credentials, and their ``$TESSERA_HOME`` cannot be opened (a path below a regular file): a worker
    reads only the home the pickled filesystem names."""
    import ray

    scratch = tmp_path_factory.mktemp("ray-env")
    (scratch / "file").write_text("not a directory\n")
    env = {"TESSERA_HOME": str(scratch / "file" / "home"), "TESSERA_LOCK": "off",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(scratch / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-cred")}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def scale_blocks(kind: str) -> list[str]:
    """The ```python blocks of the "Reading at scale" section that use ``kind`` (``ray`` or ``dask``)."""
    text = (DOCS / "fsspec.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [b for b in blocks if re.search(rf"^import {kind}\b", b, re.M)]


def expected_rows(rows: int = 300) -> list[tuple[int, str, float]]:
    """What `write_table_dir` wrote, as (id, name, score)."""
    return [(i, f"item-{i}", round(i * 0.5, 1)) for i in range(rows)]


def as_rows(df: Any) -> list[tuple[int, str, float]]:
    return sorted(zip(map(int, df["id"]), map(str, df["name"]), map(float, df["score"])))


def run_ray_blocks(src: Path) -> None:
    """Each Ray block in this process (so it uses the module's cluster), then what it read against ``src``."""
    blocks = scale_blocks("ray")
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        ns: dict[str, Any] = {}
        exec(compile(code, f"docs/fsspec.md (Ray block {i + 1})", "exec"), ns)
        if "rows" in ns:  # read_binary_files: every file's bytes, as committed
            got = {r["path"].split("/", 1)[1]: r["bytes"] for r in ns["rows"]}
            assert got == {f"parts/{p.name}": p.read_bytes() for p in (src / "parts").iterdir()}
        else:
            assert as_rows(ns["df"]) == expected_rows()


def run_dask_blocks(tmp_path: Path, src: Path, env: dict[str, str]) -> None:
    """Each Dask block in a fresh interpreter (dask.bag's default scheduler spawns processes, which
    re-import a script's __main__), then what it computed against ``src``."""
    blocks = scale_blocks("dask")
    assert len(blocks) == 2
    out = tmp_path / "dask-result.pickle"
    epilogue = ("\nimport pickle\nwith open(%r, 'wb') as _f:\n"
                "    pickle.dump({k: globals()[k].compute() for k in ('df', 'lines') if k in globals()}, _f)\n" % str(out))
    for i, code in enumerate(blocks):
        proc = subprocess.run([sys.executable, "-c", code + epilogue], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=240, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"docs/fsspec.md Dask block {i + 1} failed:\n{code}\n{proc.stderr[-3000:]}"
        result = pickle.loads(out.read_bytes())
        if "df" in result:
            assert as_rows(result["df"]) == expected_rows()
        else:
            assert "".join(result["lines"]) == (src / "data.csv").read_text()


def test_recipes_local(ray_cluster: None, tmp_path: Path, home: Path) -> None:
    import tessera

    src = write_table_dir(tmp_path / "tab")
    with tessera.Repo(home) as repo:
        repo.commit("tab", src)
    run_ray_blocks(src)
    run_dask_blocks(tmp_path, src, {**os.environ})


@pytest.mark.s3
def test_recipes_in_a_fresh_home_reading_from_a_remote(ray_cluster: None, tmp_path: Path, s3_bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tessera

    src = write_table_dir(tmp_path / "tab")
    origin = make_home(tmp_path / "origin")
    with tessera.Repo(origin) as repo:
        v = repo.commit("tab", src)
    push(origin, v.ref, s3_bucket)
    reader = remote_only_home(tmp_path / "reader", s3_bucket)
    monkeypatch.setenv("TESSERA_HOME", str(reader))
    run_ray_blocks(src)
    run_dask_blocks(tmp_path, src, {**os.environ})
    assert not list((reader / "packs").rglob("*.pack"))  # read lazily, nothing pulled


def test_ray_workers_read_the_version_the_driver_resolved(ray_cluster: None, tmp_path: Path, home: Path) -> None:
    """A bare NAME pinned on the driver: Ray lists the Parquet files in a task and reads them in others,
    all in processes of their own; a commit after the pin changes nothing they read. After the driver
    resolves again, workers that cached the old resolution read the new version."""
    import ray
    import tessera

    with tessera.Repo(home) as repo:
        v1 = repo.commit("tab", write_table_dir(tmp_path / "v1"))
        fs = fsspec.filesystem("tessera")
        assert fs.info("tab")["version"] == v1.ref  # the pin
        v2 = repo.commit("tab", write_table_dir(tmp_path / "v2", rows=40))
    assert v2.ref != v1.ref
    df = ray.data.read_parquet("tessera://tab/parts/", filesystem=fs).to_pandas()
    assert as_rows(df) == expected_rows()
    fs.invalidate_cache()
    assert fs.info("tab")["version"] == v2.ref
    df = ray.data.read_parquet("tessera://tab/parts/", filesystem=fs).to_pandas()  # the same workers
    assert as_rows(df) == expected_rows(40)
