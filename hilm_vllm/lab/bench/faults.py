"""Faults under a soak load: SIGKILL and restart each tier in turn (slm, ilm, llm), then SIGSTOP
one for 5 s and SIGCONT it.

    .venv/bin/python bench/faults.py                       # make faults: demo family
    .venv/bin/python bench/faults.py --zoo tiny --users 8

It launches the family's four tiers, starts the soak's Locust users (locustfiles/soak.py, mixed
policies, SSE and gRPC) and, after a quiet `--gap`, injects each fault: a killed tier's whole
process tree gets SIGKILL (no goodbye) and is started again on the same ports, so the router's
addresses stay valid; a stopped one gets SIGSTOP, then SIGCONT after `--pause` s. After each
fault it probes the router until a request that needs the tier (slm: spec, ilm: cascade, llm:
llm-only) is served fully again (HTTP 200, `usage.hilm.degraded` empty), then waits `--gap`
before the next. bench/results/faults-<UTC>.json has per fault, in `results.faults`:
  fault, tier
  requests      the users' requests in flight at any time from the fault to its recovery
  failed        of those, the ones that failed (error status, error event, cut or short)
  recovered_s   from the fault until the probe is served fully (null: not within --deadline)
  restart_s     kill+restart only: from SIGKILL until the new process is SERVING
and over the whole run `requests`, `failed`, `sessions` per tier at the end; the failure
messages are in `errors`. The router's recovery (re-opening sessions on a restarted tier,
per-call timeouts, which failures mark a tier down) is what this measures.
"""

from __future__ import annotations

import argparse
import sys
import time


from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.launch import exit_on_sigterm
from hilm_vllm.lab.soak import DEFAULT_POLICIES
from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.soak.harness import (LocustRun, kill_and_restart, launch_family,
                                    prompts_of, stop_and_continue)

KILLED = ("slm", "ilm", "llm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--users", type=int, default=16, help="(default: 16)")
    p.add_argument("--kill", default=",".join(KILLED),
                   help="tiers to SIGKILL and restart, in order (default: %(default)s)")
    p.add_argument("--stop-tier", default="ilm", choices=["slm", "ilm", "llm", "none"],
                   help="the tier to SIGSTOP (default: %(default)s)")
    p.add_argument("--pause", type=float, default=5.0, help="SIGSTOP length, s (default: 5)")
    p.add_argument("--gap", type=float, default=20.0,
                   help="seconds of undisturbed load before each fault and at the end "
                        "(default: 20)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds a fault may take to recover (default: 300)")
    p.add_argument("--max-tokens", type=int, default=24, help="(default: 24)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="(default: %(default)s)")
    args = p.parse_args(argv)
    args.kill = [t for t in args.kill.split(",") if t]
    if set(args.kill) - set(KILLED):
        p.error(f"--kill takes tiers among {', '.join(KILLED)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    zoo, stack = launch_family(args.zoo, "faults")
    faults, samples = [], None
    run = LocustRun(stack.router.http_url, stack.router.grpc_address, args.users, 24 * 3600,
                    policies=args.policies, max_tokens=args.max_tokens,
                    prompts=prompts_of(zoo))
    try:
        run.start()
        time.sleep(args.gap)
        for tier in args.kill:
            print(f"faults: SIGKILL {tier}, restart", flush=True)
            faults.append(kill_and_restart(stack, tier, args.deadline))
            print(f"faults: {faults[-1]}", flush=True)
            time.sleep(args.gap)
        if args.stop_tier != "none":
            print(f"faults: SIGSTOP {args.stop_tier} for {args.pause:g} s", flush=True)
            faults.append(stop_and_continue(stack, args.stop_tier, args.pause, args.deadline))
            print(f"faults: {faults[-1]}", flush=True)
            time.sleep(args.gap)
        samples = run.finish()
        sessions = stack.wait_sessions_closed(30)
    finally:
        run.stop()
        stack.stop()
    entries = [f.result(samples["records"], samples["errors"]) for f in faults]
    results = {"users": args.users, "requests": samples["requests"],
               "failed": samples["failures"], "faults": entries, "sessions": sessions}
    config = {"zoo": args.zoo, "users": args.users, "kill": args.kill,
              "stop_tier": args.stop_tier, "pause_s": args.pause, "gap_s": args.gap,
              "deadline_s": args.deadline, "max_tokens": args.max_tokens,
              "policies": args.policies.split(",")}
    path = write_result("faults", config, results, args.out, top={"errors": samples["errors"]})
    for e in entries:
        print(f"  {e['fault']:<20} requests {e['requests']:>4}  failed {e['failed']:>4}  "
              f"recovered {e['recovered_s']} s")
    print(f"faults: {samples['requests']} requests, {samples['failures']} failed; sessions at "
          f"the end {sessions} -> {path}")
    return 0 if samples["failures"] == 0 and all(e["recovered_s"] is not None
                                                  for e in entries) else 1


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
