"""Memory a server gives back: glibc's allocator tuned for servers that decode large photos on
many threads.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so the
next 15 MB photo buffers come from the heap, and every thread may get its own heap (arena): freed
photos stay in the process, and a server's RSS grows with the number of threads that ever decoded
a large photo (seen: the app from 0.9 to 1.6 GB under 64 clients). A fixed threshold (1 MB: every
larger block is mapped and unmapped on its own) and 2 arenas keep RSS to what is in use. A no-op
where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 4 << 20
ARENAS = 2


def give_back_freed_memory() -> bool:
    """Tune glibc's malloc as above, for this process; call it before the server starts its
    threads. Whether it took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = all(mallopt(option, value) == 1 for option, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENAS)))
    log.debug("malloc tuned for a server: %s", done)
    return done
