"""The soak and fault harness: four tiers, Locust headless in a subprocess, memory and sessions.

The tiers are a `hilm_vllm.stack.Stack` (launched as `hilm up` does, or wrapping tiers a test
started), which restarts one on its own ports, so the router's addresses stay valid, and reads
each tier's resident memory (its whole process tree: the API process, vLLM's engine core) and
open sessions (its /metrics). `LocustRun` drives locustfiles/soak.py headless against the router
and reads back the users' raw samples (hilm_vllm/lab/soak/users.py); `RssSampler` records the memory
along the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from hilm_vllm.launch import TierProcess
from hilm_vllm.stack import Stack, family_plan
from hilm_vllm.zoo import ensure_zoo
from hilm_vllm.router.policy import Policy

LOCUSTFILE = Path(__file__).resolve().parents[2] / "locustfiles" / "soak.py"  # the checkout's
USERS_IMPORT = "from hilm_vllm.lab.soak.users import GrpcGenerateUser, SseUser  # noqa: F401\n"
RSS_GROWTH_LIMIT_PCT = 5.0
# Memory that levels off: each tier's RSS fitted by least squares over the run's last
# SLOPE_WINDOW_S (or its second half, if shorter) grows by less than this. Judged only when the
# window is at least SLOPE_MIN_WINDOW_S long (a 10-minute soak reports its slope, unjudged).
RSS_SLOPE_LIMIT_MB_PER_MIN = 1.0
SLOPE_WINDOW_S = 1800.0
SLOPE_MIN_WINDOW_S = 1200.0
RSS_SAMPLE_EVERY_S = 10.0  # the memory timeline's step


def percentile(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 2) if xs else None


class RssSampler:
    """Samples every tier's resident memory, per process, every `every_s` seconds in a thread:
    `series()` = {"t_s": [...], tier: [MB, ...], "by_process": {tier: {process: [MB, ...]}}}."""

    def __init__(self, stack: Stack, every_s: float = RSS_SAMPLE_EVERY_S):
        self.stack, self.every_s = stack, every_s
        self.t: list[float] = []
        self.samples: list[dict[str, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.t.append(round(time.monotonic() - self._t0, 1))
            self.samples.append(self.stack.rss_by_process())
            if self._stop.wait(self.every_s):
                return

    def series(self) -> dict:
        tiers = sorted({t for s in self.samples for t in s})
        out: dict = {"t_s": list(self.t)}
        by_process: dict = {}
        for tier in tiers:
            names = sorted({n for s in self.samples for n in s.get(tier, {})})
            out[tier] = [round(sum(s.get(tier, {}).values()), 1) or None for s in self.samples]
            by_process[tier] = {n: [s.get(tier, {}).get(n) for s in self.samples] for n in names}
        out["by_process"] = by_process
        return out


@dataclass
class LocustRun:
    """locustfiles/soak.py headless, in a subprocess (Locust's gevent stays out of this one)."""

    host: str
    grpc_address: str
    users: int
    duration_s: float
    spawn_rate: float | None = None  # users started per second (default: all within ~5 s)
    policies: str | None = None
    max_tokens: int = 24
    prompts: list[str] | None = None
    user_classes: list[str] | None = None  # e.g. ["SseUser"]; default: every user class
    stop_timeout_s: float = 300.0  # users finish the request in flight when the run ends
    request_timeout_s: float = 300.0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hilm-soak-")))
    proc: subprocess.Popen | None = None
    started: float = 0.0

    def start(self) -> LocustRun:
        samples, log = self.workdir / "samples.json", self.workdir / "locust.log"
        cmd = [sys.executable, "-m", "locust", "-f", str(self.locustfile()), "--headless",
               "--host", self.host, "--grpc-address", self.grpc_address,
               "-u", str(self.users), "-r", str(self.spawn_rate or max(1.0, self.users / 5)),
               "-t", f"{int(self.duration_s)}s", "--stop-timeout", str(int(self.stop_timeout_s)),
               "--max-tokens", str(self.max_tokens), "--samples-out", str(samples),
               "--request-timeout", str(self.request_timeout_s), "--only-summary",
               "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        if self.policies:
            cmd += ["--policies", self.policies]
        if self.user_classes:
            cmd += self.user_classes
        if self.prompts:
            (self.workdir / "prompts.json").write_text(json.dumps(self.prompts))
            cmd += ["--prompts-file", str(self.workdir / "prompts.json")]
        env = dict(os.environ)
        if LOCUSTFILE.is_file():  # a source checkout: its package, installed or not
            root = str(LOCUSTFILE.parents[1])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.started = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir)
        return self

    def locustfile(self) -> Path:
        """locustfiles/soak.py of the source checkout; from an installed package, the same
        one line (the users live in hilm_vllm.lab.soak.users) written to the work folder."""
        if LOCUSTFILE.is_file():
            return LOCUSTFILE
        path = self.workdir / "soak_locustfile.py"
        path.write_text(USERS_IMPORT)
        return path

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self) -> dict:
        """Wait for the run to end; the users' samples (users.Samples.to_dict)."""
        try:
            self.proc.wait(self.duration_s + self.stop_timeout_s + 120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        samples = self.workdir / "samples.json"
        if not samples.is_file():
            raise RuntimeError(f"locust wrote no samples (exit code {self.proc.returncode}):\n"
                               f"{self.log_tail()}")
        return json.loads(samples.read_text())

    def log_tail(self, n: int = 40) -> str:
        log = self.workdir / "locust.log"
        return "\n".join(log.read_text().splitlines()[-n:]) if log.is_file() else ""

    def finish(self) -> dict:
        """End the run now (SIGTERM: users finish the request in flight, within
        stop_timeout_s); the users' samples."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def soak(stack: Stack, users: int, duration_s: float, warmup_s: float, *,
         policies: str | None = None, max_tokens: int = 24, prompts: list[str] | None = None,
         settle_s: float = 30.0, log: Callable[[str], None] = lambda _m: None,
         errors_out: dict | None = None, sample_every_s: float = RSS_SAMPLE_EVERY_S) -> dict:
    """One soak run: RSS at start, after `warmup_s` of load and at the end (and every
    `sample_every_s` along the run, per process: `rss_timeline`); sessions at the end (after up
    to `settle_s` for closes in flight); TTFT / ITL percentiles; the verdict."""
    rss = {t: {"start": v} for t, v in stack.rss().items()}
    run = LocustRun(stack.router.http_url, stack.router.grpc_address, users, duration_s,
                    policies=policies, max_tokens=max_tokens, prompts=prompts).start()
    try:
        with RssSampler(stack, sample_every_s) as sampler:
            log(f"soak: {users} users for {duration_s:g} s (warm-up {warmup_s:g} s)")
            time.sleep(max(0.0, warmup_s - run.elapsed()))
            for t, v in stack.rss().items():
                rss[t]["after_warmup"] = v
            samples = run.wait()
    finally:
        run.stop()
    if errors_out is not None:
        errors_out.update(samples["errors"])
    log(f"soak: {samples['requests']} requests, {samples['failures']} failed; waiting for "
        f"sessions to close")
    sessions = stack.wait_sessions_closed(settle_s)
    for t, v in stack.rss().items():
        rss[t]["end"] = v
    out = summarize(users, duration_s, samples, rss, sessions)
    out["rss_timeline"] = sampler.series()
    judge_slopes(out, duration_s)
    return out


def rss_slopes(timeline: dict, window_s: float) -> dict[str, float | None]:
    """Per tier, the least-squares slope (MB/min) of its RSS over the timeline's last
    `window_s` seconds; None where fewer than three samples fall in the window."""
    t = np.asarray(timeline.get("t_s") or [], dtype=float)
    out: dict[str, float | None] = {}
    for tier, ys in timeline.items():
        if tier in ("t_s", "by_process"):
            continue
        pts = [(x, y) for x, y in zip(t, ys) if y is not None and x >= t[-1] - window_s]
        if len(pts) < 3:
            out[tier] = None
            continue
        xs, vs = np.array(pts).T
        out[tier] = round(float(np.polyfit(xs / 60.0, vs, 1)[0]), 3)
    return out


def judge_slopes(results: dict, duration_s: float) -> None:
    """Adds the memory-slope fields to `results["verdict"]` (in place): the fit window, each
    tier's slope, and `rss_levelled` (None when the run is too short to judge)."""
    window = min(SLOPE_WINDOW_S, duration_s / 2)
    slopes = rss_slopes(results.get("rss_timeline") or {}, window)
    v = results["verdict"]
    v["rss_slope_window_s"] = window
    v["rss_slope_mb_per_min"] = slopes
    if window < SLOPE_MIN_WINDOW_S or not slopes:
        v["rss_levelled"] = None
        return
    v["rss_levelled"] = all(s is not None and s < RSS_SLOPE_LIMIT_MB_PER_MIN
                            for s in slopes.values())
    v["pass"] = v["pass"] and v["rss_levelled"]


def summarize(users: int, duration_s: float, samples: dict, rss: dict, sessions: dict) -> dict:
    growth = {}
    for t, r in rss.items():
        warm, end = r.get("after_warmup"), r.get("end")
        growth[t] = None if not warm or end is None else round((end - warm) / warm * 100, 2)
    checks = {
        "no_failures": samples["failures"] == 0 and samples["requests"] > 0,
        "rss_growth_pct_after_warmup": growth,
        "rss_bounded": all(g is not None and g < RSS_GROWTH_LIMIT_PCT for g in growth.values()),
        "sessions_closed": all(c == 0 for c in sessions.values()),
    }
    return {
        "users": users, "duration_s": duration_s, "requests": samples["requests"],
        "failures": samples["failures"], "rss_mb": rss, "sessions": sessions,
        "ttft_ms_p50": percentile(samples["ttft_ms"], 50),
        "ttft_ms_p99": percentile(samples["ttft_ms"], 99),
        "itl_ms_p50": percentile(samples["itl_ms"], 50),
        "itl_ms_p99": percentile(samples["itl_ms"], 99),
        "verdict": {"pass": checks["no_failures"] and checks["rss_bounded"]
                    and checks["sessions_closed"], **checks},
    }


# ---- the model families' flags -------------------------------------------------------------

# The tiny family (tests, CI): engine_configs/tiny-*.yaml, fixed thresholds that use every tier.
TINY_ROUTER_FLAGS = ["--t1", "0.3", "--t2", "0.8", "--t-ilm", "0.6", "--block-size", "3"]
# The demo family: engine_configs/demo-*.yaml and its calibrated thresholds-demo.yaml.
DEMO_ROUTER_FLAGS = ["--block-size", "4"]


def launch_family(recipe: str, what: str):
    """(zoo, Stack) of `recipe`'s four tiers (built first if missing) as `hilm up --family
    recipe` starts them, the router on the `hilm` policy; announced as `what`."""

    zoo = ensure_zoo(recipe)
    flags = ["--policy", "hilm", *(TINY_ROUTER_FLAGS if recipe == "tiny" else DEMO_ROUTER_FLAGS)]
    print(f"{what}: starting the {recipe} family's four tiers", flush=True)
    stack = Stack.launch(family_plan(recipe, router_flags=flags),
                         log=lambda m: print(f"{what}: {m}", flush=True))
    return zoo, stack


def prompts_of(zoo, n: int = 16, chars: int = 200) -> list[str]:
    """Held-out prompts of the family, cut to their last `chars` characters."""
    return [p["prompt"][-chars:] for p in zoo.heldout_prompts(n)]


# ---- faults ----------------------------------------------------------------------------------

# A request that needs the tier (and would be marked degraded without it): the probe of
# recovery after a fault.
PROBE_POLICY = {"slm": "spec", "ilm": "cascade", "llm": "llm-only"}


def probe(url: str, policy: str, timeout: float = 60.0) -> tuple[bool, str]:
    """One short completion with `policy`: (served fully, i.e. 200 and not degraded; why not)."""
    body = {"model": policy, "prompt": "def main():\n    ", "max_tokens": 4,
            "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}: {e.read()[:200]!r}"
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    degraded = out["usage"]["hilm"]["degraded"]
    return (not degraded), f"degraded {degraded}" if degraded else "ok"


def wait_recovered(url: str, tier: str, since: float, deadline_s: float) -> float | None:
    """Seconds from `since` (time.monotonic) until a probe needing `tier` is served fully;
    None if not within `deadline_s`."""
    while time.monotonic() - since < deadline_s:
        ok, _why = probe(url, PROBE_POLICY[tier])
        if ok:
            return round(time.monotonic() - since, 2)
        time.sleep(0.5)
    return None


def signal_tree(proc: TierProcess, sig: int) -> None:
    """Send `sig` to the tier's whole process tree (API process, engine core, workers)."""
    for p in [psutil.Process(proc.proc.pid), *proc.descendants()]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def in_window(records: list, start: float, end: float) -> tuple[int, int]:
    """(requests, failed) among `records` (users.Samples.records) in flight at any time in
    [start, end] (Unix time)."""
    hit = [r for r in records if r[0] <= end and r[1] >= start]
    return len(hit), sum(1 for r in hit if r[2])


@dataclass
class Fault:
    name: str  # "kill+restart slm", "stop 5 s ilm"
    tier: str
    start: float = 0.0  # Unix time of the fault
    end: float = 0.0  # Unix time it was recovered (or given up)
    restart_s: float | None = None  # SIGKILL until the new process is SERVING
    recovered_s: float | None = None  # the fault until a request needing the tier is served

    def result(self, records: list, errors: dict) -> dict:
        requests, failed = in_window(records, self.start, self.end)
        by_kind = {kind: in_window([r for r in records if _lossless(r[3]) is lossless],
                                   self.start, self.end)
                   for kind, lossless in (("lossy", False), ("lossless", True))}
        return {"fault": self.name, "tier": self.tier, "requests": requests, "failed": failed,
                # the bar: lossy requests never fail; a lossless one may end with a
                # clear 503 once the LLM has been gone for --recover-s
                "requests_lossy": by_kind["lossy"][0], "failed_lossy": by_kind["lossy"][1],
                "requests_lossless": by_kind["lossless"][0],
                "failed_lossless": by_kind["lossless"][1],
                "recovered_s": self.recovered_s, "restart_s": self.restart_s}


def _lossless(policy: str) -> bool:

    try:
        return Policy(policy).lossless
    except ValueError:
        return False


def kill_and_restart(stack: Stack, tier: str, deadline_s: float) -> Fault:
    """SIGKILL the tier's process tree, start it again on its ports, wait for recovery."""
    fault = Fault(f"kill+restart {tier}", tier, time.time())
    t0 = time.monotonic()
    stack.kill(tier)
    stack.restart(tier)
    fault.restart_s = round(time.monotonic() - t0, 2)
    fault.recovered_s = wait_recovered(stack.router.http_url, tier, t0, deadline_s)
    fault.end = time.time()
    return fault


def stop_and_continue(stack: Stack, tier: str, pause_s: float, deadline_s: float) -> Fault:
    """SIGSTOP the tier's process tree for `pause_s`, SIGCONT it, wait for recovery."""
    import signal

    fault = Fault(f"stop {pause_s:g} s {tier}", tier, time.time())
    t0 = time.monotonic()
    signal_tree(stack.tiers[tier], signal.SIGSTOP)
    try:
        time.sleep(pause_s)
    finally:
        signal_tree(stack.tiers[tier], signal.SIGCONT)
    fault.recovered_s = wait_recovered(stack.router.http_url, tier, t0, deadline_s)
    fault.end = time.time()
    return fault
