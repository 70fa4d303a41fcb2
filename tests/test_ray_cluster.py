"""`hilm up --ray` (hilm_vllm/raycluster.py): each engine tier a Ray actor on the node offering
its tier's resource, on Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`: three
simulated nodes offering `device`, `edge` and `cloud`) with the tiny family: the tiers land on
their nodes, requests go through the router, and a killed LLM (its actor, then its tier process)
comes back on its address while requests keep succeeding. The placement's logic and `hilm up`'s
flags are tested without Ray."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from hilm_vllm import raycluster, up
from hilm_vllm.raycluster import RESOURCES, Slot, assign, colocated, router_addresses


def node(node_id: str, ip: str = "10.0.0.1", alive: bool = True, **resources) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive,
            "Resources": {"CPU": 4.0, **{k: float(v) for k, v in resources.items()}}}


# ---- placement: pure logic ---------------------------------------------------------------------

def test_each_replica_goes_to_a_node_offering_its_tier_resource_spread_over_them():
    nodes = [node("head"), node("dev", device=1), node("edge", "10.0.0.2", edge=1),
             node("c1", "10.0.0.3", cloud=1), node("c2", "10.0.0.4", cloud=2)]
    slots = assign(nodes, {"llm": 3, "ilm": 1, "slm": 1})
    where = {s.name: s.node_id for s in slots}
    assert where == {"llm-0": "c2", "llm-1": "c1", "llm-2": "c2", "ilm-0": "edge",
                     "slm-0": "dev"}
    assert [s.tier for s in slots] == ["llm", "llm", "llm", "ilm", "slm"]  # ENGINE_TIERS order
    assert next(s for s in slots if s.tier == "ilm").node_ip == "10.0.0.2"
    # a node may offer several tiers; dead nodes offer nothing; two tiers (no ILM)
    both = [node("a", device=1, cloud=1), node("b", alive=False, cloud=5)]
    assert [(s.name, s.node_id) for s in assign(both, {"llm": 1, "slm": 1})] == [
        ("llm-0", "a"), ("slm-0", "a")]


def test_too_few_units_say_which_resource_to_offer():
    with pytest.raises(SystemExit, match=r"llm tier wants 2 replica\(s\).*`cloud`.*offer 1.*"
                                         r"ray start --address HEAD --resources '\{\"cloud\""):
        assign([node("c", cloud=1), node("d", device=1)], {"llm": 2, "slm": 1})
    with pytest.raises(SystemExit, match="`edge`.*offer 0"):
        assign([node("c", cloud=1, device=1)], {"llm": 1, "ilm": 1, "slm": 1})


def test_tiers_on_one_machine_share_its_cores_and_the_router_gets_every_replica():
    slots = [Slot("llm", 0, "n1", "10.0.0.1"), Slot("llm", 1, "n2", "10.0.0.2"),
             Slot("ilm", 0, "n3", "10.0.0.1"), Slot("slm", 0, "n4", "10.0.0.1")]
    assert colocated(slots) == {"llm-0": ["llm", "ilm", "slm"], "llm-1": ["llm"],
                                "ilm-0": ["llm", "ilm", "slm"], "slm-0": ["llm", "ilm", "slm"]}
    infos = [{"tier": "llm", "index": 1, "address": "b:2"}, {"tier": "slm", "index": 0,
             "address": "c:3"}, {"tier": "llm", "index": 0, "address": "a:1"}]
    assert router_addresses(infos) == ["--llm", "a:1,b:2", "--slm", "c:3"]


def test_the_tier_environment_drops_rays_omp_threads_and_binds_cores():
    env = raycluster.tier_env("llm", ["llm", "slm"], "spread",
                              {"OMP_NUM_THREADS": "1", "RAY_RAYLET_PID": str(os.getpid()),
                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert ("OMP_NUM_THREADS" in env) == ("OMP_NUM_THREADS" in os.environ)  # "raylet": us
    assert env["VLLM_CPU_OMP_THREADS_BIND"]
    given = raycluster.tier_env("slm", ["slm"], "spread", {"VLLM_CPU_OMP_THREADS_BIND": "3"})
    assert given["VLLM_CPU_OMP_THREADS_BIND"] == "3"
    assert raycluster.tier_env("router", ["llm"], "spread", {}) == {}


def test_a_restart_kills_the_tier_its_previous_start_left_and_no_other_process(tmp_path):
    # stand-ins whose command line names hilm_vllm.serve, each in its own session (as a tier),
    # with a child in its group (as its engine)
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
            "'import time; time.sleep(120)']); time.sleep(120)"
    tiers = [subprocess.Popen([sys.executable, "-c", child, "hilm_vllm.serve"],
                              start_new_session=True) for _ in range(2)]
    try:
        time.sleep(1.0)
        groups = [psutil.Process(t.pid).children() + [psutil.Process(t.pid)] for t in tiers]
        assert all(len(g) == 2 for g in groups)
        created = [psutil.Process(t.pid).create_time() for t in tiers]
        raycluster.kill_previous({"pid": tiers[0].pid, "created": created[0] + 100})  # reused
        raycluster.kill_previous({"pid": os.getpid(), "created": psutil.Process().create_time()})
        assert all(p.is_running() for g in groups for p in g)
        raycluster.kill_previous({"pid": tiers[0].pid, "created": created[0]})
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in groups[0])
        # the tier exited, its engine did not: the engine goes
        tiers[1].kill()
        tiers[1].wait()
        raycluster.kill_previous({"pid": tiers[1].pid, "created": created[1]})
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in groups[1])
        raycluster.kill_previous({})  # a first start
    finally:
        for t in tiers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(t.pid, signal.SIGKILL)
            t.wait()
    path = raycluster.state_path("run", "llm-0")
    assert path.name == "llm-0.json" and path.parent.name == "run"
    assert raycluster.read_state(tmp_path / "none.json") == {}


def test_hilm_up_ray_flags():
    import argparse

    p = argparse.ArgumentParser()
    up.add_args(p)
    args = p.parse_args([])
    assert args.ray is None and raycluster.replica_counts(args) == {"llm": 1, "ilm": 1, "slm": 1}
    args = p.parse_args(["--ray", "--llm-replicas", "2", "--ray-max-restarts", "-1"])
    assert args.ray == "" and args.ray_max_restarts == -1
    assert raycluster.replica_counts(args) == {"llm": 2, "ilm": 1, "slm": 1}
    assert p.parse_args(["--ray", "10.0.0.1:6379"]).ray == "10.0.0.1:6379"
    with pytest.raises(SystemExit, match="--slm-replicas must be at least 1"):
        raycluster.replica_counts(p.parse_args(["--ray", "--slm-replicas", "0"]))
    with pytest.raises(SystemExit, match="need --ray"):
        up.run(p.parse_args(["--llm-replicas", "2", "--family", "tiny"]), [])


# ---- the whole system on a simulated three-node cluster ------------------------------------------

def complete(url: str, policy: str, prompt: str = "def f(x):", timeout: float = 300) -> dict:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(
        {"model": policy, "prompt": prompt, "max_tokens": 6, "ignore_eos": True,
         "repetition_penalty": 1.0}).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{policy}: {e.code} {e.read().decode()[:2000]}") from None
    assert out["usage"]["completion_tokens"] == 6, out
    return out


def serving(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())["tiers"]


def restarted(actor, starts: int, timeout: float = 600) -> dict:
    """The replica's info once its `starts`-th start is up (calls wait while Ray restarts it)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = ray.get(actor.info.remote(), timeout=timeout)
        if info["starts"] >= starts and info["healthy"]:
            return info
        time.sleep(1.0)
    raise AssertionError(f"no start {starts} within {timeout} s")


@pytest.mark.slow  # three engines on two shared cores, and two restarts of the LLM: minutes
def test_tiers_land_on_their_nodes_and_a_killed_llm_comes_back_while_requests_succeed(tiny_zoo):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from hilm_vllm.stack import family_plan

    small = {"num_cpus": 1, "object_store_memory": 80 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 80 << 20})
    nodes = {r: cluster.add_node(resources={r: 1}, **small).node_id for r in RESOURCES.values()}
    ray.init(address=cluster.address, log_to_driver=False)
    seen: set[int] = set()  # every tier process, to check none is left
    stack = None
    try:
        plan = family_plan("tiny", router_flags=["--policy", "spec", "--recover-s", "300",
                                                 "--down-retry-s", "2"])
        t0 = time.monotonic()
        stack = raycluster.RayStack.launch(plan, max_restarts=3, timeout=600)
        print(f"three tiers on three nodes and the router up after {time.monotonic() - t0:.1f} s")
        infos = stack.placed.infos
        assert sorted(i["tier"] for i in infos) == ["ilm", "llm", "slm"]
        for info in infos:  # each tier on the node that offers its resource
            assert info["node_id"] == nodes[RESOURCES[info["tier"]]], info
            assert info["healthy"] and info["starts"] == 1
            seen |= tree(info["pid"])
        assert serving(stack.url) == {"slm": "serving", "ilm": "serving", "llm": "serving"}
        for policy in ("spec", "hilm", "llm-only"):
            complete(stack.url, policy)

        llm = stack.placed.actor("llm")
        before = ray.get(llm.info.remote())

        # 1. the LLM's actor killed (Ray restarts it); a request sent meanwhile waits for it
        t0 = time.monotonic()
        ray.kill(llm, no_restart=False)
        during: list = []
        t = threading.Thread(target=lambda: during.append(complete(stack.url, "spec")))
        t.start()
        after = restarted(llm, 2)
        print(f"actor killed: the LLM serves again after {time.monotonic() - t0:.1f} s")
        assert after["address"] == before["address"] and after["node_id"] == nodes["cloud"]
        assert after["pid"] != before["pid"]
        assert gone(before["pid"])  # the old tier did not outlive its actor
        seen |= tree(after["pid"])
        t.join(300)
        assert during, "the request sent while the LLM restarted did not complete"
        for policy in ("spec", "hilm"):
            complete(stack.url, policy)

        # 2. the LLM's tier process SIGKILLed: its actor exits and Ray restarts both
        t0 = time.monotonic()
        ray.get(llm.kill_tier.remote())
        again = restarted(llm, 3)
        print(f"tier SIGKILLed: the LLM serves again after {time.monotonic() - t0:.1f} s")
        assert again["address"] == before["address"] and again["pid"] != after["pid"]
        seen |= tree(again["pid"])
        for _ in range(3):
            complete(stack.url, "spec")
        assert stack.watch() is None  # every tier still has a replica
    finally:
        if stack is not None:
            stack.stop()
        ray.shutdown()
        cluster.shutdown()
    deadline = time.monotonic() + 60
    while (left := [p for p in seen if not gone(p)]) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not left, [" ".join(psutil.Process(p).cmdline()) for p in left if not gone(p)]


def tree(pid: int) -> set[int]:
    """A tier process and its children (the engine core) now."""
    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return {pid}


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts: a container's init may never reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
