"""Helpers of the verifier tests: a served tier, reference models in transformers, drafting."""

from __future__ import annotations

import contextlib
import functools

import torch

from hilm_vllm.launch import TierProcess
from hilm_vllm.sampling import SamplingSpec, processed_probs

ENGINE_FLAGS = ["--dtype", "float32", "--block-size", "32", "--kv-cache-memory-bytes", "64M",
                "--enforce-eager", "--max-model-len", "1024", "--port", "0", "--metrics-port", "0"]
SESSION_TTL_S = 10.0  # short, so expiry can be tested over the wire; longer than any idle gap


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
