"""Handing memory freed by a failed media request back to the system.

Images and video frames are decoded in many threads; glibc gives each thread's allocations an
arena of its own and keeps what is freed there for reuse, so a process that decoded hundreds of
frames for a refused request stays that much larger. malloc_trim(0) returns the free pages of
every arena. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import threading
import time

_MIN_INTERVAL_S = 1.0  # at most one trim a second: it walks every arena


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
_lock = threading.Lock()
_last = [0.0]


def release_freed_memory() -> bool:
    """malloc_trim(0) (the GIL released meanwhile), unless one ran within the last second."""
    if _TRIM is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last[0] < _MIN_INTERVAL_S:
            return False
        _last[0] = now
    _TRIM(0)
    return True
