"""Recipes for the demo model family: one Llama trained with early-exit losses, whose first
layers are saved as the SLM and ILM (LayerSkip-style), so SLM < ILM < LLM share a tokenizer
and form a quality ladder from a single run. The random-weight large-vocabulary families
(`vocab32k`, `vocab128k`) are built by random_family.py from the `RandomRecipe`s here;
`get_recipe` knows both kinds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass

from hilm_vllm.zoo.shape import check_shape

# Bump when the build's output format or training code changes meaning: it is part of the
# cache key, so stale zoos are rebuilt rather than silently reused.
# 2: the manifest gained "gates" (AUC, Spearman, risk-vs-skip of every uncertainty gate).
ZOO_FORMAT = 2


@dataclass(frozen=True)
class Recipe:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # the LLM's depth
    num_heads: int
    head_dim: int  # must be in vLLM's CPU attention set: 32, 64, 80, 96, 112, 128, ...
    slm_layers: int  # depth of the SLM exit
    ilm_layers: int  # depth of the ILM exit
    exit_loss_weight: float  # weight of each early-exit loss (LayerSkip uses ~0.25)
    seq_len: int
    batch_size: int
    train_tokens: int
    lr: float
    warmup_steps: int
    corpus_bytes: int  # training text read from the stdlib, at most
    eval_windows: int  # held-out windows for the manifest's losses and acceptances
    max_position_embeddings: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_shape(self.head_dim, self.slm_layers, self.ilm_layers, self.num_layers)

    @property
    def steps(self) -> int:
        return max(1, self.train_tokens // (self.batch_size * self.seq_len))

    def with_seed(self, seed: int) -> Recipe:
        return dataclasses.replace(self, seed=seed)

    def key(self) -> str:
        """Cache key: the recipe, the format, and the Python minor version (the corpus is
        the running interpreter's standard library, which differs between versions)."""
        blob = json.dumps(
            {"recipe": dataclasses.asdict(self), "format": ZOO_FORMAT,
             "python": list(sys.version_info[:2])},
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


RECIPES: dict[str, Recipe] = {
    # One 1.24M-parameter Llama (hidden 128, 6 layers, 4 heads of 32) with exits at layers 1 and
    # 3, trained on 10M tokens (~15 min on 2 idle AVX2 cores at ~11.5k tokens/s).
    #
    # Chosen so that the uncertainty mechanism exists (DESIGN.md: a gate with AUC >= 0.7 for
    # SLM->LLM rejection). The earlier recipe (hidden 256, 8 layers, vocab 2048, 1.6M tokens) was
    # flat: held-out loss ~4.2 nats, 73% of drafts at u >= 0.95, perturbed-u AUC 0.52. Measured
    # at equal model size (hidden 128, 6 layers, SLM 1 / ILM 3, 3M tokens; perturbed-u AUC for
    # SLM->LLM / SLM->ILM rejection):
    #   vocab 512, exit weight 0.25   0.63 / 0.62
    #   vocab 320, exit weight 0.25   0.67 / 0.66
    #   vocab 320, exit weight 1.0    0.68 / 0.68   (6M tokens: 0.70 / 0.69)
    #   vocab 272, exit weight 1.0    0.73 / 0.72
    # What makes it: a near-byte-level vocabulary (the 256 bytes, 7 specials and 9 merges, the
    # indentation runs and `self`) turns much of the text into tokens a 1-layer model can be
    # sure of (the rest of an identifier or keyword, closing brackets), so the SLM is confident
    # and right often enough for its confidence to mean something; a 1-layer SLM against a
    # 6-layer LLM keeps the gap where the SLM is unsure; a full-weight early-exit loss makes the
    # SLM sharper without costing the LLM (3M tokens: LLM loss 1.955 vs 1.963 at weight 0.25);
    # and a small, fast model sees 10M tokens (half an epoch of the library) in the budget.
    # More tokens still help (vocab 320: +0.02 AUC from 3M to 6M tokens).
    "demo": Recipe(
        name="demo", vocab_size=272, hidden_size=128, intermediate_size=352, num_layers=6,
        num_heads=4, head_dim=32, slm_layers=1, ilm_layers=3, exit_loss_weight=1.0,
        seq_len=128, batch_size=32, train_tokens=10_000_000, lr=2e-3, warmup_steps=30,
        corpus_bytes=30_000_000, eval_windows=64, max_position_embeddings=2048,
    ),
    # Seconds to build: real weights for tests that need a working model, not quality.
    "tiny": Recipe(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
        num_heads=2, head_dim=32, slm_layers=1, ilm_layers=2, exit_loss_weight=0.25,
        seq_len=128, batch_size=8, train_tokens=120_000, lr=3e-3, warmup_steps=10,
        corpus_bytes=1_500_000, eval_windows=8, max_position_embeddings=2048,
    ),
}


def recipe_names() -> list[str]:
    """Every family name, trained (RECIPES) and random-weight (RANDOM_RECIPES): the choices of
    `--recipe`, `--zoo` and `zoo:<name>/<tier>`."""
    return sorted(RECIPES.keys() | RANDOM_RECIPES.keys())


def get_recipe(name: str) -> Recipe | RandomRecipe:
    """A trained recipe, or a random-weight one (random_family.py): `isinstance(r, RandomRecipe)`
    tells them apart, and `ensure_zoo` builds each its own way."""
    if name in RECIPES:
        return RECIPES[name]
    if name in RANDOM_RECIPES:
        return RANDOM_RECIPES[name]
    raise ValueError(f"unknown zoo recipe {name!r}; choose one of {recipe_names()}")


# Bump when the build's output changes meaning: part of the cache key, so stale families are
# rebuilt rather than silently reused.
RANDOM_FORMAT = 1


@dataclass(frozen=True)
class RandomRecipe:
    """A random-weight family: its architecture, the tokenizer's corpus budget and the two
    knobs that make random models usable for plumbing (`logit_std`, `deep_layer_scale`)."""

    name: str
    vocab_size: int
    corpus_bytes: int  # tokenizer training text read from the stdlib, at most
    logit_std: float  # std of each logit (i.i.d. normal): sets the entropy
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3  # the LLM's depth
    num_heads: int = 4
    head_dim: int = 32  # vLLM's CPU attention set: 32, 64, 80, ... (not 16)
    slm_layers: int = 1
    ilm_layers: int = 2
    deep_layer_scale: float = 0.2  # o_proj/down_proj of layers >= slm_layers: tier correlation
    init_std: float = 0.02
    max_position_embeddings: int = 2048
    seq_len: int = 128  # held-out window length of the manifest's measurements
    eval_windows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_shape(self.head_dim, self.slm_layers, self.ilm_layers, self.num_layers)
        if self.vocab_size < 1024:
            raise ValueError(f"vocab_size={self.vocab_size}: a random family is for large "
                             f"vocabularies (the trained recipes cover small ones)")
        if self.logit_std <= 0 or self.init_std <= 0 or self.deep_layer_scale < 0:
            raise ValueError("logit_std and init_std must be > 0, deep_layer_scale >= 0")

    def with_seed(self, seed: int) -> RandomRecipe:
        return dataclasses.replace(self, seed=seed)

    def key(self) -> str:
        """Cache key: the recipe, the format, and the Python minor version (the tokenizer's
        corpus is the running interpreter's standard library)."""
        blob = json.dumps(
            {"recipe": dataclasses.asdict(self), "kind": "random", "format": RANDOM_FORMAT,
             "python": list(sys.version_info[:2])},
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


RANDOM_RECIPES: dict[str, RandomRecipe] = {
    # 32,000 tokens (Llama 2, Mistral): CI's large-vocabulary family. BPE reaches 32,000 on
    # ~4 MB of the library (3 MB stops at 31,573); 8 MB leaves a margin. ~8.4-8.7M parameters
    # per model, 98% embedding and head (35 MB each). logit_std 4.5: entropy ~3.4 nats.
    "vocab32k": RandomRecipe(name="vocab32k", vocab_size=32_000, corpus_bytes=8_000_000,
                             logit_std=4.5),
    # 128,256 tokens (Llama 3): the benchmark's. The whole training split (~25 MB) reaches
    # ~110k BPE tokens; the rest are fill entries. ~33M parameters per model (~132 MB).
    # logit_std 5.0: entropy ~3.4 nats (a larger vocabulary needs larger logits for the same
    # peakiness).
    "vocab128k": RandomRecipe(name="vocab128k", vocab_size=128_256, corpus_bytes=30_000_000,
                              logit_std=5.0),
}
