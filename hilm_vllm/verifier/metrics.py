"""Prometheus metrics of the verifier tiers (served on the tier's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SESSIONS = Gauge("hilm_verifier_sessions", "Open verifier sessions (expired ones count until "
                 "the next session opens or is used)")
VERIFIES = Counter("hilm_verifier_verifies", "Verify calls served (drafted blocks verified)")
DRAFT_TOKENS = Counter("hilm_verifier_draft_tokens", "Draft tokens verified")
ACCEPTED_TOKENS = Counter("hilm_verifier_accepted_tokens",
                          "Draft tokens accepted (acceptance = accepted / draft tokens; mean "
                          "acceptance length = 1 + accepted / verifies, as vLLM's)")
VERIFY_SECONDS = Histogram("hilm_verifier_verify_seconds",
                           "Verify latency inside the tier (from receipt to reply)",
                           buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))


def observe_verify(drafted: int, accepted: int, seconds: float) -> None:
    VERIFIES.inc()
    DRAFT_TOKENS.inc(drafted)
    ACCEPTED_TOKENS.inc(accepted)
    VERIFY_SECONDS.observe(seconds)
