"""Host memory: the heap's freed pages handed back to the kernel (glibc's malloc_trim).

glibc keeps the memory of freed blocks below its mmap threshold (which grows to 32 MB, the size
of most of a model's arrays) for reuse rather than returning it. Building a model eagerly and
placing its training state (parallel.shard_tree copies it) frees about 1 GB of such blocks at
SmolLM2-135M's shape, and the first train step's peak stacks on top of it (bench/README.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def trim() -> bool:
    """malloc_trim(0): every free page of the heap back to the kernel. False where there is no
    glibc (another C library, another system): nothing is done."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
