"""Work on a thread per CPU, in input order, with bounded memory: ingest's checks and the
decoding of training and prediction images. Threads pay here because Pillow and hashlib release
the GIL while they decode, resize and hash."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_PER_WORKER = 4  # submitted and not yet yielded: enough to keep every thread busy


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset and container cpusets
    narrow), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, name: str = "worker") -> Iterator[R]:
    """`map(fn, items)` on `workers` threads, results in input order. At most
    IN_FLIGHT_PER_WORKER x workers items are submitted and not yet yielded, so memory does not
    grow with the number of items. One worker runs here, without a pool."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = IN_FLIGHT_PER_WORKER * workers
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or an early stop, what is queued is dropped
