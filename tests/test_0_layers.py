"""Layer 0: the structure keeps its shape. Every import of every module (module level, under
TYPE_CHECKING, inside functions) may only reach modules ranked below it in `RANKS`, so no import cycle
can form and nothing low knows about what sits on top of it (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"tessera": ROOT / "lib", "tessera.fuse": ROOT / "fuse", "tessera.daemon": ROOT / "daemon"}

# Low to high. A module may import only modules that come before it. Packages (their __init__) are
# listed where their own imports put them.
RANKS = [
    # foundations: no tessera imports but these
    "tessera.errors", "tessera.faults", "tessera.ids", "tessera.lru", "tessera.progress", "tessera.parallel",
    "tessera.homeguard", "tessera.home", "tessera.openfiles", "tessera.ignore", "tessera.mounting", "tessera.erofs",
    # the domain and bytes in, bytes out
    "tessera.model", "tessera.format", "tessera.format.chunker", "tessera.format.compress", "tessera.format.pack",
    "tessera.format.table",
    "tessera.config", "tessera.retention",
    # the catalog: the only SQL
    "tessera.catalog.sqlite", "tessera.catalog.schema", "tessera.catalog.catalog", "tessera.catalog", "tessera.catalog.remote_state",
    "tessera.catalog.daemon_state", "tessera.catalog.worktree_state", "tessera.catalog.marks",
    "tessera.catalog.lifecycle_state",
    # local packs; remotes: transports (keys and bytes) and what tessera writes under the keys
    "tessera.store", "tessera.remote.base", "tessera.remote.memory", "tessera.remote.local", "tessera.remote.s3",
    "tessera.remote.retry", "tessera.remote", "tessera.remote.wire", "tessera.diskcache",
    # roles and readers
    "tessera.sources", "tessera.trees", "tessera.remotes", "tessera.sessions", "tessera.lazy", "tessera.reader",
    "tessera.lazymeta",
    # what reads and writes versions
    "tessera.version", "tessera.filecache", "tessera.worktree", "tessera.treebuild", "tessera.snapshot", "tessera.vfs", "tessera.checkout", "tessera.fsck",
    "tessera.tablemerge", "tessera.push", "tessera.pull", "tessera.lockfile", "tessera.reclaim", "tessera.lifecycle", "tessera.prune",
    # a commit spread over workers (the plan, the worker task, combining); Ray itself, imported only when used
    "tessera.distributed", "tessera.raycluster",
    # the facade, and what works on a whole home through it
    "tessera.repo", "tessera.kernelmount", "tessera.filesystem", "tessera.torch",
    # adapters on top: FUSE, the daemon, the command line
    "tessera.fuse", "tessera.fuse._binding", "tessera.fuse.operations", "tessera.fuse.lowlevel", "tessera.fuse.mount",
    "tessera.daemon", "tessera.daemon.config", "tessera.daemon.watcher",
    "tessera.daemon.upkeep", "tessera.daemon.capture", "tessera.daemon.service",
    "tessera.cli.progress", "tessera.cli.app", "tessera.cli.complete", "tessera.cli.core", "tessera.cli.worktree",
    "tessera.cli.help", "tessera.cli.mount", "tessera.cli.cache",
    "tessera.cli.remote",
    "tessera.cli.daemon", "tessera.cli.lock", "tessera.cli.lifecycle", "tessera.cli.docs", "tessera.cli",
    "tessera",
]


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "tessera" and parts and parts[0] in ("fuse", "daemon"):
                continue  # not these: lib/ has no such folders, but be safe
            found[".".join([pkg, *parts])] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every tessera module ``name`` imports, wherever the import statement sits."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names}
            found = subs & set(modules())  # `from tessera import pull` imports the module tessera.pull
            out.update(found)
            if len(found) < len(subs):
                out.add(base)
    return {m for m in out if m == "tessera" or m.startswith("tessera.")}


def test_every_module_has_a_rank() -> None:
    missing = sorted(set(modules()) - set(RANKS))
    assert not missing, f"give these modules a place in RANKS: {missing}"


def test_no_module_imports_upwards() -> None:
    rank = {m: i for i, m in enumerate(RANKS)}
    known = modules()
    bad = []
    for name, path in known.items():
        for target in imports(name, path):
            if target not in known:
                continue  # a name imported from a module (`from tessera.model import Entry`)
            if target != name and rank[target] >= rank[name]:
                bad.append(f"{name} imports {target}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("module", ["tessera.vfs", "tessera.mounting", "tessera.reader", "tessera.version"])
def test_lib_never_imports_a_fuse_binding_or_watchdog(module: str) -> None:
    names = imports(module, modules()[module])
    raw = ast.parse(modules()[module].read_text())
    third = {a.name for n in ast.walk(raw) if isinstance(n, ast.Import) for a in n.names}
    third |= {n.module or "" for n in ast.walk(raw) if isinstance(n, ast.ImportFrom)}
    assert not any(n.startswith("tessera.fuse") or n.startswith("tessera.daemon") for n in names)
    assert not {"mfusepy", "fuse", "watchdog"} & {t.split(".")[0] for t in third}


def test_nothing_below_the_facade_imports_it() -> None:
    rank = {m: i for i, m in enumerate(RANKS)}
    users = [name for name, path in modules().items() if "tessera.repo" in imports(name, path)]
    assert all(rank[u] > rank["tessera.repo"] for u in users), users
