"""Every policy under load: tokens/s, TTFT and ITL against concurrent streams.

    .venv/bin/python bench/load.py                          # demo zoo, the full grid below
    .venv/bin/python bench/load.py --zoo tiny --concurrency 1,4 --policies spec,hilm
    hilm bench load --latency none                           # the same, installed

It launches the demo family's three tiers (placed on the machine's cores, see docs/serving.md,
"Placement") and one router per network setting (`--latency none`: network model off;
`hilm`: the HiLM seed's device/edge/cloud delays), then for every network setting, policy,
optimistic drafting off/on (policies that draft) and concurrency it streams `concurrency` x
`--waves` requests of `--max-tokens` tokens (`ignore_eos`, T = 1, held-out prompts) through the
router's OpenAI API with at most `concurrency` in flight. vLLM's own speculative decoding
(`vllm serve` with `--speculative-config`: the demo SLM drafting for the demo LLM, probabilistic
draft sampling, the CPU fix of patches/ active) runs the same requests, network off, as the
policy `vllm-spec`: the in-engine baseline a vLLM user would try first.

Each run is one entry of `results.runs` in bench/results/load-<UTC>.json, with exactly these
keys:
  policy, optimistic, concurrency, latency,
  tokens_per_s             completion tokens / wall time of the run (aggregate)
  tokens_per_s_per_stream  mean over requests of its tokens / its latency
  ttft_ms_p50, itl_ms_p50, itl_ms_p99   (ITL pooled over requests' chunk gaps, as vLLM's
                           benchmark_serving; a chunk carrying a verified block is one arrival)
  tr_llm                   Verify messages to the LLM per generated token (llm-only: 1 stream)
  llm_forwards_per_token   LLM forward passes per generated token
  llm_busy_s_per_token     the LLM tier's engine busy seconds (its own accounting,
                           hilm_engine_busy_seconds on its /metrics) over the run / tokens
  efficiency               mean over requests of (model time of every tier + simulated
                           network) / latency: the share of a request's wall time its parts
                           account for (the rest is router, RPC and queueing overhead)
  uplink_bytes_per_token   serialized bytes the router sent to the verifier tiers (ilm + llm:
                           the device's uplink) / generated tokens, from usage.hilm (null for
                           vllm-spec, which has no router)
  draft_bytes_per_token    serialized bytes the drafter sent back to the router (the slm
                           link's downlink: drafted tokens, uncertainties, distributions) /
                           generated tokens (0 for llm-only, null for vllm-spec)
  errors                   failed requests
The PNG beside it plots tokens/s and ITL p50 against concurrency, one line per policy.
Figures are ratios within one run: the machine is shared; on CPU a demo SLM step costs almost
what an LLM step does, so the gains come from fewer round trips and less LLM work per token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


from hilm_vllm.lab.bench.demo import RequestRecord, run_metrics
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.launch import exit_on_sigterm
from hilm_vllm.lab.bench import add_common_args, load_benchmark
from hilm_vllm.stack import config_path, family_plan, Stack
from hilm_vllm.zoo import ensure_zoo

POLICIES = ("llm-only", "hlm", "spec", "uhlm", "hilm", "cascade", "rand")
DRAFTING = {"hlm", "spec", "uhlm", "hilm", "cascade", "rand"}
ENTRY_KEYS = ("policy", "optimistic", "concurrency", "latency", "tokens_per_s",
              "tokens_per_s_per_stream", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "tr_llm",
              "llm_forwards_per_token", "llm_busy_s_per_token", "efficiency",
              "uplink_bytes_per_token", "draft_bytes_per_token", "errors")
VLLM_SPEC = "vllm-spec"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated (default: all seven)")
    p.add_argument("--llm-replicas", metavar="N,M",
                   help="instead: LLM replicas behind one router, balance and failover "
                        "(`hilm bench replicas`, which takes the rest of the flags)")
    p.add_argument("--concurrency", default="1,4,8,16,32",
                   help="concurrent streams, comma-separated (default: 1,4,8,16,32)")
    p.add_argument("--latency", default="none,hilm",
                   help="network settings, comma-separated: none, hilm (default: both)")
    p.add_argument("--optimistic", default="off,on",
                   help="optimistic drafting for drafting policies: off, on (every round: the "
                        "request field `optimistic: true`) or both (default)")
    p.add_argument("--waves", type=int, default=1,
                   help="requests per run = concurrency x waves, at least --min-requests "
                        "(default: 1)")
    p.add_argument("--min-requests", type=int, default=4, help="(default: 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    p.add_argument("--block-size", type=int, default=4, help="k (default: 4)")
    p.add_argument("--thresholds", default="engine_configs/thresholds-demo.yaml",
                   help="the router's thresholds YAML (default: %(default)s)")
    p.add_argument("--router-args", default="",
                   help="more router flags, e.g. \"--t1 0.3 --t2 0.6\" (recorded in config)")
    p.add_argument("--vllm-spec", action=argparse.BooleanOptionalAction, default=True,
                   help="also run vLLM's own speculative decoding (default: on)")
    p.add_argument("--placement", default=None,
                   help="engine placement layout (docs/serving.md, 'placement'; default: hilm-serve's, "
                        "spread)")
    p.add_argument("--engine-busy-loop-ms", type=float, default=None,
                   help="the engines' shm busy-loop window (default: hilm-serve's: 0 on CPU); "
                        "1000 with --placement vllm reproduces vLLM's own behaviour")
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the PNG of an existing load JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.policies = [x for x in args.policies.split(",") if x]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.latency = [x for x in args.latency.split(",") if x]
    args.optimistic = [{"off": False, "on": True}[x] for x in args.optimistic.split(",")]
    return args


# ---- one run ----------------------------------------------------------------------------------

async def stream(client, model: str, prompt: str, index: int, seed: int, args,
                 extra: dict) -> RequestRecord:
    rec = RequestRecord(index, seed, time.perf_counter())
    usage = None
    try:
        out = await client.completions.create(
            model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=1.0, seed=seed,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True} | extra)
        async for chunk in out:
            if chunk.choices and chunk.choices[0].text:
                rec.chunk_times.append(time.perf_counter())
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
    except Exception as e:  # noqa: BLE001 - recorded, counted in `errors`
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter()
    rec.tokens = (usage or {}).get("completion_tokens") or len(rec.chunk_times)
    rec.hilm = (usage or {}).get("hilm")
    return rec


async def run_once(url: str, model: str, prompts: list[str], concurrency: int, args,
                   extra: dict) -> tuple[list[RequestRecord], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    n = max(concurrency * args.waves, args.min_requests)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> RequestRecord:
        async with limit:
            return await stream(client, model, prompts[i % len(prompts)], i, args.seed + i,
                                args, extra)

    try:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(i) for i in range(n)))
        return list(records), time.perf_counter() - t0
    finally:
        await client.close()


def busy_seconds(metrics_url: str | None) -> float | None:
    """The LLM tier's engine busy seconds so far (hilm_engine_busy_seconds_total)."""
    if metrics_url is None:
        return None
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    m = re.search(r'^hilm_engine_busy_seconds_total\{tier="llm"\} ([-+\deE.]+)$', text, re.M)
    return float(m.group(1)) if m else None


def entry(policy: str, optimistic: bool, concurrency: int, latency: str, metrics: dict,
          busy_s: float | None) -> dict:
    """One element of `runs`: exactly ENTRY_KEYS (the names tools read), from run_metrics."""
    tokens = metrics.get("tokens") or 0
    return {
        "policy": policy, "optimistic": optimistic, "concurrency": concurrency,
        "latency": latency, "tokens_per_s": metrics["tokens_per_s"],
        "tokens_per_s_per_stream": metrics["stream_tokens_per_s"],
        "ttft_ms_p50": metrics["ttft_ms"], "itl_ms_p50": metrics["itl_ms_p50"],
        "itl_ms_p99": metrics["itl_ms_p99"],
        "tr_llm": 1.0 / tokens * metrics["requests"] if policy == "llm-only" and tokens
        else metrics["tr_llm"],
        "llm_forwards_per_token": metrics["llm_forwards_per_token"],
        "llm_busy_s_per_token": None if busy_s is None or not tokens else busy_s / tokens,
        "efficiency": metrics["efficiency"],
        "uplink_bytes_per_token": metrics.get("uplink_bytes_per_token"),
        "draft_bytes_per_token": metrics.get("draft_bytes_per_token"),
        "errors": metrics["errors"],
    }


def measure(url: str, model: str, llm_metrics: str | None, policy: str, optimistic: bool,
            concurrency: int, latency: str, prompts: list[str], args, extra: dict) -> dict:
    before = busy_seconds(llm_metrics)
    records, wall = asyncio.run(run_once(url, model, prompts, concurrency, args, extra))
    after = busy_seconds(llm_metrics)
    metrics = run_metrics(records, wall)
    busy = None if before is None or after is None else after - before
    out = entry(policy, optimistic, concurrency, latency, metrics, busy)
    failed = [r.error for r in records if r.error]
    if failed:
        print(f"  {len(failed)} failed, e.g. {failed[0][:300]}", flush=True)
    return out


# ---- tiers --------------------------------------------------------------------------------------

def engine_args(args) -> list[str]:
    """Flags of every engine tier beyond the family's engine_configs/<zoo>-<tier>.yaml."""
    if args.engine_busy_loop_ms is None:
        return []
    return ["--engine-busy-loop-ms", f"{args.engine_busy_loop_ms:g}"]


def router_flags(latency: str, args) -> list[str]:
    """The router's flags besides the tiers' addresses and its ports (hilm_vllm.stack)."""
    flags = ["--policy", "hilm", "--block-size", str(args.block_size), "--latency", latency]

    if args.thresholds and config_path(args.thresholds).exists():
        flags += ["--thresholds", str(config_path(args.thresholds))]
    return flags + args.router_args.split()


def run_tiers(zoo, prompts: list[str], args) -> list[dict]:
    """The family's tiers launched as `hilm up` launches them, one router per network model."""

    runs = []
    first, *others = args.latency
    plan = family_plan(args.zoo, router_flags=router_flags(first, args),
                       engine_args=engine_args(args))
    with Stack.launch(plan, placement=args.placement,
                      log=lambda m: print(f"  {m}", flush=True)) as stack:
        routers = {first: stack.router}
        for latency in others:
            routers[latency] = stack.add_router(["--model", plan.router[1],
                                                 *router_flags(latency, args)])
        tiers = stack.tiers
        llm_metrics = tiers["llm"].metrics_url
        for latency, router in routers.items():
            for policy in args.policies:  # one untimed warm-up request per policy
                asyncio.run(run_once(router.http_url, policy, prompts, 1,
                                     argparse.Namespace(**{**vars(args), "min_requests": 1,
                                                           "max_tokens": 4}), {"policy": policy}))
            for policy in args.policies:
                for optimistic in (args.optimistic if policy in DRAFTING else [False]):
                    for c in args.concurrency:
                        extra = {"policy": policy, "optimistic": optimistic}
                        e = measure(router.http_url, policy, llm_metrics, policy, optimistic, c,
                                    latency, prompts, args, extra)
                        runs.append(e)
                        print(line(e), flush=True)
    return runs


@contextlib.contextmanager
def vllm_spec_server(zoo, args, warmup_prompts: list[str]):
    """`vllm serve` of the family's LLM with its SLM as vLLM's own draft model (the
    `--speculative-config` of the module docstring), healthy and warmed up by short requests;
    yields (its URL, its Popen: the root of its process tree) and stops it on exit."""
    spec = {"method": "draft_model", "model": str(zoo.slm), "num_speculative_tokens":
            args.block_size, "draft_sample_method": "probabilistic"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(zoo.llm),
           "--served-model-name", VLLM_SPEC, "--dtype", "float32", "--max-model-len", "2048",
           "--block-size", "32", "--enforce-eager", "--kv-cache-memory-bytes", "512M",
           "--max-num-seqs", "32", "--enable-prefix-caching", "--port", "0",
           "--host", "127.0.0.1", "--speculative-config", json.dumps(spec)]
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, log)
        asyncio.run(run_once(url, VLLM_SPEC, warmup_prompts, 1, argparse.Namespace(
            **{**vars(args), "min_requests": 1, "max_tokens": 4}), {}))
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def vllm_spec_runs(zoo, prompts: list[str], args) -> list[dict]:
    """vLLM's own speculative decoding of the same pair, served by `vllm serve`, network off."""
    with vllm_spec_server(zoo, args, prompts) as (url, _proc):
        runs = []
        for c in args.concurrency:
            e = measure(url, VLLM_SPEC, None, VLLM_SPEC, False, c, "none", prompts, args, {})
            runs.append(e)
            print(line(e), flush=True)
        return runs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: list[str], timeout: float = 600) -> None:
    import threading

    threading.Thread(target=lambda: [log.append(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("vllm serve exited:\n" + "".join(log[-40:]))
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("vllm serve did not become healthy:\n" + "".join(log[-40:]))


# ---- report -------------------------------------------------------------------------------------

def line(e: dict) -> str:
    def f(x, fmt=".1f"):
        return "-" if x is None else format(x, fmt)
    return (f"{e['latency']:5s} {e['policy']:9s} opt={'on ' if e['optimistic'] else 'off'} "
            f"c={e['concurrency']:<3d} {f(e['tokens_per_s'])} tok/s "
            f"({f(e['tokens_per_s_per_stream'])}/stream) ttft {f(e['ttft_ms_p50'], '.0f')} ms "
            f"itl {f(e['itl_ms_p50'], '.0f')}/{f(e['itl_ms_p99'], '.0f')} ms "
            f"tr_llm {f(e['tr_llm'], '.2f')} busy/tok {f(e['llm_busy_s_per_token'], '.4f')} "
            f"eff {f(e['efficiency'], '.2f')} err {e['errors']}")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latencies = sorted({r["latency"] for r in runs})
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate([*POLICIES, VLLM_SPEC])}
    fig, axes = plt.subplots(2, len(latencies), figsize=(6.5 * len(latencies), 8), squeeze=False)
    for col, latency in enumerate(latencies):
        series: dict[str, list[dict]] = {}
        for r in runs:
            if r["latency"] == latency:
                name = r["policy"] + ("" if r["policy"] not in DRAFTING else
                                      (" (opt)" if r["optimistic"] else " (no opt)"))
                series.setdefault(name, []).append(r)
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rs]
            style = dict(linestyle="--" if "(no opt)" in name else "-", marker="o",
                         color=colors[rs[0]["policy"]], label=name)
            axes[0][col].plot(xs, [r["tokens_per_s"] for r in rs], **style)
            axes[1][col].plot(xs, [r["itl_ms_p50"] for r in rs], **style)
        for row, ylabel in enumerate(("tokens/s (aggregate)", "ITL p50 (ms)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(ylabel)
            ax.set_title(f"network: {latency}")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--llm-replicas" or a.startswith("--llm-replicas=") for a in argv):
        return load_benchmark("replicas").main(argv)
    args = parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text())["results"]["runs"], args.replot.with_suffix(".png"))
        return 0
    exit_on_sigterm()

    zoo = ensure_zoo(args.zoo)
    prompts = [p["prompt"] for p in zoo.heldout_prompts(64)]
    t0 = time.perf_counter()
    runs = run_tiers(zoo, prompts, args)
    if args.vllm_spec:
        try:
            runs += vllm_spec_runs(zoo, prompts, args)
        except Exception as e:  # noqa: BLE001 - the baseline must not lose the rest
            print(f"vllm-spec baseline failed: {e}", flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "zoo": zoo.manifest.get("key") if hasattr(zoo, "manifest") else args.zoo,
        "seconds": round(time.perf_counter() - t0, 1), "temperature": 1.0}
    path = write_result("load", config, {"runs": runs}, out_dir=args.out)
    plot(runs, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
