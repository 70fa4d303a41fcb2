"""HILM_MEMTRACE_S: the soak's diagnostic names the source line whose allocations grew."""

from __future__ import annotations

import tracemalloc

from hilm_vllm.server import memtrace


def test_the_interval_comes_from_the_environment(monkeypatch):
    for raw, want in (("", None), ("0", None), ("-3", None), ("x", None), ("30", 30.0)):
        monkeypatch.setenv(memtrace.ENV, raw)
        assert memtrace.interval_from_env() == want
    monkeypatch.delenv(memtrace.ENV)
    assert memtrace.interval_from_env() is None
    assert memtrace.start_from_env("test") is False  # unset: nothing starts


def test_a_report_names_the_line_that_grew():
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(4)
    try:
        baseline = tracemalloc.take_snapshot()
        kept = [bytes(4096) for _ in range(500)]  # ~2 MB held at this line
        text = memtrace.report("test", baseline, t0=0.0)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    first, *lines = text.splitlines()
    assert first.startswith("hilm-memtrace test pid") and "rss" in first and "traced" in first
    assert any("test_memtrace.py" in line and "KiB" in line for line in lines[:3]), text
    assert len(kept) == 500
