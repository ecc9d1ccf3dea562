"""Host memory for CPU training: keep freed heap memory for the next step (``cpu_malloc: reuse``).

A training step allocates and frees the same large tensors every step: activations, their gradients, logits.
With its defaults glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and gives the top of the heap back to the system once enough of it is free, so the next step touches new pages
and the kernel faults in and zeroes every one of them: on a 2-core machine that made the embedded default's policy
forward 1.47x and its whole step 1.14x slower (docs/results.md). ``reuse`` takes every allocation from the heap
and never gives it back (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``, as documented in
mallopt(3)): freed memory is reused by the next step, so the peak resident memory stays what it was, but it is
held until the process ends.

Only the process that calls :func:`configure` is affected (training sets it from the config before building the
model). Elsewhere than glibc (macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

MODES = ("reuse", "system")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # glibc only: musl has mallopt but ignores these parameters
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def configure(mode: str) -> bool:
    """Apply ``cpu_malloc`` (``reuse`` | ``system``) to this process; True when glibc took the ``reuse`` settings."""
    if mode not in MODES:
        raise ValueError(f"cpu_malloc must be one of {list(MODES)}; got {mode!r}")
    if mode == "system":
        return False
    libc = _glibc()
    if libc is None:
        log.info("cpu_malloc=reuse: not glibc, left as it is")
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    if not ok:
        log.warning("cpu_malloc=reuse: glibc refused mallopt; the allocator keeps its defaults")
    return ok


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mmapped_bytes() -> int | None:
    """Bytes glibc holds in mmap-ed allocations now (``mallinfo2().hblkhd``); None where unavailable."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)
