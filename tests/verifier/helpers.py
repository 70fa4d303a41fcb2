"""Helpers of the verifier tests: a served tier, reference models in transformers, drafting."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from scipy.stats import chisquare

from hilm_vllm.launch import TierProcess
from hilm_vllm.sampling import SamplingSpec, processed_probs

ENGINE_FLAGS = ["--dtype", "float32", "--block-size", "32", "--kv-cache-memory-bytes", "64M",
                "--enforce-eager", "--max-model-len", "1024", "--port", "0", "--metrics-port", "0"]
SESSION_TTL_S = 10.0  # short, so expiry can be tested over the wire; longer than any idle gap
CONTEXT = [0, 306, 295, 85, 85, 14, 94, 299, 287, 402, 227, 94, 30, 23]  # "def foo(x):..." ids


@contextlib.contextmanager
def served(tier: str, model_dir, *extra: str):
    """A healthy `hilm-serve --tier <tier>` on port 0; stopped (and its engine with it) after."""
    proc = TierProcess.start(tier, ["--model", str(model_dir), *ENGINE_FLAGS,
                                    "--session-ttl-s", str(SESSION_TTL_S), *extra])
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@functools.cache
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.inference_mode()
def next_probs(model_dir, ids: list[int], spec: SamplingSpec) -> torch.Tensor:
    """The processed next-token distribution [V] after `ids` (transformers, float32)."""
    logits = hf_model(model_dir)(torch.tensor([ids])).logits[0, -1:]  # [1, V]
    return processed_probs(logits, spec)[0]


@torch.inference_mode()
def greedy_draft(model_dir, ids: list[int], k: int) -> list[int]:
    """k greedy tokens of the model after `ids` (the SLM as a greedy drafter, q one-hot)."""
    out = list(ids)
    for _ in range(k):
        out.append(int(hf_model(model_dir)(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def sparse(probs: torch.Tensor) -> tuple[list[int], list[float]]:
    ids = torch.nonzero(probs > 0).flatten()
    return ids.tolist(), probs[ids].tolist()


def heldout_prompts(zoo, n: int, length: int = 24) -> list[list[int]]:
    """n held-out prompts (BOS + last `length` tokens) on which the SLM's greedy drafts and the
    LLM's greedy tokens part within 8 tokens, so a greedy session sees both accepts and fixes."""
    import json

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(zoo.llm / "tokenizer.json"))
    bos = json.loads((zoo.llm / "config.json").read_text())["bos_token_id"]
    found = []
    for row in zoo.heldout_prompts():
        ids = [bos, *tokenizer.encode(row["prompt"], add_special_tokens=False).ids[-length:]]
        if greedy_draft(zoo.slm, ids, 8) != greedy_draft(zoo.llm, ids, 8):
            found.append(ids)
        if len(found) == n:
            return found
    raise AssertionError(f"only {len(found)} held-out prompts where the SLM and LLM disagree")


def chisquare_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Bins with an expected count under 5 are pooled into one, as the test requires."""
    expected = counts.sum() * p / p.sum()  # float32 rounding: sum(p) = 1 +- 1e-7
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return chisquare(obs[exp > 0], exp[exp > 0]).pvalue


# ---- joint distributions of emitted token sequences (the block exactness tests) ----------------

BLOCK_TARGET = SamplingSpec(temperature=1.0, top_k=5, top_p=0.9)
BLOCK_WRONG = SamplingSpec(temperature=1.25, top_k=5, top_p=0.9)  # the power check's default
BLOCK_DRAFTER = SamplingSpec(temperature=1.5, top_k=24)  # the tiny SLM, flatter and wider than p
JOINT_P_VALUE = 0.001  # a correct verifier passes each chi-square at p-value > this
JOINT_POWER_P_VALUE = 1e-6  # ... and the same counts reject the wrong joint below this


@functools.cache
def _probs(model_dir, context: tuple[int, ...], spec: SamplingSpec) -> np.ndarray:
    return next_probs(model_dir, list(context), spec).double().numpy()


class JointModels:
    """Processed next-token distributions after context + prefix (float64, cached), and joint
    distributions of the next tokens."""

    def __init__(self, zoo, context: list[int]):
        self.zoo, self.context = zoo, tuple(context)

    def p(self, prefix: tuple[int, ...], spec: SamplingSpec = BLOCK_TARGET) -> np.ndarray:
        return _probs(self.zoo.llm, self.context + prefix, spec)

    def slm(self, prefix: tuple[int, ...]) -> np.ndarray:
        return _probs(self.zoo.slm, self.context + prefix, BLOCK_DRAFTER)

    def joint(self, length: int, spec: SamplingSpec = BLOCK_TARGET,
              after: tuple[int, ...] = ()) -> dict[tuple[int, ...], float]:
        """P(t_1..t_length) under `spec` after context + after, over the whole support."""
        out = {(): 1.0}
        for _ in range(length):
            out = {seq + (t,): prob * float(row[t])
                   for seq, prob in out.items()
                   for row in [self.p(after + seq, spec)] for t in np.flatnonzero(row)}
        return out


def check_joint(models: JointModels, sequences: list[tuple[int, ...]],
                after: tuple[int, ...] = (),
                wrong: tuple[SamplingSpec, tuple[int, ...]] | None = None) -> dict:
    """Chi-square of the first 2 and the first 3 tokens of `sequences` against the target's
    joint after context + after: p-value > JOINT_P_VALUE (bins with an expected count under 5
    pooled), and no sequence outside the support. Power: the same counts against a wrong
    joint, `wrong` = (spec, after) (default: the target at T = 1.25), must give a p-value
    < JOINT_POWER_P_VALUE. Returns the p-values."""
    wrong_spec, wrong_after = wrong or (BLOCK_WRONG, after)
    pvalues = {}
    for length in (2, 3):
        seqs = [s[:length] for s in sequences]
        for spec, at, must_pass in ((BLOCK_TARGET, after, True),
                                    (wrong_spec, wrong_after, False)):
            ref = models.joint(length, spec, at)
            keys = sorted(ref)
            index = {k: i for i, k in enumerate(keys)}
            counts = np.zeros(len(keys) + 1)  # the last bin: sequences outside the support
            for s in seqs:
                counts[index.get(s, len(keys))] += 1
            if must_pass:
                assert counts[-1] == 0, f"{int(counts[-1])} emitted {length}-grams have p = 0"
                pvalue = chisquare_pvalue(counts[:-1], np.array([ref[k] for k in keys]))
                pvalues[length] = pvalue
                assert pvalue > JOINT_P_VALUE, f"{length}-grams: p-value {pvalue:.2e}"
            else:
                pvalue = 0.0 if counts[-1] else chisquare_pvalue(
                    counts[:-1], np.array([ref[k] for k in keys]))
                pvalues[f"{length} vs wrong"] = pvalue
                assert pvalue < JOINT_POWER_P_VALUE, \
                    f"power: {length}-grams do not reject {wrong_spec} after {wrong_after}"
    return pvalues
