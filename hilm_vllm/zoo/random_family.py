"""Large-vocabulary model families with RANDOM weights (`vocab32k`, `vocab128k`): for tests and
benchmarks of plumbing and cost, never of quality.

The trained demo family has a 272-token vocabulary, right for the uncertainty mechanism but
blind to everything that grows with the vocabulary: the LM head, sampling, the draft
distributions shipped per token, detokenization. These families have hub-sized vocabularies
(32,000 like Llama 2 and Mistral, for CI; 128,256 like Llama 3, for the benchmark) in the trained
zoo's layout (slm/, ilm/, llm/, manifest.json, heldout.jsonl), so everything that takes a zoo
family takes them: `ensure_zoo("vocab32k")`, `zoo:vocab32k/slm`, `hilm up --family vocab32k`,
`--zoo vocab32k`. Building takes ~15 s (vocab32k) and ~35 s (vocab128k) on 2 cores; nothing is
trained but the tokenizer.

How the family is made, and why:

- Tokenizer: the trained zoo's byte-level BPE, trained on the same standard-library corpus, at
  most `corpus_bytes` of it (BPE training dominates the build). The library's text runs out of
  merges near 110k tokens, so a vocabulary larger than what BPE reaches is filled with vocabulary
  entries without a merge (short ASCII strings, in a fixed order): the models can sample them and
  they decode, the tokenizer never produces them. len(tokenizer) == vocab_size exactly.
- Weights: every tensor N(0, init_std^2) from one generator seeded by the recipe, in name order,
  norms 1 (Hugging Face's Llama init, made explicit so it does not move with transformers).
- Untied LM head: with a random TIED head the residual stream is mostly the input embedding and
  each model's argmax is the token it just read (measured: 56-98% of positions).
- Peaky: the final norm's weight sets each logit's standard deviation to `logit_std` (logits are
  then i.i.d. normal over the vocabulary), for a mean entropy of ~3.4 nats (e^3.4 ~ 30
  plausible tokens, varying by position) instead of a random head's ~ln V (10.3 of 10.4 nats
  at 32k), where every draft distribution is the whole vocabulary.
- Correlated tiers: the SLM and ILM are the LLM's first `slm_layers` / `ilm_layers` layers with
  its final norm and head (early exits, as in the trained family), and the layers after the SLM's
  have their output projections (o_proj, down_proj) scaled by `deep_layer_scale`, so deeper
  layers perturb the SLM's residual stream instead of replacing it. Measured at 32k and logit
  std 4.5: acceptance slm->llm 0.56, ilm->llm 0.68 at scale 0.2; 0.04 and 0.11 at 1.0.

The manifest says `"random": true`; it has the held-out losses, entropies and pairwise
acceptances of these weights (plumbing figures: what to expect of acceptance rates and draft
sizes), and no `gates` section (uncertainty gates of random models mean nothing).

The recipes themselves (`RandomRecipe`, `RANDOM_RECIPES`) are in recipes.py with the trained
ones. This module imports only the standard library at load time; the build imports torch and
transformers when it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
import string
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from hilm_vllm.zoo.recipes import RandomRecipe
from hilm_vllm.zoo.tokenizer import as_transformers, train_bpe
from hilm_vllm.zoo.build import (build_threads, encode_stream, heldout_pairs, save_tier,
                                 HELDOUT_PROMPTS)
from hilm_vllm.zoo.corpus import iter_texts

TIERS = ("slm", "ilm", "llm")
WEIGHTS_NOTE = ("random (seeded, untrained) weights: for plumbing and cost (vocabulary size, "
                "wire size, latency), not for quality")
# Held-out text read for the prompts and measurements: enough files for HELDOUT_PROMPTS prompts of
# 128 tokens (large-vocabulary tokens are long: 400 kB gave 23).
HELDOUT_BYTES = 2_000_000
# Fill entries: ASCII letters and digits, so a sampled fill token decodes to readable text.
FILL_ALPHABET = string.ascii_letters + string.digits


# ---- tokenizer ----------------------------------------------------------------------------

def fill_strings(vocab: Mapping[str, int], n: int) -> list[str]:
    """`n` strings not in `vocab`: ASCII letters and digits, shortest first (two characters,
    then three, ...), in alphabet order. Deterministic; each decodes through the byte-level
    decoder to itself (these characters are their own byte-level symbols)."""
    out: list[str] = []
    for length in itertools.count(2):
        for chars in itertools.product(FILL_ALPHABET, repeat=length):
            s = "".join(chars)
            if s not in vocab:
                out.append(s)
                if len(out) == n:
                    return out
    return out  # unreachable: the product is endless over lengths


def fill_vocab(tok, size: int):
    """A copy of the BPE `tokenizers.Tokenizer` with vocabulary entries (no merges) appended
    until it has `size` tokens: sampled ids decode, encoding is unchanged. Returns
    (tokenizer, how many were added)."""
    from tokenizers import Tokenizer

    have = tok.get_vocab_size(with_added_tokens=True)
    if have >= size:
        return tok, 0
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) != have:
        raise ValueError("expected a BPE vocabulary with ids 0..n-1 holding the special tokens")
    extra = fill_strings(vocab, size - have)
    vocab.update({s: have + i for i, s in enumerate(extra)})
    return Tokenizer.from_str(json.dumps(spec)), len(extra)


def family_tokenizer(recipe: RandomRecipe, texts: list[str]):
    """The family's transformers tokenizer of exactly `recipe.vocab_size` tokens, and
    (BPE tokens, fill tokens)."""

    bpe = train_bpe(texts, recipe.vocab_size)
    trained = bpe.get_vocab_size(with_added_tokens=True)
    filled, added = fill_vocab(bpe, recipe.vocab_size)
    tokenizer = as_transformers(filled)
    if len(tokenizer) != recipe.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {recipe.vocab_size}")
    return tokenizer, trained, added


# ---- weights ------------------------------------------------------------------------------

def norm_scale(recipe: RandomRecipe) -> float:
    """The final norm's weight that makes each logit's std `logit_std`: the normed hidden state
    has norm sqrt(hidden) times this weight, each head row is N(0, init_std^2) i.i.d."""
    return recipe.logit_std / (recipe.init_std * math.sqrt(recipe.hidden_size))


def random_config(recipe: RandomRecipe, tokenizer, num_layers: int):
    """The Llama config of one tier (`num_layers` deep), untied head, float32."""
    from hilm_vllm.zoo.train import llama_config  # loads torch / vLLM: only when it runs

    return llama_config(recipe, tokenizer, num_layers, tied=False)


def _layer(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def random_state_dict(recipe: RandomRecipe, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The LLM's weights from the recipe's seed (see the module doc): name -> float32 tensor.
    `shapes` are the model's parameter shapes; drawn in sorted name order, so the result
    depends on the recipe alone."""
    import torch

    gen = torch.Generator().manual_seed(recipe.seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            w = torch.ones(shape)
        else:
            w = torch.randn(shape, generator=gen) * recipe.init_std
            layer = _layer(name)
            if layer is not None and layer >= recipe.slm_layers and \
                    name.endswith(("o_proj.weight", "down_proj.weight")):
                w *= recipe.deep_layer_scale
        out[name] = w
    out["model.norm.weight"] = torch.full(shapes["model.norm.weight"], norm_scale(recipe))
    return out


def tier_state(state: Mapping, depth: int) -> dict:
    """The first `depth` layers with the embeddings, final norm and head: an early exit."""
    return {k: v for k, v in state.items() if (_layer(k) is None or _layer(k) < depth)}


def export_tier(state: Mapping, depth: int, recipe: RandomRecipe, tokenizer, out: Path) -> int:
    """Save one tier as a Hugging Face Llama directory (safetensors, tokenizer, generation
    config with eos). Returns its parameter count."""

    return save_tier(random_config(recipe, tokenizer, depth), tier_state(state, depth),
                     tokenizer, out)


# ---- measurements -------------------------------------------------------------------------

def measure(model, heldout, recipe: RandomRecipe) -> dict:
    """Held-out loss, mean entropy (nats) per tier and pairwise acceptance sum_x min(p, q) at
    T = 1 (the trained zoo's definition, train.evaluate), over `eval_windows` held-out windows,
    one window at a time (a 128k-vocabulary row is 0.5 MB)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    # loads torch / vLLM: only when it runs
    from hilm_vllm.zoo.train import exit_logits, sample_windows

    rng = np.random.default_rng(recipe.seed + 1)
    windows = sample_windows(heldout, recipe.eval_windows, recipe.seq_len + 1, rng)
    depths = (recipe.slm_layers, recipe.ilm_layers, recipe.num_layers)
    pairs = ("slm->ilm", "slm->llm", "ilm->llm")
    loss = dict.fromkeys(TIERS, 0.0)
    entropy = dict.fromkeys(TIERS, 0.0)
    accept = dict.fromkeys(pairs, 0.0)
    with torch.no_grad():
        for window in windows.split(1):
            logits = dict(zip(TIERS, exit_logits(model, window[:, :-1], depths)))
            target = window[:, 1:].reshape(-1)
            logp = {}
            for t, lg in logits.items():
                logp[t] = torch.log_softmax(lg.reshape(-1, lg.shape[-1]), -1)
                loss[t] += F.nll_loss(logp[t], target, reduction="sum").item()
                entropy[t] += -(logp[t].exp() * logp[t]).sum().item()
            for pair in pairs:
                q, p = (logp[t].exp() for t in pair.split("->"))
                accept[pair] += torch.minimum(p, q).sum().item()
    count = windows.shape[0] * recipe.seq_len
    return {
        "heldout_loss": {t: round(v / count, 4) for t, v in loss.items()},
        "entropy": {t: round(v / count, 4) for t, v in entropy.items()},
        "acceptance": {p: round(v / count, 4) for p, v in accept.items()},
        "eval_tokens": count,
    }


# ---- the build ----------------------------------------------------------------------------

def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"zoo: {message}", file=sys.stderr, flush=True)


def build_random(recipe: RandomRecipe, out: Path, progress: bool = True) -> dict:
    """Build the family into `out` (created atomically: a crash leaves no half-built family)."""
    import platform

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(build_threads())
    t0 = time.perf_counter()
    texts = [t for _, t in iter_texts(heldout=False, max_bytes=recipe.corpus_bytes)]
    heldout = list(iter_texts(heldout=True, max_bytes=HELDOUT_BYTES))
    _say(progress, f"{recipe.name}: training a {recipe.vocab_size:,}-token BPE on "
                   f"{sum(map(len, texts)) / 1e6:.1f} MB of the standard library")
    tokenizer, trained, filled = family_tokenizer(recipe, texts)
    tokenizer_s = time.perf_counter() - t0

    _say(progress, f"{recipe.name}: {trained:,} BPE tokens + {filled:,} fill; random weights")
    llm = LlamaForCausalLM(random_config(recipe, tokenizer, recipe.num_layers)).eval()
    state = random_state_dict(recipe, {k: tuple(v.shape) for k, v in llm.state_dict().items()})
    llm.load_state_dict(state, strict=True)
    heldout_stream = encode_stream(tokenizer, [t for _, t in heldout])
    metrics = measure(llm, heldout_stream, recipe)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    depths = dict(zip(TIERS, (recipe.slm_layers, recipe.ilm_layers, recipe.num_layers)))
    params = {t: export_tier(state, d, recipe, tokenizer, tmp / t) for t, d in depths.items()}
    pairs = heldout_pairs(tokenizer, heldout, HELDOUT_PROMPTS, recipe.seed)
    (tmp / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer_json = (tmp / "llm" / "tokenizer.json").read_bytes()
    manifest = {
        "key": recipe.key(),
        "random": True,
        "weights": WEIGHTS_NOTE,
        "recipe": dataclasses.asdict(recipe),
        "models": {t: {"path": t, "layers": depths[t], "parameters": params[t]} for t in TIERS},
        "tokenizer": {
            "vocab_size": len(tokenizer), "bpe_tokens": trained, "fill_tokens": filled,
            "fill": "vocabulary entries without a merge (ASCII letters and digits): sampled ids "
                    "decode, the tokenizer never produces them",
            "sha256": hashlib.sha256(tokenizer_json).hexdigest(),
        },
        "corpus": {"source": "python standard library (PSF licence)",
                   "python": platform.python_version(),
                   "tokenizer_train_bytes": sum(map(len, texts)),
                   "heldout_tokens": int(len(heldout_stream)), "heldout_files": len(heldout)},
        "build": {"seconds": round(time.perf_counter() - t0, 1),
                  "tokenizer_seconds": round(tokenizer_s, 1),
                  "threads": torch.get_num_threads(), "torch": torch.__version__},
        "logit_norm_weight": round(norm_scale(recipe), 6),
        **metrics,
        "heldout_prompts": len(pairs),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _say(progress, f"{recipe.name}: built in {time.perf_counter() - t0:.0f} s")
    return manifest
