"""The SQLite catalog: the only package that speaks SQL. It returns dataclasses, never rows.

`Catalog` is the one query surface; `remote_state` and `daemon_state` hold the queries of their own
tables (remotes and what they hold; the push queue and watch status) on top of it.
"""
from tessera.catalog.catalog import Catalog, DatasetInfo, DirRow, PackInfo, StatRow

__all__ = ["Catalog", "DatasetInfo", "DirRow", "PackInfo", "StatRow"]
