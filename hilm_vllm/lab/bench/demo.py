"""The demo: every routing policy on the demo family's held-out prompts, served for real.

    .venv/bin/python bench/demo.py                     # launches llm, ilm, slm and the router
    .venv/bin/python bench/demo.py --prompts 32 --max-tokens 64 --concurrency 8
    .venv/bin/python bench/demo.py --router http://127.0.0.1:8000    # use a running router

It builds the demo zoo if it is missing (`ensure_zoo`, ~15 min the first time on 2 cores),
launches the three engine tiers (`engine_configs/demo-{llm,ilm,slm}.yaml`) and the router
(`--policy hilm --thresholds engine_configs/thresholds-demo.yaml --block-size 4 --latency hilm`:
the HiLM seed's simulated network), and runs the held-out prompts under every policy (llm-only,
hlm, spec, uhlm, hilm, cascade, rand) at each temperature (default 1, then 0), plus
`llm-only-reseed`: llm-only again with other seeds, the noise floor of the quality scores. Each
request streams through the official `openai` client from the router's /v1/completions (the
policy as `model` and as the extra body field `policy`, `ignore_eos` so that every prompt yields
`--max-tokens` tokens, `stream_options.include_usage` for the router's `usage.hilm` counters),
with at most `--concurrency` prompts in flight; prompt i runs with seed `--seed` + i (the reseed
run with `--seed` + 1,000,000 + i). One short warm-up request per policy is not timed.
The tiers are stopped after the runs (also on error, Ctrl-C or SIGTERM); quality is scored after
that, with the CPU free. Exit code: 0, 1 when a request failed (the JSON is still written), 130
when interrupted.

Metrics (DESIGN.md "Metrics — defined once"), per policy and temperature; counters are summed
over the run's requests before dividing (ratios of sums, not means of ratios):
  tokens                  completion tokens of the run (usage.completion_tokens)
  wall_s                  first request sent -> last stream closed
  tokens_per_s            tokens / wall_s (aggregate); stream_tokens_per_s: mean per request of
                          its tokens / its latency
  ttft_ms, ttft_ms_p99    median and p99 over requests of request sent -> first text chunk
  itl_ms_p50, itl_ms_p99  percentiles of the gaps between consecutive text chunks of a request,
                          pooled over requests (as vLLM's benchmark_serving: a chunk that carries
                          a whole verified block counts as one arrival); tpot_ms: mean per request
                          of (last chunk - first chunk) / (tokens - 1)
  tr_llm, tr_ilm          llm_messages / tokens, ilm_messages / tokens (verify requests per token)
  skip_rate               skips / tokens (tokens kept on the device unverified)
  llm_forwards_per_token  llm_forwards / tokens
  acceptance_ilm, _llm    accepted / drafted at that tier; accept_len_ilm, _llm: vLLM's mean
                          acceptance length, 1 + accepted / drafts (blocks the tier verified)
  uplink_bytes_per_token  serialized bytes the router sent to the verifier tiers (ilm + llm:
                          the device's uplink; the router runs on the device) / tokens
  draft_bytes_per_token   serialized bytes the drafter sent back to the router (the slm link's
                          downlink) / tokens
  llm_cpu_ms_per_token    CPU time (user + system) of the LLM tier's whole process tree (API
                          process, engine core, worker; hilm_vllm.lab.bench.cpu) over the run's
                          timed requests (not the warm-up; each reading once the tiers have
                          closed the sessions before it) / tokens, milliseconds; null with
                          --router (no tier process to read). llm_cpu_ratio: that / llm-only's
                          at the same temperature: the cloud's cost per token, which the
                          hierarchy exists to cut
  efficiency              per request (sum of model_ms over slm, ilm, llm + network_ms) / its
                          latency measured by this client, then the mean over requests: the
                          share of a request's wall time that went to model work or simulated
                          network; the rest is router, RPC and queueing overhead. It can exceed 1
                          when tiers work for one request at the same time
  errors, degraded        failed requests; requests with a non-empty usage.hilm.degraded
Quality (DESIGN.md "Quality"; bench/scoring.py, shared with bench/sweep.py; scored after the
tiers are stopped, with the CPU free):
  ppl_llm                 perplexity of the continuations under the LLM (transformers, float32,
                          the continuation's text tokenized by the LLM's tokenizer, teacher-forced
                          after the prompt; token-weighted over the run's prompts)
  ppl_ratio               ppl_llm / llm-only's on the same prompts and seeds (lossless: 1 within
                          noise)
  tsr                     shadow verification of the SKIPs (usage.hilm.skipped_at): the mean over
                          skipped tokens of min(1, p(x)/q(x)), p the LLM's and q the drafter's
                          distribution as sampled (the request's temperature / top-k / top-p, the
                          drafter's q truncated as the drafter truncates it); tsr_coverage: the share of
                          skipped tokens it covers (see bench/scoring.py: the ids)
  cosine_to_reference     cos(output, the held-out file's true continuation, cut to the same
                          --max-tokens tokens of the zoo tokenizer), all-MiniLM-L6-v2 sentence
                          embeddings (U-HLM's metric), per prompt then the mean
  accuracy_ratio          cosine_to_reference / llm-only's at the same temperature
  cosine_vs_llm           cos(output, llm-only's output for the same prompt and temperature);
                          llm-only-reseed's value is the floor two LLM samples reach at T = 1
  exact_match             fraction of prompts whose output is identical to llm-only's at the same
                          temperature (compared as decoded text: identical tokens give identical
                          text); at T = 0 this is `exact_match_t0`, 1.0 for lossless policies
  ci95, noise_floor       a 95% bootstrap interval over prompts for each figure, and the same
                          figures for llm-only-reseed against llm-only (hilm_vllm.lab.quality)
Which temperature: `policies.<name>` holds the T = 1 metrics (speed, TR, acceptance and quality
are measured where the sampling is real) and `quality.exact_match_t0` from the T = 0 run; every
temperature's full set is under `policies.<name>.by_temperature["1"]` (["0"], ...).
The operating point: the router runs `hilm` at the calibrated thresholds (--thresholds, written
by `hilm calibrate`); the demo ends by printing that point's tr_llm and ppl_ratio beside the
nearest points of the newest bench/results/sweep-*.json of the same family, if there is one.

Writes bench/results/demo-<UTC>.json (hilm_vllm.lab.benchjson): config, git_commit, machine,
policies = {name: ...} and results = {"requests": [one summary per request]}.

Defaults (16 prompts x 16 tokens, 8 in flight, temperatures 1 and 0: 16 runs of 256 tokens) keep
the whole demo under 10 minutes on this project's 2-core CPU once the zoo exists. Measured there
(the four tiers themselves load the two cores): 286 s in all, of which 115 s to start the tiers,
13 s to stop them, 18 s to load the embedder and score; per run uhlm and hilm ~2 s, llm-only ~3 s,
rand ~10 s, spec 12-19 s, hlm 14-25 s (an early router; see docs/benchmarks.md for the current run).
The policies that verify every few tokens pay a verifier step, a drafter step and a simulated
round trip per verify; on a busy CPU the model steps dominate. With 32 tokens and 4 in flight the
same machine took 601 s (hlm 108 s a run): scale --prompts / --max-tokens / --concurrency from
these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.bench.cpu import ms_per, TreeCPU
from hilm_vllm.lab.bench.sweep_points import latest_sweep, nearest_points, point_line
from hilm_vllm.lab.quality import cosine, exact_match_rate, mean_or_none, ratio, Embedder
from hilm_vllm import codec
from hilm_vllm.stack import config_path, family_plan, Stack
from hilm_vllm.lab.bench.scoring import (embed_all, output_from_record, per_prompt_cosines,
                                         quality_block, Output, RunScores, ShadowScorer)
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.zoo import ensure_zoo


POLICIES = ("llm-only", "hlm", "spec", "uhlm", "hilm", "cascade", "rand")
BASELINE = "llm-only"
RESEED = "llm-only-reseed"  # llm-only again with other seeds: the noise floor of the scores
RESEED_OFFSET = 1_000_000  # seed offset of the reseed run: far from every prompt's own seed
WARMUP_TOKENS = 2  # a warm-up request only has to touch every tier the policy uses
PRIMARY_TEMPERATURE = 1.0  # where the top-level metrics come from (when it is run)
ENGINE_TIERS = ("llm", "ilm", "slm")  # the engine tiers (hilm_vllm.stack starts them)
USAGE_COUNTERS = ("rounds", "skips", "ilm_messages", "llm_messages", "ilm_drafted",
                  "ilm_accepted", "llm_drafted", "llm_accepted", "llm_forwards", "network_ms",
                  "ilm_drafts", "llm_drafts")
SETTLE_S = 10.0  # at most this long for the tiers to close a run's sessions (CPU readings)
USAGE_PER_TIER = ("messages", "uplink_bytes", "downlink_bytes", "model_ms")
VERIFIER_TIERS = ("ilm", "llm")  # the router's uplink: what it sends to these (DESIGN Processes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts (default: 16)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per prompt (default: 16)")
    p.add_argument("--concurrency", type=int, default=8, help="prompts in flight (default: 8)")
    p.add_argument("--temperatures", type=_floats, default=(1.0, 0.0),
                   help="comma-separated (default: 1,0)")
    p.add_argument("--policies", type=_names, default=POLICIES,
                   help=f"comma-separated subset of {','.join(POLICIES)} (llm-only is always run:"
                        " it is the quality baseline)")
    p.add_argument("--no-reseed", dest="reseed", action="store_false",
                   help=f"skip the {RESEED} noise-floor run")
    p.add_argument("--seed", type=int, default=0, help="prompt i runs with seed+i (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k (default: 0)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate --max-tokens tokens whatever the model says (default: on)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed requests per policy before its first run (default: 1)")
    p.add_argument("--router", metavar="URL",
                   help="a running router (http://H:P); nothing is launched")
    p.add_argument("--thresholds", default="engine_configs/thresholds-demo.yaml")
    p.add_argument("--block-size", type=int, default=4, help="router draft block (default: 4)")
    p.add_argument("--latency", default="hilm", help="router network model (default: hilm)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per tier")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="skip the sentence-embedding scores (no model load)")
    p.add_argument("--log-dir", help="write each launched tier's log (last 400 lines) here")
    args = p.parse_args(argv)
    if BASELINE not in args.policies:
        args.policies = (BASELINE, *args.policies)
    return args


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if bad := [n for n in names if n not in POLICIES]:
        raise argparse.ArgumentTypeError(f"unknown policy {bad}; choose from {POLICIES}")
    return names


# ---- records ------------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One streamed request as this client saw it (times: time.perf_counter seconds)."""

    prompt_index: int
    seed: int
    start: float
    end: float = math.nan
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    text: str = ""
    tokens: int = 0  # usage.completion_tokens (the number of text chunks when usage is missing)
    hilm: dict | None = None  # usage.hilm
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    def summary(self, policy: str, temperature: float) -> dict:
        ttft = self.ttft_s
        return {"policy": policy, "temperature": temperature, "prompt_index": self.prompt_index,
                "seed": self.seed, "tokens": self.tokens, "chunks": len(self.chunk_times),
                "ttft_ms": None if ttft is None else round(ttft * 1e3, 3),
                "latency_ms": round(self.latency_s * 1e3, 3), "text": self.text,
                "usage_hilm": self.hilm, "error": self.error}


@dataclass
class Run:
    """All prompts of one policy at one temperature."""

    policy: str
    temperature: float
    wall_s: float
    records: list[RequestRecord]
    llm_cpu_s: float | None = None  # the LLM tier's process-tree CPU over the timed requests


# ---- metrics (pure) -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """numpy's linear-interpolation percentile; None for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def sum_usage(usages: list[dict]) -> dict:
    """Sum the usage.hilm counters of several requests (per-tier dicts tier by tier)."""
    total = {k: 0.0 for k in USAGE_COUNTERS} | {k: {} for k in USAGE_PER_TIER}
    for u in usages:
        for k in USAGE_COUNTERS:
            total[k] += u.get(k) or 0
        for k in USAGE_PER_TIER:
            for tier, v in (u.get(k) or {}).items():
                total[k][tier] = total[k].get(tier, 0) + (v or 0)
    return total


def request_efficiency(r: RequestRecord) -> float | None:
    """(model time of every tier + simulated network time) / the request's latency."""
    if not r.hilm or not r.latency_s > 0:
        return None
    busy_ms = sum((r.hilm.get("model_ms") or {}).values()) + (r.hilm.get("network_ms") or 0)
    return busy_ms / (r.latency_s * 1e3)


def request_tpot_ms(r: RequestRecord) -> float | None:
    if r.tokens < 2 or len(r.chunk_times) < 1:
        return None
    return (r.chunk_times[-1] - r.chunk_times[0]) * 1e3 / (r.tokens - 1)


def accept_len(accepted: int, drafts: int | None) -> float | None:
    """vLLM's mean acceptance length (tokens made final per verification): 1 + accepted /
    drafts; None where the tier verified no block."""
    return 1 + accepted / drafts if drafts else None


def run_metrics(records: list[RequestRecord], wall_s: float) -> dict:
    """The speed and routing metrics of one run (see the module docstring)."""

    ok = [r for r in records if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    itls = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    with_usage = [r for r in ok if r.hilm]
    u = sum_usage([r.hilm for r in with_usage])
    usage_tokens = sum(r.tokens for r in with_usage) if with_usage else None

    def per_token(value):
        return ratio(value, usage_tokens)

    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "degraded": sum(bool(r.hilm and r.hilm.get("degraded")) for r in ok),
        "tokens": tokens, "wall_s": wall_s, "tokens_per_s": ratio(tokens, wall_s),
        "stream_tokens_per_s": mean_or_none(ratio(r.tokens, r.latency_s) for r in ok),
        "ttft_ms": percentile(ttfts, 50), "ttft_ms_p99": percentile(ttfts, 99),
        "itl_ms_p50": percentile(itls, 50), "itl_ms_p99": percentile(itls, 99),
        "tpot_ms": mean_or_none(request_tpot_ms(r) for r in ok),
        "tr_llm": per_token(u["llm_messages"]), "tr_ilm": per_token(u["ilm_messages"]),
        "skip_rate": per_token(u["skips"]),
        "llm_forwards_per_token": per_token(u["llm_forwards"]),
        "acceptance_ilm": ratio(u["ilm_accepted"], u["ilm_drafted"]),
        "acceptance_llm": ratio(u["llm_accepted"], u["llm_drafted"]),
        # vLLM's mean acceptance length: 1 + accepted / drafts (blocks verified)
        "accept_len_ilm": accept_len(u["ilm_accepted"], u.get("ilm_drafts")),
        "accept_len_llm": accept_len(u["llm_accepted"], u.get("llm_drafts")),
        "uplink_bytes_per_token": per_token(
            sum(u["uplink_bytes"].get(t, 0) for t in VERIFIER_TIERS)),
        "draft_bytes_per_token": per_token(u["downlink_bytes"].get("slm", 0)),
        "efficiency": mean_or_none(request_efficiency(r) for r in ok),
        "usage": u if with_usage else None,
    }


def quality_metrics(runs: list[Run], references: list[str], embed) -> dict[tuple, dict]:
    """(policy, temperature) -> cosine_to_reference, accuracy_ratio, cosine_vs_llm, exact_match.

    `embed(texts) -> [n, d]` array; every distinct text is embedded once."""

    outputs = {(run.policy, run.temperature): texts_by_prompt(run, len(references))
               for run in runs}
    texts = sorted({t for outs in outputs.values() for t in outs if t is not None}
                   | set(references))
    vectors = dict(zip(texts, embed(texts)))

    def mean_cos(outs, refs):
        return mean_or_none(cosine(vectors[o], vectors[r]) for o, r in zip(outs, refs)
                            if o is not None and r is not None)

    scores = {key: {"cosine_to_reference": mean_cos(outs, references)}
              for key, outs in outputs.items()}
    for (policy, temperature), outs in outputs.items():
        base = outputs.get((BASELINE, temperature))
        s = scores[(policy, temperature)]
        base_score = scores.get((BASELINE, temperature), {}).get("cosine_to_reference")
        s["accuracy_ratio"] = ratio(s["cosine_to_reference"], base_score)
        s["cosine_vs_llm"] = mean_cos(outs, base) if base else None
        s["exact_match"] = exact_match_rate(outs, base) if base else None
    return scores


def texts_by_prompt(run: Run, n: int) -> list[str | None]:
    """Output text per prompt index (None where the request failed)."""
    out: list[str | None] = [None] * n
    for r in run.records:
        if r.ok:
            out[r.prompt_index] = r.text
    return out


def temperature_key(t: float) -> str:
    return f"{float(t):g}"


def build_policies(runs: list[Run], quality: dict[tuple, dict] | None,
                   headline: dict[str, dict] | None = None) -> dict[str, dict]:
    """The `policies` section: T = 1 metrics at the top (see the docstring), every T below.
    `quality[(policy, T)]` is each run's quality dict; `headline[policy]` the top-level
    `quality` (the T = 1 figures with exact_match_t0 from the T = 0 run: `headline_quality`)."""
    policies: dict[str, dict] = {}
    for run in runs:
        entry = policies.setdefault(run.policy, {"by_temperature": {}})
        scores = (quality or {}).get((run.policy, run.temperature), {})
        metrics = run_metrics(run.records, run.wall_s)
        entry["by_temperature"][temperature_key(run.temperature)] = metrics | {
            "llm_cpu_ms_per_token": ms_per(run.llm_cpu_s, metrics["tokens"]),
            "llm_cpu_ratio": None, "quality": dict(scores)}
    add_cpu_ratios(policies)
    for name, entry in policies.items():
        by_t = entry["by_temperature"]
        top_key = primary_key(by_t)
        top = by_t[top_key]
        t0 = by_t.get(temperature_key(0.0), {}).get("quality", {})
        quality = {"exact_match_t0": t0.get("exact_match"),
                   "cosine_to_reference": top["quality"].get("cosine_to_reference"),
                   "accuracy_ratio": top["quality"].get("accuracy_ratio"),
                   "cosine_vs_llm": top["quality"].get("cosine_vs_llm")}
        if headline and name in headline:
            quality |= headline[name]
        entry.update({k: v for k, v in top.items() if k != "quality"})
        entry.update(temperature=float(top_key), quality=quality)
        entry["by_temperature"] = entry.pop("by_temperature")  # after the headline keys
    return policies


def add_cpu_ratios(policies: dict[str, dict]) -> None:
    """Each run's llm_cpu_ratio: its llm_cpu_ms_per_token / llm-only's at the same T."""

    base = policies.get(BASELINE, {}).get("by_temperature", {})
    for entry in policies.values():
        for t, m in entry["by_temperature"].items():
            m["llm_cpu_ratio"] = ratio(m["llm_cpu_ms_per_token"],
                                       base.get(t, {}).get("llm_cpu_ms_per_token"))


def primary_key(by_t: dict) -> str:
    """The temperature whose figures are a policy's headline: T = 1 if run, else the first."""
    primary = temperature_key(PRIMARY_TEMPERATURE)
    return primary if primary in by_t else next(iter(by_t))


# ---- table --------------------------------------------------------------------------------------

# (header, key in a by_temperature entry or ("quality", key), format)
COLUMNS = (("tok/s", "tokens_per_s", ".1f"), ("TTFT ms", "ttft_ms", ".0f"),
           ("ITL p50", "itl_ms_p50", ".1f"), ("ITL p99", "itl_ms_p99", ".1f"),
           ("TR llm", "tr_llm", ".3f"), ("TR ilm", "tr_ilm", ".3f"),
           ("skip", "skip_rate", ".3f"), ("fwd/tok", "llm_forwards_per_token", ".3f"),
           ("acc ilm", "acceptance_ilm", ".3f"), ("acc llm", "acceptance_llm", ".3f"),
           ("B/tok", "uplink_bytes_per_token", ".0f"), ("eff", "efficiency", ".2f"),
           ("LLM CPU ms/tok", "llm_cpu_ms_per_token", ".2f"),
           ("x llm-only", "llm_cpu_ratio", ".2f"),
           ("ppl", ("quality", "ppl_llm"), ".2f"), ("ppl ratio", ("quality", "ppl_ratio"), ".3f"),
           ("TSR", ("quality", "tsr"), ".3f"),
           ("cos ref", ("quality", "cosine_to_reference"), ".3f"),
           ("acc ratio", ("quality", "accuracy_ratio"), ".3f"),
           ("cos llm", ("quality", "cosine_vs_llm"), ".3f"),
           ("exact", ("quality", "exact_match"), ".2f"), ("err", "errors", "d"))


def render_table(policies: dict[str, dict], temperature: float) -> str:
    """A Markdown table of one temperature's metrics, one row per policy."""
    key = temperature_key(temperature)
    rows = [[name] + [_cell(entry["by_temperature"][key], col, fmt) for _, col, fmt in COLUMNS]
            for name, entry in policies.items() if key in entry["by_temperature"]]
    header = ["policy"] + [h for h, _, _ in COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _cell(entry: dict, col, fmt: str) -> str:
    value = entry.get(col[0], {}).get(col[1]) if isinstance(col, tuple) else entry.get(col)
    return "-" if value is None else format(value, fmt)


# ---- requests -----------------------------------------------------------------------------------

async def stream_one(client, policy: str, prompt: str, index: int, seed: int, temperature: float,
                     args, extra_body: dict | None = None) -> RequestRecord:
    """One streamed completion; errors are recorded, not raised. `extra_body` adds router body
    fields (thresholds, skip_rate, block_size, optimistic)."""
    extra = {"policy": policy.removesuffix("-reseed"), "ignore_eos": args.ignore_eos}
    if args.top_k > 0:
        extra["top_k"] = args.top_k
    extra |= extra_body or {}
    rec = RequestRecord(index, seed, time.perf_counter())
    parts, usage = [], None
    try:
        stream = await client.completions.create(
            model=extra["policy"], prompt=prompt, max_tokens=args.max_tokens,
            temperature=temperature, seed=seed, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                rec.chunk_times.append(now)
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
    except Exception as e:  # noqa: BLE001 - one failed request must not end the demo
        rec.error = f"{type(e).__name__}: {e}"
    rec.end, rec.text = time.perf_counter(), "".join(parts)
    rec.tokens = (usage or {}).get("completion_tokens") or len(rec.chunk_times)
    rec.hilm = (usage or {}).get("hilm")
    return rec


async def run_policy(client, policy: str, prompts: list[str], temperature: float,
                     args) -> Run:
    limit = asyncio.Semaphore(args.concurrency)
    base = args.seed + (RESEED_OFFSET if policy == RESEED else 0)

    async def one(i: int, prompt: str) -> RequestRecord:
        async with limit:
            return await stream_one(client, policy, prompt, i, base + i, temperature, args)

    start = time.perf_counter()
    records = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return Run(policy, temperature, time.perf_counter() - start, list(records))


def run_order(args) -> list[tuple[str, float]]:
    names = [*args.policies, *([RESEED] if args.reseed else [])]
    return [(name, t) for t in args.temperatures for name in names]


async def run_all(url: str, prompts: list[str], args, llm_pid: int | None = None,
                  settle: Callable[[], object] | None = None) -> list[Run]:
    """Every (policy, temperature) run; `llm_pid`: the LLM tier's process, whose tree's CPU
    time is read around each timed run (None: not measured), each reading after `settle()`
    (waits until the tiers have closed the requests' sessions: closing is asynchronous)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="hilm", max_retries=0,
                         timeout=args.request_timeout)
    runs, order, warm = [], run_order(args), set()
    async with client:
        for n, (policy, temperature) in enumerate(order, 1):
            if args.warmup and policy not in warm:  # first use of the policy's code paths
                warm.add(policy)
                await run_policy(client, policy, prompts[:args.warmup], temperature,
                                 _with(args, max_tokens=min(WARMUP_TOKENS, args.max_tokens)))
            settle = settle or (lambda: None)
            settle()
            with TreeCPU({"llm": llm_pid}) as cpu:
                run = await run_policy(client, policy, prompts, temperature, args)
                settle()
            run.llm_cpu_s = cpu.seconds["llm"]
            runs.append(run)
            print(progress_line(n, len(order), run), flush=True)
    return runs


def _with(args, **changes) -> argparse.Namespace:
    return argparse.Namespace(**(vars(args) | changes))


def progress_line(n: int, total: int, run: Run) -> str:
    m = run_metrics(run.records, run.wall_s)
    errors = f", {m['errors']} FAILED" if m["errors"] else ""
    first_error = next((r.error for r in run.records if r.error), "")
    return (f"[{n}/{total}] {run.policy:<16} T={temperature_key(run.temperature):<3} "
            f"{m['tokens']:>5} tokens in {run.wall_s:6.1f} s "
            f"({m['tokens_per_s'] or 0:6.1f} tok/s){errors}"
            + (f"\n    first error: {first_error}" if first_error else ""))


# ---- tiers --------------------------------------------------------------------------------------

def thresholds_file(path: str | Path):
    """The thresholds YAML (`codec.ThresholdsFile`), None when there is none."""

    path = config_path(path)
    return codec.read_thresholds(path) if path.is_file() else None


def router_flags(args) -> list[str]:
    """The router's flags besides the tiers' addresses and its ports (hilm_vllm.stack)."""

    return ["--policy", "hilm", "--thresholds", str(config_path(args.thresholds)),
            "--block-size", str(args.block_size), "--latency", args.latency]


@dataclass
class Tiers:
    """The router's URL and the stack this demo launched (None with --router)."""

    url: str
    stack: object = None  # hilm_vllm.stack.Stack

    def tail(self, tier: str, n: int = 30) -> str:
        return self.stack.tail(tier, n) if self.stack is not None else ""


@contextlib.contextmanager
def served_router(args, zoo):
    """Yield Tiers: `--router`, else the family's four tiers launched as `hilm up --family`
    launches them (hilm_vllm.stack), all stopped on exit (error or not)."""
    if args.router:
        yield Tiers(args.router)
        return

    plan = family_plan(args.zoo, router_flags=router_flags(args))
    with Stack.launch(plan, timeout=args.startup_timeout,
                      log=lambda m: print(f"  {m}", flush=True)) as stack:
        try:
            yield Tiers(stack.url, stack)
        finally:
            if args.log_dir:
                stack.write_logs(Path(args.log_dir))
                print(f"tier logs (last lines of each) in {args.log_dir}", flush=True)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean shutdown as Ctrl-C


# ---- main ---------------------------------------------------------------------------------------

def load_prompts(zoo, args) -> tuple[list[str], list[str]]:
    """The first --prompts held-out prompts and their true continuations cut to --max-tokens."""
    from tokenizers import Tokenizer

    rows = zoo.heldout_prompts(args.prompts)
    if len(rows) < args.prompts:
        print(f"note: the {args.zoo} zoo holds {len(rows)} held-out prompts; using them all")
    tok = Tokenizer.from_file(str(zoo.llm / "tokenizer.json"))
    refs = [tok.decode(tok.encode(r["reference"], add_special_tokens=False).ids[:args.max_tokens])
            for r in rows]
    return [r["prompt"] for r in rows], refs


def outputs_of(run: Run, prompts: list[str], args) -> list:
    """bench.scoring.Output per prompt index (failed or missing requests: text None)."""

    out = [Output(p, None) for p in prompts]
    for r in run.records:
        out[r.prompt_index] = output_from_record(r, prompts[r.prompt_index], run.temperature,
                                                 args.top_k)
    return out


def score(runs: list[Run], prompts: list[str], references: list[str], args,
          zoo) -> tuple[dict, dict] | None:
    """Quality of every run (bench/scoring.py): ({(policy, T): quality dict}, {policy: the
    headline quality}), or None with --no-quality."""
    if not args.quality:
        return None
    import numpy as np

    t0 = time.monotonic()
    n = len(references)
    texts = {(run.policy, run.temperature): texts_by_prompt(run, n) for run in runs}
    vectors = embed_all([t for ts in texts.values() for t in ts] + list(references),
                        Embedder().encode)
    per_run = quality_metrics(runs, references, lambda ts: np.array([vectors[t] for t in ts]))
    scorer = ShadowScorer.for_zoo(zoo)
    scores = {}
    for run in runs:
        key = (run.policy, run.temperature)
        scores[key] = RunScores(scorer.score(outputs_of(run, prompts, args)),
                                per_prompt_cosines(texts[key], references, vectors),
                                texts[key] if run.temperature == 0 else None)
    per_run, headline = quality_dicts(scores, per_run)
    print(f"quality scored in {time.monotonic() - t0:.0f} s", flush=True)
    return per_run, headline


def quality_dicts(scores: dict[tuple, object], per_run: dict[tuple, dict]) -> tuple[dict, dict]:
    """RunScores per (policy, T) and the cosine/exact dicts of `quality_metrics` -> the quality
    dict of each run (against llm-only and llm-only-reseed at the same T) and each policy's
    headline quality (its primary-temperature run with exact_match_t0 from its T = 0 run)."""
    from dataclasses import replace

    out = {}
    for (policy, t), rs in scores.items():
        out[(policy, t)] = dict(per_run.get((policy, t), {})) | quality_block(
            rs, scores.get((BASELINE, t)), scores.get((RESEED, t)))
    headline = {}
    for policy in dict.fromkeys(p for p, _ in scores):
        temps = {temperature_key(t): t for p, t in scores if p == policy}
        t = temps[primary_key(temps)]

        def with_t0(name):
            rs = scores.get((name, t))
            t0 = scores.get((name, 0.0))
            return None if rs is None else replace(
                rs, outputs_t0=t0.outputs_t0 if t0 is not None else None)

        block = quality_block(with_t0(policy), with_t0(BASELINE), with_t0(RESEED))
        headline[policy] = block | {"cosine_vs_llm": per_run.get((policy, t), {}).get(
            "cosine_vs_llm")}
    return out, headline


def config_of(args, zoo, prompts: list[str]) -> dict:
    return {k: v for k, v in vars(args).items()} | {
        "policies": list(args.policies), "temperatures": list(args.temperatures),
        "runs": [f"{p}@T={temperature_key(tt)}" for p, tt in run_order(args)],
        "zoo_root": str(zoo.root), "num_prompts": len(prompts),
        "engine_configs": {t_: f"engine_configs/demo-{t_}.yaml" for t_ in ENGINE_TIERS},
        "thresholds_values": config_thresholds(args.thresholds),
        "reseed_offset": RESEED_OFFSET, "primary_temperature": PRIMARY_TEMPERATURE}


def report(runs: list[Run], references: list[str], args, zoo, prompts) -> int:

    scores = score(runs, prompts, references, args, zoo)
    policies = build_policies(runs, *(scores or (None,)))
    requests = [r.summary(run.policy, run.temperature) for run in runs for r in run.records]
    path = write_result("demo", config_of(args, zoo, prompts), {"requests": requests},
                        args.out, top={"policies": policies})
    for t in args.temperatures:
        print(f"\nT = {temperature_key(t)} ({len(prompts)} prompts x {args.max_tokens} tokens, "
              f"concurrency {args.concurrency}; exact = identical to llm-only)\n")
        print(render_table(policies, t))
    print(f"\nwrote {path}")
    print("\n" + operating_point_report(policies, args))
    failed = sum(m["errors"] for e in policies.values() for m in e["by_temperature"].values())
    if failed:
        print(f"{failed} requests failed: see `error` in the JSON's requests", file=sys.stderr)
    return 1 if failed else 0


def operating_point_report(policies: dict[str, dict], args) -> str:
    """Where the calibrated point (`hilm` at --thresholds) sits: its figures, `hlm`'s in the same
    run, and the nearest points of the newest sweep of the same family (bench/sweep.py)."""
    entry = policies.get("hilm")
    if entry is None:
        return "operating point: `hilm` was not run"
    t = config_thresholds(args.thresholds)
    point = {"label": "hilm (this run)", "skip_rate_measured": entry.get("skip_rate"), **entry}
    lines = [f"operating point: hilm at the calibrated thresholds ({args.thresholds}: t1 "
             f"{_fmt(t.get('t1'))}, t2 {_fmt(t.get('t2'))}, t_ilm {_fmt(t.get('t_ilm'))}; "
             f"T = {entry['temperature']:g})", point_line(point)]
    hlm = policies.get("hlm")
    if hlm and hlm.get("tokens_per_s") and entry.get("tokens_per_s"):
        lines.append(f"  hlm in the same run: {hlm['tokens_per_s']:.1f} tok/s, tr_llm "
                     f"{_fmt(hlm.get('tr_llm'))}: hilm is "
                     f"{entry['tokens_per_s'] / hlm['tokens_per_s']:.2f}x hlm's tokens/s")
    sweep = latest_sweep(args.out, args.zoo)
    if sweep is None or entry.get("tr_llm") is None:
        lines.append(f"  no sweep of the {args.zoo} family in {args.out}: `hilm bench sweep` "
                     f"draws the curve this point sits on")
        return "\n".join(lines)
    doc = json.loads(sweep.read_text())
    c = doc.get("config", {})
    lines.append(f"  the nearest points by tr_llm on {sweep.name} ({c.get('num_prompts')} prompts "
                 f"x {c.get('max_tokens')} tokens, T = {c.get('temperature')}; another run, so "
                 f"compare tr_llm and ppl_ratio, not tokens/s):")
    lines += [point_line(p) for p in nearest_points(doc.get("points", []), entry["tr_llm"])]
    return "\n".join(lines)


def config_thresholds(path: str | Path) -> dict:
    tf = thresholds_file(path)
    if tf is None:
        return {k: None for k in ("t1", "t2", "t_ilm", "rule")}
    th = tf.thresholds
    return {"t1": th.t1, "t2": th.t2, "t_ilm": th.t_ilm, "rule": tf.rule}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def run_guarded(what: str, body: Callable[[], int]) -> int:
    """A benchmark's entry point around `body`: SIGTERM ends it like Ctrl-C (the tiers it
    started are stopped by their `with` blocks), 130 when interrupted, 1 with the message when a
    tier did not start (the message carries the tier's log tail), else body's exit code."""
    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.monotonic()
    try:
        code = body()
    except KeyboardInterrupt:
        print(f"\ninterrupted: every tier this {what} started is stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{what} finished in {time.monotonic() - t0:.0f} s")
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:

        zoo = ensure_zoo(args.zoo, progress=True)
        prompts, references = load_prompts(zoo, args)
        with served_router(args, zoo) as tiers:
            stack = tiers.stack
            llm_pid = stack.tiers["llm"].proc.pid if stack is not None else None
            settle = (lambda: stack.wait_sessions_closed(SETTLE_S)) if stack is not None else None
            runs = asyncio.run(run_all(tiers.url, prompts, args, llm_pid, settle))
            if tiers.stack is not None and any(r.error for run in runs for r in run.records):
                print(f"some requests failed; the router's last lines:\n{tiers.tail('router')}",
                      file=sys.stderr)
        return report(runs, references, args, zoo, prompts)

    return run_guarded("demo", body)

if __name__ == "__main__":
    sys.exit(main())
