"""Where each tier's CPU goes: py-spy of every tier process while a policy runs under load.

    hilm bench profile                                   # llm-only and spec at 16 streams, demo
    hilm bench profile --policies spec,hilm --concurrency 16 --waves 4
    hilm bench profile --summary bench/results/profile-<UTC>.json   # print an existing one

It launches the family as `hilm bench cloud-cost` does (hilm_vllm.stack, network model off) and,
for every policy, streams one untimed warm-up wave and then `concurrency` x `--waves` requests
of `--max-tokens` tokens (T = 1, `ignore_eos`) through the OpenAI API, as cloud-cost does. Over
the timed waves it samples every process of every tier's tree (the API process, its engine core
and worker; the router) with `py-spy record --nonblocking -r RATE -f raw` (py-spy does not
stop the process it samples; it records only threads that are running, not idle waits) and
reads each tree's CPU time (psutil). `bench/results/profile-<UTC>.json` holds `config`,
`git_commit`, `machine` and `results.runs`, one per policy, with
  policy, concurrency, tokens_per_s, errors
  cpu_ms_per_token         {tier: ms} as cloud-cost's *_cpu_ms_per_token
  cpu_ms_per_token_by_process   {tier: {process: ms}}
  processes                {tier: {process: {samples, self: [[frame, share], ...],
                            inclusive: [[frame, share], ...]}}}: the top `--top` frames by
                           self samples and by inclusive samples (a frame counted once per
                           stack), as shares of the process's busy samples; `idle_samples`
                           are the samples whose innermost frame is a wait (IDLE_FRAMES:
                           select, poll, a condition or queue wait: py-spy cannot always tell
                           a thread blocked in C from one running, so they are set apart
                           here), `samples` all of them; a frame is "function (file)", the
                           file's path from its package on. Under contention a thread that
                           wakes another (a ZMQ send) may be preempted inside that call: a
                           share is of the time a thread was busy or ready, not of CPU alone
and the raw py-spy stacks of each process beside the JSON (`profile-<UTC>/<policy>-<tier>-
<process>.txt`, Brendan Gregg's collapsed format with paths from each package on:
`flamegraph.pl` or speedscope draws them; a process with no sample has no file).
py-spy needs ptrace rights over the tiers, which are not its children: on Linux
`kernel.yama.ptrace_scope` 0, or root / CAP_SYS_PTRACE (a process it cannot read gets an
`error` in place of its frames).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.bench.cloud_cost import (ROUTER_POLICIES, TIERS, add_wave_args,
                                            router_flags, waves)
from hilm_vllm.lab.bench.cpu import ROOT_ROLE, TreeCPU, ms_per
from hilm_vllm.lab.bench.demo import run_metrics
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.launch import exit_on_sigterm
from hilm_vllm.stack import Stack, _title as process_title, family_plan
from hilm_vllm.zoo import ensure_zoo

SETTLE_S = 10.0
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?P<line>:\d+)?\)$")
_PACKAGES = ("site-packages/", "dist-packages/", "lib/python3")
# innermost frames that are waits, not work (matched against frame_name's output)
IDLE_FRAMES = ("select (selectors.py)", "Poller.poll (", "poll (zmq/", "Condition.wait (",
               "wait (multiprocessing/connection.py)", "Thread.run (threading.py)",
               "Event.wait (", "sleep (", "_wait (asyncio/tasks.py)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--policies", default="llm-only,spec",
                   help="comma-separated, of " + ", ".join(ROUTER_POLICIES)
                        + " (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="concurrent streams (default: %(default)s)")
    add_wave_args(p)
    p.add_argument("--rate", type=int, default=100,
                   help="py-spy samples per second (default: %(default)s)")
    p.add_argument("--top", type=int, default=40,
                   help="frames kept per process and ranking (default: %(default)s)")
    p.add_argument("--summary", type=Path, default=None,
                   help="only print the top frames of an existing profile JSON")
    args = p.parse_args(argv)
    args.policies = [x for x in args.policies.split(",") if x]
    unknown = set(args.policies) - set(ROUTER_POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(ROUTER_POLICIES)}")
    if args.concurrency < 1 or args.waves < 1 or args.rate < 1 or args.top < 1:
        p.error("--concurrency, --waves, --rate and --top must be at least 1")
    return args


# ---- pure: py-spy's collapsed stacks -> top frames ----------------------------------------------

def frame_name(frame: str) -> str:
    """"fn (path/to/pkg/mod.py:12)" -> "fn (pkg/mod.py)": the line dropped (one entry per
    function) and the path cut to start at its package."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('fn')} ({short_path(m.group('file'))})"


def short_path(path: str) -> str:
    """A source path from its package on (no machine paths in committed results):
    ".../site-packages/vllm/x.py" -> "vllm/x.py", ".../lib/python3.11/json/x.py" ->
    "json/x.py", else the last two parts."""
    for marker in _PACKAGES:
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + len(marker):]
            if marker == "lib/python3":  # lib/python3.11/json/x.py -> json/x.py
                path = path.split("/", 1)[-1]
            break
    else:
        path = "/".join(path.split("/")[-2:])
    return path


def shortened_stacks(text: str) -> str:
    """py-spy's collapsed stacks with every frame's path shortened (short_path), lines kept."""
    def one(frame: str) -> str:
        m = _FRAME.match(frame)
        if not m:
            return frame
        return f"{m.group('fn')} ({short_path(m.group('file'))}{m.group('line') or ''})"

    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            out.append(";".join(one(f) for f in stack.split(";")) + f" {count}")
    return "\n".join(out) + ("\n" if out else "")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw output (`frame;frame;... count` per line, outermost first) as (frames,
    count) pairs; a line py-spy annotates with a thread or process name keeps that entry."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out.append((stack.split(";"), int(count)))
    return out


def is_idle(innermost: str) -> bool:
    """Whether a stack whose innermost frame (frame_name's form) is this one is a wait."""
    return any(mark in innermost for mark in IDLE_FRAMES)


def top_frames(stacks: list[tuple[list[str], int]], top: int) -> dict:
    """{samples, idle_samples, self, inclusive}: the `top` frames by self samples (the innermost
    frame) and by inclusive samples (each frame once per stack), as shares of the busy samples
    (the stacks that do not end in a wait, is_idle)."""
    own: Counter = Counter()
    incl: Counter = Counter()
    samples = idle = 0
    for frames, n in stacks:
        names = [frame_name(f) for f in frames]
        samples += n
        if not names or is_idle(names[-1]):
            idle += n
            continue
        own[names[-1]] += n
        for name in set(names):
            incl[name] += n
    total = samples - idle

    def ranked(c: Counter) -> list[list]:
        return [[name, round(k / total, 4)] for name, k in c.most_common(top)] if total else []

    return {"samples": samples, "idle_samples": idle, "self": ranked(own),
            "inclusive": ranked(incl)}


# ---- sampling -----------------------------------------------------------------------------------

def tree(root_pid: int | None) -> list[tuple[int, str]]:
    """(pid, role) of every live process of the tree, the root as "api"."""
    if root_pid is None:
        return []
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for i, p in enumerate(procs):
        try:
            out.append((p.pid, ROOT_ROLE if i == 0 else process_title(p)))
        except psutil.Error:
            continue
    return out


def py_spy() -> str | None:
    """py-spy's executable: on PATH, else beside this Python's (a virtual environment)."""
    found = shutil.which("py-spy") or Path(sys.executable).with_name("py-spy")
    return str(found) if Path(found).exists() else None


def py_spy_version() -> str | None:
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()


class Sampler:
    """py-spy recording each process of the trees until stop(); collapsed stacks per
    (tier, role) under `folder`."""

    def __init__(self, roots: dict[str, int | None], folder: Path, prefix: str, rate: int):
        self.spy = py_spy()
        if self.spy is None:
            raise SystemExit("error: `hilm bench profile` needs py-spy (pip install py-spy)")
        self.jobs: list[tuple[str, str, Path, subprocess.Popen]] = []
        seen: Counter = Counter()
        for tier, root in roots.items():
            for pid, role in tree(root):
                seen[(tier, role)] += 1
                name = role if seen[(tier, role)] == 1 else f"{role}-{seen[(tier, role)]}"
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
                out = folder / f"{prefix}-{tier}-{safe}.txt"
                proc = subprocess.Popen(
                    [self.spy, "record", "-p", str(pid), "-r", str(rate), "-f", "raw",
                     "--nonblocking", "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self.jobs.append((tier, name, out, proc))
        time.sleep(1.0)  # py-spy attaches

    def stop(self, top: int) -> dict[str, dict[str, dict]]:
        for *_, proc in self.jobs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        out: dict[str, dict[str, dict]] = {}
        for tier, name, path, proc in self.jobs:
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if not path.exists():
                msg = (err or b"").decode(errors="replace").strip().splitlines()
                out.setdefault(tier, {})[name] = {"error": msg[-1] if msg else "no output"}
                continue
            text = shortened_stacks(path.read_text())
            out.setdefault(tier, {})[name] = top_frames(parse_collapsed(text), top)
            if text:
                path.write_text(text)
            else:  # a process that never ran in the interval (a resource tracker)
                path.unlink()
        return out


def profile_run(stack: Stack, policy: str, prompts: list[str], args, folder: Path) -> dict:
    roots = {t: stack.tiers[t].proc.pid if t in stack.tiers else None for t in TIERS}
    extra = {"policy": policy}
    waves(stack.url, policy, prompts, args.concurrency, 1, args.warmup_tokens, args, extra)
    stack.wait_sessions_closed(SETTLE_S)
    sampler = Sampler(roots, folder, policy, args.rate)
    with TreeCPU(roots) as cpu:
        records, wall = waves(stack.url, policy, prompts, args.concurrency, args.waves,
                              args.max_tokens, args, extra)
    processes = sampler.stop(args.top)
    stack.wait_sessions_closed(SETTLE_S)
    m = run_metrics(records, wall)
    tokens = m.get("tokens") or 0
    return {
        "policy": policy, "concurrency": args.concurrency, "tokens_per_s": m["tokens_per_s"],
        "errors": m["errors"],
        "cpu_ms_per_token": {t: ms_per(s, tokens) for t, s in cpu.seconds.items()},
        "cpu_ms_per_token_by_process": {
            t: None if parts is None else {k: round(ms_per(v, tokens) or 0.0, 4)
                                           for k, v in parts.items()}
            for t, parts in cpu.by_role.items()},
        "processes": processes,
    }


# ---- report -------------------------------------------------------------------------------------

def summary(runs: list[dict], n: int = 8) -> str:
    """Markdown-ish lines: per run, each process with busy samples, its top `n` frames by self
    and by inclusive share (frames that 90% or more of the busy stacks hold, such as the process's
    main function, are left out of the inclusive list: they say nothing)."""
    lines = []
    for r in runs:
        ms = r["cpu_ms_per_token"]
        lines.append(f"## {r['policy']} at {r['concurrency']} streams: "
                     f"{r['tokens_per_s']:.1f} tokens/s, CPU ms per token "
                     + ", ".join(f"{t} {v:.2f}" for t, v in ms.items() if v is not None))
        for tier, procs in r["processes"].items():
            for name, prof in procs.items():
                share = (r["cpu_ms_per_token_by_process"].get(tier) or {}).get(name)
                head = f"- {tier} {name}" + (f" ({share:.2f} ms/token)" if share else "")
                if "error" in prof:
                    lines.append(f"{head}: py-spy: {prof['error']}")
                    continue
                busy = prof["samples"] - prof["idle_samples"]
                if not busy:
                    continue
                lines.append(f"{head}, {busy} busy samples of {prof['samples']}; self: "
                             + "; ".join(f"{f} {x:.1%}" for f, x in prof["self"][:n]))
                telling = [(f, x) for f, x in prof["inclusive"] if x < 0.9]
                lines.append("    inclusive: "
                             + "; ".join(f"{f} {x:.1%}" for f, x in telling[:n]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary is not None:
        print(summary(json.loads(args.summary.read_text())["results"]["runs"]))
        return 0
    exit_on_sigterm()
    zoo = ensure_zoo(args.zoo)
    prompts = [p["prompt"] for p in zoo.heldout_prompts(64)]
    folder = args.out / f"profile-stacks-{os.getpid()}"  # renamed after the JSON once written
    folder.mkdir(parents=True, exist_ok=True)
    plan = family_plan(args.zoo, router_flags=router_flags(args))
    t0 = time.perf_counter()
    runs = []
    with Stack.launch(plan, log=lambda m: print(f"  {m}", flush=True)) as stack:
        for policy in args.policies:
            print(f"profiling {policy} at {args.concurrency} streams", flush=True)
            runs.append(profile_run(stack, policy, prompts, args, folder))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "latency": "none", "temperature": 1.0, "ignore_eos": True, "stacks": folder.name,
        "py_spy": py_spy_version(), "seconds": round(time.perf_counter() - t0, 1)}
    path = write_result("profile", config, {"runs": runs}, out_dir=args.out)
    stacks = path.with_suffix("")  # the stacks beside the JSON, under its name
    folder.rename(stacks)
    doc = json.loads(path.read_text())
    doc["config"]["stacks"] = stacks.name
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(summary(runs))
    print(f"\nwrote {path} and {stacks}/")
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
