"""Soak: Locust users on the router's OpenAI API (SSE, completions and chat) and gRPC Generate,
mixed policies, for minutes; memory, sessions, latency and failures recorded.

    .venv/bin/python bench/soak.py                         # make soak: demo, 64 users, 10 min
    .venv/bin/python bench/soak.py --zoo tiny --users 16 --duration 60

It launches the family's four tiers (llm, ilm, slm, router), runs locustfiles/soak.py headless
(users in hilm_vllm/lab/soak/users.py), samples each tier's resident memory (its process tree) at
the start, after the warm-up and at the end, and every --sample-every s along the run, reads each
tier's open sessions at the end, and writes bench/results/soak-<UTC>.json with `results`:
  users, duration_s, requests, failures,
  rss_mb          per tier: start, after_warmup, end (MB)
  rss_timeline    t_s, MB per tier at each t, and by_process (per tier: the API process,
                  vLLM's EngineCore, ...), plotted beside the JSON as soak-<UTC>.png
  sessions        per tier at the end (slm, ilm, llm: the router holds none of its own)
  ttft_ms_p50, ttft_ms_p99, itl_ms_p50, itl_ms_p99   (SSE and gRPC pooled)
  verdict         pass = 0 failures, RSS growth after the warm-up < 5% per tier, every
                  tier's session count back to 0, and (runs of 40 min or more) each tier's RSS
                  slope, least squares over the last 30 min (or half the run), < 1 MB/min
The failure messages (counted) are in `errors`. Exit code 0 when the verdict passes, else 1.
On vLLM-CPU every engine step costs 13-18 ms and the four tiers share the machine's cores: the
latencies are this machine's under this load, not the design's figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.launch import exit_on_sigterm
from hilm_vllm.lab.soak.harness import launch_family, prompts_of, soak
from hilm_vllm.lab.soak import DEFAULT_POLICIES
from hilm_vllm.lab.bench import add_common_args


# The 'after warm-up' sample at 30% of the run: the engine tiers' workers grow their C heaps
# for the first minutes of load and then level off (soak-20261202T192359Z and
# soak-20261205T195952Z: the ILM, which sees the least traffic, +7.0% after 60 s of a 10-minute
# run, +2.8% after 180 s; see docs/benchmarks.md, "Soak and faults").
WARMUP_SHARE = 0.3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--users", type=int, default=64, help="(default: 64)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default: 600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of load before the 'after warm-up' memory sample "
                        "(default: 30%% of --duration, at least 15: vLLM's workers grow "
                        "their heaps for the first minutes of load, then level off)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per request (default: 24)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="(default: %(default)s)")
    p.add_argument("--sample-every", type=float, default=10.0,
                   help="seconds between memory samples of the timeline (default: 10)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only redraw the PNG of an earlier soak JSON")
    args = p.parse_args(argv)
    if args.users < 1 or args.duration <= 0 or args.sample_every <= 0:
        p.error("--users must be >= 1, --duration and --sample-every > 0")
    if args.warmup is None:
        args.warmup = max(15.0, args.duration * WARMUP_SHARE)
    if not 0 < args.warmup < args.duration:
        p.error("--warmup must be inside (0, --duration)")
    return args


# one colour per process role in every panel (others: matplotlib's next)
PROCESS_COLORS = {"api": "tab:green", "VLLM::EngineCore": "tab:blue", "VLLM::Worker": "tab:orange",
                  "python": "tab:grey"}


def plot(path: Path, results: dict, warmup_s: float) -> None:
    """Each tier's resident memory along the run, and its processes', as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = results.get("rss_timeline") or {}
    t = tl.get("t_s") or []
    by_process = tl.get("by_process") or {}
    tiers = [x for x in ("slm", "ilm", "llm", "router") if x in by_process]
    if not t or not tiers:
        return
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.2 * len(tiers), 3.6), squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        ax.plot(t, tl[tier], color="black", lw=2, label="tier (all processes)")
        for name, ys in sorted(by_process[tier].items()):
            ax.plot(t, ys, lw=1, label=name, color=PROCESS_COLORS.get(name))
        ax.axvline(warmup_s, color="grey", ls="--", lw=1, label="end of warm-up")
        growth = results["verdict"]["rss_growth_pct_after_warmup"].get(tier)
        slope = results["verdict"].get("rss_slope_mb_per_min", {}).get(tier)
        title = f"{tier}: {growth:+.1f}% after warm-up" if growth is not None else tier
        ax.set_title(title + (f"\n{slope:+.2f} MB/min over the last "
                              f"{results['verdict']['rss_slope_window_s'] / 60:g} min"
                              if slope is not None else ""), fontsize=9)
        if slope is not None:
            w = results["verdict"]["rss_slope_window_s"]
            ax.axvspan(t[-1] - w, t[-1], color="tab:green", alpha=0.06, label="slope fitted")
        ax.set_xlabel("seconds of load")
        ax.set_ylabel("RSS, MB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"soak: {results['users']} users, {results['requests']} requests, "
                 f"{results['failures']} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        import json

        doc = json.loads(args.replot.read_text())
        plot(args.replot.with_suffix(".png"), doc["results"], doc["config"]["warmup_s"])
        return 0
    zoo, stack = launch_family(args.zoo, "soak")
    try:
        results = soak(stack, args.users, args.duration, args.warmup, policies=args.policies,
                       max_tokens=args.max_tokens, prompts=prompts_of(zoo),
                       log=lambda m: print(m, flush=True), errors_out=(errors := {}),
                       sample_every_s=args.sample_every)
    finally:
        stack.stop()
    config = {"zoo": args.zoo, "users": args.users, "duration_s": args.duration,
              "warmup_s": args.warmup, "max_tokens": args.max_tokens,
              "policies": args.policies.split(","), "sample_every_s": args.sample_every}
    path = write_result("soak", config, results, args.out, top={"errors": errors})
    plot(path.with_suffix(".png"), results, args.warmup)
    v = results["verdict"]
    print(f"soak: {results['requests']} requests, {results['failures']} failed; TTFT p50/p99 "
          f"{results['ttft_ms_p50']}/{results['ttft_ms_p99']} ms, ITL p50/p99 "
          f"{results['itl_ms_p50']}/{results['itl_ms_p99']} ms; RSS growth after warm-up "
          f"{v['rss_growth_pct_after_warmup']} %; RSS slope over the last "
          f"{v['rss_slope_window_s']:g} s {v['rss_slope_mb_per_min']} MB/min; sessions at the end {results['sessions']}; "
          f"{'PASS' if v['pass'] else 'FAIL'} -> {path} (memory along the run: "
          f"{path.with_suffix('.png').name})")
    return 0 if v["pass"] else 1


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
