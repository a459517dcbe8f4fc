"""Returning freed host memory to the system.

glibc keeps memory that was freed inside its heap resident, and a heap in which long-lived small tensors (frames)
are allocated between short-lived large ones (the batches of an SVD) fragments: each batch then grows the resident
set by what it could not reuse, so building the frames of SmolLM2-135M peaked at 450–830 MiB (varying from run to
run with thread timing) for 330 MiB of frames. ``malloc_trim(0)`` hands every free page back (it walks the heaps
and advises the kernel on whole free pages), so the resident set follows what is allocated.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not Linux, or not glibc (musl has no malloc_trim): nothing to return
        return None


def release_freed_host_memory() -> None:
    """Give the C heap's free pages back to the system (glibc); a no-op elsewhere. Costs a walk over the heap: call
    it after freeing large temporaries, not per tensor."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
