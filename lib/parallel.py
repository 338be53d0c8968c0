"""Run a few I/O-bound tasks on threads, failing fast (push and pull move packs this way)."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait


def run_parallel(workers: int, tasks: list[Callable[[], None]]) -> None:
    """Run tasks on a thread pool; on the first failure cancel what has not started and re-raise it."""
    if not tasks:
        return
    if len(tasks) == 1 or workers <= 1:
        for task in tasks:
            task()
        return
    pool = ThreadPoolExecutor(min(workers, len(tasks)), thread_name_prefix="tessera-io")
    try:
        futures: list[Future[None]] = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            exc = f.exception() if f.done() and not f.cancelled() else None
            if exc is not None:
                for other in futures:
                    other.cancel()
                raise exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
