"""Shell completion of dataset names and refs (click's completion: see `tessera help cli`).

Completion runs on every <TAB>, so it opens the catalog read-only, without the home's init lock, and
never creates a home: a missing home (or a busy catalog) completes nothing.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
from click.shell_completion import CompletionItem

if TYPE_CHECKING:
    from tessera.catalog import Catalog

LIMIT = 200
T = TypeVar("T")


def _ask(ctx: click.Context, question: Callable[["Catalog"], list[T]]) -> list[T]:
    from tessera.catalog import Catalog
    from tessera.config import default_home
    from tessera.errors import TesseraError

    home = ctx.find_root().params.get("home") or os.environ.get("TESSERA_HOME")
    path = (Path(home).expanduser() if home else default_home()) / "catalog.db"
    if not path.is_file():
        return []
    try:
        cat = Catalog(path, read_only=True, timeout=1.0)
    except (TesseraError, OSError):
        return []
    try:
        return question(cat)[:LIMIT]
    except Exception:  # noqa: BLE001 - a completion never fails the shell
        return []
    finally:
        cat.close()


def complete_dataset(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    names = _ask(ctx, lambda cat: [d.name for d in cat.datasets() if d.name.startswith(incomplete)])
    return [CompletionItem(n) for n in names]


def complete_ref(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``co`` -> dataset names; ``coco@3f`` -> hash prefixes (12 hex); ``coco:v`` -> tags."""
    if "@" in incomplete:
        name, _, prefix = incomplete.partition("@")
        hashes = _ask(ctx, lambda cat: cat.find_versions(name, prefix.lower()))
        return [CompletionItem(f"{name}@{h[:12]}") for h in hashes]
    if ":" in incomplete:
        name, _, tag = incomplete.partition(":")
        tags = _ask(ctx, lambda cat: sorted(t for ts in cat.tags(name).values() for t in ts if t.startswith(tag)))
        return [CompletionItem(f"{name}:{t}") for t in tags]
    return complete_dataset(ctx, param, incomplete)


def complete_ref_or_dir(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Refs, and directories once the word looks like a path."""
    if "/" in incomplete or incomplete.startswith((".", "~")):
        return [CompletionItem(incomplete, type="dir")]
    return complete_ref(ctx, param, incomplete) + [CompletionItem(incomplete, type="dir")]
