"""`hilm calibrate`: fit the routing thresholds of a model family (U-HLM's threshold_calc).

    hilm calibrate --family demo                  # launches the four tiers it needs
    hilm calibrate --slm-drafter H:P --ilm-drafter H:P --ilm-verifier H:P --llm-verifier H:P

Three drafter -> verifier pairs run on the family's held-out prompts: SLM -> ILM (T1),
SLM -> LLM (T2) and ILM -> LLM (the ILM's own threshold), the ILM drafting on a drafter tier
of its own. Every token is verified, one token per round: the drafter drafts x with (u, q), the
verifier accepts it with min(1, p(x)/q(x)) and returns p(x) and its next token (the bonus
token after an accept, the correction after a reject), which both sides then continue from.

Why 1-token blocks: the context of each record is then exactly the verifier's own sampling
path (speculative sampling is exact), so the records are an unbiased sample of the contexts the
verifier generates. With k-token blocks, positions after the first in a block are reached only
through accepted tokens, whose distribution is min(p, q) / sum min(p, q) rather than p: those
contexts lean towards the easy ones and would bias the fit towards acceptance.

Per token it records u, beta = max(0, 1 - p(x)/q(x)), accepted, and p(x) < q(x); fits
beta = a*u + b (calibration.calibrate) and writes
  engine_configs/thresholds-<family>.yaml   t1, t2, t_ilm by --rule, and every fit;
  bench/results/calibration-<family>-<UTC>.json   config, fits, bins, counts;
  bench/results/calibration-<family>-<UTC>.png    binned rejection rate against u, fitted lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# CPU-friendly engine flags for the tiers this command launches.
DEFAULT_ENGINE_ARGS = ("--dtype float32 --block-size 32 --kv-cache-memory-bytes 128M "
                       "--enforce-eager --max-model-len 1024")


@dataclass(frozen=True)
class Pair:
    key: str  # threshold name in the YAML
    name: str  # "drafter->verifier"
    drafter: str  # model tier that drafts (on an slm-tier server)
    verifier: str  # model tier that verifies (on a verifier-tier server)


PAIRS = (Pair("t1", "slm->ilm", "slm", "ilm"), Pair("t2", "slm->llm", "slm", "llm"),
         Pair("t_ilm", "ilm->llm", "ilm", "llm"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit uncertainty thresholds T1, T2, T_ILM for a model family",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--family", default="demo", help="zoo recipe of the models (default: demo)")
    for role in ("slm-drafter", "ilm-drafter", "ilm-verifier", "llm-verifier"):
        p.add_argument(f"--{role}", metavar="HOST:PORT",
                       help=f"use this running {role.replace('-', ' ')} instead of launching one")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (default: 64)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per prompt (default: 48)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i runs with seed+i")
    p.add_argument("--rule", choices=["risk-averse", "risk-prone"], default="risk-prone",
                   help="which threshold the YAML's t1/t2/t_ilm take (both are recorded)")
    p.add_argument("--uncertainty-gate", default="perturbed",
                   choices=["perturbed", "entropy", "var-entropy", "max-prob"])
    p.add_argument("--uncertainty-samples", type=int, default=20, help="K")
    p.add_argument("--theta-max", type=float, default=2.0)
    p.add_argument("--perturbation", choices=["uniform", "grid"], default="uniform")
    p.add_argument("--concurrency", type=int, default=4, help="prompts in flight per pair")
    p.add_argument("--engine-args", default=DEFAULT_ENGINE_ARGS,
                   help="engine flags of launched tiers (default: %(default)s)")
    p.add_argument("--out", help="YAML path (default: engine_configs/thresholds-<family>.yaml)")
    p.add_argument("--results-dir", default="bench/results")
    p.add_argument("--records", metavar="PATH.npz",
                   help="also save every per-token record (u, p(x), q(x), accepted) per pair")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(calibrate_family(args))


# ---- records ------------------------------------------------------------------------------------

@dataclass
class Records:
    """Per-token calibration records of one pair."""

    u: list[float] = field(default_factory=list)
    p_x: list[float] = field(default_factory=list)
    q_x: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    prompts: int = 0

    def add(self, u: float, p_x: float, q_x: float, accepted: bool) -> None:
        self.u.append(u)
        self.p_x.append(p_x)
        self.q_x.append(q_x)
        self.accepted.append(accepted)

    def extend(self, other: Records) -> None:
        for name in ("u", "p_x", "q_x", "accepted"):
            getattr(self, name).extend(getattr(other, name))
        self.prompts += other.prompts


async def record_prompt(drafter, verifier, prompt: str, spec, uncertainty, tokens: int,
                        progress) -> Records:
    """Generate `tokens` tokens from `prompt`, every drafted token verified alone."""
    rec = Records(prompts=1)
    d = await drafter.open_session(prompt, spec, uncertainty)
    v = await verifier.open_session(list(d.prompt_token_ids), spec)
    pos, end = d.position, d.position + tokens
    try:
        while pos < end:
            (t,) = (await drafter.draft(d.session_id, pos, 1)).tokens
            q_x = float(t.probs[t.ids == t.token_id][0])
            reply = await verifier.verify(v.session_id, pos, [t.token_id],
                                          [(t.ids.tolist(), t.probs.tolist())],
                                          want_target_probs=True)
            accepted = reply.num_accepted == 1
            rec.add(t.uncertainty, reply.target_probs[0], q_x, accepted)
            if not accepted:
                await drafter.rollback(d.session_id, pos)
            await drafter.append(d.session_id, reply.position - 1, [reply.next_token])
            progress.update(reply.position - pos)
            pos = reply.position
            if d.eos_token_id in ((t.token_id, reply.next_token) if accepted
                                  else (reply.next_token,)):
                break
    finally:
        await drafter.close_session(d.session_id)
        await verifier.close_session(v.session_id)
    return rec


async def record_pair(drafter_address: str, verifier_address: str, prompts: list[str], args,
                      progress) -> Records:
    from hilm_vllm.drafter.client import DrafterClient
    from hilm_vllm.verifier.client import VerifierClient

    limit = asyncio.Semaphore(args.concurrency)
    uncertainty = uncertainty_config(args)

    async def one(i: int, prompt: str) -> Records:
        async with limit:
            return await record_prompt(drafter, verifier, prompt, sampling_spec(args, i),
                                       uncertainty, args.tokens, progress)

    async with DrafterClient(drafter_address, "hilm-calibrate") as drafter, \
            VerifierClient(verifier_address, "hilm-calibrate") as verifier:
        parts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    total = Records()
    for part in parts:
        total.extend(part)
    return total


def sampling_spec(args, i: int):
    from hilm_vllm.sampling import SamplingSpec

    return SamplingSpec(args.temperature, args.top_k, args.top_p, seed=args.seed + i)


def uncertainty_config(args):
    from hilm_vllm.uncertainty import UncertaintyConfig

    return UncertaintyConfig(args.uncertainty_gate, args.uncertainty_samples, args.theta_max,
                             args.perturbation)


# ---- tiers ------------------------------------------------------------------------------------

ROLES = {"slm_drafter": ("slm", "slm"), "ilm_drafter": ("slm", "ilm"),
         "ilm_verifier": ("ilm", "ilm"), "llm_verifier": ("llm", "llm")}  # role: (tier, model)


@contextlib.contextmanager
def tiers(args):
    """Addresses of the four roles: the given ones, else tiers launched for the family."""
    from hilm_vllm.launch import TierProcess, exit_on_sigterm

    exit_on_sigterm()
    launched = {}
    try:
        for role, (tier, model) in ROLES.items():
            if getattr(args, role) is None:
                flags = ["--model", f"zoo:{args.family}/{model}", *shlex.split(args.engine_args),
                         "--port", "0", "--metrics-port", "0"]
                launched[role] = TierProcess.start(tier, flags)
        for proc in launched.values():
            proc.wait_healthy(timeout=600)
        yield {role: getattr(args, role) or launched[role].grpc_address for role in ROLES}
    finally:
        for proc in launched.values():
            proc.stop()


def pair_addresses(pair: Pair, addresses: dict) -> tuple[str, str]:
    return addresses[f"{pair.drafter}_drafter"], addresses[f"{pair.verifier}_verifier"]


# ---- outputs ------------------------------------------------------------------------------------

def save_records(path: Path, records: dict[str, Records]) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"{name}/{field}": np.asarray(getattr(rec, field))
                                 for name, rec in records.items()
                                 for field in ("u", "p_x", "q_x", "accepted")})


def fit_pair(rec: Records, num_samples: int) -> dict:
    """A pair's records -> the JSON/YAML summary (fit, Delta, thresholds, bins, counts)."""
    from dataclasses import asdict

    import numpy as np

    from hilm_vllm.calibration import (binned_rates, calibrate, rejection_probability,
                                       step_edges)

    u, p_x, q_x = np.array(rec.u), np.array(rec.p_x), np.array(rec.q_x)
    accepted = np.array(rec.accepted)
    cal = calibrate(u, p_x, q_x, accepted)
    bins = binned_rates(u, accepted, rejection_probability(p_x, q_x), step_edges(num_samples))
    return {"fit": cal.summary(), "prompts": rec.prompts, "tokens": len(rec.u),
            "p_lt_q": int(np.sum(p_x < q_x)), "accepted": int(accepted.sum()),
            "bins": [asdict(b) for b in bins if b.count]}


def thresholds_doc(args, fits: dict, json_path: Path) -> dict:
    rule = args.rule.replace("-", "_")
    doc = {"family": args.family, "rule": args.rule}
    doc |= {pair.key: round(fits[pair.name]["fit"][rule], 6) for pair in PAIRS}
    doc |= {"uncertainty": {"gate": args.uncertainty_gate, "num_samples": args.uncertainty_samples,
                            "theta_max": args.theta_max, "perturbation": args.perturbation},
            "sampling": {"temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p},
            "fits": {name: {k: round(v, 6) if isinstance(v, float) else v
                            for k, v in f["fit"].items()} | {"tokens": f["tokens"]}
                     for name, f in fits.items()},
            "results": str(json_path)}
    return doc | {"warnings": threshold_warnings(doc)}


def threshold_warnings(doc: dict) -> list[str]:
    """What a router would do with these thresholds that is probably not intended."""
    out = []
    for pair in PAIRS:
        t = doc[pair.key]
        if t < 0:
            out.append(f"{pair.key} = {t:.3f} < 0 ({pair.name}): no token is at or below it")
        elif t >= 1:
            out.append(f"{pair.key} = {t:.3f} >= 1 ({pair.name}): every token is at or below it")
        fit = doc["fits"][pair.name]
        if fit["a"] <= 0:
            out.append(f"{pair.name}: slope a = {fit['a']:.3f} <= 0, u does not predict "
                       f"rejection")
    if doc["t2"] < doc["t1"]:
        out.append(f"t2 = {doc['t2']:.3f} < t1 = {doc['t1']:.3f}: no token routes to the ILM")
    return out


def write_yaml(path: Path, doc: dict) -> None:
    import yaml

    from hilm_vllm.benchjson import git_commit

    header = (f"# Uncertainty thresholds of the {doc['family']} family, written by "
              f"`hilm calibrate` on {dt.date.today()} (git {git_commit()}); rerun it, do not "
              f"edit.\n# Router: u <= t1 -> keep (skip); t1 < u <= t2 -> ILM; u > t2 -> LLM. "
              f"The ILM forwards to the LLM when its own u > t_ilm.\n# t1, t2, t_ilm use "
              f"`rule`; every fit has both rules: risk_averse = -b/a, risk_prone = "
              f"(delta - b)/a.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))


def plot(path: Path, fits: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4), sharey=True)
    for ax, (name, f) in zip(np.atleast_1d(axes), fits.items()):
        centers = [(b["lo"] + b["hi"]) / 2 for b in f["bins"]]
        ax.scatter(centers, [b["rejection_rate"] for b in f["bins"]],
                   s=[10 + 100 * b["count"] / f["tokens"] for b in f["bins"]],
                   label="observed rejection rate (size = tokens)")
        ax.plot(centers, [b["mean_beta"] for b in f["bins"]], "x", label="mean beta")
        fit = f["fit"]
        line = np.linspace(0, 1, 50)
        ax.plot(line, fit["a"] * line + fit["b"], "k-",
                label=f"beta = {fit['a']:.3f} u + {fit['b']:.3f} (R² {fit['r2']:.3f})")
        for rule, style in (("risk_averse", ":"), ("risk_prone", "--")):
            if 0 <= fit[rule] <= 1:
                ax.axvline(fit[rule], color="gray", linestyle=style,
                           label=f"{rule} {fit[rule]:.3f}")
        ax.set(title=f"{args.family}: {name} ({f['tokens']} tokens)", xlabel="u",
               xlim=(-0.03, 1.03))
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("rejection rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command ------------------------------------------------------------------------------

async def calibrate_family(args) -> int:
    from tqdm import tqdm

    from hilm_vllm.benchjson import write_result
    from hilm_vllm.zoo import find_zoo

    zoo = find_zoo(args.family)
    if zoo is None:
        raise SystemExit(f"error: the {args.family!r} zoo is not built: run "
                         f"`hilm zoo build --recipe {args.family}` first")
    prompts = [p["prompt"] for p in zoo.heldout_prompts(args.prompts)]
    with tiers(args) as addresses:
        fits, records = {}, {}
        for pair in PAIRS:
            with tqdm(total=len(prompts) * args.tokens, desc=pair.name, unit="tok") as bar:
                rec = records[pair.name] = await record_pair(*pair_addresses(pair, addresses),
                                                             prompts, args, bar)
            try:
                fits[pair.name] = fit_pair(rec, args.uncertainty_samples)
            except ValueError as e:
                raise SystemExit(f"error: {pair.name}: cannot fit {len(rec.u)} records ({e}): "
                                 f"use more --prompts/--tokens, or a gate with more spread "
                                 f"(e.g. a lower --theta-max)") from e
    if args.records:
        save_records(Path(args.records), records)
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"zoo": str(zoo.root)}
    json_path = write_result(f"calibration-{args.family}", config, {"pairs": fits},
                             Path(args.results_dir))
    plot(json_path.with_suffix(".png"), fits, args)
    out = Path(args.out or f"engine_configs/thresholds-{args.family}.yaml")
    doc = thresholds_doc(args, fits, json_path)
    write_yaml(out, doc)
    for name, f in fits.items():
        fit = f["fit"]
        print(f"{name}: a={fit['a']:.4f} b={fit['b']:.4f} R2={fit['r2']:.4f} "
              f"(binned {fit['r2_binned']:.3f}) delta={fit['delta']:.4f} "
              f"risk-averse={fit['risk_averse']:.4f} risk-prone={fit['risk_prone']:.4f} "
              f"({f['tokens']} tokens)")
    for warning in doc["warnings"]:
        print(f"warning: {warning}")
    print(f"wrote {out}, {json_path}, {json_path.with_suffix('.png')}")
    return 0
