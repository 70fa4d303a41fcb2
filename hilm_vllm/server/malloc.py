"""Give freed C-heap memory back to the system now and then (glibc's `malloc_trim`).

A long-running tier allocates and frees native memory of every size on many threads (gRPC's
core, the tokenizer, numpy, torch); glibc keeps what is freed inside its arenas, so the resident
size creeps up although nothing is leaked. `HILM_MALLOC_TRIM_S=N` (or `--malloc-trim-s N`) makes
the process call `malloc_trim(0)` every N seconds from a thread; 0 turns it off. A no-op where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

ENV = "HILM_MALLOC_TRIM_S"
logger = logging.getLogger(__name__)
_started = False
_lock = threading.Lock()


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """One malloc_trim(0): True when memory was returned (False also without glibc)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def interval(value: float | None = None) -> float:
    """Seconds between trims: `value`, else $HILM_MALLOC_TRIM_S, else 0 (off)."""
    if value is not None:
        return max(0.0, float(value))
    raw = os.environ.get(ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else 0.0
    except ValueError:
        raise ValueError(f"${ENV}={raw!r}: expected seconds between trims (0: off)") from None


def start(every_s: float) -> bool:
    """Trim every `every_s` seconds in a daemon thread, once per process; False when off."""
    global _started
    if every_s <= 0 or _libc() is None:
        return False
    with _lock:
        if _started:
            return False
        _started = True
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            trim()

    threading.Thread(target=loop, daemon=True, name="hilm-malloc-trim").start()
    logger.info("returning freed heap memory to the system every %g s (malloc_trim)", every_s)
    return True
