"""Catalog schema as ordered, named migrations (sqlite-utils `Migrations`).

Append new steps at the end; never edit an applied one. `SCHEMA_VERSION` is the number of steps this
code knows; a catalog that recorded a higher number was written by a newer tessera and is refused.
"""
from __future__ import annotations

from tessera.catalog.sqlite import Database, Migrations

migrations = Migrations("tessera")


@migrations(name="0001_initial")
def _initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE datasets (
            name TEXT PRIMARY KEY, head TEXT, created REAL NOT NULL);
        CREATE TABLE versions (
            hash TEXT PRIMARY KEY, files INTEGER NOT NULL, size INTEGER NOT NULL,
            created REAL NOT NULL);
        CREATE TABLE history (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, hash TEXT NOT NULL,
            parent TEXT, time REAL NOT NULL, author TEXT NOT NULL, message TEXT NOT NULL,
            meta TEXT NOT NULL);
        CREATE INDEX history_hash ON history (hash);
        CREATE INDEX history_dataset ON history (dataset, hash);
        CREATE TABLE tags (
            dataset TEXT NOT NULL, tag TEXT NOT NULL, hash TEXT NOT NULL,
            PRIMARY KEY (dataset, tag));
        CREATE TABLE trees (id TEXT PRIMARY KEY, data BLOB NOT NULL);
        CREATE TABLE files (id TEXT PRIMARY KEY, size INTEGER NOT NULL, chunks BLOB NOT NULL);
        CREATE TABLE packs (
            id TEXT PRIMARY KEY, size INTEGER NOT NULL, blobs INTEGER NOT NULL,
            created REAL NOT NULL, local INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE chunks (
            id BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,
            stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL, codec INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX chunks_pack ON chunks (pack);
        CREATE TABLE stat_cache (
            dir TEXT NOT NULL, name TEXT NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
            size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
            file_id TEXT NOT NULL, PRIMARY KEY (dir, name)) WITHOUT ROWID;
        """
    )


@migrations(name="0002_remote")
def _remote(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE remotes (name TEXT PRIMARY KEY, url TEXT NOT NULL, is_default INTEGER NOT NULL DEFAULT 0);
        -- keys known to exist on a remote (packs/<id>, index/<id>, meta/..., versions/..., history/...):
        -- push uploads only what is not listed here, without listing the bucket.
        CREATE TABLE remote_objects (remote TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (remote, key))
            WITHOUT ROWID;
        """
    )


@migrations(name="0003_daemon")
def _daemon(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE push_queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT, remote TEXT NOT NULL, dataset TEXT NOT NULL,
            hash TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_try REAL NOT NULL DEFAULT 0, last_error TEXT);
        CREATE TABLE watch_status (
            path TEXT PRIMARY KEY, dataset TEXT NOT NULL, last_event REAL, last_version TEXT,
            last_commit REAL, last_error TEXT, updated REAL NOT NULL);
        """
    )


@migrations(name="0004_dir_cache")
def _dir_cache(db: Database) -> None:
    # A directory whose own stat is unchanged and whose files all hit the stat cache keeps its tree id:
    # re-committing an unchanged tree then builds no trees at all (git's cache-tree idea).
    db.executescript(
        """
        CREATE TABLE dir_cache (
            path TEXT PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL, tree_id TEXT NOT NULL, size INTEGER NOT NULL, files INTEGER NOT NULL
        ) WITHOUT ROWID;
        """
    )


@migrations(name="0005_sync_remote_meta")
def _sync_remote_meta(db: Database) -> None:
    # Which metadata pack on a remote holds each tree / file record (kind 1 = tree, 2 = file, as in
    # tessera.format.pack): push then uploads only the trees and file records the remote lacks, and a
    # version object can still list every metadata pack it needs. See docs/format.md "Remote layout".
    db.executescript(
        """
        CREATE TABLE remote_meta (
            remote TEXT NOT NULL, kind INTEGER NOT NULL, id TEXT NOT NULL, pack TEXT NOT NULL,
            PRIMARY KEY (remote, kind, id)) WITHOUT ROWID;
        """
    )


@migrations(name="0006_worktrees")
def _worktrees(db: Database) -> None:
    # Which version each directory came from (committed, exported or checked out), keyed by its real
    # path: `tessera status DIR` compares DIR with it. complete = 0 while an export/checkout is writing.
    db.executescript(
        """
        CREATE TABLE worktrees (
            path TEXT PRIMARY KEY, dataset TEXT NOT NULL, hash TEXT NOT NULL, how TEXT NOT NULL,
            time REAL NOT NULL, complete INTEGER NOT NULL DEFAULT 1, excludes TEXT NOT NULL DEFAULT '[]'
        ) WITHOUT ROWID;
        """
    )


@migrations(name="0007_lazy_versions")
def _lazy_versions(db: Database) -> None:
    # Versions known from a remote whose trees, file records and chunk locations are fetched as they are
    # walked (a format-2 version object, kept here): listing one directory of a million-file version
    # fetches that directory's tree, not all of them. The row goes once the metadata is complete.
    db.executescript(
        """
        CREATE TABLE lazy_versions (hash TEXT PRIMARY KEY, remote TEXT NOT NULL, object BLOB NOT NULL) WITHOUT ROWID;
        """
    )


SCHEMA_VERSION = 7
