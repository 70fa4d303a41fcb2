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

# engine_configs/tiny-<tier>.yaml has the tiny family's engine flags; this one only checks that
# --engine-args reach every engine tier.
ENGINE = "--max-num-seqs 8"


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
        serving = [" ".join(c.cmdline()) for c in children
                   if "hilm_vllm.serve" in " ".join(c.cmdline())]
        assert len(serving) == 4, serving
        engines = [c for c in serving if "--tier router" not in c]
        assert all("tiny-" in c and "--max-num-seqs 8" in c for c in engines), engines
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


# ---- what `hilm up` (hilm_vllm.stack.family_plan) starts: pure logic, nothing launched -------

def test_the_demo_family_plan_uses_its_configs_thresholds_and_ilm_gate():
    from hilm_vllm.stack import REPO, family_plan

    plan = family_plan("demo", router_flags=["--policy", "hilm"], check_models=False)
    assert list(plan.engines) == ["llm", "ilm", "slm"]
    for tier, flags in plan.engines.items():
        assert flags[:2] == ["--model", f"zoo:demo/{tier}"]
        assert flags[flags.index("--config") + 1] == str(REPO / "engine_configs" /
                                                          f"demo-{tier}.yaml")
    # t_ilm was fitted with the thresholds file's ilm_uncertainty gate: the ILM tier gets it
    ilm = plan.engines["ilm"]
    assert ilm[ilm.index("--uncertainty-gate") + 1] == "perturbed"
    assert "--uncertainty-gate" not in plan.engines["llm"] + plan.engines["slm"]
    assert plan.router[:2] == ["--model", "zoo:demo/llm"]
    assert plan.router[plan.router.index("--thresholds") + 1].endswith("thresholds-demo.yaml")
    assert plan.router[-2:] == ["--policy", "hilm"]


def test_explicit_thresholds_models_and_gate_flags_win(tmp_path):
    from hilm_vllm.stack import family_plan

    plan = family_plan("demo", router_flags=["--t1", "0.2", "--t2", "0.5"],
                       tier_args={"ilm": "--uncertainty-gate entropy"},
                       models={"llm": "org/big-model"}, engine_args="--max-model-len 512",
                       check_models=False)
    assert "--thresholds" not in plan.router  # the given thresholds, not the family's file
    assert plan.router[:2] == ["--model", "org/big-model"]
    assert plan.engines["llm"][:2] == ["--model", "org/big-model"]
    ilm = plan.engines["ilm"]
    assert ilm.count("--uncertainty-gate") == 1 and ilm[-2:] == ["--uncertainty-gate", "entropy"]
    assert all(f[f.index("--max-model-len") + 1] == "512" for f in plan.engines.values())
    th = tmp_path / "th.yaml"
    th.write_text("t1: 0.1\nt2: 0.2\nt_ilm: 0.3\nilm_uncertainty:\n  gate: entropy\n"
                  "  num_samples: 20\n  theta_max: 2.0\n  perturbation: uniform\n")
    plan = family_plan("demo", router_flags=[f"--thresholds={th}"], check_models=False)
    ilm = plan.engines["ilm"]
    assert ilm[ilm.index("--uncertainty-gate"):][:8] == [
        "--uncertainty-gate", "entropy", "--uncertainty-samples", "20", "--theta-max", "2.0",
        "--perturbation", "uniform"]


def test_two_tiers_and_missing_models():
    from hilm_vllm.stack import family_plan, flag_value, ilm_gate_flags

    plan = family_plan(None, models={"slm": "a", "llm": "b"}, no_ilm=True, check_models=False)
    assert list(plan.engines) == ["llm", "slm"] and flag_value(plan.router, "--policy") == "spec"
    with pytest.raises(SystemExit, match="--ilm-model, or --family"):
        family_plan(None, models={"slm": "a", "llm": "b"}, check_models=False)
    with pytest.raises(SystemExit, match="unknown zoo recipe 'no-such-family'"):
        family_plan("no-such-family")
    assert flag_value(["--x", "1", "--x=2"], "--x") == "2" and flag_value([], "--x") is None
    assert ilm_gate_flags(None) == [] and ilm_gate_flags("/no/such/file.yaml") == []


def test_hilm_serve_tier_all_is_hilm_up():
    from hilm_vllm.serve import _split_all

    assert _split_all(["--tier", "all", "--family", "demo"]) == ["--family", "demo"]
    assert _split_all(["--family", "demo", "--tier=all"]) == ["--family", "demo"]
    assert _split_all(["--tier", "llm"]) is None
    out = subprocess.run([sys.executable, "-m", "hilm_vllm.serve", "--tier", "all", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--family" in out.stdout and "--llm-model" in out.stdout


def test_sigint_stops_a_launcher_started_with_sigint_ignored():
    """`hilm up &` in a shell script starts it with SIGINT ignored; `kill -INT` must still stop
    it (through KeyboardInterrupt, so its finally blocks stop the tiers)."""
    code = ("import time\nfrom hilm_vllm.launch import exit_on_sigterm\nexit_on_sigterm()\n"
            "print('ready', flush=True)\ntry:\n    time.sleep(20)\n"
            "except KeyboardInterrupt:\n    print('stopped', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "stopped"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
