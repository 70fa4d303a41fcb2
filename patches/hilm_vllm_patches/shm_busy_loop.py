"""Setting: how long vLLM's shared-memory queue readers spin before they sleep (vLLM 0.32.0).

`vllm/distributed/device_communicators/shm_broadcast.py::SpinCondition` keeps every reader of a
`MessageQueue` (the worker reading the scheduler's steps; the engine core reading the worker's
outputs) busy-looping on `sched_yield()` for `busy_loop_s = 1` second after each message it
reads, and only then parks on a ZMQ notification. On a GPU that owns its host cores this hides
wake-up latency. Where several engines share cores (a CPU machine serving the drafter and the
verifiers side by side, a device that drafts beside other work) the spinning process takes the
core from the one that has work: measured on 2 cores, a Verify right after a Draft took
834-1010 ms instead of 43-48 ms (patches/README.md).

This plugin replaces `SpinCondition.wait` with the same logic reading the window from the
environment variable `HILM_ENGINE_BUSY_LOOP_MS` (milliseconds; `hilm-serve --engine-busy-loop-ms`
sets it for the engine processes it spawns, which inherit it). Unset: vLLM's own 1 s, unchanged.
The replacement is a method of the class, so it also applies to queues built before the plugin
ran. It refuses other vLLM versions (the wrapped method is internal).
"""

from __future__ import annotations

import os
import time

PINNED_VLLM = "0.32.0"
ENV = "HILM_ENGINE_BUSY_LOOP_MS"

window_s: float | None = None  # the window in force in this process (None: vLLM's own)
replaced = None  # vLLM's SpinCondition.wait, once register() replaced it


def window_from_env(environ=os.environ) -> float | None:
    """The configured window in seconds, or None when unset; a bad value is an error."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number of milliseconds (e.g. 0 or 2)") from None
    if not 0 <= ms <= 60_000:
        raise ValueError(f"{ENV}={raw!r} must be within [0, 60000] milliseconds")
    return ms / 1e3


POLL_MAX_MS = 100  # longest park between two checks of the shm flag once idle for long


def park_ms(idle_s: float, timeout_ms: int | None) -> int:
    """How long a reader idle for `idle_s` parks before re-checking the shm flag itself.

    The writer's ZMQ notification is not reliable (PUB with SNDHWM=1 into a CONFLATE SUB):
    measured with the window at 0 and 8 concurrent drafter sessions, most Drafts waited out
    vLLM's 5 s recheck (median 4993 ms against 41 ms with vLLM's 1 s spin). So a parked reader
    wakes on its own after a short sleep that grows with the idle time (1 ms right after a
    message, 100 ms after 1 s of silence): a lost notification costs at most that, and an idle
    engine wakes ~10 times a second instead of spinning. It sleeps in epoll, so the core is
    free for the engine that has work."""
    cap = max(1, min(POLL_MAX_MS, int(idle_s * 100)))
    return cap if timeout_ms is None else max(0, min(cap, int(timeout_ms)))


def wait(self, timeout_ms: int | None = None) -> None:
    """`SpinCondition.wait` with the configured window instead of `self.busy_loop_s`, and a
    park that re-checks the shm flag on its own (see `park_ms`)."""
    from vllm.distributed.utils import sched_yield
    from zmq import NOBLOCK

    assert self.is_reader, "Only readers can wait"
    busy = self.busy_loop_s if window_s is None else window_s
    idle = time.monotonic() - self.last_read
    if idle <= busy:
        sched_yield()
        return
    events = dict(self.poller.poll(timeout=park_ms(idle, timeout_ms)))
    if self.local_notify_socket in events and self.read_cancel_socket not in events:
        self.local_notify_socket.recv(flags=NOBLOCK, copy=False)  # CONFLATE: one message


def register() -> None:
    """`vllm.general_plugins` entry point (runs in the API process, engine core and workers)."""
    import vllm
    from vllm.logger import init_logger

    logger = init_logger("vllm.hilm_patches")  # vLLM's handlers exist in every engine process
    global replaced, window_s
    window = window_from_env()
    if window is None:
        return
    if vllm.__version__.split("+")[0] != PINNED_VLLM:
        logger.warning("%s is set but vLLM is %s, not %s: the shm busy-loop window is left at "
                       "vLLM's default", ENV, vllm.__version__, PINNED_VLLM)
        return
    from vllm.distributed.device_communicators import shm_broadcast

    window_s = window
    if shm_broadcast.SpinCondition.wait is not wait:
        replaced = shm_broadcast.SpinCondition.wait
        shm_broadcast.SpinCondition.wait = wait
        logger.info("hilm: shm busy-loop window %.1f ms (pid %d)", window * 1e3, os.getpid())


def state() -> dict:
    """What this process runs with (for the tiers' info RPCs and the tests)."""
    from vllm.distributed.device_communicators import shm_broadcast

    return {"pid": os.getpid(), "patched": shm_broadcast.SpinCondition.wait is wait,
            "window_ms": None if window_s is None else window_s * 1e3}
