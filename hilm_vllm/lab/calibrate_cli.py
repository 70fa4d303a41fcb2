"""`hilm calibrate`: fit the routing thresholds of a model family (U-HLM's threshold_calc, plus
a monotone model, every gate's AUC and thresholds from a stated target).

    hilm calibrate --family demo                  # launches the four tiers it needs
    hilm calibrate --slm-drafter H:P --ilm-drafter H:P --ilm-verifier H:P --llm-verifier H:P
    hilm calibrate --family demo --risk-budget 0.05          # or t1=0.02,t2=0.05,t_ilm=0.05
    hilm calibrate --family demo --target-tr 0.2             # t2 sends 20% of tokens to the LLM
    hilm calibrate --family demo --from-records r.npz --risk-budget 0.2   # refit, no tiers

Three drafter -> verifier pairs run on the family's held-out prompts: SLM -> ILM (T1),
SLM -> LLM (T2) and ILM -> LLM (the ILM's own threshold), the ILM drafting on a drafter tier
of its own. Every token is verified, one token per round: the drafter drafts x with (g, q), the
verifier accepts it with min(1, p(x)/q(x)) and returns p(x) and its next token (the bonus
token after an accept, the correction after a reject), which both sides then continue from.

Why 1-token blocks: the context of each record is then exactly the verifier's own sampling
path (speculative sampling is exact), so the records are an unbiased sample of the contexts the
verifier generates. With k-token blocks, positions after the first in a block are reached only
through accepted tokens, whose distribution is min(p, q) / sum min(p, q) rather than p: those
contexts lean towards the easy ones and would bias the fit towards acceptance.

Gates (--gate): a drafter session measures one gate (its OpenSession's uncertainty config), so
`--gate all` (the default) runs the pass once per gate: perturbed, entropy, var-entropy,
max-prob. Seeds are the same in every pass. Per gate and pair it records g, beta =
max(0, 1 - p(x)/q(x)), accepted and p(x) < q(x), and fits
  - U-HLM's line beta = a*g + b with its rules risk-averse -b/a and risk-prone (Delta - b)/a
    (kept as a record: on flat models they leave [0, 1]);
  - a monotone model of beta against g (isotonic regression; calibration.isotonic_fit);
  - the gate's AUC for rejection, beta as a soft label (calibration.rejection_auc).
The SLM's gate is the one with the highest mean AUC over SLM -> ILM and SLM -> LLM (t1 and t2
both compare the SLM's u); the ILM's, the highest AUC on ILM -> LLM.

Thresholds, always in [0, 1] (tokens with g <= t are skipped, i.e. not sent to that verifier):
  --rule risk-budget (default): the largest t whose skipped tokens have expected beta <= EPS
      by the monotone model (--risk-budget, default 0.1; TSR >= 1 - EPS on these data);
  --rule risk-averse / risk-prone: U-HLM's line, clipped into [0, 1] (with a warning);
  --target-tr X: t2 is the threshold at which a share X of the SLM's tokens goes to the LLM.
t1 is at most t2 (the router skips u <= t1 whatever t2 is, so a larger t1 would skip tokens the
t2 target sends to the LLM). When no threshold meets the target the YAML says why
(`operating_points.<t>.note`) and holds the nearest usable one.

Outputs:
  engine_configs/thresholds-<family>.yaml   t1, t2, t_ilm, the gates and why, every fit;
  bench/results/calibration-<family>-<UTC>.json   config, per gate and pair: fits, bins, AUC;
  bench/results/calibration-<family>-<UTC>.png    rejection rate against g per gate and pair,
                                                  the line and the monotone model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hilm_vllm.launch import TierProcess, exit_on_sigterm
from hilm_vllm.lab.calibration import (best_gate, binned_rates, calibrate_pair,
                                       rejection_probability, step_edges)
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.lab.benchjson import git_commit, write_result
from hilm_vllm.zoo import find_zoo

# CPU-friendly engine flags for the tiers this command launches.
DEFAULT_ENGINE_ARGS = ("--dtype float32 --block-size 32 --kv-cache-memory-bytes 128M "
                       "--enforce-eager --max-model-len 1024")
# The drafter's gates (hilm_vllm.uncertainty.Gate; not imported here: it pulls in torch).
GATES = ("perturbed", "entropy", "var-entropy", "max-prob")
DEFAULT_RISK_BUDGET = 0.1
TR_TOLERANCE = 0.01  # a target TR counts as met within 1 percentage point


@dataclass(frozen=True)
class Pair:
    key: str  # threshold name in the YAML
    name: str  # "drafter->verifier"
    drafter: str  # model tier that drafts (on an slm-tier server)
    verifier: str  # model tier that verifies (on a verifier-tier server)


PAIRS = (Pair("t1", "slm->ilm", "slm", "ilm"), Pair("t2", "slm->llm", "slm", "llm"),
         Pair("t_ilm", "ilm->llm", "ilm", "llm"))
PAIR_BY_KEY = {p.key: p for p in PAIRS}


def risk_budgets(text: str) -> dict[str, float]:
    """`0.05` (every threshold) or `t1=0.02,t2=0.05,t_ilm=0.05` (unnamed ones: the default)."""
    text = text.strip()
    try:
        if "=" not in text:
            out = dict.fromkeys(PAIR_BY_KEY, float(text))
        else:
            out = dict.fromkeys(PAIR_BY_KEY, DEFAULT_RISK_BUDGET)
            for part in text.split(","):
                key, value = (s.strip() for s in part.split("="))
                if key not in PAIR_BY_KEY:
                    raise argparse.ArgumentTypeError(
                        f"unknown threshold {key!r}: use t1, t2, t_ilm")
                out[key] = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or t1=EPS,t2=EPS,t_ilm=EPS, got {text!r}") from None
    for key, eps in out.items():
        if not 0 <= eps <= 1:
            raise argparse.ArgumentTypeError(f"{key}: a risk budget is in [0, 1], got {eps}")
    return out


def unit_interval(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1], got {x}")
    return x


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit uncertainty thresholds T1, T2, T_ILM for a model family",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--family", default="demo", help="zoo recipe of the models (default: demo)")
    for role in ("slm-drafter", "ilm-drafter", "ilm-verifier", "llm-verifier"):
        p.add_argument(f"--{role}", metavar="HOST:PORT",
                       help=f"use this running {role.replace('-', ' ')} instead of launching one")
    p.add_argument("--from-records", metavar="PATH.npz", type=Path,
                   help="refit records saved by --records instead of running tiers")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (default: 64)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per prompt (default: 48)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i runs with seed+i")
    p.add_argument("--gate", "--uncertainty-gate", dest="gate", default="all",
                   choices=[*GATES, "all"],
                   help="gate(s) to calibrate; all: one pass per gate, the best AUC is chosen "
                        "(default: %(default)s)")
    p.add_argument("--rule", choices=["risk-budget", "risk-averse", "risk-prone"],
                   default="risk-budget",
                   help="how t1, t2, t_ilm are chosen (every fit records U-HLM's two rules) "
                        "(default: %(default)s)")
    p.add_argument("--risk-budget", type=risk_budgets, default=None, metavar="EPS",
                   help="largest expected rejection among skipped tokens: EPS for all, or "
                        f"t1=EPS,t2=EPS,t_ilm=EPS (default: {DEFAULT_RISK_BUDGET})")
    p.add_argument("--target-tr", type=unit_interval, default=None, metavar="X",
                   help="t2 such that a share X of the SLM's tokens goes to the LLM (u > t2); "
                        "t1 and t_ilm still follow --rule")
    p.add_argument("--uncertainty-samples", type=int, default=20, help="K")
    p.add_argument("--theta-max", type=float, default=2.0)
    p.add_argument("--perturbation", choices=["uniform", "grid"], default="uniform")
    p.add_argument("--concurrency", type=int, default=4, help="prompts in flight per pair")
    p.add_argument("--engine-args", default=DEFAULT_ENGINE_ARGS,
                   help="engine flags of launched tiers (default: %(default)s)")
    p.add_argument("--out", help="YAML path (default: engine_configs/thresholds-<family>.yaml)")
    p.add_argument("--results-dir", default="bench/results")
    p.add_argument("--records", metavar="PATH.npz",
                   help="also save every per-token record (g, p(x), q(x), accepted) per gate "
                        "and pair")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(calibrate_family(args))


def gates_of(args) -> tuple[str, ...]:
    return GATES if args.gate == "all" else (args.gate,)


def budgets_of(args) -> dict[str, float]:
    return args.risk_budget or dict.fromkeys(PAIR_BY_KEY, DEFAULT_RISK_BUDGET)


# ---- records ------------------------------------------------------------------------------------

@dataclass
class Records:
    """Per-token calibration records of one gate on one pair."""

    u: list[float] = field(default_factory=list)  # the gate's value g
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
            q_x = float(t.probs[t.ids == t.token_id][0] / t.probs.sum())  # weights -> law
            reply = await verifier.verify(v.session_id, pos, [t.token_id],
                                          [(t.ids, t.probs)],
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
                      progress, gate: str) -> Records:
    from hilm_vllm.drafter.client import DrafterClient  # loads torch / vLLM: only when it runs
    from hilm_vllm.verifier.client import VerifierClient  # loads torch / vLLM: only when it runs

    limit = asyncio.Semaphore(args.concurrency)
    uncertainty = uncertainty_config(args, gate)

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
    from hilm_vllm.sampling import SamplingSpec  # loads torch / vLLM: only when it runs

    return SamplingSpec(args.temperature, args.top_k, args.top_p, seed=args.seed + i)


def uncertainty_config(args, gate: str):
    from hilm_vllm.uncertainty import UncertaintyConfig  # loads torch / vLLM: only when it runs

    return UncertaintyConfig(gate, args.uncertainty_samples, args.theta_max, args.perturbation)


# ---- tiers ------------------------------------------------------------------------------------

ROLES = {"slm_drafter": ("slm", "slm"), "ilm_drafter": ("slm", "ilm"),
         "ilm_verifier": ("ilm", "ilm"), "llm_verifier": ("llm", "llm")}  # role: (tier, model)


@contextlib.contextmanager
def tiers(args):
    """Addresses of the four roles: the given ones, else tiers launched for the family."""

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


FIELDS = ("u", "p_x", "q_x", "accepted")


def save_records(path: Path, records: dict[str, dict[str, Records]]) -> None:
    """records[gate][pair] -> PATH.npz with arrays `<gate>/<pair>/<field>` (and `.../prompts`)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for gate, by_pair in records.items():
        for name, rec in by_pair.items():
            arrays |= {f"{gate}/{name}/{f}": np.asarray(getattr(rec, f)) for f in FIELDS}
            arrays[f"{gate}/{name}/prompts"] = np.asarray(rec.prompts)
    np.savez_compressed(path, **arrays)


def load_records(path: Path, default_gate: str = "perturbed") -> dict[str, dict[str, Records]]:
    """PATH.npz from save_records (files of the older `<pair>/<field>` layout: `default_gate`)."""
    import numpy as np

    out: dict[str, dict[str, Records]] = {}
    with np.load(path) as data:
        for key in data.files:
            parts = key.split("/")
            gate, name, f = parts if len(parts) == 3 else (default_gate, *parts)
            rec = out.setdefault(gate, {}).setdefault(name, Records())
            if f == "prompts":
                rec.prompts = int(data[key])
            else:
                setattr(rec, f, data[key].tolist())
    return out


# ---- fits and thresholds ------------------------------------------------------------------------

@dataclass(eq=False)
class PairResult:
    """One gate on one pair: the calibration and what the JSON records of it."""

    gate: str
    pair: str
    cal: object  # calibration.PairCalibration
    bins: list  # calibration.Bin, non-empty ones
    prompts: int
    tokens: int
    p_lt_q: int
    accepted: int

    def summary(self) -> dict:
        return {"gate": self.gate, **self.cal.summary(), "prompts": self.prompts,
                "tokens": self.tokens, "p_lt_q": self.p_lt_q, "accepted": self.accepted,
                "bins": [asdict(b) for b in self.bins]}


def plot_edges(gate: str, num_samples: int):
    """Bins of the plot: u's 1/K steps for the perturbed gate, 20 equal bins otherwise."""
    import numpy as np

    return step_edges(num_samples) if gate == "perturbed" else np.linspace(0, 1, 21)


def fit_pair(rec: Records, num_samples: int, gate: str = "perturbed",
             pair: str = "") -> PairResult:
    """A gate's records on a pair -> line, monotone model, AUC, bins, counts."""
    import numpy as np

    if not rec.u:
        raise ValueError("no records")
    u, p_x, q_x = np.array(rec.u, float), np.array(rec.p_x, float), np.array(rec.q_x, float)
    accepted = np.array(rec.accepted, bool)
    cal = calibrate_pair(u, p_x, q_x, accepted)
    bins = binned_rates(u, accepted, rejection_probability(p_x, q_x),
                        plot_edges(gate, num_samples))
    return PairResult(gate, pair, cal, [b for b in bins if b.count], rec.prompts, len(rec.u),
                      int(np.sum(p_x < q_x)), int(accepted.sum()))


def _auc(r: PairResult) -> float:
    return 0.5 if math.isnan(r.cal.auc) else r.cal.auc


def choose_gates(results: dict[str, dict[str, PairResult]]) -> dict[str, dict]:
    """results[gate][pair] -> {"slm": {gate, why}, "ilm": {gate, why}}: the SLM's gate by the
    mean AUC over its two pairs (t1 and t2 both compare its u), the ILM's by ILM -> LLM."""

    out = {}
    for model, names in (("slm", ("slm->ilm", "slm->llm")), ("ilm", ("ilm->llm",))):
        score = {g: sum(_auc(results[g][n]) for n in names) / len(names) for g in results}
        gate = best_gate(score)
        what = ("mean AUC over slm->ilm and slm->llm" if model == "slm" else "AUC on ilm->llm")
        figures = ", ".join(f"{g} {score[g]:.3f}" for g in sorted(score, key=score.get,
                                                                  reverse=True))
        why = (f"highest {what} ({figures})" if len(score) > 1
               else f"the only gate calibrated ({what} {score[gate]:.3f})")
        out[model] = {"gate": gate, "auc": round(score[gate], 6), "why": why}
    return out


def operating_points(args, results: dict[str, dict[str, PairResult]],
                     choice: dict[str, dict]) -> dict:
    """The point of each threshold key (calibration.OperatingPoint), t1 <= t2 enforced."""
    from hilm_vllm.lab.calibration import (OperatingPoint, Rule, risk_budget_point, rule_point,
                                       target_tr_point)

    budgets = budgets_of(args)
    points: dict[str, OperatingPoint] = {}
    for pair in PAIRS:
        cal = results[choice[pair.drafter]["gate"]][pair.name].cal
        if pair.key == "t2" and args.target_tr is not None:
            points[pair.key] = target_tr_point(cal.monotone, args.target_tr, TR_TOLERANCE)
        elif args.rule == "risk-budget":
            points[pair.key] = risk_budget_point(cal.monotone, budgets[pair.key])
        elif cal.linear is None:
            point = risk_budget_point(cal.monotone, budgets[pair.key])
            points[pair.key] = OperatingPoint(
                point.threshold, False, point.target, point.skipped, point.risk,
                point.risk_observed, f"no {args.rule} rule: {cal.linear_error}; used the risk "
                f"budget instead: {point.note}")
        else:
            points[pair.key] = rule_point(cal.linear.thresholds.pick(Rule(args.rule)),
                                          cal.monotone, args.rule)
    t1, t2 = points["t1"], points["t2"]
    if t1.threshold > t2.threshold:
        model = results[choice["slm"]["gate"]]["slm->ilm"].cal.monotone
        share, risk, observed = model.skip_curve()
        j = int((model.values <= t2.threshold).sum()) - 1
        note = (f"lowered to t2 = {t2.threshold:.4g} from {t1.threshold:.4g} ({t1.note}): the "
                f"router skips every u <= t1, so a t1 above t2 would skip tokens that t2 sends "
                f"to the LLM. The ILM band (t1, t2] is empty")
        points["t1"] = OperatingPoint(t2.threshold, t1.met, t1.target,
                                      float(share[j]) if j >= 0 else 0.0,
                                      float(risk[j]) if j >= 0 else None,
                                      float(observed[j]) if j >= 0 else None, note)
    return points


def thresholds_doc(args, results: dict[str, dict[str, PairResult]], json_path: Path) -> dict:
    """The YAML as a document (`thresholds_file(...).to_doc()`)."""
    return thresholds_file(args, results, json_path).to_doc()


def thresholds_file(args, results: dict[str, dict[str, PairResult]], json_path: Path):
    """The YAML: t1, t2, t_ilm (in [0, 1]), the gates and why, operating points, fits."""
    from hilm_vllm.codec import ThresholdsFile  # loads torch / vLLM: only when it runs

    choice = choose_gates(results)
    points = operating_points(args, results, choice)
    budgets = budgets_of(args)
    tf = ThresholdsFile(
        Thresholds(*(round(points[key].threshold, 6) for key in ("t1", "t2", "t_ilm"))),
        uncertainty_config(args, choice["slm"]["gate"]),
        uncertainty_config(args, choice["ilm"]["gate"]), args.family, args.rule)
    report = {"risk_budget": budgets if args.rule == "risk-budget" else None,
              "target_tr": args.target_tr,
              "gate_choice": choice,
            "auc": {g: {n: _round(r.cal.auc) for n, r in by_pair.items()}
                    for g, by_pair in results.items()},
            "sampling": {"temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p},
            "operating_points": {
                key: {"pair": PAIR_BY_KEY[key].name,
                      "gate": choice[PAIR_BY_KEY[key].drafter]["gate"]}
                | {k: _round(v) for k, v in points[key].summary().items()}
                for key in PAIR_BY_KEY},
            "fits": {pair.name: fit_doc(results[choice[pair.drafter]["gate"]][pair.name])
                     for pair in PAIRS},
            "results": str(json_path)}
    tf = replace(tf, report=report)
    return replace(tf, report=report | {"warnings": threshold_warnings(tf.to_doc())})


def _round(v):
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    return v


def fit_doc(r: PairResult) -> dict:
    """A pair's fit in the YAML: U-HLM's line and rules (flat, as before), AUC, monotone model."""
    lin = r.cal.linear.summary() if r.cal.linear is not None else {}
    return ({"gate": r.gate, "auc": _round(r.cal.auc), "auc_observed": _round(r.cal.auc_observed)}
            | {k: _round(v) for k, v in lin.items()}
            | ({"linear_error": r.cal.linear_error} if r.cal.linear is None else {})
            | {"delta": _round(r.cal.delta), "acceptance": _round(r.cal.acceptance),
               "mean_beta": _round(r.cal.mean_beta), "tokens": r.tokens,
               "monotone": [{k: _round(v) for k, v in b.items()}
                            for b in r.cal.monotone.blocks()]})


def threshold_warnings(doc: dict) -> list[str]:
    """What a router would do with these thresholds that is probably not intended."""
    out = []
    for key, point in doc["operating_points"].items():
        if not point["met"]:
            out.append(f"{key} ({point['pair']}, {point['target']}): {point['note']}")
        elif point["skipped"] == 0:
            out.append(f"{key} ({point['pair']}): skips no token: {point['note']}")
    for model, c in doc["gate_choice"].items():
        if c["auc"] < 0.6:
            out.append(f"the {model.upper()}'s best gate ({c['gate']}) has AUC {c['auc']:.3f} "
                       f"< 0.6 for rejection: it routes nearly at random, whatever its "
                       f"thresholds")
    for name, fit in doc["fits"].items():
        if fit.get("a") is not None and fit["a"] <= 0:
            out.append(f"{name}: slope a = {fit['a']:.3f} <= 0, the line does not predict "
                       f"rejection")
    if doc["t2"] <= doc["t1"]:
        out.append(f"t2 = {doc['t2']:.4g} <= t1 = {doc['t1']:.4g}: no token routes to the ILM")
    if doc["ilm_uncertainty"]["gate"] != "perturbed":
        out.append(f"t_ilm was fitted with the {doc['ilm_uncertainty']['gate']} gate: start the "
                   f"ILM tier with --uncertainty-gate {doc['ilm_uncertainty']['gate']} (the "
                   f"router does not send the ILM a gate)")
    return out


def write_yaml(path: Path, tf) -> None:
    """Write a `codec.ThresholdsFile` with its header (`codec.read_thresholds` reads it)."""
    from hilm_vllm.codec import write_thresholds  # loads torch / vLLM: only when it runs

    doc = tf.to_doc()

    header = (f"# Uncertainty thresholds of the {doc['family']} family, written by "
              f"`hilm calibrate` on {dt.date.today()} (git {git_commit()}); rerun it, do not "
              f"edit.\n# Router: u <= t1 -> keep (skip); t1 < u <= t2 -> ILM; u > t2 -> LLM. "
              f"The ILM forwards to the LLM when its own u > t_ilm.\n"
              f"# u is the gate in `uncertainty` (the router sends it to the drafter); t_ilm's "
              f"is `ilm_uncertainty`. Thresholds are in [0, 1]: `rule` says how they were "
              f"chosen,\n# `operating_points` what each does on the calibration data (skipped "
              f"share, expected rejection among skipped tokens) and why when a target is not "
              f"met.\n# `fits` keeps U-HLM's line per pair (risk_averse = -b/a, risk_prone = "
              f"(delta - b)/a, may leave [0, 1]) beside the monotone model and the gate's AUC.\n")
    write_thresholds(path, tf, header)


def plot(path: Path, results: dict[str, dict[str, PairResult]], args,
         doc: dict | None = None) -> None:
    """Rows: gates; columns: pairs. Observed rejection rate per bin, mean beta, U-HLM's line,
    the monotone model, and the chosen thresholds on the chosen gates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gates = list(results)
    names = [p.name for p in PAIRS if p.name in results[gates[0]]]
    fig, axes = plt.subplots(len(gates), len(names), figsize=(5 * len(names), 3.6 * len(gates)),
                             sharey=True, squeeze=False)
    for row, gate in enumerate(gates):
        for col, name in enumerate(names):
            ax, r = axes[row][col], results[gate][name]
            centers = [(b.lo + b.hi) / 2 for b in r.bins]
            ax.scatter(centers, [b.rejection_rate for b in r.bins],
                       s=[10 + 100 * b.count / r.tokens for b in r.bins],
                       label="observed rejection rate (size = tokens)")
            ax.plot(centers, [b.mean_beta for b in r.bins], "x", label="mean beta")
            line = np.linspace(0, 1, 50)
            if r.cal.linear is not None:
                fit = r.cal.linear.fit
                ax.plot(line, fit.a * line + fit.b, "k-", lw=1,
                        label=f"linear: {fit.a:.3f} g + {fit.b:.3f} (R² {fit.r2:.3f})")
            m = r.cal.monotone
            xs = np.concatenate([[0.0], m.values, [1.0]])
            ax.step(xs, m.predict(np.clip(xs, m.values[0], None)), where="post", color="C3",
                    lw=1.5, label="monotone (isotonic)")
            if doc is not None:
                for key, point in doc["operating_points"].items():
                    if point["pair"] == name and point["gate"] == gate:
                        ax.axvline(point["threshold"], color="gray", ls="--",
                                   label=f"{key} = {point['threshold']:.3f} ({point['target']})")
            ax.set(title=f"{name}, {gate}: AUC {r.cal.auc:.3f} ({r.tokens} tokens)",
                   xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))
            ax.legend(fontsize=6)
            if row == len(gates) - 1:
                ax.set_xlabel("gate value g (u for perturbed)")
            if col == 0:
                ax.set_ylabel("rejection rate")
    fig.suptitle(f"{args.family}: rejection against uncertainty", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ------------------------------------------------------------------------------

async def record_all(args, prompts: list[str]) -> dict[str, dict[str, Records]]:
    from tqdm import tqdm

    records: dict[str, dict[str, Records]] = {}
    with tiers(args) as addresses:
        for gate in gates_of(args):
            for pair in PAIRS:
                with tqdm(total=len(prompts) * args.tokens, desc=f"{gate} {pair.name}",
                          unit="tok") as bar:
                    records.setdefault(gate, {})[pair.name] = await record_pair(
                        *pair_addresses(pair, addresses), prompts, args, bar, gate)
    return records


def fit_all(records: dict[str, dict[str, Records]], args) -> dict[str, dict[str, PairResult]]:
    results: dict[str, dict[str, PairResult]] = {}
    for gate, by_pair in records.items():
        for pair in PAIRS:
            rec = by_pair.get(pair.name)
            try:
                if rec is None:
                    raise ValueError("no records")
                results.setdefault(gate, {})[pair.name] = fit_pair(
                    rec, args.uncertainty_samples, gate, pair.name)
            except ValueError as e:
                n = 0 if rec is None else len(rec.u)
                raise SystemExit(f"error: {gate} {pair.name}: cannot calibrate {n} records "
                                 f"({e}): use more --prompts/--tokens") from e
    return results


async def calibrate_family(args) -> int:

    zoo_root = None
    if args.from_records is not None:
        records = load_records(args.from_records)
        if args.gate != "all":
            records = {g: r for g, r in records.items() if g == args.gate}
        if not records:
            raise SystemExit(f"error: {args.from_records} holds no records of gate {args.gate}")
    else:

        zoo = find_zoo(args.family)
        if zoo is None:
            raise SystemExit(f"error: the {args.family!r} zoo is not built: run "
                             f"`hilm zoo build --recipe {args.family}` first")
        zoo_root = str(zoo.root)
        prompts = [p["prompt"] for p in zoo.heldout_prompts(args.prompts)]
        records = await record_all(args, prompts)
    if args.records:
        save_records(Path(args.records), records)
    results = fit_all(records, args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k != "func"} | {"zoo": zoo_root}
    json_path = write_result(
        f"calibration-{args.family}", config,
        {"gates": {g: {n: r.summary() for n, r in by_pair.items()}
                   for g, by_pair in results.items()}},
        Path(args.results_dir))
    out = Path(args.out or f"engine_configs/thresholds-{args.family}.yaml")
    tf = thresholds_file(args, results, json_path)
    doc = tf.to_doc()
    # The JSON also records the choice and the points (the YAML may be rewritten later).
    full = json.loads(json_path.read_text())
    full["results"] |= {k: doc[k] for k in ("gate_choice", "operating_points", "t1", "t2",
                                            "t_ilm", "rule", "risk_budget", "target_tr",
                                            "warnings")}
    json_path.write_text(json.dumps(full, indent=2) + "\n")
    png = json_path.with_suffix(".png")
    try:
        plot(png, results, args, doc)
    except ImportError:  # matplotlib comes with the [bench] extra; serving needs none
        print("no plot: matplotlib is not installed (pip install 'hilm-vllm[bench]')")
        png = None
    write_yaml(out, tf)
    report(results, doc)
    print(f"wrote {out}, {json_path}" + (f", {png}" if png else ""))
    return 0


def report(results: dict[str, dict[str, PairResult]], doc: dict) -> None:
    print(f"{'gate':<12} {'pair':<9} {'tokens':>6} {'AUC':>6} {'a':>8} {'b':>8} "
          f"{'averse':>8} {'prone':>8} {'accept':>6}")
    for gate, by_pair in results.items():
        for name, r in by_pair.items():
            lin = r.cal.linear
            cols = ([f"{v:8.3f}" for v in (lin.fit.a, lin.fit.b, lin.thresholds.risk_averse,
                                           lin.thresholds.risk_prone)]
                    if lin is not None else ["-".rjust(8)] * 4)
            print(f"{gate:<12} {name:<9} {r.tokens:>6} {r.cal.auc:6.3f} {' '.join(cols)} "
                  f"{r.cal.acceptance:6.3f}")
    for model, c in doc["gate_choice"].items():
        print(f"{model} gate: {c['gate']} ({c['why']})")
    for key, p in doc["operating_points"].items():
        risk = "-" if p["risk"] is None else f"{p['risk']:.3f}"
        print(f"{key} = {p['threshold']:.4g} ({p['pair']}, {p['gate']}, {p['target']}): skips "
              f"{100 * p['skipped']:.1f}%, expected rejection among them {risk}"
              + ("" if p["met"] else "  [target not met]"))
    for warning in doc["warnings"]:
        print(f"warning: {warning}")
