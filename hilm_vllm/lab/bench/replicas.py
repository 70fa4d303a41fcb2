"""`hilm bench replicas` (also `hilm bench load --llm-replicas 1,2`): LLM replicas behind one
router, balance and failover.

For each replica count it starts the family's drafter and that many LLM tiers (no ILM: the
policies are `spec`, lossless, and `uhlm`, lossy) and a router with `--llm A,B,...`, streams
`--concurrency` requests at a time (T = 1, `ignore_eos`) for each policy, and records the
aggregate tokens/s, the sessions each replica got (the router's
`hilm_router_replica_sessions_opened_total`) and the errors. Then the failover case: with two
replicas and both policies mixed under the same load, one replica is SIGKILLed mid-run; the
requests in flight on it must fail over (their sessions reopen on the other replica from the
history the router owns). It records how many requests ran, how many lossy and lossless ones
failed, and `recovered_s`: from the kill until a request that was in flight at the kill streamed
a token again. On 2 cores replicas cannot add speed (they share the cores): what is measured is
balance and failover.

Writes bench/results/replicas-<UTC>.json: `results.runs` (entries `replicas`, `policy`,
`concurrency`, `tokens_per_s`, `sessions_per_replica`, `errors`) and `results.failover`
(`requests`, `failed_lossy`, `failed_lossless`, `recovered_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import time
import urllib.request

from hilm_vllm.launch import TierProcess, exit_on_sigterm
from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.bench.demo import RequestRecord
from hilm_vllm.lab.bench.load import stream
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.stack import family_plan
from hilm_vllm.zoo import ensure_zoo

LOSSLESS, LOSSY = "spec", "uhlm"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hilm bench replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--llm-replicas", default="1,2",
                   help="LLM replica counts, comma-separated (default: %(default)s)")
    p.add_argument("--policies", default=f"{LOSSLESS},{LOSSY}",
                   help="policies of the balance runs (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="concurrent streams (default: %(default)s)")
    p.add_argument("--waves", type=int, default=3,
                   help="requests per run = concurrency x waves (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens per request (default: %(default)s)")
    p.add_argument("--kill-after-s", type=float, default=4.0,
                   help="failover: seconds into the run before one replica is SIGKILLed "
                        "(default: %(default)s)")
    p.add_argument("--no-failover", action="store_true", help="skip the failover case")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.llm_replicas = [int(x) for x in args.llm_replicas.split(",") if x]
    except ValueError:
        p.error(f"--llm-replicas takes counts like 1,2, got {args.llm_replicas!r}")
    if not args.llm_replicas or min(args.llm_replicas) < 1:
        p.error("--llm-replicas: counts of at least 1")
    args.policies = [x for x in args.policies.split(",") if x]
    return args


def sessions_opened(metrics_url: str) -> dict[str, float]:
    """replica address -> LLM sessions this router opened there so far."""
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    out = {}
    for m in re.finditer(r'^hilm_router_replica_sessions_opened_total\{([^}]*)\} (\S+)$',
                         text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("tier") == "llm":
            out[labels["replica"]] = float(m.group(2))
    return out


class System:
    """The drafter, `n` LLM replicas and a router on them."""

    def __init__(self, zoo: str, n: int, log=print):
        plan = family_plan(zoo, no_ilm=True, router_flags=["--optimistic-min-keep", "0.5"])
        self.procs: list[TierProcess] = []
        start = lambda tier, flags: self._start(tier, [*flags, "--port", "0",  # noqa: E731
                                                        "--metrics-port", "0"])
        self.slm = start("slm", plan.engines["slm"])
        self.llms = [start("llm", plan.engines["llm"]) for _ in range(n)]
        for p in [self.slm, *self.llms]:
            p.wait_healthy(900)
        self.llm_addresses = [p.grpc_address for p in self.llms]
        log(f"  drafter and {n} LLM replica(s) up: {', '.join(self.llm_addresses)}")
        self.router = self._start("router", [
            *plan.router, "--slm", self.slm.grpc_address, "--llm", ",".join(self.llm_addresses),
            "--port", "0", "--grpc-port", "0", "--metrics-port", "0", "--down-retry-s", "30"])
        self.router.wait_healthy(300)

    def _start(self, tier: str, flags: list[str]) -> TierProcess:
        p = TierProcess.start(tier, flags)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - one that is already gone
                pass


async def run_load(url: str, prompts: list[str], policies: list[str], n: int, concurrency: int,
                   args, during=None) -> tuple[list[RequestRecord], list[str], float]:
    """`n` requests, `concurrency` at a time, policies in turn; `during(records_so_far)` is
    awaited beside them (the failover's kill)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> RequestRecord:
        policy = policies[i % len(policies)]
        async with limit:
            return await stream(client, policy, prompts[i % len(prompts)], i, args.seed + i,
                                args, {})

    try:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        side = asyncio.ensure_future(during()) if during else None
        records = await asyncio.gather(*tasks)
        if side is not None:
            await side
        return list(records), [policies[i % len(policies)] for i in range(n)], \
            time.perf_counter() - t0
    finally:
        await client.close()


def balance_runs(zoo, prompts: list[str], args) -> list[dict]:
    runs = []
    for n in args.llm_replicas:
        system = System(args.zoo, n)
        try:
            for policy in args.policies:
                before = sessions_opened(system.router.metrics_url)
                records, _, wall = asyncio.run(run_load(
                    system.router.http_url, prompts, [policy],
                    args.concurrency * args.waves, args.concurrency, args))
                after = sessions_opened(system.router.metrics_url)
                per = [after.get(a, 0.0) - before.get(a, 0.0) for a in system.llm_addresses]
                if n == 1 and not any(after.values()):  # one replica: no set, count requests
                    per = [float(len(records))]
                entry = {"replicas": n, "policy": policy, "concurrency": args.concurrency,
                         "tokens_per_s": round(sum(r.tokens for r in records) / wall, 1),
                         "sessions_per_replica": [int(x) for x in per],
                         "errors": sum(1 for r in records if r.error),
                         "requests": len(records)}
                print(f"replicas={n} {policy:5s} c={args.concurrency} "
                      f"{entry['tokens_per_s']:.1f} tok/s sessions {entry['sessions_per_replica']}"
                      f" errors {entry['errors']}", flush=True)
                runs.append(entry)
        finally:
            system.stop()
    return runs


def failover_run(prompts: list[str], args) -> dict:
    system = System(args.zoo, 2)
    killed: dict = {}
    try:
        victim = system.llms[0]

        async def kill():
            await asyncio.sleep(args.kill_after_s)
            killed["t"] = time.perf_counter()
            os.killpg(victim.proc.pid, signal.SIGKILL)  # the replica and its engine
            print(f"  SIGKILL {victim.grpc_address} at {args.kill_after_s:g} s", flush=True)

        records, policies, wall = asyncio.run(run_load(
            system.router.http_url, prompts, [LOSSLESS, LOSSY],
            args.concurrency * max(args.waves, 4), args.concurrency, args, during=kill))
    finally:
        system.stop()
    t_kill = killed.get("t")
    in_flight = [r for r in records if t_kill is not None and r.start < t_kill
                 and (r.end > t_kill)]
    after = [min((t for t in r.chunk_times if t > t_kill), default=None) for r in in_flight]
    after = [t for t in after if t is not None]
    failed = [(r, p) for r, p in zip(records, policies) if r.error]
    out = {"requests": len(records),
           "failed_lossy": sum(1 for _, p in failed if p == LOSSY),
           "failed_lossless": sum(1 for _, p in failed if p == LOSSLESS),
           "recovered_s": round(min(after) - t_kill, 3) if after else None,
           "in_flight_at_kill": len(in_flight),
           "failovers": sum((r.hilm or {}).get("failovers", 0) for r in records),
           "errors": sorted({r.error for r, _ in failed})[:5],
           "wall_s": round(wall, 1)}
    print(f"failover: {out}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    zoo = ensure_zoo(args.zoo)
    prompts = [p["prompt"] for p in zoo.heldout_prompts(64)]
    t0 = time.perf_counter()
    runs = balance_runs(zoo, prompts, args)
    failover = None if args.no_failover else failover_run(prompts, args)
    config = {k: v for k, v in vars(args).items() if k != "out"} | {
        "zoo": zoo.root.name, "seconds": round(time.perf_counter() - t0, 1),
        "temperature": 1.0, "ignore_eos": True,
        "sessions_per_replica": "LLM sessions the router opened on each replica "
                                "(hilm_router_replica_sessions_opened_total)"}
    path = write_result("replicas", config, {"runs": runs, "failover": failover},
                        out_dir=args.out)
    print(f"wrote {path}")
    bad = any(r["errors"] for r in runs) or (
        failover is not None and (failover["failed_lossy"] or failover["failed_lossless"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
