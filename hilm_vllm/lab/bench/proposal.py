"""How much acceptance the drafter's truncated proposal costs, and how many bytes it saves.

    hilm bench proposal                          # demo family, the default grid
    hilm bench proposal --zoo vocab32k --zoo-also vocab128k

Speculative sampling accepts a token drawn from q with probability min(1, p(x) / q(x)), so a
block's expected per-token acceptance is alpha = sum_x min(p(x), q(x)) (Leviathan et al.), for
any proposal q the verifier knows exactly. For every held-out window of the family it runs the
LLM (p) and the SLM (q) with transformers in float32, takes the rows of the reference
continuation (the positions a drafter drafts), applies the request's transform (--temperature,
no top-k / top-p, what a user sends by default) to both, and computes alpha exactly (no sampled
tokens, so no seed noise) for the untruncated q and for q truncated as the drafter truncates it
(`sampling.truncate`: at most `cap` entries holding mass >= 1 - eps, float16 weights) over the
grid --caps x --eps. Same windows, same rows for every cell.

Writes bench/results/proposal-<UTC>.json: config, git_commit, machine, and under `results`, per
family (`families.<name>`): `vocab_size`, `rows`, `alpha_untruncated`, and `grid`, a list of
{cap, eps, alpha, alpha_ratio (alpha / alpha_untruncated), entries (mean entries a row keeps),
bytes_per_row (6 x entries: int32 id + float16 weight)}; `default` (the drafter's defaults,
`DrafterSettings`) with its `alpha_ratio`; and `smallest_within_1pct`: the cell with the fewest
bytes whose alpha_ratio >= 0.99. A PNG plots alpha_ratio against bytes per row per eps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.zoo import ensure_zoo

BYTES_PER_ENTRY = 6  # int32 id + float16 weight (sampling.pack_row)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "model family (its SLM drafts, its LLM verifies)")
    p.add_argument("--zoo-also", default="", help="more families, comma-separated")
    p.add_argument("--caps", default="8,16,32,64,128,256,0",
                   help="entry caps to try, 0 = none (default: %(default)s)")
    p.add_argument("--eps", default="0,1e-4,1e-3,1e-2",
                   help="tail masses to drop (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0)")
    p.add_argument("--windows", type=int, default=48,
                   help="held-out windows per family (default: 48)")
    p.add_argument("--tokens", type=int, default=32,
                   help="reference tokens scored per window (default: 32)")
    return p.parse_args(argv)


def alpha(p, q) -> float:
    """Mean over rows of sum_x min(p(x), q(x)): p, q [N, V] (torch, rows summing to 1)."""
    return float(p.double().minimum(q.double()).sum(-1).mean())


def grid_rows(p, q, caps: list[int], eps_list: list[float]) -> list[dict]:
    """alpha of every truncation of q in the grid, against p (both [N, V] processed rows)."""
    # loads torch / vLLM: only when it runs
    from hilm_vllm.sampling import Truncation, truncated_probs

    base = alpha(p, q)
    out = []
    for eps in eps_list:
        for cap in caps:
            dense, _, weights = truncated_probs(q, Truncation(cap, eps))
            entries = float((weights > 0).sum(-1).double().mean())
            a = alpha(p, dense)
            out.append({"cap": cap, "eps": eps, "alpha": round(a, 6),
                        "alpha_ratio": round(a / base, 6), "entries": round(entries, 2),
                        "bytes_per_row": round(BYTES_PER_ENTRY * entries, 1)})
    return out


def smallest_within(grid: list[dict], ratio: float = 0.99) -> dict | None:
    """The cell with the fewest bytes per row whose alpha_ratio >= `ratio`."""
    ok = [g for g in grid if g["alpha_ratio"] >= ratio]
    return min(ok, key=lambda g: (g["bytes_per_row"], -g["alpha_ratio"])) if ok else None


def rows_of(zoo, windows: int, tokens: int, temperature: float):
    """(p, q) [N, V]: the LLM's and SLM's processed rows at the reference positions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # loads torch / vLLM: only when it runs
    from hilm_vllm.sampling import SamplingSpec, processed_probs

    tok = AutoTokenizer.from_pretrained(zoo.llm)
    llm = AutoModelForCausalLM.from_pretrained(zoo.llm, dtype=torch.float32).eval()
    slm = AutoModelForCausalLM.from_pretrained(zoo.slm, dtype=torch.float32).eval()
    spec = SamplingSpec(temperature)
    ps, qs = [], []
    with torch.inference_mode():
        for row in zoo.heldout_prompts(windows):
            prompt = tok(row["prompt"])["input_ids"]
            ref = tok(row["reference"], add_special_tokens=False)["input_ids"][:tokens]
            if not ref:
                continue
            ids = torch.tensor([prompt + ref])
            rows = slice(len(prompt) - 1, len(prompt) - 1 + len(ref))
            ps.append(processed_probs(llm(input_ids=ids).logits[0, rows].float(), spec))
            qs.append(processed_probs(slm(input_ids=ids).logits[0, rows].float(), spec))
    return torch.cat(ps), torch.cat(qs)


def measure_family(name: str, args) -> dict:
    from hilm_vllm.drafter.core import DrafterSettings  # loads torch / vLLM: only when it runs

    zoo = ensure_zoo(name)
    p, q = rows_of(zoo, args.windows, args.tokens, args.temperature)
    caps = [int(c) for c in args.caps.split(",")]
    eps_list = [float(e) for e in args.eps.split(",")]
    d = DrafterSettings().truncation
    grid = grid_rows(p, q, sorted(set(caps) | {d.cap}), sorted(set(eps_list) | {d.eps}))
    default = next(g for g in grid if g["cap"] == d.cap and g["eps"] == d.eps)
    vocab = json.loads((zoo.llm / "config.json").read_text())["vocab_size"]
    return {"vocab_size": vocab, "rows": int(p.shape[0]),
            "alpha_untruncated": round(alpha(p, q), 6), "grid": grid, "default": default,
            "smallest_within_1pct": smallest_within(grid)}


def plot(families: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
    for ax, (name, fam) in zip(axes[0], families.items()):
        for eps in sorted({g["eps"] for g in fam["grid"]}):
            cells = sorted((g for g in fam["grid"] if g["eps"] == eps),
                           key=lambda g: g["bytes_per_row"])
            ax.plot([g["bytes_per_row"] for g in cells], [g["alpha_ratio"] for g in cells],
                    marker="o", label=f"eps {eps:g}")
        ax.axhline(0.99, color="grey", ls="--", lw=1)
        ax.scatter([fam["default"]["bytes_per_row"]], [fam["default"]["alpha_ratio"]],
                   s=120, facecolors="none", edgecolors="red", label="default")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per drafted token's q (6 per entry)")
        ax.set_ylabel("acceptance / untruncated")
        ax.set_title(f"{name} (V = {fam['vocab_size']:,})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [args.zoo, *filter(None, args.zoo_also.split(","))]
    families = {}
    for name in names:
        print(f"{name}: scoring {args.windows} windows x {args.tokens} tokens", flush=True)
        families[name] = fam = measure_family(name, args)
        d, s = fam["default"], fam["smallest_within_1pct"]
        print(f"  V={fam['vocab_size']:,} rows={fam['rows']} alpha={fam['alpha_untruncated']:.4f}"
              f"  default cap {d['cap']} eps {d['eps']:g}: ratio {d['alpha_ratio']:.4f}, "
              f"{d['bytes_per_row']:.0f} B/row; smallest within 1%: "
              f"{s and (s['cap'], s['eps'], s['bytes_per_row'])}")
    config = {k: v for k, v in vars(args).items() if k != "out"} | {"families": names}
    path = write_result("proposal", config, {"families": families}, args.out)
    plot(families, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
