"""Estimate DSI's inputs, `a` and `c`, from real tiers on vLLM, and predict the speedups.

- `a` (acceptance) per tier pair: the target decodes greedily; the drafter scores the target's
  sequence in one forward and we compare its greedy prediction with the target's token at each
  generated position. With M matches and F mismatches, the mean run of matches before a
  mismatch is M / F and `a = 1 - 1/(1 + M/F) = M / (M + F)`: the geometric model's estimate,
  counting the unterminated last run's matches (censored) too.
- `c` per pair: drafter / target latency, both for the first token (TTFT: prefill) and per
  output token (TPOT: decode). Drafting is decoding, so predictions use the TPOT ratio.

Engines run one at a time in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), float32, eager,
without prefix caching so repeated prompts are timed honestly.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from hilm_vllm.lab.dsi.model import is_valid, simulate

TIERS = ("slm", "ilm", "llm")
PAIRS = (("slm", "ilm"), ("slm", "llm"), ("ilm", "llm"))  # (drafter, target)


def acceptance_from_matches(matches: Sequence[bool]) -> float:
    """`a = 1 - 1/(1 + mean run)`, mean run = matches per mismatch."""
    if not matches:
        raise ValueError("no positions to estimate the acceptance rate from")
    hits = sum(bool(m) for m in matches)
    misses = len(matches) - hits
    if misses == 0:
        return 1.0
    return 1.0 - 1.0 / (1.0 + hits / misses)


def argmax_tokens(prompt_logprobs: list) -> list[int | None]:
    """vLLM `prompt_logprobs` rows (dict token -> Logprob, None at position 0) -> the token of
    rank 1 at each position: the model's greedy prediction given the prefix before it."""
    out: list[int | None] = []
    for row in prompt_logprobs:
        out.append(None if row is None else next(t for t, lp in row.items() if lp.rank == 1))
    return out


def predict(c: float, a: float, k_max: int, n_servers: int, S: int, repeats: int,
            seed: int) -> dict:
    """Best-k SI and DSI (valid k only) speedups over non-SI, by the offline model."""
    c = min(max(c, 1e-6), 1.0)  # a drafter measured slower than its target drafts at c = 1
    best_si, best_dsi = (float("inf"), 0), (float("inf"), 0)
    for k in range(1, k_max + 1):
        means = simulate(c, a, k, S, repeats, seed).means()
        best_si = min(best_si, (means["si"], k))
        if is_valid(c, k, n_servers):
            best_dsi = min(best_dsi, (means["dsi"], k))
    out = {"c_used": c, "si_speedup": S / best_si[0], "si_k": best_si[1],
           "dsi_speedup": None, "dsi_k": None}
    if best_dsi[1]:
        out |= {"dsi_speedup": S / best_dsi[0], "dsi_k": best_dsi[1]}
    return out


def _engine(model_dir: Path, max_model_len: int):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, block_size=32,
               kv_cache_memory_bytes=64 << 20, max_model_len=max_model_len, max_num_seqs=4,
               enable_prefix_caching=False, seed=0)


def _timed(llm, prompt, params) -> tuple[float, list[int], list[int]]:
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return time.perf_counter() - start, list(out.prompt_token_ids), list(out.outputs[0].token_ids)


def _greedy(llm, prompts: list, tokens: int,
            rounds: int = 3) -> tuple[float, float, list[tuple[list, list]]]:
    """TTFT and TPOT (seconds), one request at a time: per prompt the best of `rounds` (other
    load on the machine only ever adds time; on 2 busy cores single runs varied 30x), then the
    median over prompts. Also each prompt's (prompt ids, greedy continuation)."""
    from vllm import SamplingParams

    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    full = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    _timed(llm, prompts[0], full)  # warm-up: first calls pay one-off setup
    ttfts, tpots, seqs = [], [], []
    for prompt in prompts:
        t1 = min(_timed(llm, prompt, first)[0] for _ in range(rounds))
        runs = [_timed(llm, prompt, full) for _ in range(rounds)]
        tn, ids, gen = min(runs, key=lambda run: run[0])
        ttfts.append(t1)
        tpots.append(max(tn - t1, 0.0) / (tokens - 1))
        seqs.append((ids, gen))
    return statistics.median(ttfts), statistics.median(tpots), seqs


def _matches(llm, seqs: list[tuple[list, list]]) -> list[bool]:
    """Does the drafter's greedy token equal the target's, at each generated position?"""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # detokenize=False: the research notes saw detokenizing prompt logprobs hang the engine.
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids + gen) for ids, gen in seqs]
    outs = llm.generate(prompts, params, use_tqdm=False)
    hits: list[bool] = []
    for (ids, gen), out in zip(seqs, outs):
        guess = argmax_tokens(out.prompt_logprobs)[len(ids):]
        hits += [g == t for g, t in zip(guess, gen)]
    return hits


def _as_prompt(p):
    from vllm.inputs import TextPrompt, TokensPrompt

    if isinstance(p, dict):
        p = p["prompt"]
    return TextPrompt(prompt=p) if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p))


def measure(models: dict[str, Path], prompts: list, tokens: int, max_model_len: int = 1024,
            rounds: int = 3) -> dict:
    """Latency per tier and (a, c) per pair. Targets go first (llm, ilm, slm) so each drafter
    can score the sequences of the targets above it while its engine is up."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: 1.8 s per engine, not 12
    vprompts = [_as_prompt(p) for p in prompts]
    latency, seqs, hits = {}, {}, {}
    for tier in reversed(TIERS):
        llm = _engine(models[tier], max_model_len)
        try:
            ttft, tpot, seqs[tier] = _greedy(llm, vprompts, tokens, rounds)
            latency[tier] = {"ttft_s": ttft, "tpot_s": tpot}
            for drafter, target in PAIRS:
                if drafter == tier:
                    hits[(drafter, target)] = _matches(llm, seqs[target])
        finally:
            del llm
            gc.collect()
    return {"models": {t: str(models[t]) for t in TIERS}, "prompts": len(prompts),
            "tokens": tokens, "latency": latency, "pairs": _pairs(latency, hits)}


def _pairs(latency: dict, hits: dict) -> dict:
    out = {}
    for drafter, target in PAIRS:
        m = hits[(drafter, target)]
        d, t = latency[drafter], latency[target]
        out[f"{drafter}->{target}"] = {
            "a": acceptance_from_matches(m), "positions": len(m), "matches": int(sum(m)),
            "c_ttft": d["ttft_s"] / t["ttft_s"], "c_tpot": d["tpot_s"] / t["tpot_s"]}
    return out


def add_predictions(report: dict, k_max: int, n_servers: int, S: int, repeats: int,
                    seed: int) -> dict:
    """Attach predicted SI / DSI speedups over non-SI (c = the TPOT ratio) to each pair."""
    for pair in report["pairs"].values():
        pair["prediction"] = predict(pair["c_tpot"], pair["a"], k_max, n_servers, S, repeats,
                                     seed)
    return report
