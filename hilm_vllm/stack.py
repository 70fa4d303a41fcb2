"""A whole system: the llm, ilm and slm engine tiers and the router, started, watched and stopped
together. `hilm up` is this plus a wait for Ctrl-C; `make demo`, the benchmarks (demo, sweep,
load) and the soak and fault runs launch through it too, so they run what a user starts.

    plan = family_plan("demo", router_flags=["--policy", "hilm"])
    with Stack.launch(plan) as stack:
        print(stack.url)                  # http://127.0.0.1:PORT, the OpenAI API
        stack.tiers["llm"].grpc_address   # each tier's TierProcess

`family_plan` turns a family (zoo:F/slm, zoo:F/ilm, zoo:F/llm) or one model per tier into each
process's `hilm-serve` flags: `engine_configs/F-<tier>.yaml` and `engine_configs/thresholds-F.yaml`
are used when they exist (in the current directory or the source checkout), and the ILM tier
gets the gate its threshold was fitted with (the thresholds file's `ilm_uncertainty`).
"""

from __future__ import annotations

import shlex
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hilm_vllm.launch import TierProcess
from hilm_vllm.zoo.registry import resolve_model

ENGINE_TIERS = ("llm", "ilm", "slm")  # started in this order; the router needs them
TIERS = ("slm", "ilm", "llm", "router")
# The open-session gauge of each tier that holds sessions (the router holds none of its own:
# a request's sessions live on the tiers).
SESSION_GAUGES = {"slm": "hilm_drafter_sessions", "ilm": "hilm_verifier_sessions",
                  "llm": "hilm_verifier_sessions"}
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL of the tier's process group (a tier still starting
#                      its engine can take a minute to honour SIGTERM)
REPO = Path(__file__).resolve().parent.parent  # the source checkout (an editable install)
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "engine_configs"  # an installed package's


# ---- what to start -------------------------------------------------------------------------

@dataclass
class StackPlan:
    """Each process's `hilm-serve` flags, without the addresses and ports Stack assigns."""

    engines: dict[str, list[str]]  # tier -> flags (after `--tier TIER`)
    router: list[str]  # the router's flags; Stack adds --slm/--ilm/--llm, --host and the ports
    host: str = "127.0.0.1"  # the router's HTTP API
    port: int = 0  # 0: any free port


def find_config(name: str) -> Path | None:
    """engine_configs/NAME in the current directory, else the source checkout's, else the copy
    an installed package ships (setup.py)."""
    for folder in (Path.cwd() / "engine_configs", REPO / "engine_configs", PACKAGED_CONFIGS):
        path = folder / name
        if path.is_file():
            return path
    return None


def config_path(path: str | Path) -> Path:
    """`path` when it exists; else, for `engine_configs/NAME`, the file find_config finds (so the
    benchmarks' default `engine_configs/X.yaml` works from any directory and from an installed
    package, while their JSON records the short name); else `path` unchanged."""
    path = Path(path)
    if not path.is_file() and path.parent.name == "engine_configs":
        return find_config(path.name) or path
    return path


def flag_value(flags: list[str], name: str) -> str | None:
    """The value of `name` in an argv (`--x v` or `--x=v`), the last one given; None if absent."""
    value = None
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f.split("=", 1)[1]
    return value


def ilm_gate_flags(thresholds: str | Path | None) -> list[str]:
    """The ILM tier's own gate flags from the thresholds YAML's `ilm_uncertainty` (t_ilm was
    fitted with that gate; the router does not send the ILM one), [] when it names none."""
    from hilm_vllm import codec  # loads torch (sampling): not at `hilm --help`'s import time

    if thresholds is None or not Path(thresholds).is_file():
        return []
    u = codec.read_thresholds(thresholds).ilm_uncertainty
    if u is None:
        return []
    return ["--uncertainty-gate", u.gate.value, "--uncertainty-samples", str(u.num_samples),
            "--theta-max", str(u.theta_max), "--perturbation", u.perturbation.value]


def family_plan(family: str | None = None, *, models: dict[str, str | None] | None = None,
                engine_args: str | list[str] = "", tier_args: dict[str, str] | None = None,
                router_flags: list[str] | None = None, no_ilm: bool = False,
                host: str = "127.0.0.1", port: int = 0, check_models: bool = True) -> StackPlan:
    """The flags of every process for `family` (zoo:F/<tier>) or one model per tier (`models`,
    which win over the family's). `engine_args` go to every engine tier, `tier_args[tier]` to one
    (quoted strings, as on a command line); `router_flags` to the router. With `check_models`, a
    zoo model that is not built fails now, saying how to build it."""

    models, tier_args = dict(models or {}), dict(tier_args or {})
    router_flags = list(router_flags or [])
    common = shlex.split(engine_args) if isinstance(engine_args, str) else list(engine_args)
    tiers = [t for t in ENGINE_TIERS if not (no_ilm and t == "ilm")]
    thresholds = flag_value(router_flags, "--thresholds")
    if family and thresholds is None and not any(
            flag_value(router_flags, f) is not None for f in ("--t1", "--t2")):
        th = find_config(f"thresholds-{family}.yaml")
        if th is not None:
            thresholds = str(th)
            router_flags = ["--thresholds", thresholds, *router_flags]
    engines: dict[str, list[str]] = {}
    for tier in tiers:
        model = models.get(tier) or (f"zoo:{family}/{tier}" if family else None)
        if model is None:
            raise SystemExit(f"error: give --{tier}-model, or --family (e.g. --family demo)")
        if check_models:
            resolve_model(model)
        flags = ["--model", model]
        config = find_config(f"{family}-{tier}.yaml") if family else None
        if config is not None:
            flags += ["--config", str(config)]
        own = shlex.split(tier_args.get(tier) or "")
        if tier == "ilm" and "--uncertainty-gate" not in common + own:
            flags += ilm_gate_flags(thresholds)
        engines[tier] = flags + common + own
    if no_ilm and flag_value(router_flags, "--policy") is None:
        router_flags += ["--policy", "spec"]
    router = ["--model", engines["llm"][1], *router_flags]
    return StackPlan(engines, router, host, port)


# ---- the running system --------------------------------------------------------------------

@dataclass
class Stack:
    """The running tiers (tier -> TierProcess); `args[tier]` are the flags each was started with
    (its ports included). `owned=False` wraps tiers someone else stops (a test's fixtures)."""

    tiers: dict[str, TierProcess]
    args: dict[str, list[str]] = field(default_factory=dict)
    owned: bool = True
    extra: list[TierProcess] = field(default_factory=list)  # more routers (add_router)

    @classmethod
    def launch(cls, plan: StackPlan, *, placement: str | None = None, timeout: float = 900.0,
               echo: Callable[[str, str], None] | None = None,
               log: Callable[[str], None] | None = None) -> Stack:
        """Start the engine tiers together (placed on this machine's cores, `placement`), wait
        until each is SERVING, then the router on their addresses. `echo(tier, line)` sees the
        router's output lines; `log` gets progress messages. Anything started is stopped when
        a tier fails to come up (RuntimeError with its last lines) or on KeyboardInterrupt."""
        say = log or (lambda _m: None)
        stack = cls({})
        t0 = time.monotonic()
        try:
            say(f"starting {', '.join(plan.engines)} ...")
            for tier, flags in plan.engines.items():
                stack.args[tier] = [*flags, "--port", "0", "--metrics-port", "0"]
                stack.tiers[tier] = TierProcess.start(tier, stack.args[tier],
                                                      placement=placement)
            for tier in plan.engines:
                stack.tiers[tier].wait_healthy(timeout)
                say(f"{tier} ready at {stack.tiers[tier].grpc_address} "
                    f"(metrics {stack.tiers[tier].metrics_url}) after "
                    f"{time.monotonic() - t0:.0f} s")
            stack.start_router(plan, stack.addresses(), timeout, echo)
            say(f"router ready at {stack.url} after {time.monotonic() - t0:.0f} s")
        except BaseException:
            stack.stop()
            raise
        return stack

    def addresses(self) -> list[str]:
        """--slm/--ilm/--llm flags naming the engine tiers' gRPC addresses."""
        return [x for t in ENGINE_TIERS if t in self.tiers
                for x in (f"--{t}", self.tiers[t].grpc_address)]

    def start_router(self, plan: StackPlan, addresses: list[str], timeout: float,
                     echo: Callable[[str, str], None] | None = None) -> TierProcess:
        """The plan's router on the engine tiers at `addresses` (--slm/--ilm/--llm flags), at
        the plan's host and port, healthy; `echo(tier, line)` gets its output lines."""
        self.args["router"] = [*plan.router, *addresses, "--host", plan.host,
                               "--port", str(plan.port), "--grpc-port", "0",
                               "--metrics-port", "0"]
        self.tiers["router"] = TierProcess.start(
            "router", self.args["router"],
            echo=(lambda line: echo("router", line)) if echo else None)
        self.tiers["router"].wait_healthy(timeout)
        return self.tiers["router"]

    def add_router(self, flags: list[str], timeout: float = 300.0) -> TierProcess:
        """Another router on the same engine tiers (e.g. another network model); stopped with
        the stack."""
        r = TierProcess.start("router", [*flags, *self.addresses(), "--port", "0",
                                         "--grpc-port", "0", "--metrics-port", "0"])
        self.extra.append(r)
        r.wait_healthy(timeout)
        return r

    @property
    def router(self) -> TierProcess:
        return self.tiers["router"]

    @property
    def url(self) -> str:
        """The router's HTTP API, e.g. http://127.0.0.1:8000 (reachable address)."""
        return self.router.http_url

    def exited(self) -> TierProcess | None:
        """A tier whose process has exited, if any."""
        return next((p for p in self.tiers.values() if p.proc.poll() is not None), None)

    def tail(self, tier: str, n: int = 30) -> str:
        return self.tiers[tier].tail(n) if tier in self.tiers else ""

    def write_logs(self, log_dir: Path) -> None:
        """Each tier's last output lines to LOG_DIR/<tier>.log."""
        log_dir.mkdir(parents=True, exist_ok=True)
        for tier, p in self.tiers.items():
            (log_dir / f"{tier}.log").write_text("\n".join(p.log) + "\n")

    # memory and sessions (the soak's checks)

    def rss(self) -> dict[str, float | None]:
        return {t: rss_mb(self.tiers[t]) for t in TIERS if t in self.tiers}

    def rss_by_process(self) -> dict[str, dict[str, float]]:
        return {t: process_rss_mb(self.tiers[t]) for t in TIERS if t in self.tiers}

    def sessions(self) -> dict[str, int | None]:
        out = {}
        for t, gauge in SESSION_GAUGES.items():
            if t in self.tiers:
                v = scrape(self.tiers[t].metrics_url, gauge)
                out[t] = None if v is None else int(v)
        return out

    def wait_sessions_closed(self, timeout: float) -> dict[str, int | None]:
        """Each tier's open sessions, once all are 0 or after `timeout` s (closing is async)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.sessions()
            if all(c == 0 for c in counts.values()) or time.monotonic() > deadline:
                return counts
            time.sleep(0.5)

    # faults

    def kill(self, tier: str) -> None:
        """SIGKILL the tier's whole process tree: no goodbye, its connections just drop."""
        proc = self.tiers[tier]
        for p in [psutil.Process(proc.proc.pid), *proc.descendants()]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.proc.wait(30)

    def restart(self, tier: str, timeout: float = 900.0) -> TierProcess:
        """Start `tier` again on the ports it had (the router keeps its addresses)."""
        old = self.tiers[tier]
        new = TierProcess.start(tier, [*self.args[tier], "--port", str(old.grpc_port),
                                       "--metrics-port", str(old.metrics_port)])
        self.tiers[tier] = new
        new.wait_healthy(timeout)
        return new

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every process, routers first, all at once; a Ctrl-C meanwhile cannot cut it
        short (in the main thread). Nothing when the stack is not `owned`."""
        if not self.owned:
            return
        procs = [*self.extra, *(self.tiers[t] for t in ("router", *ENGINE_TIERS)
                                if t in self.tiers)]
        if not procs:
            return
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            threads = [threading.Thread(target=p.stop, args=(timeout,)) for p in procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- measurements of a tier's processes ----------------------------------------------------

def scrape(url: str, name: str) -> float | None:
    """The value of an unlabelled metric on a /metrics page, None if absent or unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _tree(proc: TierProcess) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def process_rss_mb(proc: TierProcess) -> dict[str, float]:
    """Resident memory of each process of the tier's tree, MB, by role: "api" (the hilm-serve
    process) and the others by their process title (vLLM names its engine core "EngineCore",
    its workers likewise); several of one name are summed."""
    out: dict[str, float] = {}
    for i, p in enumerate(_tree(proc)):
        try:
            name = "api" if i == 0 else _title(p)
            out[name] = round(out.get(name, 0.0) + p.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def _title(p: psutil.Process) -> str:
    """A child's process title: vLLM's (e.g. "VLLM::EngineCore", set in its command line; the
    kernel's name keeps only 15 characters of it), else the executable's name."""
    try:
        cmdline = p.cmdline()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        cmdline = []
    if cmdline and cmdline[0].strip().startswith("VLLM::"):
        return cmdline[0].strip()
    return p.name() or f"pid{p.pid}"


def rss_mb(proc: TierProcess) -> float | None:
    """Resident memory of the tier's process tree, MB (None once it is gone)."""
    parts = process_rss_mb(proc)
    return round(sum(parts.values()), 1) if parts else None
