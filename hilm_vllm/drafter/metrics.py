"""Prometheus metrics of the drafter tier (served on the tier's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SESSIONS = Gauge("hilm_drafter_sessions", "Open drafter sessions")
DRAFTS = Counter("hilm_drafter_drafts", "Draft calls served")
TOKENS = Counter("hilm_drafter_tokens", "Tokens drafted")
ROLLED_BACK = Counter("hilm_drafter_rolled_back_tokens",
                      "Tokens this tier drafted (or was given) that a later Draft cut off: its "
                      "rejected drafts and what followed them (acceptance on the device side: "
                      "1 - rolled back / hilm_drafter_tokens)")
EARLY_STOPS = Counter("hilm_drafter_early_stops", "Drafts ended early by stop_uncertainty")
WAITING = Gauge("hilm_drafter_waiting_drafts",
                "Drafts whose results this process is waiting for (0 when idle)")
WORKER_RECORDS = Gauge("hilm_drafter_worker_records",
                       "Draft records held by the engine's worker, as of its last step "
                       "(0 when idle: nothing is left behind by finished or aborted drafts)")
DRAFT_SECONDS = Histogram("hilm_drafter_draft_seconds", "Draft latency (engine + readout)",
                          buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))


def observe_draft(num_tokens: int, seconds: float, early_stop: bool) -> None:
    DRAFTS.inc()
    TOKENS.inc(num_tokens)
    DRAFT_SECONDS.observe(seconds)
    if early_stop:
        EARLY_STOPS.inc()


ENGINE_TOKENS_SENT = Counter("hilm_drafter_engine_tokens_sent",
                             "Tokens handed to the engine by Draft calls (new tokens only: what "
                             "the session's engine request did not hold)")
