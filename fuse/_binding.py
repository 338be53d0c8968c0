"""The one place that imports a FUSE binding.

Preference: ``mfusepy`` (maintained fusepy fork, libfuse 3), then fusepy's ``fuse`` (libfuse 2). Every
failure is kept and reported together in one `FuseUnavailable` that says what to install.

Two traps handled here:

- mfusepy loads libfuse 2 first when both are installed; ``FUSE_LIBRARY_NAME=fuse3`` (set before the
  import unless the user chose otherwise) makes it take libfuse 3 (1 MiB reads, no-open, readdirplus).
- fusepy's module is named ``fuse``, like this repository's ``fuse/`` folder; when the repository root
  is on ``sys.path`` a plain ``import fuse`` finds the folder. The fallback looks the module up on
  ``sys.path`` minus any entry whose ``fuse/`` is ours.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tessera.errors import FuseUnavailable

logger = logging.getLogger(__name__)

INSTALL_HINT = "install libfuse 3 (`apt-get install fuse3`) and the binding (`pip install mfusepy`)"
FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags


@dataclass(frozen=True)
class Binding:
    name: str  # "mfusepy" or "fusepy"
    module: ModuleType
    FUSE: Any
    Operations: Any
    FuseOSError: Any
    libfuse_major: int

    @property
    def description(self) -> str:
        return f"{self.name} over libfuse {self.libfuse_major}"


_cached: Binding | None = None


def load_binding() -> Binding:
    """Import the FUSE binding (once). Raises `FuseUnavailable` listing every failure."""
    global _cached
    if _cached is not None:
        return _cached
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable("FUSE is not usable here: /dev/fuse does not exist (load the fuse kernel module, "
                              f"or start the container with --device /dev/fuse --cap-add SYS_ADMIN); {INSTALL_HINT}")
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    failures: list[str] = []
    for name, loader in (("mfusepy", _load_mfusepy), ("fusepy", _load_fusepy)):
        try:
            _cached = loader()
            return _cached
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError (no libfuse), AttributeError (ABI)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    raise FuseUnavailable("no FUSE binding could be loaded (" + "; ".join(failures) + f"): {INSTALL_HINT}")


def _load_mfusepy() -> Binding:
    import mfusepy

    return Binding("mfusepy", mfusepy, _plus_fuse_class(mfusepy), mfusepy.Operations, mfusepy.FuseOSError,
                   int(getattr(mfusepy, "fuse_version_major", 2)))


def _load_fusepy() -> Binding:
    ours = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path
            if os.path.abspath(os.path.join(p or ".", "fuse")) != ours]
    spec = importlib.machinery.PathFinder.find_spec("fuse", path)
    if spec is None or spec.loader is None:
        raise ImportError("no module named 'fuse' (pip install fusepy)")
    module = sys.modules.get("fuse")
    if module is None or getattr(module, "__file__", None) != spec.origin:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not hasattr(module, "FUSE"):
        raise ImportError(f"{spec.origin} is not fusepy")
    return Binding("fusepy", module, module.FUSE, module.Operations, module.FuseOSError, 2)


def _plus_fuse_class(mfusepy: ModuleType) -> Any:
    """mfusepy's FUSE with real readdirplus on libfuse 3: entries go to the kernel *with* their
    attributes (FUSE_FILL_DIR_PLUS), so `ls -l`, `os.walk` + `stat` and `find` cost no LOOKUP or
    GETATTR per entry. libfuse's high-level API takes the given stat as is (no extra getattr call)."""
    if getattr(mfusepy, "fuse_version_major", 2) != 3:
        return mfusepy.FUSE

    class PlusFUSE(mfusepy.FUSE):  # type: ignore[misc,valid-type]
        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                           flags: int) -> int:
            if not flags & FUSE_READDIR_PLUS or not hasattr(self.operations, "readdir_attrs"):
                return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            st = mfusepy.c_stat()
            size = ctypes.sizeof(st)
            for name, attrs in self.operations.readdir_attrs(decoded):
                ctypes.memset(ctypes.byref(st), 0, size)
                mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
                if filler(buf, name.encode(self.encoding, self.errors), st, 0, FUSE_FILL_DIR_PLUS) != 0:
                    break
            return 0

    return PlusFUSE
