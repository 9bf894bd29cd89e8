"""The process's allocator policy for the fast path: keep freed memory instead of giving it back.

Why: on a virtual machine a fresh large allocation is slow (its pages are zeroed and faulted in from the
host), and every relaxation step allocates tens of MB per tensor. `seqep bench` runs every mode under this
policy; `seqep train` turns it on for the fast path.
"""

from __future__ import annotations

KEEP_FREED_BYTES = 2**31 - 1  # the largest trim threshold mallopt accepts (a C int)


def keep_freed_memory() -> bool:
    """Ask glibc never to give freed memory back to the OS (no mmap for big blocks, no heap trimming).

    On a virtual machine a fresh large allocation is slow (≈ 0.15–0.8 ms per MB: pages zeroed and, once
    given back, faulted in again from the host), and every EP step allocates tens of MB per tensor. With
    this policy the process reuses its own heap (docs/history.md). Same effect as starting Python
    with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>. Returns False where glibc is not available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        # mallopt's value is a C int: a larger Python int is silently truncated (2**62 becomes 0, i.e. trim on
        # every free, so every large allocation faults its pages in afresh)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False
