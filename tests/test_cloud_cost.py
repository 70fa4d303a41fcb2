"""`hilm bench cloud-cost`: the run entries' keys and arithmetic, and the process-tree CPU
reading (hilm_vllm.lab.bench.cpu) on real child processes. No engines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from hilm_vllm.lab.bench import BENCHMARKS, cloud_cost, cpu
from hilm_vllm.lab.bench.cloud_cost import ENTRY_KEYS, RUN_KEYS, add_ratios, entry, parse_args

ISSUE_KEYS = {"policy", "concurrency", "tokens_per_s", "llm_cpu_ms_per_token",
              "ilm_cpu_ms_per_token", "slm_cpu_ms_per_token", "router_cpu_ms_per_token",
              "llm_cpu_ms_per_verify", "tr_llm", "errors"}


def metrics(**kw):
    """demo.run_metrics' shape, for 4 requests of 16 tokens."""
    base = {"requests": 4, "errors": 0, "tokens": 64, "wall_s": 2.0, "tokens_per_s": 32.0,
            "tr_llm": 0.25, "tr_ilm": 0.125, "uplink_bytes_per_token": 300.0,
            "draft_bytes_per_token": 900.0, "usage": {"llm_messages": 16, "ilm_messages": 8}}
    return base | kw


CPU = {"llm": 0.64, "ilm": 0.32, "slm": 1.28, "router": 0.064}


def test_the_issue_keys_come_first_and_are_all_there():
    assert set(RUN_KEYS) == ISSUE_KEYS and ENTRY_KEYS[:len(RUN_KEYS)] == RUN_KEYS
    e = entry("hilm", 4, metrics(), CPU)
    assert tuple(e) == ENTRY_KEYS


def test_cpu_is_divided_by_tokens_and_by_the_llm_verify_calls():
    e = entry("hilm", 4, metrics(), CPU, {"llm": {"api": 0.16, "VLLM::EngineCore": 0.48}},
              {"llm": 0})
    assert e["llm_cpu_ms_per_token"] == pytest.approx(640 / 64)
    assert e["ilm_cpu_ms_per_token"] == pytest.approx(320 / 64)
    assert e["slm_cpu_ms_per_token"] == pytest.approx(1280 / 64)
    assert e["router_cpu_ms_per_token"] == pytest.approx(64 / 64)
    assert e["total_cpu_ms_per_token"] == pytest.approx((640 + 320 + 1280 + 64) / 64)
    assert e["llm_cpu_ms_per_verify"] == pytest.approx(640 / 16)
    assert e["tr_llm"] == 0.25 and e["tr_ilm"] == 0.125
    assert e["uplink_bytes_per_token"] == 300.0 and e["draft_bytes_per_token"] == 900.0
    assert e["cpu_ms_per_token_by_process"]["llm"] == {
        "api": pytest.approx(2.5), "VLLM::EngineCore": pytest.approx(7.5)}


def test_llm_only_and_vllm_spec_have_no_verify_and_one_message_per_request():
    e = entry("llm-only", 1, metrics(tr_llm=0.2, usage={"llm_messages": 4}), CPU)
    assert e["llm_cpu_ms_per_verify"] is None and e["tr_llm"] == 4 / 64
    v = entry("vllm-spec", 1, metrics(tr_llm=None, tr_ilm=None, uplink_bytes_per_token=None,
                                      usage=None), {"llm": 0.64})
    assert v["llm_cpu_ms_per_verify"] is None and v["tr_llm"] == 4 / 64
    assert v["llm_cpu_ms_per_token"] == pytest.approx(10.0)
    for k in ("ilm_cpu_ms_per_token", "slm_cpu_ms_per_token", "router_cpu_ms_per_token",
              "uplink_bytes_per_token", "draft_bytes_per_token", "tr_ilm"):
        assert v[k] is None, k
    assert v["total_cpu_ms_per_token"] == pytest.approx(10.0)


def test_verify_saturated_counts_its_verify_calls():
    """verify-saturated: no router; its tokens are what its Verify calls emitted, its verifies
    are its calls (usage.llm_messages), tr_llm = calls / tokens."""
    m = metrics(tr_llm=0.4, tr_ilm=None, uplink_bytes_per_token=None,
                draft_bytes_per_token=None, usage={"llm_messages": 26})
    e = entry(cloud_cost.SATURATED, 16, m, {"llm": 0.52, "slm": 0.0, "router": 0.0})
    assert e["llm_cpu_ms_per_token"] == pytest.approx(520 / 64)
    assert e["llm_cpu_ms_per_verify"] == pytest.approx(520 / 26)
    assert e["tr_llm"] == 0.4 and e["tr_ilm"] is None and e["uplink_bytes_per_token"] is None
    assert add_ratios([entry("llm-only", 16, metrics(), {"llm": 0.26}), e])[1][
        "llm_cpu_ratio"] == pytest.approx(2.0)


def test_no_tokens_or_no_reading_gives_null_not_zero():
    e = entry("spec", 1, metrics(tokens=0, errors=4, tokens_per_s=None),
              {"llm": None, "ilm": None, "slm": None, "router": None})
    assert all(e[k] is None for k in ("llm_cpu_ms_per_token", "llm_cpu_ms_per_verify",
                                      "total_cpu_ms_per_token"))
    assert e["errors"] == 4


def test_ratios_are_to_llm_only_at_the_same_concurrency():
    runs = [entry("llm-only", 1, metrics(), {"llm": 1.28}),
            entry("hilm", 1, metrics(), {"llm": 0.32}),
            entry("hilm", 4, metrics(), {"llm": 0.32})]  # no llm-only at 4
    add_ratios(runs)
    assert runs[0]["llm_cpu_ratio"] == 1.0 and runs[1]["llm_cpu_ratio"] == 0.25
    assert runs[2]["llm_cpu_ratio"] is None


def test_the_json_document_and_table(tmp_path, monkeypatch):
    from hilm_vllm.lab import benchjson

    monkeypatch.setattr(benchjson, "machine", lambda: {"cpu_count": 2})  # no torch import
    runs = add_ratios([entry("llm-only", 1, metrics(), CPU), entry("hilm", 1, metrics(), CPU)])
    path = benchjson.write_result("cloud-cost", {"waves": 3}, {"runs": runs}, tmp_path)
    assert re.fullmatch(r"cloud-cost-\d{8}T\d{6}Z\.json", path.name)
    doc = json.loads(path.read_text())
    assert {"config", "git_commit", "machine"} <= doc.keys()
    for run in doc["results"]["runs"]:
        assert ISSUE_KEYS <= run.keys()
    table = cloud_cost.render_table(runs).splitlines()
    assert table[0].startswith("| policy") and "LLM ms/tok" in table[0]
    assert len(table) == 4 and len({len(x) for x in table}) == 1


def test_arguments_and_registration():
    args = parse_args([])
    assert args.concurrency == [1, 4, 16, 32] and args.waves == 3 and args.max_tokens == 48
    assert args.policies == ["llm-only", "spec", "hilm", "uhlm", "cascade", "vllm-spec",
                             "verify-saturated"]
    args = parse_args(["--policies", "hilm,vllm-spec", "--concurrency", "1,4", "--zoo", "tiny"])
    assert args.policies == ["hilm", "vllm-spec"] and args.concurrency == [1, 4]
    args = parse_args(["--policies", "verify-saturated", "--saturated-s", "2.5"])
    assert args.policies == ["verify-saturated"] and args.saturated_s == 2.5
    for bad in (["--policies", "nope"], ["--saturated-s", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert BENCHMARKS["cloud-cost"][0] == "cloud_cost"


# ---- the process-tree CPU reading ---------------------------------------------------------------

# A process of the test tree: `worker.py DIR NAME BURN_S [NEXT_NAME NEXT_BURN_S WHEN ...]` starts
# the next level now (WHEN=now) or after DIR/go appears (WHEN=later), says DIR/ready-NAME, waits
# for DIR/go, burns BURN_S seconds of CPU, says DIR/done-NAME and idles until killed.
WORKER = """import os, subprocess, sys, time
d, name, burn, rest = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]

def spawn():
    subprocess.Popen([sys.executable, __file__, d, *rest[:2], *rest[3:]])

if rest and rest[2] == "now":
    spawn()
open(os.path.join(d, "ready-" + name), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
if rest and rest[2] == "later":
    spawn()
t = time.process_time()
while time.process_time() - t < burn:
    pass
open(os.path.join(d, "done-" + name), "w").close()
time.sleep(120)
"""


def _wait_for(*paths, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.02)


def test_a_tree_counts_children_of_children_and_new_processes_from_zero(tmp_path):
    """parent (0.3 s) -> child (0.4 s, running before the first reading) -> grandchild (0.2 s,
    started after it: counted from 0, its interpreter's start-up included)."""
    import psutil

    (tmp_path / "worker.py").write_text(WORKER)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path),
                               "parent", "0.3", "child", "0.4", "now", "grandchild", "0.2",
                               "later"])
    try:
        _wait_for(tmp_path / "ready-parent", tmp_path / "ready-child")
        meter = cpu.TreeCPU({"tree": parent.pid, "unmeasured": None}).start()
        assert len(meter.before["tree"].cpu_s) == 2
        (tmp_path / "go").touch()
        _wait_for(*(tmp_path / f"done-{n}" for n in ("parent", "child", "grandchild")))
        meter.stop()
        assert len(meter.after["tree"].cpu_s) == 3
        spent = meter.seconds["tree"]
        # 0.3 + 0.4 + 0.2, plus a start-up and the polling (psutil reads 10 ms clock ticks)
        assert 0.85 <= spent < 1.6, spent
        assert meter.seconds["unmeasured"] is None and meter.vanished["tree"] == 0
        roles = meter.by_role["tree"]
        assert roles["api"] >= 0.27 and sum(roles.values()) == pytest.approx(spent)
        assert sum(v for k, v in roles.items() if k != "api") >= 0.57
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait(10)


def test_a_process_that_exits_between_readings_is_counted_as_vanished():
    code = ("import subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.readline()'], "
            "stdin=subprocess.PIPE)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "c.stdin.write(b'\\n'); c.stdin.flush(); c.wait()\n"
            "print('gone', flush=True)\n"
            "sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = cpu.snapshot(proc.pid)
        assert len(before.cpu_s) == 2
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "gone"
        after = cpu.snapshot(proc.pid)
        assert len(after.cpu_s) == 1 and cpu.vanished(before, after) == 1
        assert cpu.delta(before, after) >= 0
        assert cpu.delta(before, None) is None
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
        assert cpu.snapshot(proc.pid) is None  # the root itself is gone: unmeasured
    finally:
        proc.kill()
        proc.wait(10)


def test_ms_per():
    assert cpu.ms_per(0.5, 100) == 5.0
    assert cpu.ms_per(None, 100) is None and cpu.ms_per(0.5, 0) is None
