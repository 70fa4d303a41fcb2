"""`hilm bench profile`: py-spy's collapsed stacks reduced to top frames, and the sampler on a
real child process tree (py-spy attaches to it). No engines."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hilm_vllm.lab.bench import BENCHMARKS, profile
from hilm_vllm.lab.bench.profile import (Sampler, frame_name, is_idle, parse_args,
                                         parse_collapsed, summary, top_frames)

RAW = """\
<module> (/x/lib/python3.11/site-packages/hilm_vllm/serve.py:10);run (/x/lib/python3.11/asyncio/runners.py:44);verify (/x/lib/python3.11/site-packages/hilm_vllm/verifier/core.py:120);send (/x/lib/python3.11/site-packages/zmq/sugar/socket.py:700) 30
<module> (/x/lib/python3.11/site-packages/hilm_vllm/serve.py:10);run (/x/lib/python3.11/asyncio/runners.py:44);verify (/x/lib/python3.11/site-packages/hilm_vllm/verifier/core.py:131) 10
<module> (/x/lib/python3.11/site-packages/hilm_vllm/serve.py:10);run (/x/lib/python3.11/asyncio/runners.py:44);EpollSelector.select (/x/lib/python3.11/selectors.py:468) 60
garbage line without a count
"""


def test_frames_lose_their_line_and_path_before_the_package():
    assert frame_name("send (/x/lib/python3.11/site-packages/zmq/sugar/socket.py:700)") \
        == "send (zmq/sugar/socket.py)"
    assert frame_name("run (/usr/lib/python3.11/asyncio/runners.py:44)") \
        == "run (asyncio/runners.py)"
    assert frame_name("f (<string>:5)") == "f (<string>)"
    assert frame_name("f (/a/b/c/mod.py:1)") == "f (c/mod.py)"
    assert frame_name("not a frame") == "not a frame"


def test_collapsed_stacks_are_parsed_and_waits_set_apart():
    stacks = parse_collapsed(RAW)
    assert [n for _, n in stacks] == [30, 10, 60]  # the bad line is skipped
    assert is_idle("EpollSelector.select (selectors.py)")
    assert is_idle("Poller.poll (zmq/sugar/poll.py)")
    assert not is_idle("send (zmq/sugar/socket.py)")
    t = top_frames(stacks, top=10)
    assert t["samples"] == 100 and t["idle_samples"] == 60
    # shares of the 40 busy samples
    assert t["self"] == [["send (zmq/sugar/socket.py)", 0.75],
                         ["verify (hilm_vllm/verifier/core.py)", 0.25]]
    incl = dict(t["inclusive"])
    assert incl["verify (hilm_vllm/verifier/core.py)"] == 1.0
    assert incl["send (zmq/sugar/socket.py)"] == 0.75
    assert "EpollSelector.select (selectors.py)" not in incl
    assert len(top_frames(stacks, top=1)["self"]) == 1


def test_a_frame_is_counted_once_per_stack_and_empty_input_gives_no_shares():
    rec = parse_collapsed("a (m.py:1);b (m.py:2);a (m.py:3) 4\n")
    assert dict(top_frames(rec, 5)["inclusive"])["a (m.py)"] == 1.0
    assert top_frames([], 5) == {"samples": 0, "idle_samples": 0, "self": [], "inclusive": []}


def test_summary_lists_busy_processes_only():
    run = {"policy": "spec", "concurrency": 16, "tokens_per_s": 100.0,
           "cpu_ms_per_token": {"llm": 2.0, "ilm": None},
           "cpu_ms_per_token_by_process": {"llm": {"api": 0.5}},
           "processes": {"llm": {"api": top_frames(parse_collapsed(RAW), 10),
                                 "python": top_frames([], 10)},
                         "ilm": {"api": {"error": "Permission denied"}}}}
    text = summary([run])
    assert "spec at 16 streams: 100.0 tokens/s" in text and "llm 2.00" in text
    assert "llm api (0.50 ms/token), 40 busy samples of 100" in text
    assert "send (zmq/sugar/socket.py) 75.0%" in text
    assert "python" not in text and "py-spy: Permission denied" in text


def test_arguments_and_registration():
    assert BENCHMARKS["profile"][0] == "profile"
    a = parse_args([])
    assert a.policies == ["llm-only", "spec"] and a.concurrency == 16
    a = parse_args(["--policies", "spec,hilm", "--concurrency", "4", "--rate", "50"])
    assert a.policies == ["spec", "hilm"] and a.concurrency == 4 and a.rate == 50
    for bad in (["--policies", "nope"], ["--concurrency", "0"], ["--rate", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.skipif(profile.py_spy() is None, reason="py-spy not installed")
def test_the_sampler_records_every_process_of_a_real_tree(tmp_path):
    busy = ("import time\n"
            "def spin():\n"
            "    t = time.time()\n"
            "    while time.time() - t < 30: sum(range(1000))\n"
            "spin()\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys\n"
                               f"c = subprocess.Popen([sys.executable, '-c', {busy!r}])\n"
                               + busy.replace("spin()\n", "") + "spin()\n"])
    try:
        time.sleep(1.0)  # the child exists
        sampler = Sampler({"llm": parent.pid, "ilm": None}, tmp_path, "spec", rate=50)
        time.sleep(2.0)
        out = sampler.stop(top=10)
    finally:
        for p in __import__("psutil").Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
    procs = out["llm"]
    if any("error" in p for p in procs.values()):
        pytest.skip(f"py-spy cannot attach here: {procs}")
    assert set(procs) == {"api", "python"}  # the root and its child, by title
    for prof in procs.values():
        assert prof["samples"] > 20
        assert any(name.startswith("spin (") for name, _ in prof["inclusive"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec-llm-api.txt",
                                                          "spec-llm-python.txt"]


def test_committed_stacks_carry_no_machine_paths():
    text = profile.shortened_stacks(RAW)
    assert "/x/" not in text and len(text.splitlines()) == 3
    assert text.splitlines()[0] == ("<module> (hilm_vllm/serve.py:10);run (asyncio/runners.py:44);"
                                    "verify (hilm_vllm/verifier/core.py:120);"
                                    "send (zmq/sugar/socket.py:700) 30")
    assert profile.shortened_stacks("") == ""
