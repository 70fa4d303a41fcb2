"""`hilm chat`: URL handling, the usage footer, and a clear error without a router."""

import subprocess
import sys

import pytest

from hilm_vllm.chat_cli import base_url, footer


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "http://127.0.0.1:8000",
                                 "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"])
def test_base_url(url):
    assert base_url(url) == "http://127.0.0.1:8000/v1"


def test_footer_from_usage_hilm():
    usage = {"completion_tokens": 20, "hilm": {
        "policy": "hilm", "skips": 12, "ilm_messages": 3, "llm_messages": 1, "ilm_drafted": 8,
        "ilm_accepted": 6, "llm_drafted": 0, "llm_accepted": 0, "llm_forwards": 2,
        "uplink_bytes": {"slm": 0, "ilm": 1200, "llm": 300}, "network_ms": 140.0,
        "degraded": ["llm slow"]}}
    line = footer(usage, elapsed_s=2.0, ttft_s=0.25)
    assert line == ("[20 tokens in 2.00 s (10.0 tok/s) | TTFT 250 ms | policy hilm | skips 12 | "
                    "ILM 3 msgs, acc 0.75 | LLM 1 msgs | LLM fwd/tok 0.10 | uplink 1,500 B | "
                    "net 140 ms | DEGRADED: llm slow]")
    assert "no usage.hilm" in footer({"completion_tokens": 3}, 1.0, None)


def test_unreachable_router_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "hilm_vllm.cli", "chat", "--url",
                        "http://127.0.0.1:1"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 1 and "cannot reach the router at http://127.0.0.1:1/v1" in r.stderr
