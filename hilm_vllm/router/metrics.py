"""Prometheus metrics of the router, served on its API port's `/metrics` (as `vllm serve` does)
and on the separate --metrics-port.

Beside the `hilm_router_*` metrics the router exports vLLM's own names where the meaning is the
same, so vLLM's dashboards and `vllm bench serve` read them unchanged:

- `vllm:spec_decode_num_drafts` (one per verification of a drafted block, on either verifier
  tier), `..._num_draft_tokens`, `..._num_accepted_tokens` and
  `..._num_accepted_tokens_per_pos{position}`: mean acceptance length = 1 + accepted / drafts,
  per-position acceptance = accepted_per_pos[i] / drafts, exactly as vLLM computes them. Tokens
  the policy kept on the device (SKIP) are not drafts: they were never verified.
- `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
  `vllm:e2e_request_latency_seconds`, `vllm:num_requests_running`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from prometheus_client import Counter, Gauge, Histogram

ADMITTED_CHOICES = Gauge("hilm_router_admission_active_choices",
                         "Choices running now (at most --max-active-choices)")
QUEUED_REQUESTS = Gauge("hilm_router_admission_queued_requests",
                        "Requests waiting for admission, all clients")
REFUSED_REQUESTS = Gauge("hilm_router_admission_refused_requests",
                         "Requests answered 429 / RESOURCE_EXHAUSTED by admission since start")
REPLICA_SESSIONS = Gauge("hilm_router_replica_sessions",
                         "Sessions (and llm-only streams) this router holds open on each replica "
                         "of a tier with several (--llm A,B)", ["tier", "replica"])
REPLICA_OPENED = Counter("hilm_router_replica_sessions_opened",
                         "Sessions (and llm-only streams) this router opened on each replica of "
                         "a tier with several", ["tier", "replica"])
OPTIMISTIC = Counter("hilm_router_optimistic_drafts_total",
                     "Drafts made while a block was verified (drafted), those whose tokens "
                     "became the next block (kept), and rounds that did not draft ahead "
                     "because the request's keep chance was below --optimistic-min-keep (gated)", ["outcome"])
REQUESTS = Counter("hilm_router_requests_total", "Generation requests by policy and outcome",
                   ["policy", "outcome"])
TOKENS = Counter("hilm_router_tokens_total", "Generated tokens by policy", ["policy"])
ROUNDS = Counter("hilm_router_rounds_total", "Draft-plan-verify rounds by policy", ["policy"])
ROUTES = Counter("hilm_router_route_decisions_total",
                 "Drafted tokens by where the policy routed them (skip, ilm, llm)", ["route"])
DRAFTED = Counter("hilm_router_verified_drafts_total",
                  "Draft tokens sent to a verifier tier", ["tier"])
ACCEPTED = Counter("hilm_router_accepted_drafts_total",
                   "Draft tokens a verifier tier accepted (acceptance = accepted / verified)",
                   ["tier"])
ACCEPTED_PER_POS = Counter("hilm_router_accepted_drafts_per_pos_total",
                           "Drafts a verifier tier accepted at each position of the block "
                           "(per-position acceptance = this / hilm_router_verifications_total)",
                           ["tier", "position"])
VERIFICATIONS = Counter("hilm_router_verifications_total",
                        "Drafted blocks a verifier tier verified (vLLM's 'drafts')", ["tier"])
MESSAGES = Counter("hilm_router_messages_total", "Messages sent to a tier", ["tier"])
UPLINK_BYTES = Counter("hilm_router_uplink_bytes_total",
                       "Serialized bytes sent to a tier", ["tier"])
RTT = Histogram("hilm_router_rtt_seconds", "Round trip of one message per hop (network model "
                "included)", ["tier"],
                buckets=(.001, .0025, .005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5))
TRANSMISSION_RATE = Histogram("hilm_router_transmission_rate",
                              "Per request: verification messages to a tier / generated tokens",
                              ["tier"], buckets=(0, .05, .1, .2, .3, .4, .5, .6, .8, 1.0, 1.5))
_LATENCY = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5, 5, 7.5, 10, 20,
            40, 80)
TTFT = Histogram("hilm_router_ttft_seconds", "Time to first token", ["policy"],
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
ITL = Histogram("hilm_router_inter_token_latency_seconds",
                "Time between two successive outputs of a request (each output is what one "
                "round made final: one or more tokens)", ["policy"], buckets=_LATENCY)
E2E = Histogram("hilm_router_e2e_request_latency_seconds",
                "A generation request from its start to its last token", ["policy"],
                buckets=_LATENCY)
RUNNING = Gauge("hilm_router_requests_running", "Generation requests in flight")
DEGRADED = Counter("hilm_router_degraded_total",
                   "Requests completed around an unreachable tier", ["reason"])
TIER_DOWN = Counter("hilm_router_tier_unreachable_total",
                    "Times a tier was found unreachable", ["tier"])

# vLLM's names (vllm/v1/metrics/loggers.py, vllm/v1/spec_decode/metrics.py), labelled by the
# served model name as vLLM's are, plus the verifier tier.
_SD = ["model_name", "tier"]
SD_DRAFTS = Counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", _SD)
SD_DRAFT_TOKENS = Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", _SD)
SD_ACCEPTED = Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", _SD)
SD_ACCEPTED_PER_POS = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                              "Accepted tokens per draft position.", [*_SD, "position"])
V_TTFT = Histogram("vllm:time_to_first_token_seconds",
                   "Histogram of time to first token in seconds.", ["model_name"],
                   buckets=(.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5,
                            7.5, 10, 20, 40, 80))
V_ITL = Histogram("vllm:inter_token_latency_seconds",
                  "Histogram of inter-token latency in seconds.", ["model_name"],
                  buckets=_LATENCY)
V_E2E = Histogram("vllm:e2e_request_latency_seconds",
                  "Histogram of e2e request latency in seconds.", ["model_name"],
                  buckets=_LATENCY)
V_RUNNING = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                  ["model_name"])

MODEL_NAME = {"name": ""}  # the served model name (set by the router tier at start-up)


def model_name() -> str:
    return MODEL_NAME["name"]


def init_series(name: str, tiers: list[str], block_size: int) -> None:
    """Create the spec-decode series at start-up with 0, as vLLM does: a scrape before the
    first request (`vllm bench serve` reads /metrics before and after its run) finds them."""
    MODEL_NAME["name"] = name
    V_RUNNING.labels(name)
    for tier in tiers:
        VERIFICATIONS.labels(tier)
        SD_DRAFTS.labels(name, tier)
        SD_DRAFT_TOKENS.labels(name, tier)
        SD_ACCEPTED.labels(name, tier)
        for pos in range(block_size):
            SD_ACCEPTED_PER_POS.labels(name, tier, str(pos))
            ACCEPTED_PER_POS.labels(tier, str(pos))


class _Window:
    """What happened since the last log line (the periodic SpecDecoding line)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.drafts = self.draft_tokens = self.accepted = 0
        self.per_pos: dict[int, int] = {}
        self.tokens = self.messages = self.skips = 0
        self.t0 = time.monotonic()


WINDOW = _Window()


def observe_verification(tier: str, drafted: int, accepted: int) -> None:
    """One drafted block verified by `tier`: `accepted` of its `drafted` tokens accepted (a
    prefix, as speculative sampling accepts)."""
    name = model_name()
    VERIFICATIONS.labels(tier).inc()
    DRAFTED.labels(tier).inc(drafted)
    ACCEPTED.labels(tier).inc(accepted)
    SD_DRAFTS.labels(name, tier).inc()
    SD_DRAFT_TOKENS.labels(name, tier).inc(drafted)
    SD_ACCEPTED.labels(name, tier).inc(accepted)
    for pos in range(drafted):
        # every position a draft reached gets its series (0 while nothing was accepted there),
        # as vLLM creates one per speculative position
        ACCEPTED_PER_POS.labels(tier, str(pos)).inc(1 if pos < accepted else 0)
        SD_ACCEPTED_PER_POS.labels(name, tier, str(pos)).inc(1 if pos < accepted else 0)
    w = WINDOW
    w.drafts += 1
    w.draft_tokens += drafted
    w.accepted += accepted
    for pos in range(accepted):
        w.per_pos[pos] = w.per_pos.get(pos, 0) + 1
    for pos in range(accepted, drafted):
        w.per_pos.setdefault(pos, 0)


def observe_request_end(tokens: int, messages: int, skips: int) -> None:
    WINDOW.tokens += tokens
    WINDOW.messages += messages
    WINDOW.skips += skips


def spec_decoding_line(w: _Window | None = None) -> str | None:
    """vLLM's SpecDecodingLogging line, plus the router's transmission rate (verification
    messages per generated token) and skips; None when nothing was drafted."""
    w = w or WINDOW
    if not w.drafts and not w.tokens:
        return None
    dt = max(1e-9, time.monotonic() - w.t0)
    mean_len = 1 + w.accepted / w.drafts if w.drafts else 0.0
    rate = 100.0 * w.accepted / w.draft_tokens if w.draft_tokens else 0.0
    per_pos = [w.per_pos.get(i, 0) / w.drafts for i in range(max(w.per_pos, default=-1) + 1)] \
        if w.drafts else []
    tr = w.messages / w.tokens if w.tokens else 0.0
    return ("SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f "
            "tokens/s, Drafted throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d "
            "tokens, Per-position acceptance rate: %s, Avg Draft acceptance rate: %.1f%%, "
            "TR: %.3f messages/token, Skipped: %d of %d tokens"
            % (mean_len, w.accepted / dt, w.draft_tokens / dt, w.accepted, w.draft_tokens,
               ", ".join(f"{p:.3f}" for p in per_pos), rate, tr, w.skips, w.tokens))


def log_interval_s() -> float:
    """vLLM's $VLLM_LOG_STATS_INTERVAL (default 10 s)."""
    try:
        return max(0.1, float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10")))
    except ValueError:
        return 10.0


async def log_stats_forever(logger: logging.Logger, interval_s: float | None = None) -> None:
    """Every interval: the SpecDecoding line for what happened since the last one (nothing when
    idle), as vLLM's LoggingStatLogger does."""
    interval_s = interval_s or log_interval_s()
    WINDOW.reset()
    while True:
        await asyncio.sleep(interval_s)
        line = spec_decoding_line()
        if line:
            logger.info("%s", line)
        WINDOW.reset()
