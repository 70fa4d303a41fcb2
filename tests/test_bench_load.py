"""bench/load.py's run entries: exactly the keys the round-cost issue names."""

from __future__ import annotations

from hilm_vllm.lab.bench.load import ENTRY_KEYS, entry, parse_args


def metrics(**kw):
    base = {"tokens": 64, "requests": 2, "tokens_per_s": 10.0, "stream_tokens_per_s": 5.0,
            "ttft_ms": 100.0, "itl_ms_p50": 20.0, "itl_ms_p99": 90.0, "tr_llm": 0.25,
            "llm_forwards_per_token": 0.25, "efficiency": 0.95, "uplink_bytes_per_token": 120.0,
            "draft_bytes_per_token": 700.0, "errors": 0}
    return base | kw


def test_an_entry_has_exactly_the_issue_keys_and_divides_busy_time_by_tokens():
    e = entry("spec", True, 8, "hilm", metrics(), busy_s=3.2)
    assert tuple(e) == ENTRY_KEYS
    assert e["llm_busy_s_per_token"] == 3.2 / 64 and e["optimistic"] is True
    assert e["uplink_bytes_per_token"] == 120.0 and e["draft_bytes_per_token"] == 700.0
    assert {"uplink_bytes_per_token", "draft_bytes_per_token"} <= set(ENTRY_KEYS)


def test_llm_only_sends_one_message_per_request_and_unknown_busy_time_is_null():
    e = entry("llm-only", False, 1, "none", metrics(tr_llm=None), busy_s=None)
    assert e["tr_llm"] == 2 / 64 and e["llm_busy_s_per_token"] is None


def test_arguments_are_checked():
    args = parse_args(["--policies", "spec,hilm", "--concurrency", "1,8", "--optimistic", "on"])
    assert args.policies == ["spec", "hilm"] and args.concurrency == [1, 8]
    assert args.optimistic == [True]
