"""glibc malloc settings for the CPU engine process: keep freed activations for reuse.

By default glibc serves large blocks with fresh `mmap`s (its threshold adapts, but only up
to what it last freed) and trims the top of the heap on free, so many of a step's
activations come back as new pages that the kernel faults in and zeroes again. A 2,048-token
prefill of the default model took 24k-100k page faults (0.15-0.45 s of system time) in a
model-step thread, none after the first with these settings; in the served benchmark at
concurrency 32, 54k-81k fell to 17k-29k. Elementwise ops on fresh pages ran up to 4x slower.
vLLM's CPU backend gets the same effect by preloading tcmalloc; `mallopt` needs nothing new.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# malloc.h parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks up to glibc's 64-bit ceiling (HEAP_MAX_SIZE / 2) come from the heap, not mmap.
MMAP_THRESHOLD_BYTES = 32 << 20
# Freed memory at the heap's top stays mapped up to this much (the peak activations).
TRIM_THRESHOLD_BYTES = 1 << 30
# One arena: the model-step thread's blocks then come from the main heap, which can grow
# as needed, instead of thread-arena heaps capped at 64 MiB that are mapped and unmapped.
ARENA_MAX = 1


def keep_freed_memory() -> bool:
    """Apply the settings to this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    ok = mallopt(M_ARENA_MAX, ARENA_MAX) == 1 and ok
    if not ok:
        log.info("mallopt refused the settings: freed activations go back to the kernel")
    return ok
