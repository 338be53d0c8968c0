"""The SQLite catalog: the only package that speaks SQL. It returns dataclasses, never rows."""
from tessera.catalog.catalog import Catalog, ChunkLocation, DatasetInfo, DirRow, PackInfo, StatRow

__all__ = ["Catalog", "ChunkLocation", "DatasetInfo", "DirRow", "PackInfo", "StatRow"]
