"""`hilm up --ray [ADDRESS]`: the engine tiers as Ray actors on a Ray cluster's nodes.

Each node says which tiers it can hold with a custom Ray resource (`RESOURCES`): `device` for the
slm tier (the drafter), `edge` for the ilm tier, `cloud` for the llm tier; a replica takes one
unit, so `ray start --resources '{"cloud": 2}'` makes a node take two LLM replicas.

    placed = place(plan, "auto", replicas={"llm": 2})   # plan: stack.family_plan(...)
    placed.addresses()   # ["--llm", "10.0.0.5:41234,10.0.0.6:39011", "--ilm", ..., "--slm", ...]
    placed.stop()

- **Placement.** `assign` gives each replica a node that offers its tier's resource (the nodes
  with the most units left first, so replicas spread), and its actor is pinned there
  (`NodeAffinitySchedulingStrategy`, hard) besides asking for the unit: a restarted replica comes
  back on the same node.
- **One actor, one tier.** A `TierActor` owns one `hilm-serve --tier T` process
  (`launch.TierProcess`), bound to the node's IP (the address Ray knows the node by); its
  `__init__` starts it and returns once it is SERVING; `info()` gives its address and health.
  Engine tiers that share a machine (nodes with one IP) are placed on its cores together, as
  `hilm up` places them on one machine (`engine_env.placement`, `--placement`).
- **Restarts.** A tier process that exits takes its actor down with it (a watchdog thread), and
  Ray restarts the actor (`max_restarts`; calls wait meanwhile, `max_task_retries=-1`), whose
  `__init__` starts the tier again on the ports it had: the first start's gRPC and metrics ports
  are kept in a file on the node, so the router's addresses stay right. A killed actor
  (`ray.kill(actor, no_restart=False)`, a worker crash) comes back the same way; its old tier
  (alive or draining) is killed first. The router, started by `hilm up` next to it, sees the
  replica drop and reopens sessions from the history it owns (`router/replicas.py`).
- **Teardown.** `Placement.stop()` stops every tier (SIGINT, then SIGKILL of its process group)
  and kills the actors, with SIGINT and SIGTERM ignored meanwhile. A tier whose actor dies
  without that gets SIGTERM (`PR_SET_PDEATHSIG`), unless Ray SIGKILLs it first (it kills a dead
  worker's children), which leaves its vLLM engine running: a restart kills what is left.

Ray is imported inside the functions that use it, never at module level: `hilm up` imports this
module, and `hilm --help` must not pay Ray's import (about a second) nor need Ray installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from grpc_health.v1 import health_pb2

from hilm_vllm.launch import TierProcess
from hilm_vllm.server import engine_env
from hilm_vllm.stack import ENGINE_TIERS, Stack, StackPlan, flag_value

RESOURCES = {"slm": "device", "ilm": "edge", "llm": "cloud"}  # tier -> the Ray resource
DEFAULT_MAX_RESTARTS = 10  # per actor; -1: without end
LOCAL_OBJECT_STORE = 128 << 20  # a one-node Ray of our own: the actors pass no objects
STATE_DIR = "hilm-ray"  # under the node's temporary directory: one file per replica (its ports)
RAY_MISSING = ("`hilm up --ray` needs Ray: pip install 'ray==2.60.0' (or the `dsi` extra, "
               "pip install 'hilm-vllm[dsi]') on this machine and every node")


# ---- where each replica goes: pure logic -----------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """One replica of a tier, on one node."""

    tier: str
    index: int  # the replica's number within its tier
    node_id: str
    node_ip: str

    @property
    def name(self) -> str:
        return f"{self.tier}-{self.index}"


def assign(nodes: list[dict], replicas: dict[str, int]) -> list[Slot]:
    """A node for each replica (`replicas`: tier -> count) among `nodes` (`ray.nodes()`'s
    records: NodeID, NodeManagerAddress, Resources, Alive). A replica takes one unit of its tier's
    resource; each goes to the live node with the most units left (ties: the order given), so a
    tier's replicas spread over its nodes. SystemExit saying what to start when the cluster offers
    too few units."""
    left = {n["NodeID"]: {r: int(n.get("Resources", {}).get(r, 0)) for r in RESOURCES.values()}
            for n in nodes if n.get("Alive", True)}
    ip = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in nodes}
    slots = []
    for tier in ENGINE_TIERS:
        count = replicas.get(tier, 0)
        resource = RESOURCES[tier]
        for index in range(count):
            best = max(left, key=lambda node: left[node][resource], default=None)
            if best is None or left[best][resource] < 1:
                offered = sum(int(n.get("Resources", {}).get(resource, 0)) for n in nodes
                              if n.get("Alive", True))
                raise SystemExit(
                    f"error: the {tier} tier wants {count} replica(s), one unit of the Ray "
                    f"resource `{resource}` each, and the cluster's live nodes offer {offered}: "
                    f"start nodes with `ray start --address HEAD --resources "
                    f"'{{\"{resource}\": 1}}'` (or fewer --{tier}-replicas)")
            left[best][resource] -= 1
            slots.append(Slot(tier, index, best, ip.get(best, "")))
    return slots


def colocated(slots: list[Slot]) -> dict[str, list[str]]:
    """Slot name -> the engine tiers on its machine (nodes with one IP share the machine's
    cores, as Ray's test cluster's nodes do), whose cores `engine_env.placement` divides."""
    by_ip: dict[str, list[str]] = {}
    for s in slots:
        tiers = by_ip.setdefault(s.node_ip, [])
        if s.tier not in tiers:
            tiers.append(s.tier)
    return {s.name: by_ip[s.node_ip] for s in slots}


def router_addresses(infos: list[dict]) -> list[str]:
    """--slm/--ilm/--llm flags naming every replica's gRPC address (replica order)."""
    out = []
    for tier in ENGINE_TIERS:
        mine = sorted((i for i in infos if i["tier"] == tier), key=lambda i: i["index"])
        if mine:
            out += [f"--{tier}", ",".join(i["address"] for i in mine)]
    return out


def replica_counts(args) -> dict[str, int]:
    """`hilm up`'s --{slm,ilm,llm}-replicas for the tiers its plan has."""
    out = {}
    for tier in ENGINE_TIERS:
        n = getattr(args, f"{tier}_replicas", 1)
        if n < 1:
            raise SystemExit(f"error: --{tier}-replicas must be at least 1, got {n}")
        out[tier] = n
    return out


# ---- one tier in one actor ---------------------------------------------------------------------

def _die_with_parent() -> Callable[[], object] | None:
    """A `preexec_fn` by which the tier gets SIGTERM when the actor's process dies (Linux's
    PR_SET_PDEATHSIG), then drains and stops; None elsewhere. libc is loaded here, in the parent:
    between fork and exec (the actor has threads) the child only makes the one call."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class NodeTier(TierProcess):
    """A TierProcess bound to `host` (the node's IP, so other nodes reach it): its health checks
    and addresses name that host rather than 127.0.0.1."""

    host = "127.0.0.1"

    @classmethod
    def launch(cls, tier: str, args: list[str], env: dict[str, str], node_ip: str) -> NodeTier:
        """`hilm-serve --tier TIER ARGS`, bound to `node_ip` unless ARGS name a --host (with
        0.0.0.0 or ::, the tier is still reached at `node_ip`)."""
        bind = flag_value(args, "--host")
        if bind is None:
            args = [*args, "--host", node_ip]
        cmd = [sys.executable, "-m", "hilm_vllm.serve", "--tier", tier, *args]
        # the preexec_fn makes one prctl call between fork and exec, nothing that takes a lock
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True,
                                preexec_fn=_die_with_parent())  # noqa: PLW1509
        out = cls(proc, tier)
        out.host = node_ip if bind in (None, "0.0.0.0", "::") else bind
        return out

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def tier_env(tier: str, tiers_here: list[str], layout: str,
             environ: dict[str, str] | None = None) -> dict[str, str]:
    """The tier process's environment: the actor's, without what Ray set for its own workers
    (OMP_NUM_THREADS=1 when the node's own environment has none), with the engine's cores
    (`VLLM_CPU_OMP_THREADS_BIND`, from the tiers on this machine) unless given."""
    env = dict(os.environ if environ is None else environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # AsyncLLM needs its engine core process
    if "OMP_NUM_THREADS" in env and not _raylet_has("OMP_NUM_THREADS", env):
        del env["OMP_NUM_THREADS"]
    if tier in engine_env.ENGINE_TIERS and engine_env.BIND_ENV not in env:
        env[engine_env.BIND_ENV] = engine_env.placement(
            tiers_here, engine_env.available_cpus(), layout)[tier]
    return env


def _raylet_has(name: str, env: dict[str, str]) -> bool:
    """Whether the node's raylet (started by `ray start`, with the node's environment) has
    `name`: Ray's workers get OMP_NUM_THREADS=1 unless it does. True when unknown."""
    try:
        return name in psutil.Process(int(env["RAY_RAYLET_PID"])).environ()
    except (KeyError, ValueError, psutil.Error):
        return True


def state_path(run_id: str, name: str) -> Path:
    return Path(tempfile.gettempdir()) / STATE_DIR / run_id / f"{name}.json"


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def kill_previous(state: dict) -> None:
    """SIGKILL the process group of the tier a previous start of this actor left (a killed
    actor's tier may still run or drain, or its engine outlive it). The group's id is the tier's
    pid (it starts a session): while the tier runs, only when that pid is still that process; once
    it has exited, whoever is left in its group is its own (Linux gives no new process a pid that
    names a live group)."""
    pid = state.get("pid")
    if not pid:
        return
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - state.get("created", 0)) > 1 or \
                "hilm_vllm.serve" not in " ".join(p.cmdline()):
            return  # the pid was reused
    except psutil.NoSuchProcess:
        pass  # the tier has exited: its group may still hold its engine
    except psutil.Error:
        return
    group = []
    for q in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(q.pid) == pid:
                group.append(q)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(group, timeout=30)


class TierActor:
    """A Ray actor (`ray.remote(TierActor)`, see `place`) that owns one tier process on its
    node. Constructed again by Ray after a restart, with the same arguments."""

    def __init__(self, tier: str, index: int, flags: list[str], run_id: str,
                 tiers_here: list[str], layout: str = "spread", timeout: float = 900.0):
        import ray  # in the actor's process only (see the module's docstring)

        self.tier, self.index = tier, index
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.path = state_path(run_id, f"{tier}-{index}")
        previous = read_state(self.path)
        kill_previous(previous)
        self.starts = previous.get("starts", 0) + 1
        ports = ["--port", str(previous.get("port", 0)),
                 "--metrics-port", str(previous.get("metrics_port", 0))]
        self.stopping = False
        self.proc = NodeTier.launch(tier, [*flags, *ports], tier_env(tier, tiers_here, layout),
                                    self.node_ip)
        self._save(previous)  # a restart during this start finds the tier to kill
        try:
            self.proc.wait_healthy(timeout)
        except BaseException:
            self.proc.stop(10)
            raise
        self._save({"port": self.proc.grpc_port, "metrics_port": self.proc.metrics_port})
        threading.Thread(target=self._watch, daemon=True).start()

    def _save(self, ports: dict) -> None:
        """This start's tier process and the ports to keep, in the node's state file."""
        pid = self.proc.proc.pid
        with contextlib.suppress(psutil.Error):
            created = psutil.Process(pid).create_time()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({
                "pid": pid, "created": created, "starts": self.starts,
                **{k: ports[k] for k in ("port", "metrics_port") if ports.get(k)}}))

    def _watch(self) -> None:
        """The tier exited by itself: take the actor down so that Ray restarts it."""
        while self.proc.proc.poll() is None and not self.stopping:
            time.sleep(0.5)
        if self.stopping:
            return
        print(f"hilm: the {self.tier} tier (replica {self.index}) exited "
              f"({self.proc.proc.returncode}); the actor exits for Ray to restart it:\n"
              f"{self.proc.tail()}", file=sys.stderr, flush=True)
        self.proc.stop(5)  # what is left of its process group
        os._exit(1)

    def info(self) -> dict:
        """Where this replica serves and whether it answers now."""
        try:
            healthy = self.proc.proc.poll() is None and \
                self.proc.health() == health_pb2.HealthCheckResponse.SERVING
        except Exception:  # noqa: BLE001 - any failure of the check is "not healthy"
            healthy = False
        return {"tier": self.tier, "index": self.index, "address": self.proc.grpc_address,
                "metrics_url": self.proc.metrics_url, "node_id": self.node_id,
                "node_ip": self.node_ip, "pid": self.proc.proc.pid, "starts": self.starts,
                "healthy": healthy}

    def tail(self, n: int = 40) -> str:
        return self.proc.tail(n)

    def kill_tier(self) -> int:
        """SIGKILL the tier's process group (a fault for tests): the watchdog then restarts it."""
        pid = self.proc.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the tier for good (teardown): no restart follows."""
        self.stopping = True
        code = self.proc.stop(timeout)
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.path.parent.rmdir()  # the last replica of the run on this node
        return code


@contextlib.contextmanager
def shielded():
    """SIGINT and SIGTERM ignored meanwhile (in the main thread): a teardown cut short would
    leave tiers to Ray, which SIGKILLs an actor's tier process and orphans its engine."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- the cluster ---------------------------------------------------------------------------------

def connect(address: str | None, replicas: dict[str, int]) -> bool:
    """Join the cluster at `address` ("auto": the one $RAY_ADDRESS or `ray start` on this machine
    names), or with None that one if any, else start a one-node Ray here that offers every tier's
    resource. True when this call started or joined Ray (and `Placement.stop` leaves it)."""
    try:
        import ray  # only for --ray (see the module's docstring)
    except ImportError:
        raise SystemExit(f"error: {RAY_MISSING}") from None
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return True
    try:
        ray.init(address="auto", log_to_driver=False)
    except ConnectionError:
        ray.init(resources={RESOURCES[t]: n for t, n in replicas.items()},
                 include_dashboard=False, log_to_driver=False,
                 object_store_memory=LOCAL_OBJECT_STORE)
    return True


@dataclass
class Placement:
    """The actors of every replica and what they answered (`infos`, slot order)."""

    slots: list[Slot]
    actors: list = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    owns_ray: bool = False
    run_id: str = ""

    def addresses(self) -> list[str]:
        return router_addresses(self.infos)

    def actor(self, tier: str, index: int = 0):
        return next(a for s, a in zip(self.slots, self.actors, strict=False)
                    if s.tier == tier and s.index == index)

    def refresh(self, timeout: float = 60.0) -> list[dict]:
        """Each replica's `info()` again (waits for one that is restarting)."""
        import ray

        self.infos = ray.get([a.info.remote() for a in self.actors], timeout=timeout)
        return self.infos

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every tier, kill the actors, and leave Ray if `place` joined it."""
        import ray

        with shielded():
            self._stop(ray, timeout)

    def _stop(self, ray, timeout: float) -> None:
        if self.actors:
            refs = [a.stop.remote() for a in self.actors]
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=timeout)
            for a in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
            self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False


def place(plan: StackPlan, address: str | None = None, *,
          replicas: dict[str, int] | None = None, max_restarts: int = DEFAULT_MAX_RESTARTS,
          placement: str | None = None, timeout: float = 900.0,
          log: Callable[[str], None] | None = None) -> Placement:
    """Start `plan`'s engine tiers as actors on the cluster at `address` (see `connect`), each
    replica on a node offering its tier's resource, and wait until every one is SERVING.
    Anything started is stopped again when one fails (RuntimeError with its message)."""
    say = log or (lambda _m: None)
    counts = {t: (replicas or {}).get(t, 1) for t in plan.engines}
    owns = connect(address, counts)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    placed = Placement([], owns_ray=owns, run_id=uuid.uuid4().hex[:12])
    try:
        placed.slots = assign(ray.nodes(), counts)
        layout = placement or os.environ.get("HILM_PLACEMENT") or "spread"
        here = colocated(placed.slots)
        remote = ray.remote(TierActor)
        for s in placed.slots:
            placed.actors.append(remote.options(
                name=f"hilm-{placed.run_id}-{s.name}", num_cpus=0,
                resources={RESOURCES[s.tier]: 1},
                scheduling_strategy=NodeAffinitySchedulingStrategy(s.node_id, soft=False),
                max_restarts=max_restarts, max_task_retries=-1,
            ).remote(s.tier, s.index, plan.engines[s.tier], placed.run_id, here[s.name],
                     layout, timeout))
        say(f"starting {', '.join(s.name for s in placed.slots)} on "
            f"{len({s.node_id for s in placed.slots})} Ray node(s) ...")
        refs = {a.info.remote(): s for s, a in zip(placed.slots, placed.actors, strict=True)}
        t0, pending, infos = time.monotonic(), list(refs), {}
        while pending:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RuntimeError(f"{', '.join(refs[r].name for r in pending)} did not turn "
                                   f"SERVING within {timeout:.0f} s")
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise RuntimeError(f"the {refs[ref].name} replica did not start: {e}") from None
                infos[ref] = info
                say(f"{refs[ref].name} ready at {info['address']} (node "
                    f"{info['node_id'][:8]}) after {time.monotonic() - t0:.0f} s")
        placed.infos = [infos[r] for r in refs]
    except BaseException:
        placed.stop()
        raise
    return placed


@dataclass
class RayStack:
    """The tiers on Ray (`placed`) and the router next to this process (`stack`, router only)."""

    placed: Placement
    stack: Stack
    _pings: dict = field(default_factory=dict)
    _starts: dict = field(default_factory=dict)

    @classmethod
    def launch(cls, plan: StackPlan, address: str | None = None, *,
               replicas: dict[str, int] | None = None,
               max_restarts: int = DEFAULT_MAX_RESTARTS, placement: str | None = None,
               timeout: float = 900.0, echo: Callable[[str, str], None] | None = None,
               log: Callable[[str], None] | None = None) -> RayStack:
        placed = place(plan, address, replicas=replicas, max_restarts=max_restarts,
                       placement=placement, timeout=timeout, log=log)
        stack = Stack({})
        try:
            stack.start_router(plan, placed.addresses(), timeout, echo)
            if log:
                log(f"router ready at {stack.url}")
        except BaseException:
            stack.stop()
            placed.stop()
            raise
        out = cls(placed, stack)
        out._starts = {(i["tier"], i["index"]): i["starts"] for i in placed.infos}
        return out

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def router(self) -> TierProcess:
        return self.stack.router

    def watch(self, log: Callable[[str], None] | None = None) -> str | None:
        """One look at the replicas, without waiting: says which came back (restarted) or died
        for good; returns a message when a tier has no replica left (or the router exited)."""
        import ray

        if (gone := self.stack.exited()) is not None:
            return f"the router exited ({gone.proc.returncode}):\n{gone.tail()}"
        say = log or (lambda _m: None)
        for s, a in zip(self.placed.slots, self.placed.actors, strict=True):
            key = (s.tier, s.index)
            if key not in self._pings:
                self._pings[key] = a.info.remote()
            done, _ = ray.wait([self._pings[key]], timeout=0)
            if not done:
                continue  # still restarting (or busy)
            ref = self._pings.pop(key)
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._starts[key] = None
                say(f"{s.name} is gone for good: {e}")
                if all(self._starts.get((s.tier, i)) is None
                       for i in range(sum(1 for x in self.placed.slots if x.tier == s.tier))):
                    return f"the {s.tier} tier has no replica left"
                continue
            if self._starts.get(key) is not None and info["starts"] != self._starts[key]:
                say(f"{s.name} restarted at {info['address']} (start {info['starts']})")
            self._starts[key] = info["starts"]
        return None

    def stop(self) -> None:
        """The router, then every replica; a second Ctrl-C or SIGTERM cannot cut it short."""
        with shielded():
            self.stack.stop()
            self.placed.stop()

    def __enter__(self) -> RayStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
