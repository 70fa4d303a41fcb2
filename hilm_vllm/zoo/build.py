"""`hilm zoo build`: tokenizer, one early-exit training run, three exported models, manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from hilm_vllm.zoo.corpus import iter_texts
from hilm_vllm.zoo.recipes import Recipe
from hilm_vllm.zoo.tokenizer import train_tokenizer

HELDOUT_PROMPTS = 64  # prompt/reference pairs written for benchmarks and the demo
PROMPT_TOKENS, REFERENCE_TOKENS = 64, 64  # the demo trains on 128-token windows
TIERS = ("slm", "ilm", "llm")


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one int32 token stream: <bos> doc <eos> <bos> doc <eos> ..."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return np.concatenate([np.asarray(ids + [eos], dtype=np.int32) for ids in encoded])


def export_model(model, depth: int, recipe: Recipe, tokenizer, out: Path) -> int:
    """Save the first `depth` layers (plus embeddings, final norm, head) as a Llama.

    Returns its parameter count."""
    from hilm_vllm.zoo.train import llama_config  # loads torch / vLLM: only when it runs

    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < depth}
    return save_tier(llama_config(recipe, tokenizer, depth), keep, tokenizer, out)


def save_tier(config, state: dict, tokenizer, out: Path) -> int:
    """A Llama of `config` with weights `state`, saved as a Hugging Face directory
    (safetensors, tokenizer, a generation config with its eos): every family's tiers."""
    from transformers import GenerationConfig, LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def heldout_pairs(tokenizer, texts: list[tuple[str, str]], n: int, seed: int) -> list[dict]:
    """Prompt / true-continuation pairs from held-out files, one per file at most."""
    rng = np.random.default_rng(seed)
    pairs = []
    for rel, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        span = PROMPT_TOKENS + REFERENCE_TOKENS
        if len(ids) <= span:
            continue
        s = int(rng.integers(0, len(ids) - span))
        pairs.append({
            "file": rel,
            "prompt": tokenizer.decode(ids[s:s + PROMPT_TOKENS]),
            "reference": tokenizer.decode(ids[s + PROMPT_TOKENS:s + span]),
        })
        if len(pairs) == n:
            break
    return pairs


def build_threads() -> int:
    """Training threads: `HILM_ZOO_THREADS`, else every core. On a machine shared with other
    busy processes fewer threads train faster: torch's threads wait on one another at every op,
    so one descheduled thread stalls them all (measured on 2 cores beside one busy process:
    2 threads fell to 1.4-3k tokens/s, 1 thread kept 6.5-8k)."""
    if env := os.environ.get("HILM_ZOO_THREADS"):
        return max(1, int(env))
    return os.cpu_count() or 1


def build(recipe: Recipe, out: Path, device: str = "cpu", progress: bool = True) -> dict:
    """Build the zoo into `out` (created atomically: a crash leaves no half-built zoo)."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from hilm_vllm.zoo.gates import evaluate_gates  # loads torch / vLLM: only when it runs
    # loads torch / vLLM: only when it runs
    from hilm_vllm.zoo.train import evaluate, llama_config, train

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(build_threads())
    t0 = time.perf_counter()
    train_texts = [t for _, t in iter_texts(heldout=False, max_bytes=recipe.corpus_bytes)]
    heldout = list(iter_texts(heldout=True, max_bytes=max(recipe.corpus_bytes // 8, 400_000)))
    tokenizer = train_tokenizer(train_texts, recipe.vocab_size)
    stream = encode_stream(tokenizer, train_texts)
    heldout_stream = encode_stream(tokenizer, [t for _, t in heldout])
    prep_s = time.perf_counter() - t0

    model = LlamaForCausalLM(llama_config(recipe, tokenizer, recipe.num_layers))
    bar = tqdm(total=recipe.steps * recipe.batch_size * recipe.seq_len, unit="tok",
               unit_scale=True, desc=f"zoo {recipe.name}", disable=not progress)
    with bar:
        stats = train(model, stream, recipe, device, bar)
    t_eval = time.perf_counter()
    metrics = evaluate(model, heldout_stream, recipe)
    gates = evaluate_gates(model, heldout_stream, recipe)
    eval_s = time.perf_counter() - t_eval

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    depths = dict(zip(TIERS, (recipe.slm_layers, recipe.ilm_layers, recipe.num_layers)))
    params = {t: export_model(model, d, recipe, tokenizer, tmp / t) for t, d in depths.items()}
    pairs = heldout_pairs(tokenizer, heldout, HELDOUT_PROMPTS, recipe.seed)
    (tmp / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    manifest = {
        "key": recipe.key(),
        "recipe": dataclasses.asdict(recipe),
        "models": {t: {"path": t, "layers": depths[t], "parameters": params[t]} for t in TIERS},
        "corpus": {"source": "python standard library (PSF licence)",
                   "python": platform.python_version(), "train_tokens_available": int(len(stream)),
                   "heldout_tokens": int(len(heldout_stream)), "heldout_files": len(heldout)},
        "training": {"tokens": stats.tokens, "seconds": round(stats.seconds, 1),
                     "prep_seconds": round(prep_s, 1), "eval_seconds": round(eval_s, 1),
                     "final_train_loss": round(stats.final_loss, 4),
                     "device": device, "threads": torch.get_num_threads(),
                     "torch": torch.__version__},
        **metrics,
        "gates": gates,
        "heldout_prompts": len(pairs),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest
