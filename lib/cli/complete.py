"""Shell completion of dataset names and refs (click's completion: see `tessera help cli`).

Completion runs on every <TAB>, so it reads the catalog directly, read-only, and never creates a
home: a missing home completes nothing.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

LIMIT = 200


def _catalog(ctx: click.Context) -> Path | None:
    from tessera.config import default_home

    home = ctx.find_root().params.get("home") or os.environ.get("TESSERA_HOME")
    path = (Path(home).expanduser() if home else default_home()) / "catalog.db"
    return path if path.is_file() else None


def _rows(ctx: click.Context, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    db = _catalog(ctx)
    if db is None:
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def complete_dataset(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    rows = _rows(ctx, "SELECT name FROM datasets WHERE name LIKE ? ESCAPE '\\' ORDER BY name LIMIT ?",
                 (_like(incomplete), LIMIT))
    return [CompletionItem(r[0]) for r in rows]


def complete_ref(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``co`` -> dataset names; ``coco@3f`` -> hash prefixes (12 hex); ``coco:v`` -> tags."""
    if "@" in incomplete:
        name, _, prefix = incomplete.partition("@")
        rows = _rows(ctx, "SELECT DISTINCT hash FROM history WHERE dataset = ? AND hash LIKE ? ESCAPE '\\'"
                          " ORDER BY seq DESC LIMIT ?", (name, _like(prefix.lower()), LIMIT))
        return [CompletionItem(f"{name}@{r[0][:12]}") for r in rows]
    if ":" in incomplete:
        name, _, tag = incomplete.partition(":")
        rows = _rows(ctx, "SELECT tag FROM tags WHERE dataset = ? AND tag LIKE ? ESCAPE '\\' ORDER BY tag LIMIT ?",
                     (name, _like(tag), LIMIT))
        return [CompletionItem(f"{name}:{r[0]}") for r in rows]
    return complete_dataset(ctx, param, incomplete)


def complete_ref_or_dir(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Refs, and directories once the word looks like a path."""
    if "/" in incomplete or incomplete.startswith((".", "~")):
        return [CompletionItem(incomplete, type="dir")]
    return complete_ref(ctx, param, incomplete) + [CompletionItem(incomplete, type="dir")]
