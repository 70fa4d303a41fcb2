"""Prometheus metrics of the router (`hilm_router_*`), served on its /metrics port."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("hilm_router_requests_total", "Generation requests by policy and outcome",
                   ["policy", "outcome"])
TOKENS = Counter("hilm_router_tokens_total", "Generated tokens by policy", ["policy"])
ROUTES = Counter("hilm_router_route_decisions_total",
                 "Drafted tokens by where the policy routed them (skip, ilm, llm)", ["route"])
DRAFTED = Counter("hilm_router_verified_drafts_total",
                  "Draft tokens sent to a verifier tier", ["tier"])
ACCEPTED = Counter("hilm_router_accepted_drafts_total",
                   "Draft tokens a verifier tier accepted (acceptance = accepted / verified)",
                   ["tier"])
MESSAGES = Counter("hilm_router_messages_total", "Messages sent to a tier", ["tier"])
UPLINK_BYTES = Counter("hilm_router_uplink_bytes_total",
                       "Serialized bytes sent to a tier", ["tier"])
RTT = Histogram("hilm_router_rtt_seconds", "Round trip of one message per hop (network model "
                "included)", ["tier"],
                buckets=(.001, .0025, .005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5))
TRANSMISSION_RATE = Histogram("hilm_router_transmission_rate",
                              "Per request: verification messages to a tier / generated tokens",
                              ["tier"], buckets=(0, .05, .1, .2, .3, .4, .5, .6, .8, 1.0, 1.5))
TTFT = Histogram("hilm_router_ttft_seconds", "Time to first token", ["policy"],
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
DEGRADED = Counter("hilm_router_degraded_total",
                   "Requests completed around an unreachable tier", ["reason"])
TIER_DOWN = Counter("hilm_router_tier_unreachable_total",
                    "Times a tier was found unreachable", ["tier"])
