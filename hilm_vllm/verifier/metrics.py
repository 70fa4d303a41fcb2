"""Prometheus metrics of the verifier tiers (served on the tier's /metrics)."""

from __future__ import annotations

from prometheus_client import Gauge

SESSIONS = Gauge("hilm_verifier_sessions", "Open verifier sessions (expired ones count until "
                 "the next session opens or is used)")
