"""`hilm up`: one command brings the three engine tiers and the router up on the tiny zoo,
serves an OpenAI request through them, and stops every process it started on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

ENGINE = "--dtype float32 --block-size 32 --kv-cache-memory-bytes 64M --enforce-eager " \
         "--max-model-len 1024"


@pytest.mark.slow  # three engines and a router: minutes on 2 shared cores
def test_hilm_up_serves_and_stops_everything(tiny_zoo):
    cmd = [sys.executable, "-m", "hilm_vllm.cli", "up", "--family", "tiny", "--port", "0",
           "--quiet", f"--engine-args={ENGINE}", "--policy", "spec"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 600
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.match(r"HILM_URL=(\S+)", line):
                url = m.group(1)
        assert url, "".join(lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len([c for c in children if "hilm_vllm.serve" in " ".join(c.cmdline())]) == 4
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert json.loads(r.read())["tiers"] == {"slm": "serving", "ilm": "serving",
                                                     "llm": "serving"}
        req = urllib.request.Request(url + "/v1/completions", json.dumps(
            {"model": "hilm", "prompt": "def f(x):", "max_tokens": 6, "ignore_eos": True,
             "repetition_penalty": 1.0}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 6
        assert out["usage"]["hilm"]["policy"] == "hilm"  # the policy named by `model`
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(180) == 128 + signal.SIGTERM or proc.returncode in (0, 1)
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
