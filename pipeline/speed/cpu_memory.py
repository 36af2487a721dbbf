"""The C library's memory allocator, set for training on the CPU.

Every eager step frees and reallocates the same activation-sized buffers (about 1 MB each for
LeNet at batch 64). glibc's malloc serves blocks that large with a fresh mmap and returns them
to the kernel on free, so every step pays hundreds of page faults: about a third of the step on
a 2-core machine. Raising the mmap and trim thresholds keeps freed blocks in the heap, where the
next step finds them. The same effect as preloading jemalloc or tcmalloc, without a dependency.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest; bigger blocks (the dataset) are mapped once anyway
TRIM_THRESHOLD = 1 << 30  # free heap kept before any is returned to the kernel


def reuse_freed_memory() -> bool:
    """Have malloc keep freed blocks for reuse; False where the C library does not allow it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
