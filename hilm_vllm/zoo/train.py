"""Training with early-exit losses (LayerSkip-style) and the held-out measurements.

One Llama is trained with its ordinary loss plus a loss at the SLM and ILM depths, taken through
the shared final norm and LM head. Its first `slm_layers` and `ilm_layers` layers, with that
norm and head, are then complete models in their own right.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hilm_vllm.zoo.recipes import Recipe


@dataclass(frozen=True)
class TrainStats:
    tokens: int
    seconds: float
    final_loss: float


def llama_config(recipe: Recipe, tokenizer, num_layers: int, tied: bool = True):
    """The Llama config of one tier (`num_layers` deep), float32; `tied`: the head shares the
    embeddings (the trained families; the random ones untie it). Any recipe with the model
    fields (hidden, intermediate, heads, head_dim, vocab, positions) will do."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
        head_dim=recipe.head_dim, max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=10000.0, tie_word_embeddings=tied, torch_dtype="float32",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def exit_logits(model, input_ids: torch.Tensor, depths: tuple[int, ...]) -> list[torch.Tensor]:
    """Logits at each depth in `depths` (the last is the full model), one forward.

    input_ids: [B, L] -> each returned tensor [B, L, V].
    """
    out = model.model(input_ids=input_ids, output_hidden_states=True)
    hidden = out.hidden_states  # [num_layers + 1] x [B, L, H]; the last is already normed
    n = model.config.num_hidden_layers
    result = []
    for d in depths:
        h = hidden[d] if d == n else model.model.norm(hidden[d])
        result.append(model.lm_head(h))
    return result


def sample_windows(stream: np.ndarray, n: int, length: int, rng: np.random.Generator):
    """n random windows of `length` tokens from the token stream -> [n, length] int64."""
    starts = rng.integers(0, len(stream) - length, size=n)
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]).astype(np.int64))


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _loss(model, batch: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    depths = (recipe.slm_layers, recipe.ilm_layers, recipe.num_layers)
    logits = exit_logits(model, batch[:, :-1], depths)
    target = batch[:, 1:].reshape(-1)
    losses = [F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target) for lg in logits]
    total = losses[-1] + recipe.exit_loss_weight * (losses[0] + losses[1])
    return total, losses[-1]


def train(model, stream: np.ndarray, recipe: Recipe, device: str, progress) -> TrainStats:
    """AdamW with warmup and cosine decay; `progress` is a tqdm-like bar over tokens."""
    model.train().to(device)
    rng = np.random.default_rng(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens_per_step = recipe.batch_size * recipe.seq_len
    start, loss_ema = time.perf_counter(), None
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        batch = sample_windows(stream, recipe.batch_size, recipe.seq_len + 1, rng).to(device)
        total, main = _loss(model, batch, recipe)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = main.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * main.item()
        elapsed = time.perf_counter() - start
        progress.update(tokens_per_step)
        progress.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{(step + 1) * tokens_per_step / elapsed:,.0f}")
    model.eval().cpu()
    return TrainStats(recipe.steps * tokens_per_step, time.perf_counter() - start, float(loss_ema))


@torch.no_grad()
def evaluate(model, heldout: np.ndarray, recipe: Recipe) -> dict:
    """Held-out loss per model and pairwise acceptance sum_x min(p(x), q(x)) at T = 1.

    Acceptance is averaged over every position of `eval_windows` random held-out windows: it is
    the expected probability that one token drafted by the smaller model is accepted by the
    larger one under exact speculative sampling.
    """
    rng = np.random.default_rng(recipe.seed + 1)
    windows = sample_windows(heldout, recipe.eval_windows, recipe.seq_len + 1, rng)
    depths = (recipe.slm_layers, recipe.ilm_layers, recipe.num_layers)
    names = ("slm", "ilm", "llm")
    sums = {n: 0.0 for n in names} | {p: 0.0 for p in ("slm->ilm", "slm->llm", "ilm->llm")}
    for chunk in windows.split(8):
        logits = dict(zip(names, exit_logits(model, chunk[:, :-1], depths)))
        target = chunk[:, 1:].reshape(-1)
        for n, lg in logits.items():
            sums[n] += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target, reduction="sum").item()
        probs = {n: torch.softmax(lg.float(), -1) for n, lg in logits.items()}
        for pair in ("slm->ilm", "slm->llm", "ilm->llm"):
            q, p = (probs[n] for n in pair.split("->"))
            sums[pair] += torch.minimum(p, q).sum(-1).sum().item()
    count = windows.shape[0] * recipe.seq_len
    return {
        "heldout_loss": {n: round(sums[n] / count, 4) for n in names},
        "acceptance": {p: round(sums[p] / count, 4) for p in ("slm->ilm", "slm->llm", "ilm->llm")},
        "eval_tokens": count,
    }
