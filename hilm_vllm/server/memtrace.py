"""Where a process's Python memory goes, for a soak that finds a tier growing.

`HILM_MEMTRACE_S=N` (off by default: tracing costs time and memory) makes each hilm-vllm process
that reads it trace its Python allocations (`tracemalloc`) and print to stderr, every N seconds,
its resident memory, the traced total, and the source lines whose allocations grew most since
the first report (to `$HILM_MEMTRACE_DIR/<process>-<pid>.log` instead when that is set):

    HILM_MEMTRACE_S=60 HILM_MEMTRACE_DIR=/tmp/mt hilm bench soak --zoo demo --duration 900

The tiers' API processes and the router start it in `hilm-serve`; vLLM's engine core starts it
when our hooks are installed there (the verifier's VerifyHook, the drafter's logits processor),
so growth in the engine's own Python objects shows too. Memory outside Python's allocator
(torch tensors, the C allocator's fragmentation) shows only as RSS growing while the traced total
does not.
"""

from __future__ import annotations

import os
import sys
import threading
import time

ENV = "HILM_MEMTRACE_S"
DIR_ENV = "HILM_MEMTRACE_DIR"
TOP = 12
FRAMES = 4  # traceback depth kept per allocation (lines, grouped by their innermost frame)
_started = False
_lock = threading.Lock()


def interval_from_env() -> float | None:
    """Seconds between reports from $HILM_MEMTRACE_S, None when unset, empty or not > 0."""
    raw = os.environ.get(ENV, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        return None
    return value if value > 0 else None


def start_from_env(name: str) -> bool:
    """Start tracing and the reporting thread once per process when $HILM_MEMTRACE_S asks."""
    global _started
    every = interval_from_env()
    if every is None:
        return False
    with _lock:
        if _started:
            return False
        _started = True
    import tracemalloc

    tracemalloc.start(FRAMES)
    threading.Thread(target=_report_loop, args=(name, every), daemon=True,
                     name="hilm-memtrace").start()
    return True


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def report(name: str, baseline, t0: float) -> str:
    """One report: RSS, traced memory, and the lines that grew most since `baseline`."""
    import tracemalloc

    snap = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, __file__)])
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"hilm-memtrace {name} pid {os.getpid()} t={time.monotonic() - t0:.0f}s "
             f"rss {_rss_mb():.1f} MB, traced {current / 2**20:.1f} MB (peak {peak / 2**20:.1f})"]
    for stat in snap.compare_to(baseline, "lineno")[:TOP]:
        if stat.size_diff <= 0:
            continue
        frame = stat.traceback[0]
        lines.append(f"hilm-memtrace {name}   {stat.size_diff / 2**10:+9.1f} KiB "
                      f"{stat.count_diff:+7d} blocks  {frame.filename}:{frame.lineno}")
    return "\n".join(lines)


def _emit(name: str, text: str) -> None:
    folder = os.environ.get(DIR_ENV)
    if not folder:
        print(text, file=sys.stderr, flush=True)
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}-{os.getpid()}.log"), "a") as f:
        f.write(text + "\n")


def _report_loop(name: str, every: float) -> None:
    import tracemalloc

    t0 = time.monotonic()
    time.sleep(every)
    baseline = tracemalloc.take_snapshot()
    while True:
        time.sleep(every)
        try:
            _emit(name, report(name, baseline, t0))
        except Exception as e:  # noqa: BLE001 - a diagnostic must never take the tier down
            print(f"hilm-memtrace {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
