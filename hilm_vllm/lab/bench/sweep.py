"""The trade-off sweep: speed and TR against quality, over thresholds and skip rates.

    .venv/bin/python bench/sweep.py                    # demo zoo; launches llm, ilm, slm, router
    hilm bench sweep --prompts 8 --max-tokens 16       # the same, installed (repository root)
    .venv/bin/python bench/sweep.py --zoo tiny --shares 0.5 --router http://127.0.0.1:8000

One router (`--policy hilm --thresholds <YAML> --block-size 4 --latency hilm`, as `make demo`)
serves every point; thresholds and skip rates are set per request through the body fields
`thresholds: {t1, t2, t_ilm}` and `skip_rate`. Points:
  llm-only               the reference of ppl_ratio and exact match (same prompts and seeds)
  llm-only-reseed        llm-only with other seeds: the noise floor (label; policy llm-only)
  hlm, spec, cascade     the lossless policies, one point each
  uhlm@calibrated,       the thresholds of the YAML (`hilm calibrate`): the operating point
  hilm@calibrated        that `make demo` runs
  uhlm, hilm, rand       one point per grid share s (--shares, default 0.1,0.25,0.5,0.75,0.9):
      uhlm  t2 = Q(s)                       (u <= t2 kept on the device)
      hilm  t1 = Q(s), t2 = Q(s + band (1 - s)), t_ilm = the YAML's (--band, default 0.5: half
            of the tokens that are not skipped fall in the ILM's band)
      rand  skip_rate = s
    Q(s) is the s-quantile of the SLM's gate (the one the YAML names) on the calibration data:
    the monotone model's blocks of `fits["slm->llm"].monotone` (tokens per run of gate values),
    interpolated inside a block and, for the perturbed gate (u in steps of 1/K), placed halfway
    between two steps so that the float32 wire cannot move a token across it. A YAML without
    those blocks (or --grid fixed) uses the shares themselves as thresholds in [0, 1].
    Equal thresholds from two shares run once.
Each point streams --prompts held-out prompts x --max-tokens tokens (`ignore_eos`, T =
--temperature, prompt i with seed --seed + i in every point; the reseed point --seed +
1,000,000 + i), --concurrency in flight, through the router's OpenAI API (bench/demo.py's client);
one untimed warm-up request per policy. Grid points run share by share (uhlm, hilm, rand at one
share back to back), so points compared at equal TR ran close in time on a shared machine.

Each entry of `points` (bench/results/sweep-<UTC>.json, beside `config`, `git_commit`,
`machine`, `comparisons`, and `results.texts`: every output text per point and prompt):
  policy, label, share (the grid share, else null), calibrated (bool),
  thresholds             {t1, t2, t_ilm} sent with the requests (uhlm, hilm), else null
  skip_rate              rand: the TARGET skip rate (the body field); uhlm and hilm: the MEASURED
                         one (skips / tokens), the x of U-HLM's plots; null for the policies
                         that never skip (llm-only, hlm, spec, cascade)
  skip_rate_measured     skips / tokens for every policy (rand's realized rate included)
  tokens_per_s, tr_llm, tr_ilm and bench/demo.py's other run metrics (ttft_ms, itl_ms_p50,
                         llm_forwards_per_token, acceptance_*, efficiency, errors, ...)
  quality                ppl_llm, ppl_ratio, tsr, exact_match_t0 (null unless --t0 runs it),
                         cosine_to_reference, accuracy_ratio, ci95, noise_floor, tsr_coverage
                         (bench/scoring.py; ratios against the llm-only point)
`comparisons`: uhlm and hilm against rand at equal tr_llm (rand's ppl_ratio and TSR
interpolated linearly at each uhlm/hilm point's tr_llm), and hilm against uhlm at equal
ppl_ratio (uhlm's tr_llm interpolated at each hilm point's ppl_ratio); null outside the range
the other curve covers. The PNG beside the JSON plots tokens/s and tr_llm against ppl_ratio
(U-HLM's trade-off figure, quality on the x axis), the noise floor as a band.

--t0 lossless|all|none (default none): also run those points at T = 0 for exact_match_t0
(lossless: llm-only, hlm, spec, cascade; all: every point). Each costs another run.

Time, measured on this project's 2-core CPU shared with other jobs (load average 9-12), demo
family, defaults (64 prompts x 32 tokens, 8 in flight, shares 0.1,0.25,0.5,0.75,0.9 -> 20 points
once equal thresholds are merged): 12.6 min in all, of which 79 s starting the tiers, 7.5 min of
runs (hlm the slowest, 32 s) and 3.5 min of scoring (embedder, LLM and SLM in transformers).
Halve --prompts to halve the runs; the intervals widen by ~1.4x.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.bench import demo  # stream_one, run_metrics, served_router, Tiers, ...
from hilm_vllm.lab.bench.sweep_points import point_line, quality as _q, GRID_POLICIES
from hilm_vllm.lab.bench.scoring import (embed_all, per_prompt_cosines, quality_block, RunScores,
                                         ShadowScorer)
from hilm_vllm.lab.quality import Embedder
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.zoo import ensure_zoo

FIXED_POLICIES = ("llm-only", "hlm", "spec", "cascade")
LOSSLESS = FIXED_POLICIES
SKIPPING = ("uhlm", "hilm")  # their `skip_rate` is the measured one
DEFAULT_SHARES = (0.1, 0.25, 0.5, 0.75, 0.9)
RESEED_LABEL = "llm-only-reseed"
METRIC_KEYS = ("tokens_per_s", "tr_llm", "tr_ilm", "stream_tokens_per_s", "ttft_ms",
               "itl_ms_p50", "itl_ms_p99", "llm_forwards_per_token", "acceptance_ilm",
               "acceptance_llm", "accept_len_llm", "uplink_bytes_per_token", "efficiency",
               "tokens", "wall_s", "requests", "errors", "degraded")
POINT_KEYS = ("policy", "label", "share", "calibrated", "thresholds", "skip_rate",
              "skip_rate_measured", *METRIC_KEYS, "quality")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hilm bench sweep", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--prompts", type=int, default=64,
                   help="held-out prompts (default: 64, all the demo zoo holds)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (default: 32)")
    p.add_argument("--concurrency", type=int, default=8, help="prompts in flight (default: 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="prompt i runs with seed+i (default: 0)")
    p.add_argument("--shares", type=_shares, default=DEFAULT_SHARES,
                   help="grid: target shares of the SLM's tokens skipped, comma-separated "
                        "(default: 0.1,0.25,0.5,0.75,0.9)")
    p.add_argument("--grid", choices=["quantiles", "fixed"], default="quantiles",
                   help="thresholds at the gate's quantiles of the shares (from the YAML), or "
                        "the shares themselves as thresholds (default: quantiles)")
    p.add_argument("--band", type=float, default=0.5,
                   help="hilm: share of the non-skipped tokens in the ILM band (default: 0.5)")
    p.add_argument("--policies", type=_names, default=(*FIXED_POLICIES, *GRID_POLICIES),
                   help="comma-separated subset (llm-only always runs: it is the reference)")
    p.add_argument("--no-calibrated", dest="calibrated", action="store_false",
                   help="skip the YAML's own thresholds as points")
    p.add_argument("--no-reseed", dest="reseed", action="store_false",
                   help="skip the llm-only-reseed noise-floor point")
    p.add_argument("--t0", choices=["none", "lossless", "all"], default="none",
                   help="points also run at T = 0 for exact_match_t0 (default: none)")
    p.add_argument("--no-cosine", dest="cosine", action="store_false",
                   help="skip U-HLM's sentence-embedding cosine (no embedder load)")
    p.add_argument("--thresholds", default="engine_configs/thresholds-demo.yaml",
                   help="calibration YAML: the router's defaults, the calibrated points, the "
                        "gate quantiles (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=4, help="router draft block (default: 4)")
    p.add_argument("--latency", default="hilm", help="router network model (default: hilm)")
    p.add_argument("--router", metavar="URL", help="a running router; nothing is launched")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per policy")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", help="write each launched tier's log here")
    args = p.parse_args(argv)
    if "llm-only" not in args.policies:
        args.policies = ("llm-only", *args.policies)
    args.ignore_eos, args.quality = True, True  # what bench/demo.py's helpers read
    return args


def _shares(text: str) -> tuple[float, ...]:
    try:
        shares = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {text!r}") from None
    if not shares or any(not 0 <= s <= 1 for s in shares):
        raise argparse.ArgumentTypeError(f"shares are in [0, 1], got {text!r}")
    return shares


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    known = (*FIXED_POLICIES, *GRID_POLICIES)
    if bad := [n for n in names if n not in known]:
        raise argparse.ArgumentTypeError(f"unknown policy {bad}; choose from {known}")
    return names


# ---- the grid (pure) ----------------------------------------------------------------------------

def gate_quantile(blocks: list[dict], share: float) -> float:
    """The gate value below which a share `share` of the calibration tokens lie, from the
    monotone model's blocks ({lo, hi, tokens}, in gate order), interpolated linearly inside a
    block (its tokens taken as spread evenly over [lo, hi])."""
    total = sum(b["tokens"] for b in blocks)
    if total <= 0:
        raise ValueError("the monotone model has no tokens")
    target, below = share * total, 0.0
    for b in blocks:
        if below + b["tokens"] >= target:
            frac = (target - below) / b["tokens"] if b["tokens"] else 1.0
            return float(b["lo"] + frac * (b["hi"] - b["lo"]))
        below += b["tokens"]
    return float(blocks[-1]["hi"])


def on_steps(t: float, num_samples: int) -> float:
    """A threshold for a gate in steps of 1/K: halfway between the step at or below t and the
    next, so that every u <= t stays skipped and float32 rounding cannot move a token."""
    k = math.floor(t * num_samples + 1e-9)
    return min(1.0, (k + 0.5) / num_samples) if k < num_samples else 1.0


def load_yaml(path: str | Path) -> dict:
    """The thresholds YAML as a document ({} when there is none)."""
    tf = demo.thresholds_file(path)
    return {} if tf is None else tf.to_doc()


def calibrated_thresholds(doc: dict) -> dict | None:
    """{t1, t2, t_ilm} of the YAML, or None when it has none."""
    try:
        return {k: float(doc[k]) for k in ("t1", "t2", "t_ilm")}
    except (KeyError, TypeError, ValueError):
        return None


def quantile_fn(doc: dict, grid: str):
    """share -> threshold on the SLM's gate, and a line saying where it came from."""
    fit = ((doc.get("fits") or {}).get("slm->llm") or {})
    blocks = fit.get("monotone")
    u = doc.get("uncertainty") or {}
    if grid == "fixed" or not blocks:
        why = "fixed grid: thresholds = shares" + ("" if grid == "fixed" else
                                                   " (the YAML has no monotone model)")
        return (lambda s: float(s)), why
    steps = int(u.get("num_samples") or 0) if u.get("gate", "perturbed") == "perturbed" else 0

    def q(s: float) -> float:
        t = gate_quantile(blocks, s)
        return on_steps(t, steps) if steps else t

    return q, (f"quantiles of the {u.get('gate', 'perturbed')} gate on slm->llm "
               f"({sum(b['tokens'] for b in blocks)} calibration tokens, "
               f"{len(blocks)} monotone blocks)")


@dataclass(frozen=True)
class PointSpec:
    """One point of the sweep: a policy and what its requests send."""

    label: str
    policy: str
    thresholds: dict | None = None  # body `thresholds`
    skip_rate: float | None = None  # body `skip_rate` (rand)
    share: float | None = None
    calibrated: bool = False
    seed_offset: int = 0

    def body(self) -> dict:
        out = {}
        if self.thresholds is not None:
            out["thresholds"] = dict(self.thresholds)
        if self.skip_rate is not None:
            out["skip_rate"] = self.skip_rate
        return out


def plan_points(args, doc: dict) -> tuple[list[PointSpec], str]:
    """The points in run order, and where the grid came from."""
    q, why = quantile_fn(doc, args.grid)
    cal = calibrated_thresholds(doc)
    t_ilm = cal["t_ilm"] if cal else 1.0
    specs = [PointSpec("llm-only", "llm-only")]
    if args.reseed:
        specs.append(PointSpec(RESEED_LABEL, "llm-only", seed_offset=demo.RESEED_OFFSET))
    specs += [PointSpec(p, p) for p in ("hlm", "spec", "cascade") if p in args.policies]
    if args.calibrated and cal is not None:
        specs += [PointSpec(f"{p}@calibrated", p, cal, calibrated=True)
                  for p in SKIPPING if p in args.policies]
    seen = set()
    for s in args.shares:
        grid = {"uhlm": {"t1": q(s), "t2": q(s), "t_ilm": t_ilm},
                "hilm": {"t1": q(s), "t2": q(min(1.0, s + args.band * (1 - s))), "t_ilm": t_ilm}}
        for policy in GRID_POLICIES:
            if policy not in args.policies:
                continue
            th = grid.get(policy)
            key = (policy, tuple(sorted(th.items())) if th else s)
            if key in seen:
                continue
            seen.add(key)
            specs.append(PointSpec(f"{policy}@{s:g}", policy, {k: round(v, 6) for k, v in
                                                               th.items()} if th else None,
                                   s if policy == "rand" else None, share=s))
    return specs, why


# ---- points (pure) ------------------------------------------------------------------------------

def assemble_point(spec: PointSpec, metrics: dict, quality: dict | None) -> dict:
    """One entry of `points`: exactly POINT_KEYS (see the module docstring for `skip_rate`)."""
    measured = metrics.get("skip_rate")
    if spec.policy == "rand":
        skip_rate = spec.skip_rate
    elif spec.policy in SKIPPING:
        skip_rate = measured
    else:
        skip_rate = None
    point = {"policy": spec.policy, "label": spec.label, "share": spec.share,
             "calibrated": spec.calibrated, "thresholds": spec.thresholds,
             "skip_rate": skip_rate, "skip_rate_measured": measured}
    point |= {k: metrics.get(k) for k in METRIC_KEYS}
    point["quality"] = quality
    return point


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x on the piecewise-linear curve through (xs, ys) (sorted by x here), None outside
    [min xs, max xs] or with fewer than one point."""
    pairs = sorted((a, b) for a, b in zip(xs, ys) if a is not None and b is not None)
    if not pairs:
        return None
    xs_, ys_ = [a for a, _ in pairs], [b for _, b in pairs]
    if x < xs_[0] or x > xs_[-1]:
        return None
    i = bisect.bisect_left(xs_, x)
    if xs_[i] == x:
        return ys_[i]
    x0, x1, y0, y1 = xs_[i - 1], xs_[i], ys_[i - 1], ys_[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)




def comparisons(points: list[dict]) -> dict:
    """uhlm/hilm vs rand at equal tr_llm; hilm vs uhlm at equal ppl_ratio (module docstring)."""
    by = {p: [x for x in points if x["policy"] == p] for p in GRID_POLICIES}
    rand = by["rand"]
    out: dict = {"vs_rand_at_equal_tr": [], "hilm_vs_uhlm_at_equal_ppl_ratio": []}
    for policy in SKIPPING:
        for pt in by[policy]:
            tr = pt["tr_llm"]
            out["vs_rand_at_equal_tr"].append({
                "label": pt["label"], "tr_llm": tr, "ppl_ratio": _q(pt, "ppl_ratio"),
                "tsr": _q(pt, "tsr"), "tokens_per_s": pt["tokens_per_s"],
                "rand_ppl_ratio": None if tr is None else interpolate(
                    [r["tr_llm"] for r in rand], [_q(r, "ppl_ratio") for r in rand], tr),
                "rand_tsr": None if tr is None else interpolate(
                    [r["tr_llm"] for r in rand], [_q(r, "tsr") for r in rand], tr),
                "rand_tokens_per_s": None if tr is None else interpolate(
                    [r["tr_llm"] for r in rand], [r["tokens_per_s"] for r in rand], tr)})
    uhlm = by["uhlm"]
    for pt in by["hilm"]:
        pr = _q(pt, "ppl_ratio")
        out["hilm_vs_uhlm_at_equal_ppl_ratio"].append({
            "label": pt["label"], "ppl_ratio": pr, "tr_llm": pt["tr_llm"],
            "tr_ilm": pt["tr_ilm"], "tokens_per_s": pt["tokens_per_s"],
            "uhlm_tr_llm": None if pr is None else interpolate(
                [_q(u, "ppl_ratio") for u in uhlm], [u["tr_llm"] for u in uhlm], pr),
            "uhlm_tokens_per_s": None if pr is None else interpolate(
                [_q(u, "ppl_ratio") for u in uhlm], [u["tokens_per_s"] for u in uhlm], pr)})
    return out


# ---- running ------------------------------------------------------------------------------------

@dataclass
class PointRun:
    spec: PointSpec
    temperature: float
    run: demo.Run
    extra: dict = field(default_factory=dict)


async def run_point(client, spec: PointSpec, prompts: list[str], temperature: float,
                    args) -> demo.Run:
    limit = asyncio.Semaphore(args.concurrency)
    base = args.seed + spec.seed_offset
    body = spec.body()

    async def one(i: int, prompt: str):
        async with limit:
            return await demo.stream_one(client, spec.policy, prompt, i, base + i, temperature,
                                         args, extra_body=body)

    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return demo.Run(spec.label, temperature, time.perf_counter() - t0, list(records))


def run_plan(specs: list[PointSpec], args) -> list[tuple[PointSpec, float]]:
    """(point, temperature) in run order: every point at --temperature, then the T = 0 runs."""
    order = [(s, args.temperature) for s in specs]
    if args.t0 != "none" and args.temperature != 0:
        order += [(s, 0.0) for s in specs
                  if args.t0 == "all" or s.policy in LOSSLESS]
    return order


async def run_all(url: str, prompts: list[str], specs: list[PointSpec], args) -> list[PointRun]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="hilm", max_retries=0,
                         timeout=args.request_timeout)
    order, warm, out = run_plan(specs, args), set(), []
    async with client:
        for n, (spec, temperature) in enumerate(order, 1):
            if args.warmup and spec.policy not in warm:
                warm.add(spec.policy)
                await run_point(client, spec, prompts[:args.warmup], temperature,
                                demo._with(args, max_tokens=min(demo.WARMUP_TOKENS,
                                                                args.max_tokens)))
            run = await run_point(client, spec, prompts, temperature, args)
            out.append(PointRun(spec, temperature, run))
            print(demo.progress_line(n, len(order), run), flush=True)
    return out


# ---- scoring and the document -------------------------------------------------------------------

def score_runs(runs: list[PointRun], prompts: list[str], references: list[str], args,
               zoo) -> dict[tuple, object]:
    """RunScores per (label, T) (bench/scoring.py)."""

    n = len(prompts)
    texts = {(r.spec.label, r.temperature): demo.texts_by_prompt(r.run, n) for r in runs}
    vectors = {}
    if args.cosine:

        vectors = embed_all([t for ts in texts.values() for t in ts] + list(references),
                            Embedder().encode)
    scorer = ShadowScorer.for_zoo(zoo)
    scores = {}
    for r in runs:
        key = (r.spec.label, r.temperature)
        outputs = demo.outputs_of(r.run, prompts, args)
        cos = per_prompt_cosines(texts[key], references, vectors) if vectors else None
        scores[key] = RunScores(scorer.score(outputs), cos)
    # exact_match_t0: the T = 0 texts of a point go beside its scores at the main temperature
    for (label, t), rs in list(scores.items()):
        if t == 0:
            main = scores.get((label, args.temperature))
            if main is not None:
                main.outputs_t0 = texts[(label, t)]
            rs.outputs_t0 = texts[(label, t)]
    return scores


def build_points(runs: list[PointRun], scores: dict | None, temperature: float) -> list[dict]:
    """The `points` list: one per point at the main temperature."""

    ref = (scores or {}).get(("llm-only", temperature))
    reseed = (scores or {}).get((RESEED_LABEL, temperature))
    points = []
    for r in runs:
        if r.temperature != temperature:
            continue
        metrics = demo.run_metrics(r.run.records, r.run.wall_s)
        quality = None
        if scores is not None:
            quality = quality_block(scores[(r.spec.label, temperature)], ref, reseed)
        points.append(assemble_point(r.spec, metrics, quality))
    return points


def texts_of(runs: list[PointRun], n: int) -> dict[str, list[str | None]]:
    """{"label@T": output text per prompt (None: failed)}: what ppl and the cosine are scored
    from (kept so that they can be rescored; per-request counters would make the JSON ~2 MB)."""
    return {f"{r.spec.label}@T={demo.temperature_key(r.temperature)}":
            demo.texts_by_prompt(r.run, n) for r in runs}


def config_of(args, zoo, prompts, doc: dict, grid_source: str, specs) -> dict:
    return {k: v for k, v in vars(args).items()} | {
        "policies": list(args.policies), "shares": list(args.shares),
        "zoo_root": str(zoo.root), "num_prompts": len(prompts),
        "engine_configs": {t: f"engine_configs/demo-{t}.yaml" for t in demo.ENGINE_TIERS},
        "calibrated_thresholds": calibrated_thresholds(doc),
        "gate": (doc.get("uncertainty") or {}).get("gate"),
        "ilm_gate": (doc.get("ilm_uncertainty") or {}).get("gate"),
        "grid_source": grid_source, "reseed_offset": demo.RESEED_OFFSET,
        "points_planned": [s.label for s in specs]}


# ---- the figure ---------------------------------------------------------------------------------

STYLE = {"uhlm": ("tab:blue", "o"), "hilm": ("tab:red", "s"), "rand": ("tab:gray", "^"),
         "llm-only": ("black", "*"), "hlm": ("tab:green", "D"), "spec": ("tab:purple", "P"),
         "cascade": ("tab:orange", "X")}


def plot(path: Path, points: list[dict], title: str = "") -> None:
    """tokens/s (left) and tr_llm (right) against ppl_ratio, one curve per grid policy, the
    fixed points as markers, calibrated points circled, the noise floor as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    reseed = next((p for p in points if p["label"] == RESEED_LABEL), None)
    band = ((reseed or {}).get("quality") or {}).get("ci95", {}) or {}
    for ax, key, ylabel in ((axes[0], "tokens_per_s", "tokens/s (aggregate)"),
                            (axes[1], "tr_llm", "TR to the LLM (Verify messages / token)")):
        ax.axvline(1.0, color="black", lw=0.8, alpha=0.5)
        if band.get("ppl_ratio"):
            lo, hi = band["ppl_ratio"]
            ax.axvspan(lo, hi, color="gray", alpha=0.15, label="llm-only reseed, 95% CI")
        for policy, (color, marker) in STYLE.items():
            if policy == "llm-only" and key == "tr_llm":
                continue  # one Generate stream per request: no per-token TR
            pts = [p for p in points if p["policy"] == policy and p["label"] != RESEED_LABEL
                   and _q(p, "ppl_ratio") is not None and p.get(key) is not None]
            if not pts:
                continue
            curve = sorted((p for p in pts if not p["calibrated"]),
                           key=lambda p: _q(p, "ppl_ratio"))
            xs, ys = [_q(p, "ppl_ratio") for p in curve], [p[key] for p in curve]
            style = "-" if policy in GRID_POLICIES else "none"
            if curve:
                ax.plot(xs, ys, linestyle=style, marker=marker, color=color, label=policy)
                for p in curve:
                    ci = ((p.get("quality") or {}).get("ci95") or {}).get("ppl_ratio")
                    if ci:
                        ax.plot(ci, [p[key]] * 2, color=color, lw=0.8, alpha=0.5)
                    if p.get("share") is not None:
                        ax.annotate(f"{p['share']:g}", (_q(p, "ppl_ratio"), p[key]),
                                    fontsize=6, xytext=(3, 3), textcoords="offset points")
            for p in pts:
                if p["calibrated"]:
                    ax.plot([_q(p, "ppl_ratio")], [p[key]], marker=marker, color=color, ms=11,
                            mfc="none", mew=2, linestyle="none",
                            label=f"{p['policy']} calibrated")
        ax.set_xlabel("ppl_ratio (perplexity under the LLM / llm-only's; 1 = LLM quality)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")  # llm-only and the all-skipping points sit far above the rest
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------

def report(runs, prompts, references, args, zoo, doc, grid_source, specs) -> tuple[Path, int]:

    t0 = time.monotonic()
    scores = score_runs(runs, prompts, references, args, zoo)
    print(f"quality scored in {time.monotonic() - t0:.0f} s", flush=True)
    points = build_points(runs, scores, args.temperature)
    comp = comparisons(points)
    # `points` under `results` (where tools read a benchmark's figures) and, for readers of
    # the first sweeps, at the top level too.
    path = write_result("sweep", config_of(args, zoo, prompts, doc, grid_source, specs),
                        {"points": points, "comparisons": comp,
                         "texts": texts_of(runs, len(prompts))}, args.out,
                        top={"points": points, "comparisons": comp})
    png = path.with_suffix(".png")
    plot(png, points, f"{args.zoo} family, {len(prompts)} prompts x {args.max_tokens} tokens, "
                      f"T = {args.temperature:g}, {args.concurrency} in flight, latency "
                      f"{args.latency} ({path.name})")
    print("\npoints (ppl_ratio with its 95% interval; TSR over the skipped tokens):")
    for p in points:
        print(point_line(p))
    print(f"\nwrote {path}\n      {png}")
    failed = sum(p["errors"] or 0 for p in points)
    return path, 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:

        zoo = ensure_zoo(args.zoo, progress=True)
        doc = load_yaml(args.thresholds)
        specs, grid_source = plan_points(args, doc)
        print(f"{len(specs)} points ({grid_source}): {', '.join(s.label for s in specs)}",
              flush=True)
        prompts, references = demo.load_prompts(zoo, args)
        with demo.served_router(args, zoo) as tiers:
            runs = asyncio.run(run_all(tiers.url, prompts, specs, args))
        return report(runs, prompts, references, args, zoo, doc, grid_source, specs)[1]

    return demo.run_guarded("sweep", body)

if __name__ == "__main__":
    sys.exit(main())
