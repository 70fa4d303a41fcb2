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


# A session lives in the engine as one request; a Verify hands it only what it does not hold.
ENGINE_TOKENS_SENT = Counter("hilm_verifier_engine_tokens_sent",
                             "Tokens handed to the engine by Verify calls (new tokens only: "
                             "what the session's engine request did not hold)")
RESIDENT_SESSIONS = Gauge("hilm_verifier_resident_sessions",
                          "Sessions whose engine request is alive (holds KV)")
EVICTED_SESSIONS = Gauge("hilm_verifier_evicted_sessions",
                         "Idle sessions' engine requests closed to bound the KV they hold "
                         "(their next Verify reopens from the history)")
