"""Distributed commit on a Ray cluster: `RayExecutor` runs `tessera.distributed.commit_units` as Ray tasks.

Ray is an optional extra (``pip install 'tessera[ray]'``) and is imported only when a `RayExecutor` is
made: nothing else in tessera imports this module at import time. Every worker must have tessera
installed and see the committed directory at the same path. A task whose worker dies (machine lost,
process killed) is retried by Ray (``max_retries``); it commits its units again from scratch, writing the
same content-addressed keys, so a retry or a duplicate is harmless.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tessera.errors import TesseraError, UsageError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("a distributed commit needs Ray: pip install 'tessera[ray]'") from None
    return ray


class RayExecutor:
    """Runs tasks on the Ray cluster at ``address`` (None: ``$RAY_ADDRESS``, else a cluster on this
    machine), or on the one this process already joined. ``tasks``: how many (default: the cluster's
    CPUs); ``cpus``: CPUs each task reserves (its ingest threads use them)."""

    def __init__(self, address: str | None = None, tasks: int | None = None, *, cpus: float = 1,
                 max_retries: int = MAX_RETRIES) -> None:
        if tasks is not None and tasks < 1:
            raise UsageError("the number of tasks must be at least 1")
        ray = _ray()
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = address or "a local cluster"
                raise TesseraError(f"cannot start or join Ray at {where}: {str(exc).splitlines()[0]}") from None
            self._started = True
        self.tasks = tasks or max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1)))
        self.cpus = cpus
        self.max_retries = max_retries

    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        ray = _ray()
        task = ray.remote(num_cpus=self.cpus, max_retries=self.max_retries)(fn)
        pending = [task.remote(item) for item in items]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield self._get(ray, done[0])
        finally:
            for ref in pending:  # an error or an abandoned commit: stop the rest
                ray.cancel(ref, force=True)

    @staticmethod
    def _get(ray: Any, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TesseraError):
                raise cause from None
            raise TesseraError(f"a Ray task failed: {str(cause or exc).splitlines()[0]}") from None
        except ray.exceptions.RayError as exc:
            raise TesseraError(f"a Ray task was lost ({type(exc).__name__}) after {MAX_RETRIES} retries: "
                               f"{str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        if self._started:
            _ray().shutdown()
            self._started = False
